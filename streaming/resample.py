"""Channel and rate conversion to the internal format (16 kHz mono float32).

Resampling is libsoxr's (``soxr``): a streaming, high-quality polyphase resampler, so converting
block by block gives the same samples as converting a whole file.
"""

from __future__ import annotations

import numpy as np
import soxr

from .frames import INTERNAL_RATE


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of an (n, channels) array; 1-D input is returned as float32."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.shape[1] == 1:
        return samples[:, 0].astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


class StreamResampler:
    """Converts successive blocks from ``in_rate`` to ``out_rate`` with state kept in between."""

    def __init__(self, in_rate: int, out_rate: int = INTERNAL_RATE, quality: str = "HQ") -> None:
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._stream = (
            None
            if self.in_rate == self.out_rate
            else soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)
        )

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if self._stream is None:
            return block
        return self._stream.resample_chunk(block, last=last)


def resample(samples: np.ndarray, in_rate: int, out_rate: int = INTERNAL_RATE) -> np.ndarray:
    """Whole-buffer conversion (used where a signal is already in memory)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if in_rate == out_rate:
        return samples
    return soxr.resample(samples, in_rate, out_rate, quality="HQ").astype(np.float32, copy=False)
