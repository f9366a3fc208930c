"""Two-stage streaming voice activity detection.

Stage one is WebRTC's GMM detector on 10 ms frames: it costs about a microsecond a frame and is
a good gate, but it fires on many noises. Stage two is Silero VAD v6 (the weights bundled in the
``silero-vad`` package), a small conv+LSTM net on 32 ms hops that tells speech from noise well.
Silero only runs while the gate is open (voice heard within ``gate_hangover_ms``); when the gate
re-opens, Silero's LSTM is reset and warmed on ``preroll_ms`` of buffered audio, so the onset is not
missed. Speech must last ``min_speech_ms`` to start a segment and silence ``min_silence_ms`` to end
it, with hysteresis between ``threshold`` and ``neg_threshold``.

The core is synchronous and does no I/O: ``init_state()``, ``step(state, samples, pts)``,
``finish(state)``. ``VADStage`` wraps it for the pipeline.
"""

from __future__ import annotations

import collections
import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import webrtcvad
from pydantic import Field

from .errors import DuplexError
from .frames import INTERNAL_RATE, AudioFrame, Frame, SpeechEnded, SpeechEnding, SpeechStarted, VoiceActivity
from .pipeline import Stage

HOP = 512  # Silero's 16 kHz hop: 32 ms
CONTEXT = 64  # Silero's left context, samples
WEBRTC_FRAME = 160  # 10 ms

VADMode = Literal["two-stage", "webrtc", "silero"]


@dataclass(frozen=True)
class VADConfig:
    #: which detector decides: both (gate + confirm), or either alone (for comparison)
    mode: VADMode = "two-stage"
    #: WebRTC aggressiveness, 0 (lenient) to 3 (strict)
    webrtc_aggressiveness: Annotated[int, Field(ge=0, le=3)] = 2
    #: webrtc-only mode: fraction of voiced 10 ms frames that makes a 32 ms hop speech
    webrtc_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    #: keep Silero running this long after the gate last heard voice
    gate_hangover_ms: Annotated[float, Field(ge=0)] = 400.0
    #: buffered audio replayed into Silero when the gate opens, to warm its LSTM
    preroll_ms: Annotated[float, Field(ge=0, le=1000)] = 192.0
    #: Silero probability at or above which a hop is speech
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    #: Silero probability below which a hop is silence (between the two: keep the current state)
    neg_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.35
    #: speech must last this long before a segment starts (rejects clicks and coughs)
    min_speech_ms: Annotated[float, Field(ge=0)] = 160.0
    #: silence must last this long before a segment ends (bridges pauses between words)
    min_silence_ms: Annotated[float, Field(ge=0)] = 400.0
    #: added before each start and after each end, so word edges are not clipped
    speech_pad_ms: Annotated[float, Field(ge=0)] = 64.0
    #: silence this long (ms) inside a segment sends SpeechEnding, so that the final transcript is
    #: prepared while the end is still undecided (min_silence_ms) and ready when it is; 0 = never
    end_hint_ms: Annotated[float, Field(ge=0)] = 128.0
    #: also send VoiceActivity frames when the raw per-hop decision changes (the coordinator
    #: measures silence and barge-in onsets from them, without the segment hangovers)
    activity_events: bool = False
    #: activity events only: a run of WebRTC-voiced audio this long (ms) turns the voice on before
    #: Silero agrees (Silero hears the unvoiced start of "stop" or "so" about 100 ms late); 0 = off
    activity_webrtc_ms: Annotated[float, Field(ge=0, le=1000)] = 30.0
    #: a voice turned on by WebRTC alone stays on this long (ms) while WebRTC still hears it,
    #: waiting for Silero to agree; then Silero's hysteresis decides again
    activity_confirm_ms: Annotated[float, Field(ge=0, le=2000)] = 160.0

    def __post_init__(self) -> None:
        if self.neg_threshold > self.threshold:
            raise ValueError("neg_threshold must not exceed threshold")


# --------------------------------------------------------------------------------------- Silero


