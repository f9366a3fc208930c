"""One conversation: audio in, typed events out. The embedding API and the MQTT service share it.

A ``Session`` owns its own detector and recogniser *state* and shares the loaded *models*
(``SharedModels``: one Whisper bundle, one Silero net, one Piper voice) with every other session in
the process. Audio pushed in at any rate and channel count is converted to 16 kHz mono and runs
through one long-lived pipeline, VAD → streaming ASR → collector, whose stages run the models on
their own worker threads, never on the event loop.

Events (``events()``) are the streaming frames where they fit — ``SpeechStarted``, ``SpeechEnded``,
``PartialText``, ``FinalText``, ``ErrorFrame`` — and the agent-side ones below: ``AgentText``,
``AgentAudio``, ``TurnEvent`` and ``Metrics``. Utterance numbers are per session and keep growing
across ``reset()``.

Commands that must act at a point in the audio stream (hotwords, language, reset, flush) travel
through the pipeline as in-band markers, so they apply exactly between the audio pushed before
and after them, and the call returns once the marker has passed every stage.

The dialogue itself (when to answer, barge-in policy, interpreter mode) is the coordinator's job;
until it is wired in, a session transcribes and speaks what it is told to (``say``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import types
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np

from streaming.asr.alignment import warm_up_alignment
from streaming.asr.hotwords import parse_hotwords
from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
from streaming.asr.stage import ASRStage
from streaming.clock import Clock, RealClock
from streaming.errors import DuplexError
from streaming.frames import (
    INTERNAL_RATE,
    AudioFrame,
    ControlFrame,
    DataFrame,
    ErrorFrame,
    FinalText,
    Frame,
    PartialText,
    SpeechEnded,
    SpeechStarted,
)
from streaming.pipeline import Pipeline, Source, Stage
from streaming.resample import StreamResampler, to_mono
from streaming.vad import SileroModel, VADStage

from .config import DuplexConfig

log = logging.getLogger(__name__)

MODES = ("dialogue", "interpreter", "captions")

# ------------------------------------------------------------------------------ agent-side events


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentText(DataFrame):
    """What the agent is about to say (turn ``turn``)."""

    turn: int = 0
    text: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentAudio(AudioFrame):
    """Synthesised speech of turn ``turn``, at the voice's own rate (Piper: 22.05 kHz).
    ``pts`` is on the agent's output timeline (seconds of agent audio so far)."""

    turn: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEvent(DataFrame):
    """The agent started or stopped speaking. ``interrupted`` is True when ``interrupt()`` (or
    ``reset()``) cut the turn short: a player should drop what it has not played yet."""

    kind: Literal["agent_started", "agent_stopped"] = "agent_started"
    turn: int = 0
    interrupted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics(DataFrame):
    """Numbers about the session, emitted after every final transcript.

    ``final_latency_ms``: wall time from the moment the audio that let VAD decide the end of speech
    was pushed to the moment the final transcript was emitted (absent for a cut segment of a long
    monologue); ``lag_s``: audio pushed but not yet through the recogniser."""

    values: Mapping[str, float] = field(default_factory=lambda: types.MappingProxyType({}))


#: every event type ``Session.events()`` yields
EVENT_TYPES = (SpeechStarted, SpeechEnded, PartialText, FinalText, ErrorFrame, AgentText, AgentAudio, TurnEvent, Metrics)


# ---------------------------------------------------------------------------------------- models


