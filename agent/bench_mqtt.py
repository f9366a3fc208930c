"""``duplex bench mqtt``: what the MQTT path costs, and how many sites two cores serve in real time.

1. **Latency, side by side.** The same files, streamed at real-time pace in 20 ms blocks through the
   same loaded models, once through the in-process API (``Session.push_audio`` → ``events()``) and
   once as protocol frames through a Mosquitto broker to the service and back to a subscriber. The
   satellites and the subscriber run in a process of their own (``bench_satellite``), as they would
   on their own machines; the service runs in this one, next to the in-process sessions.
   Latency of a final is the wall time from the moment the audio at the end of its speech (as VAD
   marks it) was handed over to the moment the final reached the consumer; it includes VAD's
   end-of-speech wait, which is the same on both paths. Runs alternate path by path, file by file.
2. **Concurrent sites.** 1, 2, 3, … satellites stream different speech in real time at once, each
   to its own site, until finals lag (p90 above ``LAG_P90_S``), audio backs up in front of
   recognition (``MAX_BACKLOG_S``), or the sessions do not drain within ``DRAIN_S`` after the audio
   ends.

A private broker is started unless ``--broker`` names one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.frames import FinalText

from .config import DuplexConfig
from .mosquitto import Mosquitto
from .mqtt_protocol import Topics
from .service import BrokerSettings, MqttService
from .session import Session, SharedModels

RATE = 16000
BLOCK = 320  # 20 ms, as the satellites send it
TRAIL_S = 1.5  # silence after each file: VAD ends the utterance inside it
LAG_P90_S = 2.0
MAX_BACKLOG_S = 1.0
DRAIN_S = 5.0


def default_manifest() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "manifest.tsv"


def pick_files(manifest: Path, count: int) -> list[Path]:
    """English recordings with exact transcripts, 2.5 to 9 s long."""
    from .bench_asr import load_rows

    rows = [r for r in load_rows(manifest) if 2.5 <= r.duration <= 9.0]
    if not rows:
        raise DuplexError(f"{manifest} has no English recordings of 2.5 to 9 s")
    return [r.path for r in rows[:count]]


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50_ms": _pct(xs, 50), "p90_ms": _pct(xs, 90), "max_ms": round(max(xs), 1) if xs else None}


def _wall_at(sent: list[float], t: float) -> float:
    """Wall time the block holding audio time ``t`` was handed over (blocks of BLOCK samples from 0)."""
    k = min(len(sent) - 1, max(0, int(np.ceil(t * RATE / BLOCK)) - 1))
    return sent[k]


# ------------------------------------------------------------------------------- in-process


async def inprocess_latencies(models: SharedModels, cfg: DuplexConfig, audio: np.ndarray) -> tuple[list[float], list[float]]:
    """Stream ``audio`` into a fresh session at real-time pace; ms per final: end of speech →
    consumer, and inside the session (end of speech decided → final emitted)."""
    finals: list[tuple[float, float]] = []
    sent: list[float] = []
    async with Session(models, cfg, name="bench") as s:
        async def consume() -> None:
            async for ev in s.events():
                if isinstance(ev, FinalText):
                    finals.append((ev.pts, time.monotonic()))

        consumer = asyncio.create_task(consume())
        t0 = time.monotonic()
        for i in range(0, len(audio), BLOCK):
            chunk = audio[i : i + BLOCK]
            await asyncio.sleep(max(0.0, t0 + (i + len(chunk)) / RATE - time.monotonic()))
            await s.push_audio(chunk)
            sent.append(time.monotonic())
        await s.finish()
        await consumer
    return [(t - _wall_at(sent, end)) * 1000 for end, t in finals], [ms for _, ms in s.final_latencies]


# ------------------------------------------------------------------------------------- MQTT


class _Rig:
    """The service in this process; satellites and subscriber in another (``bench_satellite``)."""

    def __init__(self, cfg: DuplexConfig, models: SharedModels, broker: BrokerSettings) -> None:
        mc = dataclasses.replace(cfg.mqtt, max_sites=1000, inbox_frames=5000)
        self.svc = MqttService(cfg, broker, models=models, mqtt=mc, client_id="duplex-bench-service")
        self.topics = Topics(mc.topic_prefix)
        self.broker = broker

    async def __aenter__(self) -> "_Rig":
        import multiprocessing

        from . import bench_satellite

        self._svc_task = asyncio.create_task(self.svc.run())
        await asyncio.wait_for(self.svc.connected.wait(), 15)
        b = self.broker
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with model threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=bench_satellite.main, name="duplex-bench-satellites", daemon=True,
                                 args=(child, b.host, b.port, self.topics.prefix, b.username, b.password))
        self._proc.start()
        child.close()
        if (await self._recv(60))[0] != "ready":
            raise DuplexError("the satellite process did not start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.terminate()
        self.svc.stop()
        await asyncio.wait_for(self._svc_task, 20)

    async def _recv(self, timeout: float) -> tuple[Any, ...]:
        if not await asyncio.to_thread(self._conn.poll, timeout):
            raise DuplexError(f"the satellite process did not answer within {timeout:.0f} s")
        return self._conn.recv()

    async def stream(self, audios: dict[str, np.ndarray]) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Stream each site's audio at real-time pace, all at once; (handover times per frame, next seq)."""
        self._conn.send(("stream", list(audios.items())))
        _, sent, seqs = await self._recv(max(len(a) for a in audios.values()) / RATE + 60)
        return sent, seqs

    async def drain(self, seqs: dict[str, int], timeout: float) -> tuple[dict[str, bool], float, dict[str, list]]:
        """End the streams and wait until everything has come back: (ok, seconds, finals per site)."""
        self._conn.send(("drain", seqs, timeout))
        _, ok, drain_s, finals = await self._recv(timeout + 30)
        return ok, drain_s, finals

    def latencies(self, site: str, sent: list[float], finals: list[tuple[int, float, float]]) -> tuple[list[float], list[float], list[float]]:
        """Per final, ms: end of speech → subscriber; satellite → session (the audio at the end of
        speech); service → subscriber (the final). The last two are what MQTT adds."""
        produced = {seq: t for s, seq, _, t in self.svc.finals_log if s == site}
        session = self.svc.sites[site].session
        e2e, inbound, outbound = [], [], []
        for seq, end, t in finals:
            handed = _wall_at(sent, end)
            e2e.append((t - handed) * 1000)
            pushed = session.pushed_at(end)
            if pushed is not None:
                inbound.append((pushed - handed) * 1000)
            if seq in produced:
                outbound.append((t - produced[seq]) * 1000)
        return e2e, inbound, outbound


