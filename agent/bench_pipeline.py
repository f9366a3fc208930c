"""``duplex bench pipeline``: what the frame plumbing itself costs, and the idle footprint.

* overhead per frame per pass-through stage (queue hop, stamping, task switch), on a simulated clock;
* VAD stage cost per 30 ms frame through the pipeline, next to the bare core in the same process
  (the difference is the worker-thread hand-off);
* memory (RSS) and CPU while listening to silence in real time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from dataclasses import replace

import numpy as np

from streaming.clock import RealClock, SimulatedClock
from streaming.frames import AudioFrame
from streaming.pipeline import Stage
from streaming.stages import IterableSource
from streaming.testing import run_pipeline
from streaming.vad import TwoStageVAD, VADConfig, VADStage


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _frames(seconds: float, block: int = 480, noise: float = 0.0) -> list[AudioFrame]:
    rng = np.random.default_rng(0)
    n = int(seconds * 16000) // block
    return [
        AudioFrame(samples=(rng.standard_normal(block) * noise).astype(np.float32), pts=i * block / 16000)
        for i in range(n)
    ]


async def _passthrough(frames: list[AudioFrame], stages: int) -> float:
    t = time.perf_counter()
    await run_pipeline(IterableSource(frames), [_Pass(f"p{i}") for i in range(stages)], clock=SimulatedClock())
    return time.perf_counter() - t


class _Pass(Stage):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


async def _vad_pipeline(frames: list[AudioFrame], cfg: VADConfig) -> float:
    t = time.perf_counter()
    await run_pipeline(IterableSource(frames), [VADStage(cfg)], clock=SimulatedClock())
    return time.perf_counter() - t


def _vad_direct(frames: list[AudioFrame], cfg: VADConfig) -> float:
    vad = TwoStageVAD(cfg)
    state = vad.init_state()
    t = time.perf_counter()
    for f in frames:
        vad.step(state, f.samples, f.pts)
    return time.perf_counter() - t


async def _idle(seconds: float, cfg: VADConfig) -> tuple[float, float]:
    """CPU % of one core and RSS while the VAD pipeline listens to near-silence in real time."""
    frames = _frames(seconds, block=320, noise=0.0005)
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    await run_pipeline(IterableSource(frames, paced=True), [VADStage(cfg)], clock=RealClock())
    cpu = time.process_time() - cpu0
    return 100 * cpu / (time.perf_counter() - wall0), rss_mb()


def bench(cfg: VADConfig, repeat: int = 5, idle_seconds: float = 10.0) -> dict:
    speechy = _frames(20.0, noise=0.05)  # keeps the Silero stage busy, the worst case
    rss_start = rss_mb()
    asyncio.run(_vad_pipeline(speechy[:50], cfg))  # load and warm the model
    # Silero on every hop is the worst case (speech all the time); the configured mode on noise
    # shows what the gate saves
    silero = replace(cfg, mode="silero")
    over, vad_pipe, vad_direct, worst_pipe, worst_direct = [], [], [], [], []
    for _ in range(repeat):
        base = asyncio.run(_passthrough(speechy, 0))
        with4 = asyncio.run(_passthrough(speechy, 4))
        over.append((with4 - base) / (4 * len(speechy)) * 1e6)
        vad_pipe.append(asyncio.run(_vad_pipeline(speechy, cfg)) / len(speechy) * 1e3)
        vad_direct.append(_vad_direct(speechy, cfg) / len(speechy) * 1e3)
        worst_pipe.append(asyncio.run(_vad_pipeline(speechy, silero)) / len(speechy) * 1e3)
        worst_direct.append(_vad_direct(speechy, silero) / len(speechy) * 1e3)
    cpu, rss_idle = asyncio.run(_idle(idle_seconds, cfg))

    def stats(v: list[float]) -> dict:
        return {"median": statistics.median(v), "p90": float(np.percentile(v, 90)), "runs": v}

    return {
        "mode": cfg.mode,
        "overhead_us_per_frame_per_stage": stats(over),
        "vad_stage_ms_per_30ms_frame": stats(vad_pipe),
        "vad_core_ms_per_30ms_frame": stats(vad_direct),
        "silero_every_hop_stage_ms_per_30ms_frame": stats(worst_pipe),
        "silero_every_hop_core_ms_per_30ms_frame": stats(worst_direct),
        "idle_cpu_percent_of_one_core": cpu,
        "idle_rss_mb": rss_idle,
        "rss_before_model_mb": rss_start,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(r: dict) -> str:
    o, vp, vd = r["overhead_us_per_frame_per_stage"], r["vad_stage_ms_per_30ms_frame"], r["vad_core_ms_per_30ms_frame"]
    wp, wd = r["silero_every_hop_stage_ms_per_30ms_frame"], r["silero_every_hop_core_ms_per_30ms_frame"]
    return "\n".join(
        [
            "| measure | median | p90 |",
            "|---|---|---|",
            f"| pipeline overhead per frame per stage (µs) | {o['median']:.1f} | {o['p90']:.1f} |",
            f"| {r['mode']} VAD through the pipeline, per 30 ms frame, on noise (ms) | {vp['median']:.3f} | {vp['p90']:.3f} |",
            f"| {r['mode']} VAD core alone, same input, same process (ms) | {vd['median']:.3f} | {vd['p90']:.3f} |",
            f"| worst case, Silero on every hop, through the pipeline (ms) | {wp['median']:.3f} | {wp['p90']:.3f} |",
            f"| worst case, Silero on every hop, core alone (ms) | {wd['median']:.3f} | {wd['p90']:.3f} |",
            "",
            f"idle (real-time near-silence through the VAD pipeline): CPU {r['idle_cpu_percent_of_one_core']:.1f} % of one core, "
            f"RSS {r['idle_rss_mb']:.0f} MB (before the model: {r['rss_before_model_mb']:.0f} MB, peak {r['max_rss_mb']:.0f} MB)",
        ]
    )
