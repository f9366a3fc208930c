"""The satellites and the subscriber of ``duplex bench mqtt``, in a process of their own.

A real satellite runs on another machine; in the same process as the service its MQTT client
(paho, in Python) would compete with recognition for the GIL and inflate what MQTT seems to cost.
This module imports no models. The parent talks to it over a pipe; all times are
``time.monotonic()``, which is one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .mqtt_client import MqttPeer, stream_audio
from .mqtt_protocol import FLAG_END, AckEvent, FinalEvent, Topics, build_audio_frame


def main(conn: Connection, host: str, port: int, prefix: str, username: str | None, password: str | None) -> None:
    """Child entry point: serve the parent's requests until it says stop."""
    asyncio.run(_serve(conn, host, port, Topics(prefix), username, password))


async def _serve(conn: Connection, host: str, port: int, topics: Topics, username: str | None, password: str | None) -> None:
    creds = {"username": username, "password": password}
    finals: dict[str, list[tuple[int, float, float]]] = {}  # site -> (seq, end of speech, arrival)
    acks: set[str] = set()
    p = topics.prefix
    async with MqttPeer(host, port, client_id="duplex-bench-satellite", clean_session=True, **creds) as sat, \
            MqttPeer(host, port, client_id="duplex-bench-listener", clean_session=True,
                     subscriptions=[(f"{p}/+/events/final", 1), (f"{p}/+/events/ack", 1)], **creds) as sub:

        async def listen() -> None:
            while True:
                r = await sub.inbox.get()
                if r.topic.endswith("/events/final"):
                    ev = FinalEvent.model_validate_json(r.payload)
                    finals.setdefault(ev.site, []).append((ev.seq, ev.end, r.t))
                else:
                    acks.add(AckEvent.model_validate_json(r.payload).id)

        async def drain(site: str, seq: int, timeout: float) -> bool:
            """End the site's stream (flush), then a command: its ack comes after everything before it."""
            sat.publish(topics.audio_in(site), build_audio_frame(seq, b"", 16000, flags=FLAG_END), qos=1)
            sat.command(topics, site, type="set_mode", mode="captions", id=f"drain-{site}")
            deadline = time.monotonic() + timeout
            while f"drain-{site}" not in acks:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True

        listener = asyncio.create_task(listen())
        loop = asyncio.get_running_loop()
        conn.send(("ready",))
        try:
            while True:
                req: tuple[Any, ...] = await loop.run_in_executor(None, conn.recv)
                if req[0] == "stop":
                    return
                if req[0] == "stream":  # [(site, samples)], all at once, at real-time pace
                    sent: dict[str, list[float]] = {site: [] for site, _ in req[1]}
                    seqs = await asyncio.gather(*(stream_audio(sat, topics, site, np.asarray(a, np.float32), speed=1.0,
                                                               sent_at=sent[site]) for site, a in req[1]))
                    conn.send(("streamed", sent, {site: q for (site, _), q in zip(req[1], seqs)}))
                elif req[0] == "drain":  # {site: next seq}, timeout
                    t0 = time.monotonic()
                    ok = await asyncio.gather(*(drain(site, seq, req[2]) for site, seq in req[1].items()))
                    drain_s = time.monotonic() - t0
                    await asyncio.sleep(0.2)  # the ack can overtake the last final, which leaves through the outbox
                    conn.send(("drained", dict(zip(req[1], ok)), drain_s, {site: finals.get(site, []) for site in req[1]}))
        finally:
            listener.cancel()