async def mqtt_latencies(rig: _Rig, site: str, audio: np.ndarray) -> tuple[list[float], ...]:
    sent, seqs = await rig.stream({site: audio})
    ok, _, finals = await rig.drain(seqs, 30)
    if not ok[site]:
        raise DuplexError(f"site {site} did not finish within 30 s")
    inside = [ms for _, ms in rig.svc.sites[site].session.final_latencies]
    return (*rig.latencies(site, sent[site], finals[site]), inside)


# ------------------------------------------------------------------------------- capacity


def site_audio(clips: list[np.ndarray], offset: int, seconds: float) -> np.ndarray:
    parts, total, k = [np.zeros(int(0.37 * offset % 1.0 * RATE), np.float32)], 0.0, offset
    while total < seconds:
        clip = clips[k % len(clips)]
        parts += [clip, np.zeros(int(1.2 * RATE), np.float32)]
        total += len(clip) / RATE + 1.2
        k += 1
    return np.concatenate(parts)


async def capacity_run(rig: _Rig, n: int, clips: list[np.ndarray], seconds: float) -> dict[str, Any]:
    sites = [f"cap{n}-{i}" for i in range(n)]
    audios = {s: site_audio(clips, i, seconds) for i, s in enumerate(sites)}
    backlog = 0.0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal backlog
        while not stop.is_set():
            for s in sites:
                site = rig.svc.sites.get(s)
                if site is not None:
                    backlog = max(backlog, site.session.lag_seconds + site.audio_queued * BLOCK / RATE)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    cpu0, wall0 = time.process_time(), time.monotonic()
    sent, seqs = await rig.stream(audios)
    cpu1, wall1 = time.process_time(), time.monotonic()
    ok, drain_s, finals = await rig.drain(seqs, DRAIN_S + 10)
    stop.set()
    await watcher
    lat: list[float] = []
    replies: list[float] = []
    partials = 0
    for s in sites:
        lat += rig.latencies(s, sent[s], finals[s])[0]
        partials += rig.svc.sites[s].session.counts["partials"]
        replies += list(rig.svc.sites[s].session.reply_latencies)
    audio_s = sum(len(a) for a in audios.values()) / RATE
    p90 = _pct(lat, 90)
    real_time = all(ok.values()) and drain_s <= DRAIN_S and backlog <= MAX_BACKLOG_S and p90 is not None and p90 <= LAG_P90_S * 1000
    return {
        "sites": n, "audio_s_per_site": round(audio_s / n, 1), "finals": len(lat), "latency": _stats(lat),
        "max_backlog_s": round(backlog, 2), "drain_s": round(drain_s, 2),
        "partials_per_audio_s": round(partials / audio_s, 2),
        # conversation sites: end of the user's voice -> the agent's first sample, inside the service
        "reply_latency": _stats(replies),
        # the service's process only: the satellites and the broker run in processes of their own
        "service_cpu_cores": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "real_time": real_time,
    }