class SileroModel:
    """Silero VAD v6 with explicit state, so one loaded model serves any number of streams."""

    _lock = threading.Lock()
    _shared: "SileroModel | None" = None

    def __init__(self, path: Path) -> None:
        import torch

        self._torch = torch
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a corrupt or missing file: name it
            raise DuplexError(f"cannot load Silero VAD from {path}: {exc}") from None
        module.eval()
        # the scripted wrapper keeps hidden per-stream state; its inner 16 kHz net takes state
        # explicitly, which is what lets streams share the weights
        self._net = module._model
        self.path = path

    @classmethod
    def bundled_path(cls) -> Path:
        # locate the file without importing silero_vad: its __init__ calls
        # torch.set_num_threads(1), which would slow every other model in the process
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise DuplexError("Silero VAD is not installed: pip install silero-vad")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.jit"
        if not path.exists():
            raise DuplexError(f"the silero-vad package has no bundled model at {path}")
        return path

    @classmethod
    def shared(cls) -> "SileroModel":
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls(cls.bundled_path())
            return cls._shared

    def initial_state(self):
        return self._torch.zeros(2, 1, 128)

    def __call__(self, window: np.ndarray, state):
        """``window`` is CONTEXT + HOP samples; returns (speech probability, new state)."""
        torch = self._torch
        with torch.inference_mode():
            out, state = self._net(torch.from_numpy(window).unsqueeze(0), state)
        return float(out.item()), state


# ----------------------------------------------------------------------------------------- core


@dataclass
class VADState:
    """Everything one stream's detector remembers. Create it with ``TwoStageVAD.init_state``."""

    t0: float | None = None  # pts of the first sample seen
    hops: int = 0  # 32 ms hops processed
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    web_carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    last_voiced: float = -1e9  # time the gate last heard voice
    silero_active: bool = False
    silero_state: object = None
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, dtype=np.float32))
    preroll: collections.deque = field(default_factory=collections.deque)
    in_speech: bool = False
    candidate_start: float | None = None
    speech_ms: float = 0.0
    silence_start: float | None = None
    segment_start: float = 0.0
    silero_hops: int = 0  # hops Silero actually ran on (the cost the gate saves)
    last_prob: float = 0.0
    voiced: bool = False  # the last raw decision sent as VoiceActivity
    web_run_ms: float = 0.0  # WebRTC-voiced audio in the current run of voiced hops
    web_onset: float | None = None  # when WebRTC alone turned the voice on (not yet confirmed)
    hinted: bool = False  # SpeechEnding sent for the current silence


