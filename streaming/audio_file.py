"""Audio files in and out: WAV and FLAC (and whatever else libsndfile decodes).

Any channel count, bit depth (8, 16, 24, 32-bit int, float) and sample rate is accepted and
converted to 16 kHz mono float32. Files are streamed block by block, never loaded whole, so an hour
of audio costs no more memory than a second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from .clock import Clock
from .errors import AudioInputError
from .frames import INTERNAL_RATE, AudioFrame, EndOfStream, Frame
from .pipeline import Source, Stage
from .resample import StreamResampler, to_mono

log = logging.getLogger(__name__)

Pace = Literal["realtime", "fast"]


def open_audio(path: str | os.PathLike[str]) -> sf.SoundFile:
    """Open an audio file for reading, turning every failure into a one-line AudioInputError."""
    p = Path(path)
    if not p.exists():
        raise AudioInputError(f"no such audio file: {p}")
    if p.is_dir():
        raise AudioInputError(f"is a directory, not an audio file: {p}")
    try:
        f = sf.SoundFile(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(f"cannot decode {p}: {_short(exc)}") from None
    except OSError as exc:
        raise AudioInputError(f"cannot read {p}: {exc.strerror or exc}") from None
    if f.samplerate <= 0 or f.channels <= 0:
        f.close()
        raise AudioInputError(f"{p} has an invalid header (rate {f.samplerate}, channels {f.channels})")
    return f


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def read_audio(path: str | os.PathLike[str], rate: int = INTERNAL_RATE) -> np.ndarray:
    """Whole file as mono float32 at ``rate`` (for tests, benchmarks and short clips)."""
    blocks = [b for b in iter_blocks(path, rate=rate)]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def iter_blocks(path: str | os.PathLike[str], block_seconds: float = 0.5, rate: int = INTERNAL_RATE):
    """Yield mono float32 blocks at ``rate``; raises AudioInputError on a decoding failure."""
    with open_audio(path) as f:
        resampler = StreamResampler(f.samplerate, rate)
        block = max(1, int(f.samplerate * block_seconds))
        got_any = False
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioInputError(f"cannot decode {path}: {_short(exc)}") from None
            last = len(data) < block
            out = resampler.process(to_mono(data), last=last)
            if len(out):
                got_any = True
                yield out
            if last:
                break
        if not got_any:
            log.warning("%s contains no audio samples", path)


class FileSource(Source):
    """Streams a file as AudioFrames of ``block_ms``, paced in real time or as fast as possible.

    In real-time pace a block is released when its last sample would have been captured, exactly
    like a microphone; on a SimulatedClock that costs no wall time.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pace: Pace = "realtime",
        block_ms: float = 20.0,
        start_pts: float | None = None,
    ) -> None:
        if pace not in ("realtime", "fast"):
            raise ValueError(f"pace must be 'realtime' or 'fast', got {pace!r}")
        if block_ms <= 0:
            raise ValueError("block_ms must be positive")
        self.path = Path(path)
        self.pace = pace
        self.block = max(1, int(round(INTERNAL_RATE * block_ms / 1000)))
        self.start_pts = start_pts
        self.name = "file"
        # open now so that a bad file fails before any pipeline starts
        open_audio(self.path).close()

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        t0 = clock.now() if self.start_pts is None else self.start_pts
        sent = 0
        pending = np.zeros(0, dtype=np.float32)
        for chunk in iter_blocks(self.path):
            pending = np.concatenate([pending, chunk]) if len(pending) else chunk
            while len(pending) >= self.block:
                frame_samples, pending = pending[: self.block], pending[self.block :]
                yield await self._emit(clock, t0, sent, frame_samples)
                sent += self.block
        if len(pending):
            yield await self._emit(clock, t0, sent, pending)
            sent += len(pending)
        yield EndOfStream(pts=t0 + sent / INTERNAL_RATE)

    async def _emit(self, clock: Clock, t0: float, offset: int, samples: np.ndarray) -> AudioFrame:
        pts = t0 + offset / INTERNAL_RATE
        if self.pace == "realtime":
            await clock.sleep_until(pts + len(samples) / INTERNAL_RATE)
        return AudioFrame(samples=np.array(samples, dtype=np.float32), pts=pts)


class FileSink(Stage):
    """Writes every AudioFrame it receives to a WAV or FLAC file; forwards all frames."""

    def __init__(self, path: str | os.PathLike[str], *, subtype: str | None = None) -> None:
        super().__init__()
        self.name = "file-sink"
        self.path = Path(path)
        self.subtype = subtype
        self._file: sf.SoundFile | None = None
        if not self.path.parent.exists():
            raise AudioInputError(f"output folder does not exist: {self.path.parent}")
        # fail early, with the format named, if libsndfile cannot write this extension
        if self.path.suffix.lower().lstrip(".") not in {f.lower() for f in sf.available_formats()}:
            raise AudioInputError(f"unsupported output format: {self.path.suffix or '(none)'}")

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, AudioFrame):
            if self._file is None:
                self._file = sf.SoundFile(
                    str(self.path), "w", samplerate=frame.sample_rate, channels=frame.channels,
                    subtype=self.subtype,
                )
            self._file.write(frame.samples)
        await self.push(frame)

    async def aclose(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        await super().aclose()
