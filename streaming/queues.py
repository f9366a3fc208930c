"""A bounded two-tier frame queue.

Data frames and in-band control frames share one FIFO that is bounded (by data frames only), so a
slow consumer blocks its producer. Urgent control frames go to a second FIFO that is never bounded
and is always read first. An ``Interrupt`` additionally discards queued data frames of the types the
queue was told are interruptible (agent audio and text, typically): what the user interrupted must
not be played after the interrupt has been handled.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .frames import ControlFrame, DataFrame, Frame, Interrupt


class FrameQueue:
    def __init__(self, maxsize: int, interruptible: tuple[type[DataFrame], ...] = ()) -> None:
        if maxsize < 1:
            raise ValueError("queue maxsize must be at least 1")
        self.maxsize = maxsize
        self.interruptible = interruptible
        self._urgent: deque[Frame] = deque()
        self._fifo: deque[Frame] = deque()
        self._data_count = 0
        #: high-water mark of queued data frames, for tests and metrics
        self.peak = 0
        #: data frames discarded by interrupts
        self.dropped = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._urgent) + len(self._fifo)

    @property
    def data_count(self) -> int:
        return self._data_count

    async def put(self, frame: Frame) -> None:
        if isinstance(frame, ControlFrame):
            self.put_control(frame)
            return
        while self._data_count >= self.maxsize:
            self._writable.clear()
            await self._writable.wait()
        self._fifo.append(frame)
        self._data_count += 1
        self.peak = max(self.peak, self._data_count)
        self._readable.set()

    def put_control(self, frame: ControlFrame) -> None:
        """Control frames never block: an interrupt must not wait behind a full queue."""
        if frame.urgent:
            self._urgent.append(frame)
            if isinstance(frame, Interrupt) and self.interruptible:
                self._discard_interruptible()
        else:
            self._fifo.append(frame)
        self._readable.set()

    def _discard_interruptible(self) -> None:
        kept: deque[Frame] = deque()
        for f in self._fifo:
            if isinstance(f, self.interruptible):
                self.dropped += 1
                self._data_count -= 1
            else:
                kept.append(f)
        self._fifo = kept
        self._writable.set()

    async def get(self) -> Frame:
        while not self._urgent and not self._fifo:
            self._readable.clear()
            await self._readable.wait()
        if self._urgent:
            return self._urgent.popleft()
        frame = self._fifo.popleft()
        if isinstance(frame, DataFrame):
            self._data_count -= 1
            if self._data_count < self.maxsize:
                self._writable.set()
        return frame