class TwoStageVAD:
    """Streaming VAD core. Feed any block size; decisions are made on 32 ms hops."""

    def __init__(self, config: VADConfig | None = None, model: SileroModel | None = None) -> None:
        self.config = config or VADConfig()
        c = self.config
        self._model = model if model is not None or c.mode == "webrtc" else SileroModel.shared()
        self._webrtc = webrtcvad.Vad(c.webrtc_aggressiveness)
        self._hop_s = HOP / INTERNAL_RATE
        self._preroll_hops = int(round(c.preroll_ms / 1000 / self._hop_s))

    @property
    def name(self) -> str:
        return self.config.mode

    def init_state(self) -> VADState:
        return VADState(preroll=collections.deque(maxlen=max(1, self._preroll_hops)))

    def step(self, state: VADState, samples: np.ndarray, pts: float) -> list[Frame]:
        """Consume 16 kHz mono float32 ``samples`` whose first sample is at ``pts``."""
        if state is None:
            raise ValueError("TwoStageVAD.step needs a state from init_state()")
        if state.t0 is None:
            state.t0 = pts
        buf = np.concatenate([state.pending, samples]) if len(state.pending) else samples
        events: list[Frame] = []
        n = len(buf) // HOP
        for i in range(n):
            self._hop(state, buf[i * HOP : (i + 1) * HOP], events)
        state.pending = np.array(buf[n * HOP :], dtype=np.float32)
        return events

    def finish(self, state: VADState) -> list[Frame]:
        """End of stream: close an open segment at the end of the audio."""
        if state.t0 is None:
            return []
        end = state.t0 + (state.hops * HOP + len(state.pending)) / INTERNAL_RATE
        if state.in_speech and state.hinted:
            # the voice had stopped (SpeechEnding sent): the speech ends where that said
            end = min(end, state.silence_start + self.config.speech_pad_ms / 1000)
        events: list[Frame] = []
        if state.in_speech:
            events.append(
                SpeechEnded(pts=end, start=state.segment_start, detected_at=end, source=self.name)
            )
        state.in_speech = False
        state.candidate_start = None
        state.hinted = False
        return events

    def segments(self, audio: np.ndarray, block: int = 480) -> list[tuple[float, float]]:
        """The (start, end) seconds of the speech in a whole clip, as the stream would mark them."""
        state = self.init_state()
        events: list[Frame] = []
        for i in range(0, len(audio), block):
            events += self.step(state, audio[i : i + block], i / INTERNAL_RATE)
        events += self.finish(state)
        return [(e.start, e.pts) for e in events if isinstance(e, SpeechEnded)]

    def reset(self, state: VADState) -> None:
        fresh = self.init_state()
        for f in fresh.__dataclass_fields__:
            setattr(state, f, getattr(fresh, f))

    # -- one 32 ms hop -----------------------------------------------------------------------

    def _hop(self, s: VADState, hop: np.ndarray, events: list[Frame]) -> None:
        c = self.config
        t = s.t0 + s.hops * self._hop_s
        t_end = t + self._hop_s
        s.hops += 1

        voiced_fraction = self._webrtc_fraction(s, hop)
        if voiced_fraction > 0:
            s.last_voiced = t_end

        window = np.concatenate([s.context, hop])
        s.context = hop[-CONTEXT:].copy()

        if c.mode == "webrtc":
            is_speech = voiced_fraction >= c.webrtc_ratio
            is_silence = not is_speech
        else:
            gate_open = (
                c.mode == "silero"
                or s.in_speech
                or s.candidate_start is not None
                or (t_end - s.last_voiced) * 1000 <= c.gate_hangover_ms
            )
            if gate_open:
                if not s.silero_active:
                    # gate re-opened: fresh LSTM state, warmed on the buffered pre-roll
                    s.silero_state = self._model.initial_state()
                    for w in s.preroll:
                        _, s.silero_state = self._model(w, s.silero_state)
                        s.silero_hops += 1
                    s.silero_active = True
                prob, s.silero_state = self._model(window, s.silero_state)
                s.silero_hops += 1
            else:
                s.silero_active = False
                prob = 0.0
            s.last_prob = prob
            is_speech = prob >= c.threshold
            is_silence = prob < c.neg_threshold
        s.preroll.append(window)
        if c.activity_events:
            voiced = is_speech or (s.voiced and not is_silence)  # the same hysteresis
            early = s.web_onset is not None
            if c.activity_webrtc_ms > 0:
                voiced = self._webrtc_onset(s, t_end, voiced_fraction, is_speech, voiced)
            if voiced != s.voiced:
                s.voiced = voiced
                events.append(VoiceActivity(pts=t_end, speech=voiced, early=voiced and s.web_onset is not None))
            elif voiced and early and s.web_onset is None:
                events.append(VoiceActivity(pts=t_end, speech=True))  # Silero agrees with WebRTC's onset
        self._decide(s, t, t_end, is_speech, is_silence, events)

    def _webrtc_onset(self, s: VADState, t_end: float, fraction: float, is_speech: bool, voiced: bool) -> bool:
        """The raw decision with WebRTC's earlier onsets: a voiced run of activity_webrtc_ms turns
        the voice on; it stays on, while WebRTC hears it, for activity_confirm_ms or until Silero
        agrees (from then on Silero's hysteresis decides alone)."""
        c = self.config
        s.web_run_ms = s.web_run_ms + fraction * self._hop_s * 1000 if fraction >= 0.5 else 0.0
        if is_speech:
            s.web_onset = None  # confirmed
            return True
        if s.web_onset is not None:
            if fraction >= 0.5 and (t_end - s.web_onset) * 1000 <= c.activity_confirm_ms:
                return True
            s.web_onset = None  # not confirmed: a noise; the next onset needs a quiet hop first
            s.web_run_ms = float("-inf")
            return voiced
        if s.voiced and not voiced:
            s.web_run_ms = float("-inf")  # Silero ended the voice: a new onset needs a quiet hop first
        elif not voiced and not s.voiced and s.web_run_ms >= c.activity_webrtc_ms:
            s.web_onset = t_end
            return True
        return voiced

    def _webrtc_fraction(self, s: VADState, hop: np.ndarray) -> float:
        buf = np.concatenate([s.web_carry, hop]) if len(s.web_carry) else hop
        n = len(buf) // WEBRTC_FRAME
        if n == 0:
            s.web_carry = buf
            return 0.0
        pcm = (np.clip(buf[: n * WEBRTC_FRAME], -1.0, 1.0) * 32767.0).astype("<i2")
        voiced = 0
        for i in range(n):
            if self._webrtc.is_speech(pcm[i * WEBRTC_FRAME : (i + 1) * WEBRTC_FRAME].tobytes(), INTERNAL_RATE):
                voiced += 1
        s.web_carry = np.array(buf[n * WEBRTC_FRAME :], dtype=np.float32)
        return voiced / n

    def _decide(
        self, s: VADState, t: float, t_end: float, is_speech: bool, is_silence: bool, events: list[Frame]
    ) -> None:
        c = self.config
        pad = c.speech_pad_ms / 1000
        if not s.in_speech:
            if is_speech:
                if s.candidate_start is None:
                    s.candidate_start = t
                    s.speech_ms = 0.0
                s.speech_ms += self._hop_s * 1000
            elif is_silence:
                s.candidate_start = None
                s.speech_ms = 0.0
            if s.candidate_start is not None and s.speech_ms >= c.min_speech_ms:
                s.in_speech = True
                s.segment_start = max(s.t0, s.candidate_start - pad)
                s.silence_start = None
                s.candidate_start = None
                events.append(SpeechStarted(pts=s.segment_start, detected_at=t_end, source=self.name))
        else:
            if is_silence:
                if s.silence_start is None:
                    s.silence_start = t
                silent_ms = (t_end - s.silence_start) * 1000
                if silent_ms >= c.min_silence_ms:
                    end = min(t_end, s.silence_start + pad)
                    events.append(
                        SpeechEnded(pts=end, start=s.segment_start, detected_at=t_end, source=self.name)
                    )
                    s.in_speech = False
                    s.silence_start = None
                    s.hinted = False
                elif c.end_hint_ms and silent_ms >= max(c.end_hint_ms, c.speech_pad_ms) and not s.hinted:
                    s.hinted = True
                    events.append(SpeechEnding(pts=min(t_end, s.silence_start + pad),
                                               decide_at=s.silence_start + c.min_silence_ms / 1000, source=self.name))
            else:
                s.silence_start = None
                if s.hinted:
                    s.hinted = False
                    events.append(SpeechEnding(pts=t, resumed=True, source=self.name))


