#!/usr/bin/env python3
"""How soon the agent answers: the in-process API and MQTT side by side, with the real models.

    .venv/bin/python examples/reply_latency.py [--questions N] [--repeat R] [--json PATH]

Recorded questions (``agent/data/scenarios/audio/q_*.wav``, espeak-ng voices) are streamed at
real-time pace in 20 ms blocks, 0.3 s of silence before and 1 s after each, alternately

* into a conversation through the embedding API (``DuplexAgent``; the consumer is the task reading
  ``events()``), and
* as protocol frames through a private Mosquitto to ``duplex serve``'s ``MqttService`` and back to
  a subscriber. The satellite and the subscriber run in a process of their own (``spawn``), as they
  would on their own machine; the service and the API agent share this process and one set of
  models.

For each question it reports, at the consumer: **final transcript → first agent audio frame**
(negative when the agent began to answer before the final transcript came out: the turn is taken on
the stable partial words and the voice's silence, and the recogniser's final pass can finish after
the first clause has been synthesised), and **end of speech → first agent audio frame** (from the
moment the block holding the question's last sample was handed over). After the first audio the
agent is interrupted and the conversation reset, so every question starts a fresh dialogue.
The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

RATE = 16000
BLOCK = 320
QUESTIONS = ROOT / "agent" / "data" / "scenarios" / "audio"
SITE = "latency"


# ------------------------------------------------------------------ the satellite's process


def satellite(conn: Any, port: int) -> None:
    asyncio.run(_satellite(conn, port))


async def _satellite(conn: Any, port: int) -> None:
    from agent.mqtt_client import MqttPeer, stream_audio
    from agent.mqtt_protocol import FLAG_START, AckEvent, FinalEvent, Topics, parse_audio_frame

    topics = Topics()
    p = topics.prefix
    state: dict[str, Any] = {}
    acks: set[str] = set()
    async with MqttPeer("127.0.0.1", port, client_id="latency-satellite", clean_session=True) as sat, \
            MqttPeer("127.0.0.1", port, client_id="latency-listener", clean_session=True,
                     subscriptions=[(f"{p}/{SITE}/events/final", 1), (f"{p}/{SITE}/events/ack", 1),
                                    (f"{p}/{SITE}/audio/out", 0)]) as sub:

        async def listen() -> None:
            while True:
                r = await sub.inbox.get()
                if r.topic.endswith("/events/final"):
                    if "final" not in state:
                        state["final"] = (r.t, FinalEvent.model_validate_json(r.payload).text)
                elif r.topic.endswith("/events/ack"):
                    acks.add(AckEvent.model_validate_json(r.payload).id)
                elif "audio" not in state and parse_audio_frame(r.payload).header.flags & FLAG_START:
                    state["audio"] = r.t  # the first frame of a reply

        async def command(**kw: Any) -> None:
            sat.command(topics, SITE, **kw)
            while kw["id"] not in acks:
                await asyncio.sleep(0.01)

        listener = asyncio.create_task(listen())
        loop = asyncio.get_running_loop()
        seq, k = 0, 0
        conn.send(("ready",))
        try:
            while True:
                req = await loop.run_in_executor(None, conn.recv)
                if req[0] == "stop":
                    return
                samples = np.asarray(req[1], np.float32)
                state.clear()
                sent: list[float] = []
                streaming = asyncio.create_task(stream_audio(sat, topics, SITE, samples, seq=seq, start=seq == 0,
                                                             sent_at=sent))
                deadline = time.monotonic() + len(samples) / RATE + 20
                while not ("audio" in state and "final" in state) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                seq = await streaming
                k += 1
                await command(type="interrupt", id=f"i{k}")
                await command(type="reset", id=f"r{k}")
                conn.send(("answered", sent, state.get("final"), state.get("audio")))
        finally:
            listener.cancel()


# ------------------------------------------------------------------------- this process


class ApiConsumer:
    """Reads the agent's events for the whole run (as an application would), noting for the current
    question when its final and the first audio of a new reply arrived."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.got: dict[str, Any] | None = None
        self.last_reply = 0
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        from agent.session import AgentAudio
        from streaming.frames import FinalText

        async for ev in self.agent.events():
            got = self.got
            if isinstance(ev, AgentAudio):
                if got is not None and "audio" not in got and ev.reply > self.last_reply:
                    got["audio"] = time.monotonic()
                self.last_reply = max(self.last_reply, ev.reply)
            elif isinstance(ev, FinalText) and got is not None and "final" not in got:
                got["final"] = (time.monotonic(), ev.text)


