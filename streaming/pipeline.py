"""Stages joined by bounded queues, run as named tasks in one ``asyncio.TaskGroup``.

A ``Source`` yields frames; each ``Stage`` has one entry point, ``process(frame)``, and emits with
``await self.push(frame)``. The runner owns the queues, stamps frames, forwards control frames a
stage does not consume, and shuts down cleanly:

* ``EndOfStream`` travels in order behind the data; each stage gets ``flush()`` then ``aclose()``
  and exits, so nothing queued is lost;
* ``Cancel`` (or cancelling ``run()``) stops every task at once; ``aclose()`` still runs;
* an exception in any stage cancels the others and propagates out of ``run()``.

Stages that call models run them off the event loop with ``run_blocking``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from .clock import Clock, RealClock
from .frames import Cancel, ControlFrame, DataFrame, EndOfStream, Frame
from .queues import FrameQueue

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stage:
    """One step of the pipeline. Subclasses override ``process`` (and maybe ``flush``/``aclose``).

    The default ``process`` forwards every frame unchanged, so a stage only handles what it knows.
    """

    #: name of the stage's task and of its stamps on frames
    name: str = "stage"
    #: data frame types downstream queues may drop when an Interrupt overtakes them
    interruptible: tuple[type[DataFrame], ...] = ()

    def __init__(self) -> None:
        self._push: Callable[[Frame], Any] | None = None
        self.clock: Clock = RealClock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def bind(self, push: Callable[[Frame], Any], clock: Clock, backlog: Callable[[], int] | None = None) -> None:
        self._push = push
        self.clock = clock
        self._backlog = backlog

    def backlog(self) -> int:
        """Frames waiting in this stage's input queue: a stage that is behind real time can skip
        optional work (a partial hypothesis) to catch up."""
        return self._backlog() if getattr(self, "_backlog", None) else 0

    async def push(self, frame: Frame) -> None:
        if self._push is None:
            raise RuntimeError(f"stage {self.name!r} is not part of a running pipeline")
        await self._push(frame)

    async def process(self, frame: Frame) -> None:
        await self.push(frame)

    async def flush(self) -> None:
        """Called at EndOfStream, before it is forwarded: emit whatever is still pending."""

    async def aclose(self) -> None:
        """Release resources. Always called, also on cancellation and errors."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def init_worker(self) -> None:
        """Runs once on the stage's worker thread before its first job (e.g. to set the thread's
        torch intra-op thread count, which is a per-thread setting under OpenMP)."""

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (a model call) on this stage's own worker thread.

        One thread per stage keeps a model's calls serial and in order, and keeps the event loop
        free for audio I/O and control frames.
        """
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"duplex-{self.name}", initializer=self.init_worker
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))


class Source:
    """Produces frames. ``frames()`` ends when the source is exhausted (EndOfStream is implied)."""

    name: str = "source"

    def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release devices or files."""


class Pipeline:
    def __init__(
        self,
        source: Source,
        stages: Sequence[Stage],
        *,
        clock: Clock | None = None,
        queue_size: int = 64,
    ) -> None:
        names = [source.name, *(s.name for s in stages)]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.source = source
        self.stages = list(stages)
        self.clock = clock or RealClock()
        # queue i feeds stage i; it may drop frames that an upstream stage marks interruptible
        self.queues: list[FrameQueue] = []
        for i in range(len(self.stages)):
            interruptible = tuple(t for s in self.stages[:i] for t in s.interruptible)
            self.queues.append(FrameQueue(queue_size, interruptible))
        #: frames the last stage pushed (a sink usually pushes nothing)
        self.outputs: asyncio.Queue[Frame] | None = None
        self._source_task: asyncio.Task[None] | None = None

    def _push_into(self, index: int, stage_name: str) -> Callable[[Frame], Any]:
        clock = self.clock
        if index < len(self.queues):
            q = self.queues[index]

            async def push(frame: Frame) -> None:
                await q.put(frame.stamped(stage_name, clock.now()))

        else:

            async def push(frame: Frame) -> None:
                if self.outputs is not None:
                    await self.outputs.put(frame.stamped(stage_name, clock.now()))

        return push

    async def run(self) -> None:
        for i, stage in enumerate(self.stages):
            stage.bind(self._push_into(i + 1, stage.name), self.clock, self.queues[i].__len__)
        try:
            async with asyncio.TaskGroup() as tg:
                self._source_task = tg.create_task(self._run_source(), name=f"duplex:{self.source.name}")
                for i, stage in enumerate(self.stages):
                    tg.create_task(self._run_stage(i, stage), name=f"duplex:{stage.name}")
        finally:
            await self.source.aclose()

    def cancel(self, reason: str = "") -> None:
        """Stop the pipeline now, without draining; ``run()`` then returns normally.

        Call it from the event loop thread (use ``loop.call_soon_threadsafe`` from others).
        """
        if self._source_task is not None:
            self._source_task.cancel()
        if self.queues:
            self.queues[0].put_control(Cancel(reason=reason, pts=self.clock.now()))

    async def _run_source(self) -> None:
        push = self._push_into(0, self.source.name)
        last_pts = 0.0
        async for frame in self.source.frames(self.clock):
            await push(frame)
            last_pts = frame.pts
            if isinstance(frame, (EndOfStream, Cancel)):
                return
        await push(EndOfStream(pts=max(last_pts, self.clock.now())))

    async def _run_stage(self, index: int, stage: Stage) -> None:
        q = self.queues[index]
        try:
            while True:
                frame = await q.get()
                if isinstance(frame, Cancel):
                    await self._forward_control(index, stage, frame)
                    return
                if isinstance(frame, EndOfStream):
                    await stage.flush()
                    await stage.push(frame)
                    return
                await stage.process(frame)
        finally:
            await stage.aclose()

    async def _forward_control(self, index: int, stage: Stage, frame: ControlFrame) -> None:
        if index + 1 < len(self.queues):
            self.queues[index + 1].put_control(frame.stamped(stage.name, self.clock.now()))