# ---------------------------------------------------------------------------------------- stage


class VADStage(Stage):
    """Forwards audio unchanged and inserts SpeechStarted/SpeechEnded frames.

    Speech events are pushed *before* the audio frame during which they were decided, so a
    downstream consumer sees the event no later than the audio that proves it.
    """

    def __init__(self, config: VADConfig | None = None, model: SileroModel | None = None) -> None:
        super().__init__()
        self.name = "vad"
        self.vad = TwoStageVAD(config, model)
        self.state = self.vad.init_state()

    def init_worker(self) -> None:
        # Silero is far too small to gain from intra-op threads; on 2 cores a second OpenMP team
        # only spins against the event loop and other models (Silero-only VAD through the
        # pipeline measured 0.73 ms per 30 ms frame with 2 threads, 0.38 ms with 1)
        import torch

        torch.set_num_threads(1)

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, AudioFrame):
            mono = frame.mono
            if frame.sample_rate != INTERNAL_RATE:
                raise ValueError(f"VADStage needs {INTERNAL_RATE} Hz audio, got {frame.sample_rate} Hz")
            events = await self.run_blocking(self.vad.step, self.state, mono, frame.pts)
            for e in events:
                await self.push(e)
        await self.push(frame)

    async def flush(self) -> None:
        for e in self.vad.finish(self.state):
            await self.push(e)
