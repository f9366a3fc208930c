"""Pipeline core: ordering, overtaking, backpressure, clean end of stream, cancellation, errors."""

import asyncio

import numpy as np
import pytest

from streaming.clock import RealClock, SimulatedClock
from streaming.frames import AudioFrame, DataFrame, EndOfStream, Flush, Interrupt, SpeechStarted
from streaming.pipeline import Pipeline, Source, Stage
from streaming.queues import FrameQueue
from streaming.stages import IterableSource
from streaming.testing import run_frames


def audio(i: int) -> AudioFrame:
    return AudioFrame(samples=np.full(320, i / 1000, dtype=np.float32), pts=i * 0.02)


class Recorder(Stage):
    def __init__(self, name="rec", delay=0.0):
        super().__init__()
        self.name = name
        self.seen = []
        self.delay = delay
        self.closed = False
        self.flushed = False

    async def process(self, frame):
        self.seen.append(frame)
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.push(frame)

    async def flush(self):
        self.flushed = True

    async def aclose(self):
        self.closed = True
        await super().aclose()


async def test_clean_end_of_stream_loses_no_frame_and_keeps_order():
    frames = [audio(i) for i in range(500)]
    a, b = Recorder("a"), Recorder("b")
    out = await run_frames([a, b], frames, queue_size=4)
    data = [f for f in out if isinstance(f, AudioFrame)]
    assert [f.pts for f in data] == [f.pts for f in frames]
    assert isinstance(out[-1], EndOfStream)
    assert a.flushed and b.flushed and a.closed and b.closed
    # every frame is stamped by each stage it left, in order
    assert [name for name, _ in data[0].stamps] == ["frames", "a", "b"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("duplex:")]


async def test_backpressure_bounds_queues_and_blocks_the_producer():
    produced = []

    class Counting(Source):
        name = "src"

        async def frames(self, clock):
            for i in range(200):
                produced.append(i)
                yield audio(i)

    slow = Recorder("slow", delay=0.001)
    p = Pipeline(Counting(), [Recorder("fast"), slow], clock=RealClock(), queue_size=3)
    task = asyncio.create_task(p.run())
    await asyncio.sleep(0.03)
    # the producer is held back: it can be ahead of the slow stage by at most the queue bounds
    assert len(produced) - len(slow.seen) <= 3 + 3 + 2
    await task
    assert max(q.peak for q in p.queues) <= 3
    assert len(slow.seen) == 200


async def test_urgent_control_frames_overtake_queued_data_and_inband_ones_do_not():
    q = FrameQueue(maxsize=10)
    for i in range(3):
        await q.put(audio(i))
    await q.put(Flush())
    await q.put(Interrupt(reason="barge-in"))
    got = [await q.get() for _ in range(5)]
    assert isinstance(got[0], Interrupt)
    assert [type(f).__name__ for f in got[1:]] == ["AudioFrame", "AudioFrame", "AudioFrame", "Flush"]


async def test_interrupt_drops_interruptible_data_but_keeps_the_rest():
    q = FrameQueue(maxsize=10, interruptible=(AudioFrame,))
    await q.put(audio(0))
    await q.put(SpeechStarted(pts=0.0))
    await q.put(audio(1))
    q.put_control(Interrupt())
    assert isinstance(await q.get(), Interrupt)
    assert isinstance(await q.get(), SpeechStarted)
    assert q.dropped == 2 and len(q) == 0


async def test_control_frames_never_block_on_a_full_queue():
    q = FrameQueue(maxsize=1)
    await q.put(audio(0))
    await asyncio.wait_for(q.put(Interrupt()), timeout=0.1)  # would hang if it counted as data
    assert isinstance(await q.get(), Interrupt)


async def test_cancel_stops_every_task_and_closes_stages():
    class Endless(Source):
        name = "endless"

        async def frames(self, clock):
            i = 0
            while True:
                await clock.sleep_until(i * 0.02)
                yield audio(i)
                i += 1

    stages = [Recorder("a"), Recorder("b", delay=0.001)]
    p = Pipeline(Endless(), stages, clock=RealClock(), queue_size=8)
    task = asyncio.create_task(p.run())
    await asyncio.sleep(0.1)
    p.cancel("test")
    await asyncio.wait_for(task, timeout=2)
    assert all(s.closed for s in stages)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("duplex:")]


async def test_cancelling_run_from_outside_cleans_up():
    class Endless(Source):
        name = "endless"

        async def frames(self, clock):
            while True:
                await asyncio.sleep(0.01)
                yield audio(0)

    s = Recorder("a")
    task = asyncio.create_task(Pipeline(Endless(), [s], clock=RealClock()).run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.closed
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("duplex:")]


async def test_a_failing_stage_cancels_the_others_and_surfaces_its_error():
    class Boom(Stage):
        name = "boom"

        async def process(self, frame):
            if isinstance(frame, AudioFrame) and frame.pts > 0.1:
                raise RuntimeError("model exploded")
            await self.push(frame)

    after = Recorder("after")
    with pytest.raises(ExceptionGroup) as info:
        await run_frames([Boom(), after], [audio(i) for i in range(100)])
    assert info.group_contains(RuntimeError, match="model exploded")
    assert after.closed


async def test_blocking_work_runs_off_the_event_loop():
    import threading

    loop_thread = threading.get_ident()
    seen = []

    class Model(Stage):
        name = "model"

        async def process(self, frame):
            if isinstance(frame, DataFrame):
                seen.append(await self.run_blocking(threading.get_ident))
            await self.push(frame)

    await run_frames([Model()], [audio(i) for i in range(5)])
    assert seen and all(t != loop_thread for t in seen) and len(set(seen)) == 1


async def test_simulated_clock_runs_paced_audio_fast_and_deterministically():
    import time

    frames = [audio(i) for i in range(1500)]  # 30 s of paced audio
    clock = SimulatedClock()
    t = time.perf_counter()
    out = await run_frames([Recorder()], frames, clock=clock, paced=True)
    assert time.perf_counter() - t < 5.0
    assert clock.now() == pytest.approx(frames[-1].pts)
    # each frame left the source exactly at its own pts on the simulated clock
    assert all(f.stamp("frames") == pytest.approx(f.pts) for f in out if isinstance(f, AudioFrame))
    out2 = await run_frames([Recorder()], frames, clock=SimulatedClock(), paced=True)
    assert [f.stamps for f in out] == [f.stamps for f in out2]


async def test_run_pipeline_with_unbound_stage_push_errors_clearly():
    with pytest.raises(RuntimeError, match="not part of a running pipeline"):
        await Recorder().push(audio(0))


async def test_duplicate_stage_names_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        Pipeline(IterableSource([]), [Recorder("x"), Recorder("x")])