class SharedModels:
    """The loaded models every session of a process shares; loading is blocking (seconds)."""

    def __init__(self, cfg: DuplexConfig, whisper: Any, silero: SileroModel | None, resolver: Any) -> None:
        self.cfg = cfg
        self.whisper = whisper
        self.silero = silero
        self.resolver = resolver
        self._tts = None
        self._lock = threading.Lock()
        #: Piper runs here, one sentence at a time for all sessions (its ONNX session threads itself)
        self.tts_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-tts")

    @classmethod
    def load(cls, cfg: DuplexConfig, *, tts: bool = False) -> "SharedModels":
        """Whisper (``models.asr``) and Silero now; Piper now if ``tts``, else on the first ``say``."""
        from .models import resolver_for

        resolver = resolver_for(cfg.models.cache_dir)
        whisper = resolver.whisper(cfg.models.asr, cfg.models.asr_precision)
        silero = None if cfg.vad.mode == "webrtc" else resolver.vad()
        warm_up_alignment()  # numba compiles (or loads) the DTW kernel here, not in a session
        models = cls(cfg, whisper, silero, resolver)
        if tts:
            models.tts()
        return models

    def tts(self):
        """The Piper voice (``models.tts``), loaded on first use."""
        with self._lock:
            if self._tts is None:
                self._tts = self.resolver.tts(self.cfg.models.tts)
            return self._tts

    def close(self) -> None:
        self.tts_executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ pipeline pieces


@dataclass(frozen=True, slots=True, kw_only=True)
class _Marker(ControlFrame):
    """In-band command: each stage acts on it in stream order, then forwards it."""

    action: str = ""
    token: int = 0
    payload: Any = None


class _Input(Source):
    """The session's audio queue. It outlives pipelines: a restarted pipeline reads on."""

    name = "input"

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize)

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        while True:
            yield await self.queue.get()

    def drop_audio(self) -> int:
        """Discard queued audio, keep markers (someone awaits them)."""
        kept, dropped = [], 0
        while not self.queue.empty():
            f = self.queue.get_nowait()
            if isinstance(f, _Marker):
                kept.append(f)
            else:
                dropped += 1
        for f in kept:
            self.queue.put_nowait(f)
        return dropped


class _VAD(VADStage):
    async def process(self, frame: Frame) -> None:
        if isinstance(frame, _Marker):
            if frame.action == "reset":
                self.vad.reset(self.state)
            elif frame.action == "finish":
                for e in self.vad.finish(self.state):
                    await self.push(e)
            await self.push(frame)
            return
        await super().process(frame)


class _ASR(ASRStage):
    def __init__(self, recognizer: StreamingRecognizer, hotwords: tuple[str, ...]) -> None:
        super().__init__(recognizer)
        self.hotwords = hotwords
        recognizer.set_hotwords(self.state, hotwords)

    def _fresh(self):
        state = self.recognizer.init_state()
        self.recognizer.set_hotwords(state, self.hotwords)
        return state

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, _Marker):
            if frame.action == "reset":
                self.state = await self.run_blocking(self._fresh)
            elif frame.action == "finish":
                await self._emit(await self.run_blocking(self.recognizer.finish, self.state))
            elif frame.action == "hotwords":
                self.hotwords = frame.payload
                await self.run_blocking(self.recognizer.set_hotwords, self.state, frame.payload)
            elif frame.action == "recognizer":
                self.recognizer = frame.payload  # takes effect at the next utterance
            await self.push(frame)
            return
        await super().process(frame)


class _Collect(Stage):
    name = "collect"

    def __init__(self, session: "Session") -> None:
        super().__init__()
        self.session = session

    async def process(self, frame: Frame) -> None:
        self.session._on_frame(frame)


# --------------------------------------------------------------------------------------- session

_END = object()


