"""Frames-in/frames-out harness: run stages on a list of frames and get every frame they emit.

It runs the real ``Pipeline`` (queues, stamping, shutdown) on a ``SimulatedClock`` so results are
deterministic; it is public so embedders can test their own stages the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from .clock import Clock, SimulatedClock
from .frames import Frame
from .pipeline import Pipeline, Source, Stage
from .stages import IterableSource


async def run_pipeline(
    source: Source, stages: Sequence[Stage], *, clock: Clock | None = None, queue_size: int = 64
) -> list[Frame]:
    """Run to completion and return the frames that left the last stage, in order."""
    pipeline = Pipeline(source, stages, clock=clock or SimulatedClock(), queue_size=queue_size)
    pipeline.outputs = asyncio.Queue()
    await pipeline.run()
    out: list[Frame] = []
    while not pipeline.outputs.empty():
        out.append(pipeline.outputs.get_nowait())
    return out


async def run_frames(
    stages: Sequence[Stage], frames: Iterable[Frame], *, clock: Clock | None = None, paced: bool = False,
    queue_size: int = 64,
) -> list[Frame]:
    return await run_pipeline(IterableSource(frames, paced=paced), stages, clock=clock, queue_size=queue_size)
