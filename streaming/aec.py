"""Acoustic echo cancellation: the agent must not hear itself on open speakers.

Three pieces:

* ``EchoCanceller``: the synchronous, I/O-free core. ``process(mic, ref)`` takes 16 kHz mono
  float32 blocks of any length (buffered internally into ``block``-sample blocks) and returns as
  many samples, delayed by ``latency`` samples (2 blocks less one: one to fill a block, one for the
  post-filter's overlap-add). ``flush()`` returns the last ``latency`` samples. The numba kernels
  and the algorithm are in ``aec_dsp``.
* ``EchoReference``: a thread-safe ring buffer of what the speaker actually played, stamped with
  pipeline-clock times. The speaker sink's callback (or any agent audio writer) pushes; the AEC
  stage reads the stretch that lines up with each microphone frame's ``pts``.
* ``AECStage``: passes every AudioFrame through the canceller before VAD. Output frames keep the
  input frames' ``pts`` and sizes (each is emitted once its processed samples exist, so the stage
  adds ``latency`` of delay but never shifts time); other data frames and ``Flush`` keep their
  place behind the audio. While nothing has been played for the whole filter span, the canceller
  bypasses itself (no FFT), so an idle agent costs next to nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from .frames import INTERNAL_RATE, AudioFrame, ControlFrame, Frame
from .pipeline import Stage
from .resample import StreamResampler


@dataclass(frozen=True)
class AECConfig:
    #: run the echo canceller before VAD and recognition
    enabled: bool = True
    #: block size in samples at 16 kHz (FFT size is twice this); the stage's delay is 2 blocks
    block: Literal[64, 128, 256, 512] = 128
    #: echo tail the adaptive filter models after the bulk delay, ms
    tail_ms: Annotated[float, Field(gt=0, le=1000)] = 300.0
    #: the bulk-delay estimator searches reference lags up to this, ms (0: the filter starts at lag 0)
    max_delay_ms: Annotated[float, Field(ge=0, le=1000)] = 250.0
    #: blocks of filter kept in front of the estimated delay (covers estimation error)
    delay_margin_blocks: Annotated[int, Field(ge=0, le=16)] = 2
    #: scale of the adaptive step size (1 = the residual-to-error optimum)
    step: Annotated[float, Field(gt=0, le=4)] = 1.0
    #: step multiplier while double talk is detected (the step control is robust on its own)
    double_talk_step: Annotated[float, Field(ge=0, le=1)] = 1.0
    #: double talk when echo-estimate/mic correlation falls below this with the far end playing
    double_talk_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.6
    #: maximum attenuation of the residual-echo post-filter, dB (0 disables the post-filter)
    suppression_db: Annotated[float, Field(ge=0, le=100)] = 45.0
    #: residual-echo over-estimation of the post-filter (more: less echo, more user distortion)
    overdrive: Annotated[float, Field(gt=0, le=20)] = 2.0
    #: further over-estimation while the microphone hears only echo (scaled by how sure we are)
    echo_only_overdrive: Annotated[float, Field(ge=1, le=1000)] = 10.0
    #: residual echo is remembered this long (60 dB decay) to cover reverberation, ms
    residual_tail_ms: Annotated[float, Field(gt=0, le=2000)] = 250.0
    #: decision-directed smoothing of the post-filter gain (0 = instantaneous)
    gain_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.8
    #: the stage reads the reference this much before the mic time, so that what a player pushed
    #: just as its echo was captured is there to read; an echo must come back at least this late
    #: after its reference's timestamp (speakers stamp theirs early for that), ms
    ref_margin_ms: Annotated[float, Field(ge=0, le=200)] = 10.0
    #: seconds of played audio the reference ring buffer keeps
    reference_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0


@dataclass(frozen=True, slots=True)
class AECStats:
    #: estimated echo attenuation, mic to output, dB (smoothed over far-end-only blocks)
    erle_db: float
    #: the same for the linear filter alone, dB
    erle_linear_db: float
    #: double talk detected in the last block
    double_talk: bool
    #: the linear filter removes enough echo (6 dB) for the post-filter to trust its estimate
    converged: bool
    #: bypassed: nothing played within the filter span
    idle: bool
    #: where the filter window starts, ms after the reference
    bulk_delay_ms: float
    #: the delay estimator's current estimate, ms (None before it has one)
    delay_estimate_ms: float | None
    #: leakage (residual echo / echo estimate power) of the step control
    leak: float
    #: normalised echo-estimate/mic correlation of the double-talk detector
    ncc: float
    #: times the foreground filter took the background's weights / the background was rolled back
    foreground_updates: int
    background_resets: int
    #: times the foreground filter was dropped because it added more than it removed (the echo
    #: path moved)
    path_changes: int
    blocks: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class EchoCanceller:
    """Streaming echo canceller for 16 kHz mono float32 audio. See the module docstring."""

    sample_rate = INTERNAL_RATE

    def __init__(self, config: AECConfig | None = None) -> None:
        from . import aec_dsp

        self._dsp = aec_dsp
        self.config = c = config or AECConfig()
        self.block = n = int(c.block)
        self.partitions = max(1, math.ceil(c.tail_ms / 1000 * INTERNAL_RATE / n))
        self.max_delay_blocks = math.ceil(c.max_delay_ms / 1000 * INTERNAL_RATE / n)
        self.latency = 2 * n - 1
        self._tables = aec_dsp.fft_tables(2 * n)
        m = 2 * n
        idx = np.arange(m)
        self._win = np.sin(np.pi * idx / m)  # sqrt of a periodic Hann: squares sum to one at 50 %
        block_s = n / INTERNAL_RATE
        prm = np.zeros(aec_dsp.N_PARAMS)
        prm[aec_dsp.P_STEP] = c.step
        prm[aec_dsp.P_FLOOR] = 10 ** (-c.suppression_db / 20) if c.suppression_db > 0 else 1.0
        prm[aec_dsp.P_OVERDRIVE] = c.overdrive
        prm[aec_dsp.P_RES_DECAY] = 10 ** (-6.0 * block_s / (c.residual_tail_ms / 1000))
        prm[aec_dsp.P_DTD] = c.double_talk_threshold
        prm[aec_dsp.P_SILENCE] = 1e-5  # -100 dBFS: its echo is far below any microphone's noise
        prm[aec_dsp.P_DT_HANG] = math.ceil(0.3 / block_s)
        prm[aec_dsp.P_DE_LAMBDA] = 1.0 - 1.0 / math.ceil(0.4 / block_s)
        prm[aec_dsp.P_DE_MIN] = 0.08
        prm[aec_dsp.P_MARGIN] = c.delay_margin_blocks
        # post-filter memory must decay below 1e-6 of its peak before the bypass may start
        prm[aec_dsp.P_HOLD] = math.ceil(math.log(1e-6) / math.log(prm[aec_dsp.P_RES_DECAY])) if prm[aec_dsp.P_RES_DECAY] > 0 else 0
        prm[aec_dsp.P_DT_STEP] = c.double_talk_step
        prm[aec_dsp.P_DD] = c.gain_smoothing
        prm[aec_dsp.P_ECHO_ONLY_OD] = c.echo_only_overdrive
        self._prm = prm
        self._n_parts = 0
        self.reset()
        # compile (first use on a machine: ~15 s) or load numba's cache now, not mid-stream
        self.process(np.zeros(n, np.float32), np.zeros(n, np.float32))
        self.reset()

    # -- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: filters, estimates and the stream position."""
        dsp = self._dsp
        n, p = self.block, self.partitions
        k = n + 1
        lags = self.max_delay_blocks + 2 if self.max_delay_blocks > 0 else 0
        self._fs = np.zeros(dsp.N_FSTATE)
        self._fs[dsp.F_PEY] = 1e-12
        self._fs[dsp.F_PYY] = 1e-12
        self._is = np.zeros(dsp.N_ISTATE, dtype=np.int64)
        self._is[dsp.I_DE_EST] = -1
        self._is[dsp.I_DE_CAND] = -1
        h = self.max_delay_blocks + p + 1
        self._hist = np.zeros((h, k), np.complex128)
        self._hist_e = np.zeros(h)
        self._W = np.zeros((p, k), np.complex128)
        self._F = np.zeros((p, k), np.complex128)
        self._Px = np.zeros(k)
        self._Eh = np.zeros(k)
        self._Yh = np.zeros(k)
        self._prop = np.zeros(p)
        self._erle_d = np.zeros(k)
        self._erle_e = np.zeros(k)
        self._coh = np.zeros((lags, k), np.complex128)
        self._pd = np.zeros(k)
        self._pxd = np.zeros(k)
        self._restart_stream()

    def _restart_stream(self) -> None:
        """A new stream: time-continuity buffers cleared, learned filters and estimates kept."""
        n, k = self.block, self.block + 1
        self._hist[:] = 0
        self._hist_e[:] = 0
        self._is[self._dsp.I_SILENT] = 0
        self._is[self._dsp.I_STREAM] = 0
        self._xprev = np.zeros(n)
        self._dprev = np.zeros(n)
        self._eprev = np.zeros(n)
        self._yprev = np.zeros(n)
        self._ola = np.zeros(n)
        self._rmem = np.zeros(k)
        self._a2prev = np.zeros(k)
        self._set_parts(self._n_parts)
        self._pending_d = np.zeros(0, np.float64)
        self._pending_x = np.zeros(0, np.float64)
        self._out = np.zeros(n - 1, np.float64)  # with the first (empty) block: `latency` zeros

    def _set_parts(self, count: int) -> None:
        n = self.block
        self._n_parts = count
        self._pprev = np.zeros((count, n))
        self._pola = np.zeros((count, n))
        self._pending_p = np.zeros((count, 0))
        self._out_p = np.zeros((count, n - 1))

    # -- processing ----------------------------------------------------------------------------

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Echo-cancelled ``mic``, as many samples as given, ``latency`` samples late.

        ``ref`` is what the speaker played, sample-aligned with ``mic`` (the echo may come up to
        ``max_delay_ms + tail_ms`` after its reference, never before).
        """
        out, _ = self._run(mic, ref, None, adapt=True)
        return out

    def process_parts(
        self, mic: np.ndarray, ref: np.ndarray, parts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``process``, plus additive components of ``mic`` (``parts[0]`` the echo, then e.g. the
        user and the noise) put through exactly the same time-varying processing.

        For evaluation: the filter adapts on ``mic`` alone, but because the canceller is linear
        for a given echo estimate and gain sequence, ``parts_out[0]`` is the residual echo and
        ``parts_out[1:]`` are what became of the other components. They sum to the output.
        """
        parts = np.atleast_2d(np.asarray(parts, dtype=np.float64))
        if parts.shape[1] != len(mic):
            raise ValueError(f"parts must have shape (count, {len(mic)}), got {parts.shape}")
        return self._run(mic, ref, parts, adapt=True)

    def flush(self) -> np.ndarray:
        """The last ``latency`` output samples (the input is padded with silence, without
        adapting). The next ``process`` call starts a new stream with the filters kept."""
        n = self.block
        pad = (n - len(self._pending_d)) % n + n
        zeros = np.zeros(pad)
        parts = np.zeros((self._n_parts, pad)) if self._n_parts else None
        self._run(zeros, zeros, parts, adapt=False, take=0)
        tail = self._out[: self.latency].astype(np.float32)
        self._restart_stream()
        return tail

    def flush_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """``flush`` for ``process_parts``: the output tail and the components' tails."""
        n = self.block
        pad = (n - len(self._pending_d)) % n + n
        zeros = np.zeros(pad)
        self._run(zeros, zeros, np.zeros((self._n_parts, pad)), adapt=False, take=0)
        tail = self._out[: self.latency].astype(np.float32)
        tail_p = self._out_p[:, : self.latency].astype(np.float32)
        self._restart_stream()
        return tail, tail_p

    def _run(self, mic, ref, parts, *, adapt: bool, take: int | None = None):
        mic = np.asarray(mic, dtype=np.float64).reshape(-1)
        ref = np.asarray(ref, dtype=np.float64).reshape(-1)
        if mic.shape != ref.shape:
            raise ValueError(f"mic and ref must have the same length, got {mic.shape[0]} and {ref.shape[0]}")
        count = 0 if parts is None else parts.shape[0]
        if count != self._n_parts:
            if self._is[self._dsp.I_STREAM] or len(self._pending_d):
                raise ValueError("the number of parts cannot change in the middle of a stream")
            self._set_parts(count)
        n = self.block
        d = np.concatenate([self._pending_d, mic]) if len(self._pending_d) else mic
        x = np.concatenate([self._pending_x, ref]) if len(self._pending_x) else ref
        p = np.concatenate([self._pending_p, parts], axis=1) if count else np.zeros((0, len(d)))
        usable = (len(d) // n) * n
        blk = np.empty(usable)
        blk_p = np.empty((count, usable))
        if usable:
            dsp = self._dsp
            bitrev, tw, rtw = self._tables
            dsp.process_blocks(
                d[:usable], x[:usable], np.ascontiguousarray(p[:, :usable]), blk, blk_p, adapt, self._prm, self._fs, self._is,
                self._hist, self._hist_e, self._W, self._F, self._Px, self._Eh, self._Yh, self._prop,
                self._xprev, self._dprev, self._eprev, self._yprev, self._ola, self._rmem, self._a2prev,
                self._erle_d, self._erle_e,
                self._coh, self._pd, self._pxd, self._pprev, self._pola,
                bitrev, tw, rtw, self._win,
            )
        self._pending_d = d[usable:].copy()
        self._pending_x = x[usable:].copy()
        self._pending_p = p[:, usable:].copy()
        self._out = np.concatenate([self._out, blk])
        if count:
            self._out_p = np.concatenate([self._out_p, blk_p], axis=1)
        take = len(mic) if take is None else take
        out = self._out[:take].astype(np.float32)
        self._out = self._out[take:]
        out_p = None
        if count:
            out_p = self._out_p[:, :take].astype(np.float32)
            self._out_p = self._out_p[:, take:]
        return out, out_p

    # -- introspection -------------------------------------------------------------------------

    @property
    def stats(self) -> AECStats:
        dsp, fs, st = self._dsp, self._fs, self._is
        block_ms = 1000 * self.block / INTERNAL_RATE

        def ratio_db(a: float, b: float) -> float:
            return float(10 * np.log10(a / b)) if a > 0 and b > 0 else 0.0

        est = int(st[dsp.I_DE_EST])
        return AECStats(
            erle_db=ratio_db(fs[dsp.F_ERLE_IN], fs[dsp.F_ERLE_OUT]),
            erle_linear_db=ratio_db(fs[dsp.F_ERLE_IN], fs[dsp.F_ERLE_LIN]),
            double_talk=bool(st[dsp.I_DT]),
            converged=bool(st[dsp.I_CONVERGED]),
            idle=bool(st[dsp.I_BYPASS]),
            bulk_delay_ms=float(st[dsp.I_BULK] * block_ms),
            delay_estimate_ms=None if est < 0 else float(est * block_ms),
            leak=float(fs[dsp.F_LEAK]),
            ncc=float(fs[dsp.F_XI]),
            foreground_updates=int(st[dsp.I_FG_UPD]),
            background_resets=int(st[dsp.I_BG_RESET]),
            path_changes=int(st[dsp.I_PATH_CHANGES]),
            blocks=int(st[dsp.I_COUNT]),
        )


def cancel(mic: np.ndarray, ref: np.ndarray, config: AECConfig | None = None,
           canceller: EchoCanceller | None = None) -> np.ndarray:
    """Whole-signal convenience: the cancelled signal, time-aligned with ``mic``."""
    ec = canceller or EchoCanceller(config)
    out = np.concatenate([ec.process(mic, ref), ec.flush()])
    return out[ec.latency :]


# ---------------------------------------------------------------------------------- reference


class EchoReference:
    """What the speaker played, on the pipeline clock, for the echo canceller to read.

    ``push(samples, t)`` appends played audio whose first sample left the speaker at pipeline
    time ``t``. Successive pushes are treated as one continuous stream (timestamps jitter; the
    samples do not); only when a timestamp disagrees with the running sample count by more than
    ``tolerance_s`` (a gap, a device restart, clock drift) is the stream re-anchored there. The
    tolerance is wider than a host API's wobble in the DAC times it reports (PulseAudio's moved by
    4 ms under load, and following it misaligned a converged canceller) and narrower than the
    gap an underflow leaves, which is a whole callback block (20 ms).
    Other rates are resampled to 16 kHz on the way in (continuously: the speaker callback pushes
    every block it writes, silence included). ``read(t, n)`` returns the ``n`` samples played
    from time ``t`` on, zeros where nothing was played. Safe to push and read from different
    threads (the PortAudio callback and the AEC stage).
    """

    def __init__(self, seconds: float = 5.0, *, tolerance_s: float = 0.012, silence: float = 1e-5) -> None:
        self.rate = INTERNAL_RATE
        self.capacity = int(seconds * self.rate)
        self.tolerance = tolerance_s
        self.silence = silence
        self._lock = threading.Lock()
        self._buf = np.zeros(self.capacity, np.float32)
        self._origin: float | None = None  # pipeline time of ring index 0
        self._write = 0  # absolute index (16 kHz samples) after the last sample written
        self._in_rate: int | None = None
        self._in_count = 0  # input samples since the last anchor, at the input rate
        self._anchor_t = 0.0  # time of the last anchor
        self._resampler: StreamResampler | None = None
        self._last_sound = -math.inf
        self.reanchors = 0

    def push(self, samples: np.ndarray, t: float, rate: int = INTERNAL_RATE) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._origin is None or rate != self._in_rate:
                self._anchor(t, rate, first=self._origin is None)
            else:
                expected = self._anchor_t + self._in_count / rate
                if abs(t - expected) > self.tolerance:
                    self._anchor(t, rate)
                    self.reanchors += 1
            self._in_count += len(samples)
            out = self._resampler.process(samples) if self._resampler is not None else samples
            start = self._write
            self._store(start, out)
            self._write = start + len(out)
            if len(out) and float(np.max(np.abs(out))) >= self.silence:
                self._last_sound = self._origin + self._write / self.rate

    def _anchor(self, t: float, rate: int, first: bool = False) -> None:
        if first:
            self._origin = t
        self._in_rate = rate
        self._in_count = 0
        self._anchor_t = t
        index = int(round((t - self._origin) * self.rate))
        if index > self._write:  # a gap: nothing was played in between
            self._store(self._write, np.zeros(min(index - self._write, self.capacity), np.float32))
        self._write = index
        self._resampler = StreamResampler(rate, self.rate, quality="HQ") if rate != self.rate else None

    def _store(self, start: int, data: np.ndarray) -> None:
        if len(data) > self.capacity:
            start += len(data) - self.capacity
            data = data[-self.capacity :]
        pos = start % self.capacity
        first = min(len(data), self.capacity - pos)
        self._buf[pos : pos + first] = data[:first]
        self._buf[: len(data) - first] = data[first:]

    def read(self, t: float, n: int) -> np.ndarray:
        """The ``n`` samples played from pipeline time ``t`` on (zeros where none were)."""
        out = np.zeros(n, np.float32)
        with self._lock:
            if self._origin is None:
                return out
            start = int(round((t - self._origin) * self.rate))
            lo = max(start, self._write - self.capacity, 0)
            hi = min(start + n, self._write)
            if hi <= lo:
                return out
            pos = lo % self.capacity
            count = hi - lo
            first = min(count, self.capacity - pos)
            out[lo - start : lo - start + first] = self._buf[pos : pos + first]
            out[lo - start + first : hi - start] = self._buf[: count - first]
        return out

    @property
    def last_sound(self) -> float:
        """Pipeline time just after the last non-silent sample played (-inf if none)."""
        with self._lock:
            return self._last_sound

    def clear(self) -> None:
        with self._lock:
            self._origin = None
            self._write = 0
            self._resampler = None
            self._in_rate = None
            self._last_sound = -math.inf
            self._buf[:] = 0


class ShiftedReference:
    """Pushes into an ``EchoReference`` with every time moved by ``offset`` seconds: a fixed lead
    for a speaker whose reported DAC time can be late, or a mapping from one timeline onto
    another. ``offset`` may be changed between stretches of speech."""

    def __init__(self, reference: EchoReference, offset: float = 0.0) -> None:
        self.reference = reference
        self.offset = offset

    def push(self, samples: np.ndarray, t: float, rate: int = INTERNAL_RATE) -> None:
        self.reference.push(samples, t + self.offset, rate)


# -------------------------------------------------------------------------------------- stage


class AECStage(Stage):
    """Cancels the echo of ``reference`` in every AudioFrame, before VAD.

    Output frames have the input frames' ``pts`` and lengths; each leaves once the canceller has
    produced its samples (``latency`` later). Data frames and in-band control frames (``Flush``)
    wait behind the audio ahead of them; urgent ones (``Interrupt``) pass at once. The work per
    frame is a few tens of microseconds of numba, cheaper than a hop to a worker thread, so it
    runs inline.
    """

    def __init__(self, config: AECConfig | None = None, reference: EchoReference | None = None,
                 canceller: EchoCanceller | None = None) -> None:
        super().__init__()
        self.name = "aec"
        self.config = config or AECConfig()
        self.reference = reference
        self.canceller = canceller or EchoCanceller(self.config)
        self._margin = self.config.ref_margin_ms / 1000
        self._held: collections.deque[Frame] = collections.deque()
        self._ready = np.zeros(0, np.float32)
        self._skip = self.canceller.latency
        self.frames_in = 0

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != INTERNAL_RATE:
                raise ValueError(f"AECStage needs {INTERNAL_RATE} Hz audio, got {frame.sample_rate} Hz")
            mono = frame.mono
            n = frame.num_samples
            if self.reference is not None:
                ref = self.reference.read(frame.pts - self._margin, n)
            else:
                ref = np.zeros(n, np.float32)
            self._accept(self.canceller.process(mono, ref))
            self._held.append(frame)
            self.frames_in += 1
            await self._release()
        elif isinstance(frame, ControlFrame) and type(frame).urgent:
            await self.push(frame)
        elif self._held:
            self._held.append(frame)
        else:
            await self.push(frame)

    def _accept(self, out: np.ndarray) -> None:
        if self._skip:
            drop = min(self._skip, len(out))
            out = out[drop:]
            self._skip -= drop
        if len(out):
            self._ready = np.concatenate([self._ready, out]) if len(self._ready) else out

    async def _release(self) -> None:
        while self._held:
            head = self._held[0]
            if isinstance(head, AudioFrame):
                n = head.num_samples
                if len(self._ready) < n:
                    return
                samples, self._ready = self._ready[:n].copy(), self._ready[n:]
                self._held.popleft()
                await self.push(dataclasses.replace(head, samples=samples, channels=1))
            else:
                self._held.popleft()
                await self.push(head)

    async def flush(self) -> None:
        self._accept(self.canceller.flush())
        self._skip = self.canceller.latency
        await self._release()
        self._ready = np.zeros(0, np.float32)
