"""The satellite side of the MQTT protocol: a reference client for tests, benchmarks and embedders.

``MqttPeer`` is an MQTT connection that outlives broker restarts: a fixed client id, a persistent
session (the broker keeps its subscriptions and queues QoS 1 messages while it is away), reconnects
with backoff, and buffers what is published while offline to send it in order afterwards — what a
microphone satellite does with the audio it captures during an outage. ``stream_audio`` publishes
samples as protocol frames paced like a microphone.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .mqtt_protocol import FLAG_END, FLAG_START, Topics, build_audio_frame


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    #: time.monotonic() when it arrived
    t: float
    retain: bool = False


class MqttPeer:
    """``async with MqttPeer(host, port, client_id=..., subscriptions=[("duplex/+/events/#", 1)]) as p:``"""

    def __init__(self, host: str, port: int, *, client_id: str, subscriptions: Iterable[tuple[str, int]] = (),
                 username: str | None = None, password: str | None = None, clean_session: bool = False,
                 backoff_max_s: float = 0.5, tls_ca: str | None = None) -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.username, self.password = username, password
        self.clean_session = clean_session
        #: CA bundle: connect with TLS and verify the broker against it
        self.tls_ca = tls_ca
        self.backoff_max_s = backoff_max_s
        #: everything received, across reconnections
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connects: list[float] = []
        self._out: deque[tuple[str, bytes, int]] = deque()
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "MqttPeer":
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mqtt-peer:{self.client_id}")
        done, _ = await asyncio.wait({self._task, asyncio.ensure_future(self.connected.wait())}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()
        if not self.connected.is_set():
            raise TimeoutError(f"could not connect to {self.host}:{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def publish(self, topic: str, payload: bytes | str, qos: int = 0) -> None:
        """Queue a message; it goes out now if connected, else after the next reconnect."""
        self._out.append((topic, payload.encode() if isinstance(payload, str) else payload, qos))
        self._wake.set()

    def command(self, topics: Topics, site: str, **fields: Any) -> None:
        """A JSON command (``"v": 1`` added), QoS 1."""
        self.publish(topics.command(site), json.dumps({"v": 1, **fields}), qos=1)

    @property
    def pending(self) -> int:
        return len(self._out)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything published so far has gone out."""
        async with asyncio.timeout(timeout):
            while self._out:
                self._sent.clear()
                await self._sent.wait()

    async def _run(self) -> None:
        import aiomqtt

        delay = 0.05
        while True:
            try:
                client = aiomqtt.Client(self.host, self.port, identifier=self.client_id, clean_session=self.clean_session,
                                        username=self.username, password=self.password, keepalive=10, timeout=5,
                                        tls_params=aiomqtt.TLSParameters(ca_certs=self.tls_ca) if self.tls_ca else None,
                                        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])  # no Nagle delays
                client.pending_calls_threshold = 100_000
                async with client:
                    self.connects.append(time.monotonic())
                    delay = 0.05
                    if self.subscriptions:
                        await client.subscribe(self.subscriptions)
                    self.connected.set()
                    tasks = {asyncio.create_task(self._receive(client)), asyncio.create_task(self._send(client))}
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        self.connected.clear()
                        for t in tasks:
                            t.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                    for t in done:
                        if not t.cancelled() and t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
            except aiomqtt.MqttCodeError as exc:
                if getattr(exc.rc, "value", exc.rc) in (4, 5, 134, 135):
                    raise
            except aiomqtt.MqttError:
                pass
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    async def _receive(self, client: Any) -> None:
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, (bytes, bytearray)) else str(m.payload).encode()
            self.inbox.put_nowait(Received(str(m.topic), bytes(payload), time.monotonic(), bool(m.retain)))

    async def _send(self, client: Any) -> None:
        while True:
            while not self._out:
                self._wake.clear()
                await self._wake.wait()
            topic, payload, qos = self._out[0]
            await client.publish(topic, payload, qos=qos)
            self._out.popleft()
            self._sent.set()


async def stream_audio(
    peer: MqttPeer, topics: Topics, site: str, samples: np.ndarray, rate: int = 16000, *,
    frame_ms: float = 20.0, speed: float = 1.0, seq: int = 0, start: bool = True, end: bool = False,
    t0_s: float = 0.0, qos: int = 0, sent_at: list[float] | None = None,
) -> int:
    """Publish ``samples`` (float32 mono) as frames of ``frame_ms``, each released when its last
    sample would have been captured (``speed`` 2 = twice real time; 0 = as fast as possible).
    Returns the next sequence number. Timestamps start at ``t0_s``. ``qos`` 1 makes the broker keep
    audio for a reconnecting service. ``sent_at`` collects the monotonic time each frame was handed
    to the peer."""
    n = max(1, int(rate * frame_ms / 1000))
    t0 = time.monotonic()
    frames = range(0, len(samples), n)
    for k, i in enumerate(frames):
        chunk = samples[i : i + n]
        if speed > 0:
            due = t0 + (i + len(chunk)) / rate / speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        flags = (FLAG_START if start and k == 0 else 0) | (FLAG_END if end and i + n >= len(samples) else 0)
        frame = build_audio_frame(seq, chunk, rate, timestamp_us=int((t0_s + i / rate) * 1e6), flags=flags)
        peer.publish(topics.audio_in(site), frame, qos=qos)
        if sent_at is not None:
            sent_at.append(time.monotonic())
        seq += 1
    return seq
