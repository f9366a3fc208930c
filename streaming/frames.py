"""Typed frames: the only things that cross a stage boundary.

Frames are frozen, slotted dataclasses. Two tiers travel through the same queues:

* data frames (audio, speech events, text) keep their order and fill bounded queues, so a slow
  stage pushes back on its producer;
* control frames are markers. Those marked ``urgent`` (``Interrupt``, ``Cancel``) overtake any
  queued data frames; in-band ones (``Flush``, ``EndOfStream``) keep their place in the stream,
  because finalising before the audio queued ahead of them would lose words.

Every frame carries ``pts``: the time on the pipeline clock of the media it describes (for audio,
the capture time of its first sample). As a frame leaves each stage the pipeline appends a
``(stage, clock time)`` stamp, which is all that is needed to measure per-stage latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = [
    "Frame",
    "DataFrame",
    "ControlFrame",
    "AudioFrame",
    "SpeechStarted",
    "SpeechEnded",
    "SpeechEnding",
    "Interrupt",
    "Cancel",
    "Flush",
    "EndOfStream",
    "ErrorFrame",
    "Word",
    "PartialText",
    "FinalText",
    "INTERNAL_RATE",
]

#: Every stage after capture works on 16 kHz mono float32 in [-1, 1].
INTERNAL_RATE = 16000


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    #: pipeline-clock time (seconds) of the media this frame describes
    pts: float = 0.0
    #: (stage name, pipeline-clock time) appended as the frame leaves each stage
    stamps: tuple[tuple[str, float], ...] = ()

    def stamped(self, stage: str, t: float) -> "Frame":
        """A copy with one more stamp; frames are immutable, so stages never share mutation."""
        return dataclasses.replace(self, stamps=self.stamps + ((stage, t),))

    def stamp(self, stage: str) -> float | None:
        """The time this frame left ``stage``, or None if it never passed there."""
        for name, t in self.stamps:
            if name == stage:
                return t
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFrame(Frame):
    """Ordered payload; counts against queue bounds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFrame(Frame):
    """A marker. ``urgent`` ones jump ahead of queued data frames."""

    urgent: ClassVar[bool] = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFrame(DataFrame):
    #: float32 samples, shape (n,) for mono or (n, channels); made read-only on construction
    samples: np.ndarray
    #: samples per second
    sample_rate: int = INTERNAL_RATE
    #: interleaved channel count (1 inside the pipeline)
    channels: int = 1

    def __post_init__(self) -> None:
        s = self.samples
        if s.dtype != np.float32:
            raise TypeError(f"AudioFrame samples must be float32, got {s.dtype}")
        expected_ndim = 1 if self.channels == 1 else 2
        if s.ndim != expected_ndim or (s.ndim == 2 and s.shape[1] != self.channels):
            raise ValueError(f"AudioFrame samples shape {s.shape} does not match channels={self.channels}")
        if self.sample_rate <= 0:
            raise ValueError(f"AudioFrame sample_rate must be positive, got {self.sample_rate}")
        if s.flags.writeable:
            s.flags.writeable = False

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def end_pts(self) -> float:
        """Pipeline-clock time just after the last sample."""
        return self.pts + self.seconds

    @property
    def mono(self) -> np.ndarray:
        return self.samples if self.channels == 1 else self.samples.mean(axis=1, dtype=np.float32)

    def pcm16(self) -> bytes:
        """Little-endian signed 16-bit PCM, the format of webrtcvad, MQTT and most sinks."""
        return (np.clip(self.samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStarted(DataFrame):
    """VAD decided that speech started at ``pts`` (the estimated onset, padded)."""

    #: pipeline-clock time of the audio position at which the decision became possible
    detected_at: float = 0.0
    #: detector that fired, e.g. "two-stage"
    source: str = "vad"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechEnded(DataFrame):
    """VAD decided that the speech that began at ``start`` ended at ``pts``."""

    start: float = 0.0
    detected_at: float = 0.0
    source: str = "vad"

    @property
    def duration(self) -> float:
        return self.pts - self.start


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechEnding(DataFrame):
    """VAD has heard silence since shortly before ``pts`` (the end it would give the speech, padded),
    long enough that the utterance has probably ended; it decides at ``decide_at`` unless the
    voice comes back. A recogniser prepares the final transcript meanwhile. ``resumed``: the voice
    came back (at ``pts``) before the decision: what was prepared is void."""

    decide_at: float = 0.0
    resumed: bool = False
    source: str = "vad"


@dataclass(frozen=True, slots=True, kw_only=True)
class VoiceActivity(DataFrame):
    """The VAD's raw per-hop decision changed at ``pts``: voice (``speech``) or not. Only
    changes are sent; VAD's segment decisions (SpeechStarted/Ended) lag these by its hangovers."""

    speech: bool = False
    #: a voice onset from WebRTC alone, before Silero agreed (``vad.activity_webrtc_ms``); when
    #: Silero agrees a second ``speech`` frame follows with ``early`` False
    early: bool = False


@dataclass(frozen=True, slots=True)
class Word:
    """A recognised word with its audio times (pipeline clock) and confidence (0..1)."""

    word: str
    start: float
    end: float
    probability: float

    def as_dict(self) -> dict:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3),
                "probability": round(self.probability, 4)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialText(DataFrame):
    """The current hypothesis of an utterance still being spoken.

    ``stable`` is committed and will not change (it is a prefix of the final text, unless the
    final pass rewrites an uncommitted tail); ``unstable`` may still change. ``pts`` is the
    audio time up to which the hypothesis was computed.
    """

    utterance: int = 0
    stable: str = ""
    unstable: str = ""
    #: words that became stable with this partial (only the new ones)
    new_stable_words: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return (self.stable + self.unstable).strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalText(DataFrame):
    """The final transcript of an utterance (or of a committed segment of a long one).

    ``pts`` is the end of its audio; ``start`` its beginning; ``decided_at`` the pipeline-clock
    time at which it was emitted.
    """

    utterance: int = 0
    text: str = ""
    start: float = 0.0
    words: tuple[Word, ...] = ()
    language: str = ""
    #: True when the utterance goes on (a long monologue cut at a committed boundary)
    continued: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentText(DataFrame):
    """A clause of the agent's reply, as it goes to the TTS (reply ``reply``)."""

    text: str = ""
    reply: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEvent(DataFrame):
    """A turn change: ``agent_start`` / ``agent_end`` (the agent's audio began / played out),
    ``barge_in`` (the agent was cut short, by the user or by an interrupt command: ``reason`` says
    why; ``text`` is what the user heard of the reply). ``reply`` numbers the agent's turn, as
    ``AgentText.reply`` does (0: unknown)."""

    kind: str = ""
    reason: str = ""
    text: str = ""
    reply: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame(DataFrame):
    """A recoverable problem a stage reports downstream instead of dying (bad payload, dropout)."""

    stage: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Interrupt(ControlFrame):
    """The user barged in: drop queued interruptible output, stop what is playing."""

    urgent: ClassVar[bool] = True
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(ControlFrame):
    """Stop now, without draining; queued data is abandoned."""

    urgent: ClassVar[bool] = True
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Flush(ControlFrame):
    """Finish whatever is pending (e.g. close an open utterance) at this point in the stream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream(ControlFrame):
    """The source is exhausted. Every stage drains, flushes, forwards this and exits."""