# ------------------------------------------------------------------------------------- runner


async def _bench(cfg: DuplexConfig, files: list[Path], broker_url: str | None, *, repeat: int, max_sites: int,
                 site_seconds: float, progress: Callable[[str], None], conversation: bool = False) -> dict[str, Any]:
    # conversation: every site holds a conversation (LLM + Piper; the agent answers each utterance
    # and its voice goes out as audio frames); else transcripts only
    models = await asyncio.to_thread(SharedModels.load, cfg, llm=conversation)
    clips = [read_audio(f) for f in files]
    broker: Mosquitto | None = None
    try:
        if broker_url is None:
            broker = Mosquitto()
            broker.start()
            broker_url = broker.url
        settings = BrokerSettings.from_url(broker_url)
        async with _Rig(cfg, models, settings) as rig:
            inproc: list[float] = []
            mqtt: list[float] = []
            inbound: list[float] = []
            outbound: list[float] = []
            inside_inproc: list[float] = []
            inside_mqtt: list[float] = []
            cpu = {"inprocess": 0.0, "mqtt": 0.0}
            audio_total = 0.0
            per_file = []
            k = 0
            for r in range(0 if conversation else repeat):  # the latency comparison is about transcripts
                for f, clip in zip(files, clips):
                    audio = np.concatenate([np.zeros(int(0.3 * RATE), np.float32), clip, np.zeros(int(TRAIL_S * RATE), np.float32)])
                    progress(f"latency {f.name} ({r + 1}/{repeat})")
                    c0 = time.process_time()
                    a, ia = await inprocess_latencies(models, cfg, audio)
                    c1 = time.process_time()
                    k += 1
                    b, hin, hout, ib = await mqtt_latencies(rig, f"lat{k}", audio)
                    cpu["inprocess"] += c1 - c0
                    cpu["mqtt"] += time.process_time() - c1
                    audio_total += len(audio) / RATE
                    inside_inproc += ia
                    inside_mqtt += ib
                    inproc += a
                    mqtt += b
                    inbound += hin
                    outbound += hout
                    per_file.append({"file": f.name, "repeat": r, "inprocess_ms": [round(x, 1) for x in a],
                                     "mqtt_ms": [round(x, 1) for x in b]})
            added = [i + o for i, o in zip(inbound, outbound)] if len(inbound) == len(outbound) else []
            # the same file and repeat on both paths, final by final: robust to the recogniser's jitter
            paired = [b - a for run in per_file if len(run["inprocess_ms"]) == len(run["mqtt_ms"])
                      for a, b in zip(run["inprocess_ms"], run["mqtt_ms"])]
            latency = {
                "inprocess": _stats(inproc), "mqtt": _stats(mqtt), "satellite_to_session": _stats(inbound),
                "service_to_subscriber": _stats(outbound), "mqtt_added": _stats(added),
                "session_inprocess": _stats(inside_inproc), "session_mqtt": _stats(inside_mqtt),
                # CPU seconds of this process (sessions, service, event loop) per second of audio
                "cpu_per_audio_s": {k: round(v / audio_total, 3) if audio_total else None for k, v in cpu.items()},
                "paired_difference": _stats(paired),
                "difference_p50_ms": round(_pct(mqtt, 50) - _pct(inproc, 50), 1) if inproc and mqtt else None,
                "difference_p90_ms": round(_pct(mqtt, 90) - _pct(inproc, 90), 1) if inproc and mqtt else None,
                "runs": per_file,
            }
            runs = []
            for n in range(1, max_sites + 1):
                progress(f"{n} concurrent site(s)")
                res = await capacity_run(rig, n, clips, site_seconds)
                runs.append(res)
                if not res["real_time"]:
                    break
        sustained = max((r["sites"] for r in runs if r["real_time"]), default=0)
        return {
            "conversation": conversation, "llm": f"{cfg.models.llm} {cfg.models.llm_precision}" if conversation else None,
            "files": [str(f) for f in files], "repeat": repeat, "model": cfg.models.asr, "precision": cfg.models.conversation_asr_precision if conversation else cfg.models.asr_precision,
            "cpu_count": _cpus(), "latency": latency, "capacity": runs, "sustained_sites": sustained,
            "criteria": {"latency_p90_s": LAG_P90_S, "max_backlog_s": MAX_BACKLOG_S, "drain_s": DRAIN_S},
            "broker": "private mosquitto" if broker is not None else broker_url,
        }
    finally:
        if broker is not None:
            broker.close()
        models.close()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def bench(cfg: DuplexConfig, files: list[Path], broker_url: str | None = None, *, repeat: int = 2, max_sites: int = 8,
          site_seconds: float = 30.0, progress: Callable[[str], None] = lambda _: None,
          conversation: bool = False) -> dict[str, Any]:
    return asyncio.run(_bench(cfg, files, broker_url, repeat=repeat, max_sites=max_sites, site_seconds=site_seconds,
                              progress=progress, conversation=conversation))


