"""Live audio through PortAudio (sounddevice): microphone source, speaker sink, device listing.

The PortAudio callbacks run on PortAudio's own thread. They only copy samples in or out of a
buffer; resampling, framing and timestamps happen on the event loop side. Timestamps count
samples rather than reading the wall clock per block, so they do not jitter with scheduling.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .clock import Clock
from .errors import DeviceError
from .frames import INTERNAL_RATE, AudioFrame, EndOfStream, Frame, Interrupt
from .pipeline import Source, Stage
from .resample import StreamResampler, to_mono

if TYPE_CHECKING:
    from .aec import EchoReference

log = logging.getLogger(__name__)


def _sd() -> Any:
    """Import sounddevice lazily: without the PortAudio library it raises OSError at import."""
    try:
        import sounddevice as sd
    except OSError as exc:  # pragma: no cover - depends on the machine
        raise DeviceError(f"PortAudio is not available ({exc}); install libportaudio2") from None
    return sd


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool


def list_devices() -> list[DeviceInfo]:
    sd = _sd()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in, default_out = sd.default.device
    except sd.PortAudioError as exc:
        raise DeviceError(f"cannot query audio devices: {exc}") from None
    out = []
    for i, d in enumerate(devices):
        out.append(
            DeviceInfo(
                index=i,
                name=d["name"],
                hostapi=hostapis[d["hostapi"]]["name"],
                max_input_channels=int(d["max_input_channels"]),
                max_output_channels=int(d["max_output_channels"]),
                default_samplerate=float(d["default_samplerate"]),
                is_default_input=i == default_in,
                is_default_output=i == default_out,
            )
        )
    return out


def resolve_device(spec: str | int | None, kind: str) -> DeviceInfo:
    """Find an input or output device by index, exact name or unique name fragment.

    ``None`` or "default" means PortAudio's default device for ``kind``.
    """
    if kind not in ("input", "output"):
        raise ValueError(kind)
    devices = list_devices()

    def usable(d: DeviceInfo) -> bool:
        return (d.max_input_channels if kind == "input" else d.max_output_channels) > 0

    candidates = [d for d in devices if usable(d)]
    wants_default = spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "default"))
    if not candidates:
        asked = "" if wants_default else f"unknown {kind} device {str(spec)!r}: "
        raise DeviceError(f"{asked}no audio {kind} device found (is there a sound card or PulseAudio?)")
    if wants_default:
        chosen = [d for d in candidates if (d.is_default_input if kind == "input" else d.is_default_output)]
        if not chosen:
            raise DeviceError(f"no default audio {kind} device; pick one from 'duplex devices'")
        return chosen[0]
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
        for d in candidates:
            if d.index == idx:
                return d
        raise DeviceError(f"unknown {kind} device index {idx}; available: {_names(candidates)}")
    exact = [d for d in candidates if d.name.lower() == text.lower()]
    if exact:
        return exact[0]
    partial = [d for d in candidates if text.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if len(partial) > 1:
        raise DeviceError(f"{kind} device name {text!r} is ambiguous: {_names(partial)}")
    raise DeviceError(f"unknown {kind} device {text!r}; available: {_names(candidates)}")


def _names(devs: list[DeviceInfo]) -> str:
    return ", ".join(f"{d.index}:{d.name}" for d in devs)


class MicSource(Source):
    """Captures from a PortAudio input device and yields 16 kHz mono AudioFrames of ``block_ms``.

    ``max_seconds`` bounds the capture (None runs until ``stop()`` or cancellation). Overruns are
    counted in ``overflows`` and logged, never silently hidden. Blocks dropped because the consumer
    fell ``buffer_seconds`` behind are counted in ``dropped_blocks`` and replaced by silence, so the
    timestamps that follow stay on the time their audio was captured (the echo canceller pairs them
    with what the speaker played then).
    """

    def __init__(
        self,
        device: str | int | None = None,
        *,
        block_ms: float = 20.0,
        sample_rate: int | None = None,
        max_seconds: float | None = None,
        buffer_seconds: float = 2.0,
    ) -> None:
        self.name = "mic"
        self.device = resolve_device(device, "input")
        self.device_rate = int(sample_rate or self.device.default_samplerate)
        self.channels = min(2, self.device.max_input_channels)
        self.block = max(1, int(round(INTERNAL_RATE * block_ms / 1000)))
        self.max_seconds = max_seconds
        self._max_blocks = max(4, int(buffer_seconds * 1000 / block_ms))
        self._stop = threading.Event()
        self.overflows = 0
        self.dropped_blocks = 0

    def stop(self) -> None:
        self._stop.set()

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        sd = _sd()
        loop = asyncio.get_running_loop()
        blocks: collections.deque[np.ndarray] = collections.deque()
        ready = asyncio.Event()
        lock = threading.Lock()

        def on_loop() -> None:
            ready.set()

        first: list[float] = []  # when the first block's first sample was captured
        lost = [0]  # device frames dropped (oldest first) since the loop last took the blocks

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status.input_overflow:
                self.overflows += 1
            if not first:
                # stamped here, not when the event loop gets to it: a busy loop would stamp it late
                first.append(clock.now() - frames / self.device_rate)
            with lock:
                if len(blocks) >= self._max_blocks:
                    lost[0] += len(blocks.popleft())
                    self.dropped_blocks += 1
                blocks.append(indata.copy())
            loop.call_soon_threadsafe(on_loop)

        resampler = StreamResampler(self.device_rate, INTERNAL_RATE)
        device_block = max(1, int(round(self.device_rate * self.block / INTERNAL_RATE)))
        try:
            stream = sd.InputStream(
                device=self.device.index,
                samplerate=self.device_rate,
                channels=self.channels,
                dtype="float32",
                blocksize=device_block,
                callback=callback,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise DeviceError(f"cannot open input device {self.device.name!r}: {exc}") from None
        log.info(
            "capturing from %s (%d Hz, %d ch) -> %d Hz mono",
            self.device.name, self.device_rate, self.channels, INTERNAL_RATE,
        )
        pending = np.zeros(0, dtype=np.float32)
        sent = 0
        t0: float | None = None
        limit = None if self.max_seconds is None else int(self.max_seconds * INTERNAL_RATE)
        with stream:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(ready.wait(), timeout=0.5)
                except TimeoutError:
                    continue
                ready.clear()
                with lock:
                    got = list(blocks)
                    blocks.clear()
                    gap, lost[0] = lost[0], 0
                if gap:
                    # what a slow consumer made us drop was captured before what is left: silence in
                    # its place keeps every later timestamp on the time it was captured
                    got.insert(0, np.zeros((gap, self.channels), np.float32))
                for raw in got:
                    if t0 is None:
                        # the first block was captured during the block period before it arrived
                        t0 = first[0] if first else clock.now() - len(raw) / self.device_rate
                    mono = resampler.process(to_mono(raw))
                    pending = np.concatenate([pending, mono]) if len(pending) else mono
                while len(pending) >= self.block and t0 is not None:
                    chunk, pending = pending[: self.block], pending[self.block :]
                    yield AudioFrame(samples=np.array(chunk), pts=t0 + sent / INTERNAL_RATE)
                    sent += self.block
                    if limit is not None and sent >= limit:
                        self._stop.set()
                        break
        if self.overflows or self.dropped_blocks:
            log.warning(
                "microphone: %d input overflows, %d blocks dropped by a slow consumer",
                self.overflows, self.dropped_blocks,
            )
        yield EndOfStream(pts=(t0 or clock.now()) + sent / INTERNAL_RATE)


#: how much earlier than the DAC time a speaker stamps the echo canceller's reference (seconds)
REFERENCE_LEAD = 0.05


class StreamClock:
    """When the block a PortAudio output callback writes will be heard, on the pipeline clock.

    PortAudio reports the block's DAC time on its own stream clock. The offset between that clock
    and the pipeline clock is measured once, when the stream is opened (the tightest of five
    back-to-back readings), so a callback that runs late on a busy CPU does not move the times
    it reports: stamping with the pipeline clock inside the callback did, by milliseconds, and the
    echo canceller's reference was re-anchored at each jump. Host APIs that report no DAC time
    fall back to the pipeline clock plus the stream's latency.
    """

    def __init__(self, clock: Clock, stream: Any) -> None:
        self.clock = clock
        self.stream = stream
        self.offset: float | None = None  # pipeline clock minus PortAudio's stream clock
        best = math.inf
        try:
            for _ in range(5):
                a = clock.now()
                pa = float(stream.time)
                b = clock.now()
                if pa > 0 and b - a < best:
                    best, self.offset = b - a, (a + b) / 2 - pa
        except Exception:  # noqa: BLE001 - a host API without a stream clock: use ours
            self.offset = None

    def dac_time(self, time_info: Any) -> float:
        try:
            dac = float(time_info.outputBufferDacTime)
            ahead = dac - float(time_info.currentTime) if dac > 0 else -1.0
        except (AttributeError, TypeError):
            dac, ahead = 0.0, -1.0
        if 0.0 <= ahead < 1.0 and self.offset is not None:
            return dac + self.offset
        if not 0.0 <= ahead < 1.0:  # host APIs that do not report it (zeros or garbage)
            ahead = float(getattr(self.stream, "latency", 0.0) or 0.0)
        return self.clock.now() + ahead


class SpeakerSink(Stage):
    """Plays AudioFrames on a PortAudio output device. Forwards every frame.

    ``Interrupt`` clears what is buffered but not yet played, at once. ``played_seconds`` says how
    much audio actually left through the callback: later stages use it to know what the user heard.
    At EndOfStream the sink waits until its buffer has played out.

    With a ``reference``, every block the callback writes (silence included) is pushed to it,
    stamped with the pipeline-clock time it reaches the speaker (``StreamClock``), less
    ``reference_lead``: the echo canceller's reference. The lead is there because a reported DAC
    time can be late (PulseAudio's null sink monitor hears a block 20-30 ms before it). An echo
    that arrives before its reference cannot be cancelled; one that arrives after it is found by
    the canceller's delay estimator.
    """

    def __init__(
        self,
        device: str | int | None = None,
        *,
        sample_rate: int | None = None,
        block_ms: float = 20.0,
        max_buffer_seconds: float = 1.0,
        reference: EchoReference | None = None,
        reference_lead: float = REFERENCE_LEAD,
    ) -> None:
        super().__init__()
        self.name = "speaker"
        self.device = resolve_device(device, "output")
        self.device_rate = int(sample_rate or self.device.default_samplerate)
        self.block = max(1, int(round(self.device_rate * block_ms / 1000)))
        self.max_buffer = int(max_buffer_seconds * self.device_rate)
        self._buf: collections.deque[np.ndarray] = collections.deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._resampler: StreamResampler | None = None
        self._stream: Any = None
        self.played_samples = 0
        self.underflows = 0
        self.reference = reference
        self.reference_lead = reference_lead
        self._times: StreamClock  # with the stream, before it starts

    @property
    def played_seconds(self) -> float:
        return self.played_samples / self.device_rate

    @property
    def buffered_seconds(self) -> float:
        return self._buffered / self.device_rate

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.output_underflow:
            self.underflows += 1
        filled = 0
        with self._lock:
            while filled < frames and self._buf:
                head = self._buf[0]
                n = min(frames - filled, len(head))
                outdata[filled : filled + n, 0] = head[:n]
                if n == len(head):
                    self._buf.popleft()
                else:
                    self._buf[0] = head[n:]
                filled += n
            self._buffered -= filled
            self.played_samples += filled
        outdata[filled:, 0] = 0.0
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]
        if self.reference is not None:
            t = self._times.dac_time(time_info)  # set before the stream starts
            self.reference.push(outdata[:, 0].copy(), t - self.reference_lead, self.device_rate)

    def _ensure_stream(self) -> None:
        if self._stream is not None:
            return
        sd = _sd()
        try:
            self._stream = sd.OutputStream(
                device=self.device.index,
                samplerate=self.device_rate,
                channels=min(2, self.device.max_output_channels),
                dtype="float32",
                blocksize=self.block,
                callback=self._callback,
            )
            self._times = StreamClock(self.clock, self._stream)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise DeviceError(f"cannot open output device {self.device.name!r}: {exc}") from None

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, Interrupt):
            self.clear()
        elif isinstance(frame, AudioFrame):
            self._ensure_stream()
            if self._resampler is None or self._resampler.in_rate != frame.sample_rate:
                self._resampler = StreamResampler(frame.sample_rate, self.device_rate)
            out = self._resampler.process(frame.mono)
            # backpressure: never hold more than max_buffer_seconds of unplayed audio
            while self._buffered + len(out) > self.max_buffer and self._buffered > 0:
                await asyncio.sleep(self.block / self.device_rate)
            with self._lock:
                self._buf.append(out)
                self._buffered += len(out)
        await self.push(frame)

    def clear(self) -> float:
        """Drop unplayed audio now; returns the seconds dropped."""
        with self._lock:
            dropped = self._buffered
            self._buf.clear()
            self._buffered = 0
        return dropped / self.device_rate

    async def flush(self) -> None:
        while self._buffered > 0 and self._stream is not None:
            await asyncio.sleep(self.block / self.device_rate)
        if self._stream is not None:
            # let the device drain its own buffer too
            await asyncio.sleep(float(self._stream.latency or 0.0) + self.block / self.device_rate)

    async def aclose(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            finally:
                self._stream = None
        await super().aclose()
