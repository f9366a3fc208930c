"""Small general-purpose stages and sources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from .clock import Clock
from .frames import Frame
from .pipeline import Source, Stage


class Callback(Stage):
    """Calls ``fn(frame)`` for each frame of the given types (all by default), then forwards it."""

    def __init__(self, fn: Callable[[Frame], Any], types: tuple[type[Frame], ...] = (Frame,), name: str = "callback"):
        super().__init__()
        self.name = name
        self.fn = fn
        self.types = types

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, self.types):
            self.fn(frame)
        await self.push(frame)


class IterableSource(Source):
    """Yields prepared frames, optionally waiting on the clock until each frame's ``pts``."""

    def __init__(self, frames: Iterable[Frame], *, paced: bool = False, name: str = "frames") -> None:
        self._frames = list(frames)
        self.paced = paced
        self.name = name

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        for f in self._frames:
            if self.paced:
                await clock.sleep_until(f.pts)
            yield f
