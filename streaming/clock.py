"""Swappable clocks.

The live agent runs on ``RealClock``. Tests and evaluations run on ``SimulatedClock``: time only
moves when a source waits for it, so a file is processed as fast as the CPU allows while every
timestamp is what it would have been in real time, and the run is deterministic.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the clock started."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t``."""
        ...


class RealClock:
    """Monotonic wall time, zeroed at construction."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class SimulatedClock:
    """Virtual time. ``sleep_until`` jumps forward instead of waiting.

    It still yields to the event loop once, so that consumers get to run between produced frames
    exactly as they would in real time when the machine keeps up.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError("a clock cannot go backwards")
        self._t += dt

    async def sleep_until(self, t: float) -> None:
        if t > self._t:
            self._t = t
        await asyncio.sleep(0)