class Session:
    """One conversation. Use as ``async with Session(models, cfg) as s:``.

    * ``await push_audio(pcm, sample_rate)`` from any source (blocks when the pipeline is a
      queue's length behind: backpressure);
    * ``async for ev in events()``: one consumer; it ends after ``finish()`` or ``aclose()``;
    * ``say``, ``interrupt``, ``set_hotwords``, ``set_language``, ``set_mode``, ``reset``,
      ``flush``, ``finish``.
    """

    def __init__(self, models: SharedModels, cfg: DuplexConfig | None = None, *, name: str = "session") -> None:
        self.models = models
        self.cfg = cfg or models.cfg
        self.name = name
        self.asr_config: ASRConfig = self.cfg.asr
        try:
            self._recognizer = StreamingRecognizer(models.whisper, self.asr_config)
        except ValueError as exc:
            raise DuplexError(str(exc)) from None
        self._hotwords = parse_hotwords(self.asr_config.hotwords)
        #: "dialogue", "interpreter" or "captions" (see set_mode)
        self.mode: str = "dialogue"
        #: target language of interpreter mode
        self.target: str | None = None
        self._block = max(1, int(round(INTERNAL_RATE * self.cfg.audio.block_ms / 1000)))
        # unbounded on purpose: producers are paced by audio, and finals must never be dropped
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._input = _Input(self.cfg.pipeline.queue_size)
        self._resampler: StreamResampler | None = None
        self._in_rate = 0
        self._pts = 0.0
        self._pushes: deque[tuple[float, float]] = deque(maxlen=4096)  # (audio end pts, wall time)
        self._processed_pts = 0.0
        self._markers: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self._discard = False
        self._utt_base = 0
        self._utt_max = 0
        self._end_detected: float | None = None
        self._turns = 0
        self._speaking: set[asyncio.Task[None]] = set()
        self._speak_lock = asyncio.Lock()
        self._agent_pts = 0.0
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._closed = False
        self.counts = {"finals": 0, "partials": 0, "errors": 0, "restarts": 0, "turns": 0}
        #: (end of speech, final_latency_ms) of recent finals, as in their Metrics events
        self.final_latencies: deque[tuple[float, float]] = deque(maxlen=1000)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> "Session":
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"duplex:session:{self.name}")
        return self

    async def __aenter__(self) -> "Session":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop now: speech in progress is cut, queued audio is dropped, ``events()`` ends."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        for t in list(self._speaking):
            t.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._resolve_markers()
        self._events.put_nowait(_END)

    async def finish(self) -> None:
        """No more audio: close the open utterance, let queued speech finish, then end ``events()``
        after everything so far has been delivered."""
        self._accepting = False
        await self._mark("finish")
        while self._speaking:
            await asyncio.wait(set(self._speaking))
        self._events.put_nowait(_END)

    # -- audio in ---------------------------------------------------------------------------

    async def push_audio(self, pcm: np.ndarray | bytes, sample_rate: int = INTERNAL_RATE, channels: int | None = None) -> None:
        """Audio from any source: float samples in [-1, 1] or int16, shape (n,) or (n, channels),
        or signed 16-bit little-endian bytes (interleaved, ``channels`` of them, default 1).
        Any rate is resampled to 16 kHz; channels are averaged."""
        if not self._accepting:
            raise RuntimeError(f"session {self.name} takes no more audio (finished or closed)")
        if self._task is None:
            await self.start()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        x = _as_float(pcm, channels)
        if x.size == 0:
            return
        if sample_rate != self._in_rate:
            self._resampler = StreamResampler(sample_rate)
            self._in_rate = sample_rate
        assert self._resampler is not None
        y = self._resampler.process(to_mono(x))
        for i in range(0, len(y), self._block):
            chunk = np.array(y[i : i + self._block], dtype=np.float32)
            frame = AudioFrame(samples=chunk, pts=self._pts)
            self._pts = frame.end_pts
            self._pushes.append((self._pts, time.monotonic()))
            await self._input.queue.put(frame)

    @property
    def audio_seconds(self) -> float:
        """Audio pushed so far, at 16 kHz, s."""
        return self._pts

    # -- events out -------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Frame]:
        """Every event, in order (see ``EVENT_TYPES``). Ends after ``finish()`` or ``aclose()``."""
        while True:
            ev = await self._events.get()
            if ev is _END:
                self._events.put_nowait(_END)  # a second iterator ends too
                return
            yield ev

    def _emit(self, ev: Frame) -> None:
        self._events.put_nowait(ev)

    def _on_frame(self, frame: Frame) -> None:
        """Called by the collector stage, on the event loop, for everything the pipeline emits."""
        if isinstance(frame, _Marker):
            if frame.action == "reset":
                self._discard = False
                self._utt_base = self._utt_max
                self._end_detected = None
            fut = self._markers.pop(frame.token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if isinstance(frame, AudioFrame):
            self._processed_pts = frame.end_pts
            return
        if isinstance(frame, ErrorFrame):
            self.counts["errors"] += 1
            self._emit(frame)
            return
        if self._discard:
            return
        if isinstance(frame, (PartialText, FinalText)):
            utt = self._utt_base + frame.utterance
            self._utt_max = max(self._utt_max, utt)
            frame = replace(frame, utterance=utt)
        if isinstance(frame, SpeechEnded):
            self._end_detected = frame.detected_at
        if isinstance(frame, PartialText):
            self.counts["partials"] += 1
        self._emit(frame)
        if isinstance(frame, FinalText):
            self.counts["finals"] += 1
            values = {"lag_s": round(self.lag_seconds, 3), "audio_s": round(self._processed_pts, 3),
                      "finals": self.counts["finals"], "partials": self.counts["partials"]}
            if not frame.continued and self._end_detected is not None:
                pushed = self._wall_at(self._end_detected)
                if pushed is not None:
                    values["final_latency_ms"] = round((time.monotonic() - pushed) * 1000, 1)
                    self.final_latencies.append((frame.pts, values["final_latency_ms"]))
                self._end_detected = None
            self._emit(Metrics(values=types.MappingProxyType(values), pts=frame.pts))

    def pushed_at(self, t: float) -> float | None:
        """``time.monotonic()`` when the audio at session time ``t`` had been pushed (recent audio only)."""
        return self._wall_at(t)

    def _wall_at(self, t: float) -> float | None:
        # the first push whose audio reaches t; pushes are in order, and finals are recent
        for end, wall in self._pushes:
            if end >= t - 1e-6:
                return wall
        return None

    @property
    def lag_seconds(self) -> float:
        """Audio pushed but not yet through the recogniser, s."""
        return max(0.0, self._pts - self._processed_pts)

    # -- commands ---------------------------------------------------------------------------

    async def set_hotwords(self, hotwords: Iterable[str]) -> tuple[str, ...]:
        """Replace the hotword list from this point in the audio on; returns the parsed list."""
        self._hotwords = parse_hotwords(list(hotwords))
        await self._mark("hotwords", self._hotwords)
        return self._hotwords

    async def set_language(self, language: str) -> None:
        """The language spoken from the next utterance on (``"auto"``: detect it per utterance).
        English-only models accept only ``"en"``."""
        bundle = self.models.whisper
        if not bundle.multilingual and language != "en":
            raise ValueError(f"{self.cfg.models.asr} is English-only: it cannot recognise {language!r}")
        if bundle.multilingual and language not in ("auto", *bundle.tokenizer.languages):
            raise ValueError(f"unknown language {language!r}")
        self.asr_config = replace(self.asr_config, language=language)
        self._recognizer = StreamingRecognizer(bundle, self.asr_config)
        await self._mark("recognizer", self._recognizer)

    async def set_mode(self, mode: str, target: str | None = None) -> None:
        """``"dialogue"`` (answer), ``"interpreter"`` (translate into ``target``) or ``"captions"``
        (transcribe only). The session stores it; the coordinator acts on it. Until the
        coordinator is wired in, every mode transcribes and speaks only what ``say`` is given."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "interpreter" and not target:
            raise ValueError("interpreter mode needs a target language")
        self.mode, self.target = mode, target if mode == "interpreter" else None

    async def reset(self) -> None:
        """Forget the conversation: speech in progress, queued audio, detector and recogniser
        state. Events of audio pushed before the call are not delivered after it."""
        await self.interrupt()
        self._discard = True
        self._input.drop_audio()
        await self._mark("reset")

    async def flush(self) -> None:
        """Close the open utterance now (end of a stream); returns once its final is emitted."""
        await self._mark("finish")

    async def say(self, text: str) -> int:
        """Speak ``text``: emits ``AgentText``, ``TurnEvent("agent_started")``, ``AgentAudio``
        (one frame per sentence, as soon as it is synthesised) and ``TurnEvent("agent_stopped")``.
        Turns are spoken one after another; returns the turn number once it is done (or cut)."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("nothing to say")
        if self._closed:
            raise RuntimeError(f"session {self.name} is closed")
        self._turns += 1
        turn = self._turns
        task = asyncio.get_running_loop().create_task(self._speak(turn, text), name=f"duplex:say:{turn}")
        self._speaking.add(task)
        task.add_done_callback(self._speaking.discard)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return turn

    async def interrupt(self) -> bool:
        """Stop speaking now and drop queued turns. True if something was cut."""
        tasks = list(self._speaking)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        return bool(tasks)

    @property
    def speaking(self) -> bool:
        return bool(self._speaking)

    def stats(self) -> dict[str, float]:
        return {"audio_s": round(self._pts, 3), "lag_s": round(self.lag_seconds, 3), **self.counts}

    # -- internals --------------------------------------------------------------------------

    async def _speak(self, turn: int, text: str) -> None:
        loop = asyncio.get_running_loop()
        ex = self.models.tts_executor
        async with self._speak_lock:
            tts = await loop.run_in_executor(ex, self.models.tts)
            rate = tts.sample_rate
            self.counts["turns"] += 1
            self._emit(AgentText(turn=turn, text=text, pts=self._agent_pts))
            self._emit(TurnEvent(kind="agent_started", turn=turn, pts=self._agent_pts))
            interrupted = True
            try:
                chunks = tts.stream(text)
                while (chunk := await loop.run_in_executor(ex, next, chunks, None)) is not None:
                    self._emit(AgentAudio(samples=chunk, sample_rate=rate, turn=turn, pts=self._agent_pts))
                    self._agent_pts += len(chunk) / rate
                interrupted = False
            finally:
                self._emit(TurnEvent(kind="agent_stopped", turn=turn, interrupted=interrupted, pts=self._agent_pts))

    async def _mark(self, action: str, payload: Any = None) -> None:
        if self._closed:
            raise RuntimeError(f"session {self.name} is closed")
        if self._task is None:
            await self.start()
        token = next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers[token] = fut
        await self._input.queue.put(_Marker(action=action, token=token, payload=payload, pts=self._pts))
        await fut

    def _resolve_markers(self) -> None:
        for fut in self._markers.values():
            if not fut.done():
                fut.set_result(None)
        self._markers.clear()

    def _stages(self) -> list[Stage]:
        return [_VAD(self.cfg.vad, self.models.silero), _ASR(self._recognizer, self._hotwords), _Collect(self)]

    async def _supervise(self) -> None:
        """Run the pipeline; if a stage fails, report it and start a fresh one on the same input."""
        while True:
            pipeline = Pipeline(self._input, self._stages(), clock=RealClock(), queue_size=self.cfg.pipeline.queue_size)
            try:
                await pipeline.run()
                return
            except Exception as exc:  # noqa: BLE001 - a bug in a stage must not end the session
                log.exception("session %s: pipeline failed; starting a fresh one", self.name)
                self.counts["restarts"] += 1
                self._emit(ErrorFrame(stage="session", message=f"recognition failed and restarted: {_first(exc)}", pts=self._pts))
                self._discard = False
                self._utt_base = self._utt_max
                self._resolve_markers()
                await asyncio.sleep(0.05)


def _first(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _as_float(pcm: np.ndarray | bytes | bytearray | memoryview, channels: int | None) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        ch = channels or 1
        if len(pcm) % (2 * ch):
            raise ValueError(f"{len(pcm)} bytes are not whole {ch}-channel 16-bit samples")
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        return x if ch == 1 else x.reshape(-1, ch)
    x = np.asarray(pcm)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or (n, channels), got shape {x.shape}")
    if channels is not None and (x.shape[1] if x.ndim == 2 else 1) != channels:
        raise ValueError(f"audio shape {x.shape} does not match channels={channels}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"audio must be float or int16 samples, got {x.dtype}")
    return x.astype(np.float32, copy=False)
