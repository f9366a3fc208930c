"""Word timings from cross-attention: dynamic time warping over Whisper's alignment heads.

Certain decoder heads attend to the audio frame being spoken. Their attention over the text tokens,
normalised and smoothed, is a cost matrix; the monotonic path of least cost through it (DTW) gives
each token's start frame, and words take the times of their first and last tokens.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..frames import Word
from ..models.whisper import DecoderCache, Whisper
from ..models.whisper_text import WhisperTokenizer

SECONDS_PER_POSITION = 0.02  # 50 encoder positions per second


@numba.njit(cache=True)
def _dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    acc[0, 0] = 0.0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if c0 <= c1 and c0 <= c2:
                best, t = c0, 0
            elif c1 <= c2:
                best, t = c1, 1
            else:
                best, t = c2, 2
            acc[i, j] = cost[i - 1, j - 1] + best
            trace[i, j] = t
    i, j = n, m
    rows, cols = [], []
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            t = trace[i, j]
            if t == 0:
                i -= 1
                j -= 1
            elif t == 1:
                i -= 1
            else:
                j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def warm_up_alignment() -> None:
    """Compile (or load from numba's on-disk cache) the DTW kernel now, not on the first final."""
    _dtw(np.zeros((2, 3)))


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    if x.shape[-1] < width:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def group_words(tok: WhisperTokenizer, tokens: list[int]) -> list[list[int]]:
    """Token indices of each word: a token whose text starts with a space starts a new word."""
    words: list[list[int]] = []
    for i, t in enumerate(tokens):
        piece = tok.token_text(t)
        if not words or piece.startswith(" "):
            words.append([i])
        else:
            words[-1].append(i)
    return words


@torch.inference_mode()
def word_timings(
    model: Whisper,
    tok: WhisperTokenizer,
    features: torch.Tensor,
    prompt: list[int],
    text: list[int],
    logprobs: list[float],
    heads: tuple[tuple[int, int], ...],
    t0: float,
    n_frames: int,
    cache: DecoderCache | None = None,
) -> list[Word]:
    """Words of ``text`` with times on the pipeline clock (``t0`` = time of encoder position 0);
    ``n_frames`` limits the search to the positions that hold real audio. ``cache``: the keys and
    values of the decode that wrote ``text`` after ``prompt`` over these ``features``
    (``Decoded.cache``); the alignment then runs the text alone, not the prompt, and computes no
    cross-attention keys again (base, 10 s window: 22 ms)."""
    if not text:
        return []
    words = group_words(tok, text)
    probs = [math.exp(sum(logprobs[i] for i in w) / len(w)) if logprobs else 1.0 for w in words]
    texts = [tok.decode([text[i] for i in w]).strip() for w in words]
    n_frames = max(1, min(n_frames, features.shape[-2]))
    if not heads:
        return _proportional(texts, probs, t0, n_frames * SECONDS_PER_POSITION)
    if features.dim() == 2:
        features = features.unsqueeze(0)
    collected: list[torch.Tensor] = []
    if cache is not None and cache.length >= len(prompt):
        cache.truncate(len(prompt))
        seq, first = text + [tok.eot], 0
    else:
        cache = model.decoder.cross_cache(features)
        seq, first = prompt + text + [tok.eot], len(prompt)
    model.decoder(torch.tensor([seq]), cache, collect=collected, last=0)  # attention only: no logits
    w = torch.stack([collected[layer][0, head, first : first + len(text) + 1, :n_frames] for layer, head in heads])
    w = w.float().numpy()
    w = (w - w.mean(axis=-2, keepdims=True)) / (w.std(axis=-2, keepdims=True) + 1e-6)
    w = _median_filter(w, 7).mean(axis=0)
    rows, cols = _dtw(np.ascontiguousarray(-w, dtype=np.float64))
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    token_start = cols[jumps] * SECONDS_PER_POSITION  # one entry per token (+ end of text)
    out = []
    for k, (idx, txt, p) in enumerate(zip(words, texts, probs)):
        start = token_start[idx[0]]
        end = token_start[idx[-1] + 1] if idx[-1] + 1 < len(token_start) else n_frames * SECONDS_PER_POSITION
        out.append(Word(txt, t0 + float(start), t0 + float(max(end, start)), p))
    return out


def _proportional(texts: list[str], probs: list[float], t0: float, duration: float) -> list[Word]:
    """Without alignment heads: share the duration by word length (a rough fallback)."""
    total = sum(len(t) + 1 for t in texts) or 1
    out, t = [], t0
    for txt, p in zip(texts, probs):
        d = duration * (len(txt) + 1) / total
        out.append(Word(txt, t, t + d, p))
        t += d
    return out
