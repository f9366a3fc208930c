"""Composition root: builds pipelines from a ``DuplexConfig``. The CLI is a thin shell over this."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streaming.audio_device import MicSource
from streaming.audio_file import FileSource
from streaming.clock import Clock, RealClock, SimulatedClock
from streaming.errors import DeviceError, DuplexError
from streaming.frames import Frame, SpeechEnded, SpeechStarted
from streaming.pipeline import Pipeline, Source
from streaming.stages import Callback
from streaming.vad import VADConfig, VADStage

from .config import DuplexConfig

log = logging.getLogger(__name__)

#: Debian's asterisk-core-sounds-en-wav prompt (CC-BY-SA-3.0), installed by scripts/setup
BUNDLED_DEMO = Path("/usr/share/asterisk/sounds/en_US_f_Allison/demo-congrats.wav")


@dataclass(frozen=True)
class Segment:
    start: float
    end: float

    def as_dict(self) -> dict[str, float]:
        return {"start": round(self.start, 3), "end": round(self.end, 3)}


def demo_file(cfg: DuplexConfig) -> Path:
    path = Path(cfg.audio.demo_file) if cfg.audio.demo_file else BUNDLED_DEMO
    if not path.exists():
        raise DuplexError(
            f"demo recording {path} is missing; run scripts/setup (it installs asterisk-core-sounds-en-wav) "
            "or set audio.demo_file"
        )
    return path


async def vad_segments(
    path: str | Path, cfg: DuplexConfig, *, pace: str = "fast", vad: VADConfig | None = None
) -> list[Segment]:
    """Speech segments of one file, through the same pipeline as live audio.

    ``fast`` runs on a simulated clock (deterministic, as fast as the CPU allows); ``realtime``
    paces the file like a microphone on the wall clock.
    """
    clock: Clock = SimulatedClock() if pace == "fast" else RealClock()
    source = FileSource(path, pace="realtime", block_ms=cfg.audio.block_ms, start_pts=0.0)
    segments: list[Segment] = []

    def collect(frame: Frame) -> None:
        if isinstance(frame, SpeechEnded):
            segments.append(Segment(frame.start, frame.pts))

    stages = [VADStage(vad or cfg.vad), Callback(collect, (SpeechEnded,), name="collect")]
    await Pipeline(source, stages, clock=clock, queue_size=cfg.pipeline.queue_size).run()
    return segments


def open_listen_source(cfg: DuplexConfig, device: str | None, file: str | None, seconds: float | None) -> tuple[Source, str]:
    """The microphone if there is one; otherwise (and only if no device was asked for) the demo file."""
    if file:
        return FileSource(file, pace="realtime", block_ms=cfg.audio.block_ms), f"file {file}"
    wanted = device or cfg.audio.input_device
    try:
        mic = MicSource(
            wanted,
            block_ms=cfg.audio.block_ms,
            sample_rate=cfg.audio.device_sample_rate or None,
            max_seconds=seconds,
        )
        return mic, f"microphone {mic.device.name} ({mic.device_rate} Hz)"
    except DeviceError as exc:
        if device is not None or str(wanted).strip().lower() not in ("", "default"):
            raise
        demo = demo_file(cfg)
        return (
            FileSource(demo, pace="realtime", block_ms=cfg.audio.block_ms),
            f"no microphone ({exc}); playing the bundled recording {demo} in real time",
        )


async def listen(
    cfg: DuplexConfig,
    source: Source,
    on_event: Callable[[Frame], None],
) -> Pipeline:
    """Live two-stage VAD: every SpeechStarted/SpeechEnded goes to ``on_event`` as it is decided."""
    pipeline = Pipeline(
        source,
        [VADStage(cfg.vad), Callback(on_event, (SpeechStarted, SpeechEnded), name="events")],
        clock=RealClock(),
        queue_size=cfg.pipeline.queue_size,
    )
    await pipeline.run()
    return pipeline
