"""The agent's voice on its way out: clauses of synthesised audio, pulled block by block.

Whoever plays the audio pulls it: the PortAudio output callback live, the simulated room in
``duplex converse``. Pulling is what makes a sample *heard*, so this is where the agent learns what
the user actually heard (for truncating its turn on a barge-in), when its first sample left
(response latency) and when its last one did (barge-in stop time). Thread-safe: clauses arrive
from the TTS thread, pulls come from the audio thread, control from the coordinator.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from streaming.frames import INTERNAL_RATE


@dataclass
class _Clause:
    reply: int
    text: str
    samples: np.ndarray
    pos: int = 0


@dataclass(frozen=True)
class PlaybackEvent:
    """``kind``: "start" (first sample of a reply left), "words" (``text`` heard so far of the
    reply), "end" (the reply played to its end), "stopped" (cleared: ``text`` was heard)."""

    kind: str
    reply: int
    t: float
    text: str = ""


class Playback:
    """Queued agent audio (16 kHz mono float32) with what has been heard of it."""

    def __init__(self, reference=None) -> None:
        #: an ``streaming.aec.EchoReference`` fed with every sample pulled (the canceller's reference)
        self.reference = reference
        self._lock = threading.Lock()
        self._queue: deque[_Clause] = deque()
        self._paused = False
        self._events: list[PlaybackEvent] = []
        self._started: set[int] = set()
        self._finished: set[int] = set()  # replies whose last clause has been queued
        self._heard: dict[int, list[str]] = {}  # reply -> clause texts fully played
        self._current: int | None = None  # the reply now playing
        self.played_samples = 0

    # -- producer side ----------------------------------------------------------------------

    def enqueue(self, reply: int, text: str, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if reply in self._finished:
                return
            self._queue.append(_Clause(reply, text.strip(), samples))

    def finish(self, reply: int, t: float | None = None) -> None:
        """No more clauses for ``reply``; its "end" event follows when the queue has played out."""
        with self._lock:
            self._finished.add(reply)
            if t is not None and not any(c.reply == reply for c in self._queue) and reply in self._started:
                self._end(reply, t)

    # -- control ----------------------------------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def clear(self, t: float) -> str:
        """Drop everything queued (barge-in): returns the words of the current reply the user heard."""
        with self._lock:
            reply = self._current if self._current is not None else (self._queue[0].reply if self._queue else None)
            heard = self._heard_text(reply) if reply is not None else ""
            for c in self._queue:
                self._finished.add(c.reply)
            self._queue.clear()
            self._paused = False
            if reply is not None:
                self._finished.add(reply)
                self._events.append(PlaybackEvent("stopped", reply, t, heard))
                self._current = None
            return heard

    def heard(self, reply: int) -> str:
        with self._lock:
            return self._heard_text(reply)

    @property
    def current(self) -> int | None:
        """The reply now playing: its first sample has been pulled, and it has neither played out
        nor been cleared (None otherwise)."""
        return self._current

    def busy(self) -> bool:
        """Audio is queued (playing or held)."""
        with self._lock:
            return bool(self._queue)

    def events(self) -> list[PlaybackEvent]:
        """What happened since the last call (and clears it)."""
        with self._lock:
            out, self._events = self._events, []
            return out

    # -- consumer side ----------------------------------------------------------------------

    def pull(self, n: int, t: float) -> np.ndarray:
        """The next ``n`` samples to play, starting at time ``t`` (zeros when idle or paused)."""
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            filled = 0
            while filled < n and self._queue and not self._paused:
                c = self._queue[0]
                at = t + filled / INTERNAL_RATE
                if c.reply not in self._started:
                    self._started.add(c.reply)
                    self._current = c.reply
                    self._heard.setdefault(c.reply, [])
                    self._events.append(PlaybackEvent("start", c.reply, at))
                take = min(n - filled, len(c.samples) - c.pos)
                out[filled : filled + take] = c.samples[c.pos : c.pos + take]
                c.pos += take
                filled += take
                if c.pos >= len(c.samples):
                    self._queue.popleft()
                    self._heard[c.reply].append(c.text)
                    self._events.append(PlaybackEvent("words", c.reply, t + filled / INTERNAL_RATE,
                                                      self._heard_text(c.reply)))
                    if c.reply in self._finished and not any(q.reply == c.reply for q in self._queue):
                        self._end(c.reply, t + filled / INTERNAL_RATE)
            self.played_samples += filled
        if self.reference is not None:
            self.reference.push(out, t)
        return out

    # -- internals (lock held) --------------------------------------------------------------

    def _end(self, reply: int, t: float) -> None:
        self._events.append(PlaybackEvent("end", reply, t, self._heard_text(reply)))
        if self._current == reply:
            self._current = None

    def _heard_text(self, reply: int) -> str:
        """Whole clauses played, plus the words of the playing clause in proportion to its samples."""
        words = list(self._heard.get(reply, []))
        if self._queue and self._queue[0].reply == reply and self._queue[0].pos:
            c = self._queue[0]
            parts = c.text.split()
            k = int(len(parts) * c.pos / max(1, len(c.samples)))
            if k:
                words.append(" ".join(parts[:k]))
        return " ".join(words)