def markdown(res: dict[str, Any]) -> str:
    if res.get("conversation"):
        return "\n".join(_capacity_rows(res))
    lat = res["latency"]

    def row(name: str, s: dict[str, Any]) -> str:
        return f"| {name} | {s['n']} | {s['p50_ms']} | {s['p90_ms']} | {s['max_ms']} |"

    out = [
        f"## Final-transcript latency: in-process API vs MQTT ({len(res['files'])} files x {res['repeat']}, "
        f"{res['model']} {res['precision']}, {res['cpu_count']} CPUs)",
        "",
        "From the audio at the end of speech being handed over to the final at the consumer (VAD's "
        "end-of-speech wait included on both paths).",
        "",
        "| path | finals | p50 ms | p90 ms | max ms |",
        "|---|---|---|---|---|",
        row("in-process API", lat["inprocess"]),
        row("MQTT (satellite → broker → service → broker → subscriber)", lat["mqtt"]),
        row("MQTT hop in: satellite → broker → service → session", lat["satellite_to_session"]),
        row("MQTT hop out: final → broker → subscriber", lat["service_to_subscriber"]),
        row("MQTT hops together, per final", lat["mqtt_added"]),
        row("inside the session, in-process run: end of speech decided → final", lat["session_inprocess"]),
        row("inside the session, MQTT run: end of speech decided → final", lat["session_mqtt"]),
        "",
        f"MQTT p50 minus in-process p50: **{lat['difference_p50_ms']} ms** (p90: {lat['difference_p90_ms']} ms); "
        f"median of the paired differences (same file, same repeat): **{lat['paired_difference']['p50_ms']} ms**. "
        "Both carry the recogniser's own run-to-run jitter and its slowdown when the broker and the satellites "
        "compete for the same cores (the two 'inside the session' rows; the paired differences spread from "
        f"{round(min(paired_ms), 1) if (paired_ms := [b - a for r in lat['runs'] for a, b in zip(r['inprocess_ms'], r['mqtt_ms'])]) else '-'} to "
        f"{round(max(paired_ms), 1) if paired_ms else '-'} ms); the hops are measured directly on the same finals.",
        "",
        f"CPU of the service's process per second of audio: {lat['cpu_per_audio_s']['inprocess']} s in-process, "
        f"{lat['cpu_per_audio_s']['mqtt']} s over MQTT (the broker and the satellites run in other processes).",
        "",
    ]
    return "\n".join(out + _capacity_rows(res))


def _capacity_rows(res: dict[str, Any]) -> list[str]:
    what = (f"conversation sites ({res['model']} {res['precision']}, {res['llm']}, Piper: every utterance answered aloud)"
            if res.get("conversation") else f"transcription sites ({res['model']} {res['precision']})")
    out = [
        f"## Concurrent {what} streaming in real time",
        "",
        f"Real time = every site drained within {DRAIN_S:.0f} s of its audio ending, at most {MAX_BACKLOG_S} s of audio "
        f"waiting for recognition, and final latency p90 at most {LAG_P90_S} s."
        + (" Reply latency: end of the user's voice to the agent's first sample, inside the service." if res.get("conversation") else ""),
        "",
        "| sites | finals | latency p50 ms | p90 ms | max backlog s | drain s | partials per audio s | service CPU cores | replies | reply p50 ms | reply p90 ms | real time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["capacity"]:
        rl = r.get("reply_latency") or {"n": 0, "p50_ms": None, "p90_ms": None}
        out.append(f"| {r['sites']} | {r['finals']} | {r['latency']['p50_ms']} | {r['latency']['p90_ms']} | {r['max_backlog_s']} | "
                   f"{r['drain_s']} | {r['partials_per_audio_s']} | {r['service_cpu_cores']} | {rl['n']} | {rl['p50_ms']} | "
                   f"{rl['p90_ms']} | {'yes' if r['real_time'] else 'no'} |")
    out += ["", f"**{res['sustained_sites']} concurrent site(s) sustained in real time** on {res['cpu_count']} CPUs."]
    return out