async def ask_api(agent: Any, consumer: ApiConsumer, samples: np.ndarray) -> tuple[list[float], Any, float | None]:
    got: dict[str, Any] = {}
    consumer.got = got
    sent: list[float] = []
    t0 = time.monotonic()
    for i in range(0, len(samples), BLOCK):
        chunk = samples[i : i + BLOCK]
        await asyncio.sleep(max(0.0, t0 + (i + len(chunk)) / RATE - time.monotonic()))
        await agent.push_audio(chunk)
        sent.append(time.monotonic())
    deadline = time.monotonic() + 20
    while not ("audio" in got and "final" in got) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    consumer.got = None
    await agent.interrupt()
    await agent.reset()
    return sent, got.get("final"), got.get("audio")


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=5, help="how many of the recorded questions (default 5)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the questions (default 2)")
    ap.add_argument("--json", type=Path, help="also write every measurement as JSON")
    args = ap.parse_args()

    from agent.api import DuplexAgent
    from agent.config import load_config
    from agent.mosquitto import Mosquitto
    from agent.service import BrokerSettings, MqttService
    from agent.session import SharedModels
    from streaming.audio_file import read_audio

    load_before = os.getloadavg()
    cfg = load_config(use_user_default=False, environ={})
    files = sorted(QUESTIONS.glob("q_*.wav"))[: args.questions]
    clips = {f.stem: read_audio(f) for f in files}
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; {os.cpu_count()} CPUs; "
          f"loading {cfg.models.asr}, {cfg.models.llm}, {cfg.models.tts} ...", flush=True)
    models = await asyncio.to_thread(SharedModels.load, cfg, llm=True)
    rows: list[dict[str, Any]] = []
    with Mosquitto() as broker:
        svc = MqttService(cfg, BrokerSettings.from_url(broker.url), models=models, sites=[SITE], client_id="latency-service",
                          dialogue=True)
        svc_task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.connected.wait(), 15)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with model threads
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=satellite, args=(child, broker.port), daemon=True)
        proc.start()
        assert (await asyncio.to_thread(conn.recv))[0] == "ready"
        try:
            async with DuplexAgent.from_config(cfg, models=models, dialogue=True) as agent:
                consumer = ApiConsumer(agent)
                for r in range(args.repeat):
                    for name, clip in clips.items():
                        samples = np.concatenate([np.zeros(int(0.3 * RATE), np.float32), clip, np.zeros(RATE, np.float32)])
                        end_block = int(np.ceil((0.3 * RATE + len(clip)) / BLOCK)) - 1
                        for path in ("api", "mqtt"):
                            session = agent.session if path == "api" else svc.sites[SITE].session if SITE in svc.sites else None
                            base = session.audio_seconds if session is not None else 0.0
                            if path == "api":
                                sent, final, audio = await ask_api(agent, consumer, samples)
                            else:
                                conn.send(("ask", samples.tolist()))
                                _, sent, final, audio = await asyncio.to_thread(conn.recv)
                                session = svc.sites[SITE].session
                            row = {"question": name, "round": r, "path": path, "final": final[1] if final else None,
                                   "final_to_audio_ms": round((audio - final[0]) * 1000, 1) if final and audio else None,
                                   "speech_end_to_audio_ms": round((audio - sent[end_block]) * 1000, 1) if audio else None}
                            # inside the service's process: the session's own share, and the hops around it
                            pushed = session.pushed_at(base + (end_block + 1) * BLOCK / RATE - 1e-3)
                            emitted = next((t for _, t in reversed(session.reply_starts) if t > sent[0]), None)
                            if pushed is not None and emitted is not None and audio is not None:
                                row["session_ms"] = round((emitted - pushed) * 1000, 1)
                                row["hops_ms"] = round((pushed - sent[end_block] + audio - emitted) * 1000, 1)
                            rows.append(row)
                            print(f"{path:4} {name:12} final→audio {row['final_to_audio_ms']} ms, end of speech→audio "
                                  f"{row['speech_end_to_audio_ms']} ms  ({row['final']!r})", flush=True)
        finally:
            conn.send(("stop",))
            await asyncio.to_thread(proc.join, 10)
            svc.stop()
            await asyncio.wait_for(svc_task, 20)
    models.close()
    load_after = os.getloadavg()

    print(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    print("| path | runs | final → first audio p50 ms | p90 ms | end of speech → first audio p50 ms | p90 ms | "
          "of which in the session p50 ms | hops (audio in + audio out) p50 ms | p90 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for path in ("api", "mqtt"):
        a = [x["final_to_audio_ms"] for x in rows if x["path"] == path and x["final_to_audio_ms"] is not None]
        b = [x["speech_end_to_audio_ms"] for x in rows if x["path"] == path and x["speech_end_to_audio_ms"] is not None]
        summary[path] = {"runs": len([x for x in rows if x["path"] == path]), "answered": len(b),
                         "final_to_audio_ms": {"p50": pct(a, 50), "p90": pct(a, 90)},
                         "speech_end_to_audio_ms": {"p50": pct(b, 50), "p90": pct(b, 90)}}
        c = [x["session_ms"] for x in rows if x["path"] == path and "session_ms" in x]
        h = [x["hops_ms"] for x in rows if x["path"] == path and "hops_ms" in x]
        summary[path].update(session_ms={"p50": pct(c, 50), "p90": pct(c, 90)}, hops_ms={"p50": pct(h, 50), "p90": pct(h, 90)})
        label = "in-process API" if path == "api" else "over MQTT"
        print(f"| {label} | {len(b)}/{summary[path]['runs']} | {pct(a, 50)} | {pct(a, 90)} | {pct(b, 50)} | {pct(b, 90)} | "
              f"{pct(c, 50)} | {pct(h, 50)} | {pct(h, 90)} |")
    pairs: dict[str, list[float]] = {"final_to_audio_ms": [], "speech_end_to_audio_ms": []}
    for x in rows:
        y = next((y for y in rows if y["path"] == "mqtt" and (y["question"], y["round"]) == (x["question"], x["round"])), None)
        for key, diffs in pairs.items():
            if x["path"] == "api" and y is not None and x[key] is not None and y[key] is not None:
                diffs.append(y[key] - x[key])
    a, b = pairs["final_to_audio_ms"], pairs["speech_end_to_audio_ms"]
    summary["paired_mqtt_minus_api_ms"] = {k: {"p50": pct(v, 50), "p90": pct(v, 90)} for k, v in pairs.items()}
    print(f"| MQTT minus API, paired (same question and round) | {len(b)} | {pct(a, 50)} | {pct(a, 90)} | {pct(b, 50)} | "
          f"{pct(b, 90)} | | | |")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "summary": summary,
                                         "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
