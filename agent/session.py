"""One conversation: audio in, typed events out. The embedding API and the MQTT service share it.

A ``Session`` owns its own detector, recogniser and dialogue *state* and shares the loaded *models*
(``SharedModels``: one Whisper bundle, one Silero net, one Piper voice, one dialogue LLM) with every
other session in the process. Audio pushed in at any rate and channel count is converted to 16 kHz
mono and runs through one long-lived pipeline whose stages run the models on their own worker
threads, never on the event loop. Two kinds of session:

* **dialogue** (the default when the LLM is loaded): the full-duplex conversation of
  ``duplex converse``: AEC (``aec.enabled``) → VAD with voice activity → coordinator tap → streaming
  ASR → ``Coordinator`` (turn core, one ``DialogueLLM`` with its own KV cache per session, Piper into
  ``Playback``). A player task pulls ``Playback`` in 20 ms blocks on the session clock, in real
  time, while the agent speaks — that pull is what marks the agent's words as heard and feeds the
  echo canceller's reference — and sends the blocks out as ``AgentAudio`` events.
* **transcripts only** (``dialogue=False``, or models loaded without the LLM): VAD → streaming
  ASR, for captions tools; ``say`` still speaks, as fast as Piper synthesises.

Events (``events()``) are frames: ``SpeechStarted``, ``SpeechEnded``, ``PartialText``,
``FinalText``, ``ErrorFrame``, ``AgentText`` and ``TurnEvent`` (``streaming.frames``), and the two
defined here, ``AgentAudio`` and ``Metrics``. Utterance numbers are per session and keep growing
across ``reset()``; agent turns are numbered by ``reply`` (``AgentText``, ``TurnEvent``,
``AgentAudio``).

Commands that must act at a point in the audio stream (hotwords, language, reset, flush) travel
through the pipeline as in-band markers, so they apply exactly between the audio pushed before
and after them, and the call returns once the marker has passed every stage.
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
from typing import Any

import numpy as np

from orchestration.coordinator import Coordinator
from orchestration.dialogue import DialogueLLM
from orchestration.playback import Playback
from streaming.aec import AECStage, EchoCanceller, EchoReference, ShiftedReference
from streaming.asr.alignment import warm_up_alignment
from streaming.asr.hotwords import parse_hotwords
from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
from streaming.asr.stage import ASRStage
from streaming.clock import Clock, RealClock
from streaming.errors import DuplexError
from streaming.frames import (
    INTERNAL_RATE,
    AgentText,
    AudioFrame,
    ControlFrame,
    DataFrame,
    ErrorFrame,
    FinalText,
    Frame,
    PartialText,
    SpeechEnded,
    SpeechEnding,
    SpeechStarted,
    TurnEvent,
    VoiceActivity,
)
from streaming.pipeline import Pipeline, Source, Stage
from streaming.resample import StreamResampler, to_mono
from streaming.vad import SileroModel, VADStage

from .config import DuplexConfig
from .conversation import echo_until

log = logging.getLogger(__name__)

MODES = ("dialogue", "interpreter", "captions")
#: the player's block: 20 ms at 16 kHz
BLOCK = 320
#: the player re-anchors its schedule when the event loop let it fall this far behind, s
MAX_BEHIND_S = 0.2

# ------------------------------------------------------------------------------ agent-side events


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentAudio(AudioFrame):
    """The agent's voice, reply ``reply`` (as numbered in ``AgentText`` and ``TurnEvent``).

    In a dialogue session: 20 ms blocks at 16 kHz, emitted in real time as the player pulls them
    from ``Playback`` (only blocks with sound: nothing while paused or silent); ``pts`` is the
    session clock (s since the session started) at which the block is due to play. In a
    transcripts-only session (``say``): one frame per sentence at the voice's own rate (Piper:
    22.05 kHz), as soon as it is synthesised; ``pts`` is on the agent's output timeline (seconds of
    agent audio so far)."""

    reply: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics(DataFrame):
    """Numbers about the session, emitted after every final transcript.

    ``final_latency_ms``: wall time from the moment the audio that let VAD decide the end of speech
    was pushed to the moment the final transcript was emitted (absent for a cut segment of a long
    monologue); ``lag_s``: audio pushed but not yet through the recogniser."""

    values: Mapping[str, float] = field(default_factory=lambda: types.MappingProxyType({}))


#: every event type ``Session.events()`` yields (``AgentText`` and ``TurnEvent`` are ``streaming.frames``')
EVENT_TYPES = (SpeechStarted, SpeechEnded, PartialText, FinalText, ErrorFrame, AgentText, AgentAudio, TurnEvent, Metrics)


# ---------------------------------------------------------------------------------------- models


class SharedModels:
    """The loaded models every session of a process shares; loading is blocking (seconds)."""

    def __init__(self, cfg: DuplexConfig, whisper: Any, silero: SileroModel | None, resolver: Any, llm: Any = None) -> None:
        self.cfg = cfg
        self.whisper = whisper
        self.silero = silero
        self.resolver = resolver
        #: the dialogue LLM (``models.llm``); None: sessions are transcripts-only by default
        self.llm = llm
        self._tts = None
        self._lock = threading.Lock()
        self._llm_lock = threading.Lock()
        #: Piper runs here, one sentence at a time for all sessions (its ONNX session threads itself)
        self.tts_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-tts")

    @classmethod
    def load(cls, cfg: DuplexConfig, *, tts: bool = False, llm: bool = False) -> "SharedModels":
        """Whisper (``models.asr``) and Silero now; Piper now if ``tts``, else on the first ``say``;
        the dialogue LLM (``models.llm``) and Piper now if ``llm``: sessions then hold conversations."""
        from .models import resolver_for

        resolver = resolver_for(cfg.models.cache_dir)
        precision = cfg.models.conversation_asr_precision if llm else cfg.models.asr_precision
        whisper = resolver.whisper(cfg.models.asr, precision)
        silero = None if cfg.vad.mode == "webrtc" else resolver.vad()
        warm_up_alignment()  # numba compiles (or loads) the DTW kernel here, not in a session
        models = cls(cfg, whisper, silero, resolver)
        if llm:
            models.load_llm()
        if tts or llm:
            models.tts()
        return models

    def tts(self):
        """The Piper voice (``models.tts``), loaded on first use."""
        with self._lock:
            if self._tts is None:
                self._tts = self.resolver.tts(self.cfg.models.tts)
            return self._tts

    def load_llm(self):
        """The dialogue LLM (``models.llm``), loaded on first use."""
        with self._llm_lock:
            if self.llm is None:
                self.llm = self.resolver.llm(self.cfg.models.llm, self.cfg.models.llm_precision)
            return self.llm

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
    def __init__(self, recognizer: StreamingRecognizer, hotwords: tuple[str, ...], echo_until=None) -> None:
        super().__init__(recognizer, echo_until=echo_until)
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


class _AEC(AECStage):
    async def process(self, frame: Frame) -> None:
        if isinstance(frame, _Marker):
            # the canceller holds the last few ms of audio until more comes: a command must not
            # wait for audio that may never come, so the held audio is flushed out ahead of it
            if self._held:
                self._held.append(frame)
                await self.flush()
            else:
                await self.push(frame)
            return
        await super().process(frame)


class _Playback(Playback):
    """``Playback`` that wakes the session's player when audio is queued."""

    def __init__(self, reference: Any, on_enqueue: Any) -> None:
        super().__init__(reference)
        self._on_enqueue = on_enqueue

    def enqueue(self, reply: int, text: str, samples: np.ndarray) -> None:
        super().enqueue(reply, text, samples)
        self._on_enqueue()


class _Coordinator(Coordinator):
    """The coordinator inside a session. VAD frames carry audio time (seconds pushed); the turn core
    runs on the session clock, so their times are moved onto it (the moment that audio was pushed)
    before the turn core sees them, while the frames themselves go on unchanged. In-band markers
    pass through (``reset`` starts a new dialogue). In ``captions`` and ``interpreter`` mode the
    turn core hears nothing: the session transcribes and answers no one."""

    def __init__(self, session: "Session", *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.session = session

    def observe_vad(self, frame: Frame) -> None:
        if self.session.mode == "dialogue":
            super().observe_vad(replace(frame, pts=self.session._clock_time(frame.pts)))

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, _Marker):
            if frame.action == "reset":
                self.reset()
            await self.push(frame)
        elif self.session.mode != "dialogue":
            await self.push(frame)
        elif isinstance(frame, (SpeechStarted, SpeechEnded)):
            self.observe_vad(frame)
            await self.push(frame)
        else:
            await super().process(frame)


class _LateInterpreter(Stage):
    """The interpreter's place in a dialogue session's pipeline. Until the session first switches
    to interpreter mode (the translation engines are built then) it only forwards; from then on
    a real ``Interpreter`` does the work, from the next frame (and in a restarted pipeline)."""

    name = "interpreter"

    def __init__(self, session: "Session") -> None:
        super().__init__()
        self.session = session
        self._real: Stage | None = None
        if session._interp_mode != "dialogue" and session._translators is not None:
            self.set_mode(session._interp_mode, session.target)

    def bind(self, push, clock, backlog=None) -> None:
        super().bind(push, clock, backlog)
        if self._real is not None:
            self._real.bind(push, clock)

    def set_mode(self, mode: str, target: str | None = None) -> None:
        if self._real is None and mode in ("interpreter", "captions"):
            from orchestration.interpreter import Interpreter

            s = self.session
            self._real = Interpreter(s._translators, replace(s.cfg.translate, target=target or s.cfg.translate.target),
                                     tts=s.models.tts() if s.dialogue else None, playback=s.playback)
            if self._push is not None:
                self._real.bind(self._push, self.clock)  # its frames go on from this place in the pipeline
        if self._real is not None:
            self._real.set_mode(mode, target)

    async def process(self, frame: Frame) -> None:
        if self._real is not None:
            await self._real.process(frame)
        else:
            await self.push(frame)

    async def aclose(self) -> None:
        if self._real is not None:
            await self._real.aclose()
        await super().aclose()


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

    ``dialogue``: hold a conversation (True; the LLM is loaded on start if ``models`` lack it) or
    only transcribe (False). None (the default): a conversation when ``models`` have the LLM.
    """

    def __init__(self, models: SharedModels, cfg: DuplexConfig | None = None, *, name: str = "session",
                 dialogue: bool | None = None) -> None:
        self.models = models
        self.cfg = cfg or models.cfg
        self.name = name
        #: a full-duplex conversation (else transcripts only); fixed for the session's life
        self.dialogue: bool = models.llm is not None if dialogue is None else bool(dialogue)
        self.asr_config: ASRConfig = self.cfg.asr.in_conversation() if self.dialogue else self.cfg.asr
        try:
            self._recognizer = StreamingRecognizer(models.whisper, self.asr_config)
        except ValueError as exc:
            raise DuplexError(str(exc)) from None
        self._hotwords = parse_hotwords(self.asr_config.hotwords)
        #: "dialogue", "interpreter" or "captions" (see set_mode)
        self.mode: str = "dialogue" if self.dialogue else "captions"
        #: target language of interpreter mode and translated captions
        self.target: str | None = None
        self._translators = None  # built on the first switch to translated speech or captions
        self._interp = None  # the pipeline's Interpreter stage
        #: what that stage does: "interpreter", "captions" (translated) or "dialogue" (forwards)
        self._interp_mode = "dialogue"
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
        #: conversations: ms from the end of the user's voice (VAD's raw decision, on the audio's
        #: clock) to the first sample of the agent's answer leaving the player
        self.reply_latencies: deque[float] = deque(maxlen=1000)
        self._voice_off: float | None = None
        #: the session clock: the turn core's time, and the time agent audio is due to play
        self.clock = RealClock()
        self._running = asyncio.Event()  # the pipeline is built and bound (the coordinator exists)
        self._started: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # -- dialogue: the conversation's parts outlive a pipeline restart
        #: the session's ``Coordinator`` (dialogue sessions, once started)
        self.coordinator: Coordinator | None = None
        #: its dialogue LLM state: one KV cache per session
        self.dialogue_llm: DialogueLLM | None = None
        self._echo: EchoReference | None = None
        #: the echo canceller's reference on the session's audio timeline. ``Playback`` stamps what
        #: is pulled with the session clock; the canceller looks it up by the ``pts`` of microphone
        #: frames, which count seconds of audio pushed. The offset maps one onto the other: it is
        #: set from the latest push when the agent starts a stretch of speech, and kept for the
        #: stretch, so the reference stays one continuous stream (the canceller finds the rest)
        self._reference: ShiftedReference | None = None
        self._canceller: EchoCanceller | None = None
        self.playback: Playback | None = None
        self._player: asyncio.Task[None] | None = None
        self._player_wake = asyncio.Event()
        self._announced: set[int] = set()  # replies whose agent_start has been emitted
        self._ended: deque[int] = deque(maxlen=64)  # replies whose agent_end or barge_in has been emitted
        #: (reply, time.monotonic()) when each reply's first audio block was emitted (dialogue)
        self.reply_starts: deque[tuple[int, float]] = deque(maxlen=1000)
        self._last_reply = 0
        if self.dialogue:
            if self.cfg.aec.enabled:
                self._echo = EchoReference(self.cfg.aec.reference_seconds)
                self._reference = ShiftedReference(self._echo)
                self._canceller = EchoCanceller(self.cfg.aec)
            self.playback = _Playback(self._reference, self._wake_player)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> "Session":
        """Start the pipeline (a dialogue session first builds its dialogue state: a fraction of a
        second; a missing LLM raises here)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._started = self._loop.create_future()
            self._task = self._loop.create_task(self._supervise(), name=f"duplex:session:{self.name}")
            if self.dialogue:
                self._player = self._loop.create_task(self._play(), name=f"duplex:session:{self.name}:player")
        assert self._started is not None
        await asyncio.shield(self._started)
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
        for task in (self._player, self._task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._started is not None and not self._started.done():
            self._started.cancel()
        if self.dialogue_llm is not None:
            await asyncio.to_thread(self.dialogue_llm.close)
        self._resolve_markers()
        self._events.put_nowait(_END)

    async def finish(self, timeout: float = 30.0) -> None:
        """No more audio: close the open utterance, let queued speech finish, then end ``events()``
        after everything so far has been delivered. In a dialogue, the agent first answers what
        the user said last and plays its reply out (for at most ``timeout`` seconds)."""
        self._accepting = False
        await self._mark("finish")
        while self._speaking:
            await asyncio.wait(set(self._speaking))
        deadline = time.monotonic() + timeout
        while self.dialogue and not self._closed and time.monotonic() < deadline:
            c = self.coordinator
            if c is None or (not c.speaking and not c.state.turn_text.strip() and not self.playback.busy()):
                break
            await asyncio.sleep(0.02)
        if self.dialogue and not self._closed:
            await self._mark("sync")  # behind the turn events the coordinator has sent so far
        self._events.put_nowait(_END)

    # -- audio in ---------------------------------------------------------------------------

    async def push_audio(self, pcm: np.ndarray | bytes, sample_rate: int = INTERNAL_RATE, channels: int | None = None) -> None:
        """Audio from any source: float samples in [-1, 1] or int16, shape (n,) or (n, channels),
        or signed 16-bit little-endian bytes (interleaved, ``channels`` of them, default 1).
        Any rate is resampled to 16 kHz; channels are averaged."""
        if not self._accepting:
            raise RuntimeError(f"session {self.name} takes no more audio (finished or closed)")
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            await self.start()  # (a dialogue session takes audio once its dialogue state is built)
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
        if self._discard or isinstance(frame, (VoiceActivity, SpeechEnding)):  # the turn core's, the recogniser's
            return
        if isinstance(frame, TurnEvent) and frame.kind == "agent_start":
            if frame.reply in self._announced:
                return  # the player announced it already, in front of the reply's first audio
            self._announce(frame.reply)
        elif isinstance(frame, TurnEvent):
            self._ended.append(frame.reply)
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
        # the first push whose audio reaches t; pushes are in order, and what is asked about is
        # recent (finals, VAD decisions), so the search starts from the newest
        found = None
        for end, wall in reversed(self._pushes):
            if end < t - 1e-6:
                break
            found = wall
        return found

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
        """``"dialogue"`` (answer), ``"interpreter"`` (translate each utterance into ``target``
        and speak it) or ``"captions"`` (text only: translated into ``target`` when one is given,
        else the transcripts). In a dialogue session ``captions`` stops the agent and it answers no
        one until ``dialogue`` again; ``interpreter`` and translated captions translate as the
        words become stable (``translate`` settings: engine per pair, simultaneous policy, source
        language) as ``TranslatedText`` events (``AgentText``); the interpreter speaks each one as
        an agent turn (``TurnEvent``s and ``AgentAudio``), and a caption whose final rewrote shown
        words comes again with ``supersedes``. An unsupported pair is refused with the installed
        pairs. A transcripts-only session cannot speak: there ``interpreter`` is stored, and
        translated captions work as in a dialogue session."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "interpreter" and not target:
            raise ValueError("interpreter mode needs a target language")
        if mode == "dialogue":
            target = None
        translated = (mode == "interpreter" and self.dialogue) or (mode == "captions" and bool(target))
        task = "transcribe"
        if translated:
            from orchestration.interpreter import asr_task, check_pair
            from orchestration.translate import UnsupportedPair

            from .translate_cmd import translators_for

            if self._translators is None:
                self._translators = await asyncio.to_thread(translators_for, self.cfg.translate, self.models.whisper)
            try:
                check_pair(self._translators, self.cfg.translate.source, target)
            except UnsupportedPair as exc:
                raise ValueError(str(exc)) from None
            task = asr_task(self._translators, self.cfg.translate.source, target)
        self.mode, self.target = mode, target
        self._interp_mode = mode if translated else "dialogue"
        if mode != "dialogue" and self.coordinator is not None:
            self.coordinator.interrupt(f"mode {mode}")
        if self._interp is not None:
            self._interp.set_mode(self._interp_mode, target)
        if task != self.asr_config.task:  # Whisper translates this pair itself
            self.asr_config = replace(self.asr_config, task=task)
            self._recognizer = StreamingRecognizer(self.models.whisper, self.asr_config)
            await self._mark("recognizer", self._recognizer)

    async def reset(self) -> None:
        """Forget the conversation: speech in progress, queued audio, detector and recogniser
        state, and the dialogue (a fresh context for the LLM). Events of audio pushed before the
        call are not delivered after it."""
        await self.interrupt()
        self._discard = True
        self._input.drop_audio()
        await self._mark("reset")

    async def flush(self) -> None:
        """Close the open utterance now (end of a stream); returns once its final is emitted."""
        await self._mark("finish")

    async def say(self, text: str) -> int:
        """Speak ``text``: emits ``AgentText``, ``TurnEvent`` ``agent_start``, ``AgentAudio`` and
        ``TurnEvent`` ``agent_end`` (or ``barge_in`` when it is cut short). Turns are spoken one
        after another; returns the turn's number (its ``reply``) once it is done or cut (0 if it
        was dropped before it began). In a dialogue it waits for the agent's turn in progress to
        end, goes into the dialogue as the agent's words, and the user can barge in on it."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("nothing to say")
        if self._closed:
            raise RuntimeError(f"session {self.name} is closed")
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            await self.start()  # (a dialogue session takes audio once its dialogue state is built)
        number = [0]
        if self.dialogue:
            coro = self._say_dialogue(text, number)
        else:
            self._turns += 1
            number[0] = self._turns
            coro = self._speak(number[0], text)
        task = asyncio.get_running_loop().create_task(coro, name=f"duplex:say:{self.name}")
        self._speaking.add(task)
        task.add_done_callback(self._speaking.discard)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return number[0]

    async def interrupt(self) -> bool:
        """Stop speaking now and drop queued turns. True if something was cut. In a dialogue the
        reply is stopped as by a barge-in (``TurnEvent`` ``barge_in``, reason ``interrupt``): the
        dialogue keeps only the words the user heard."""
        tasks = list(self._speaking)
        for t in tasks:
            t.cancel()
        cut = self.coordinator.interrupt("interrupt") if self.coordinator is not None else False
        if tasks:
            await asyncio.wait(tasks)
        return cut or bool(tasks)

    @property
    def speaking(self) -> bool:
        """The agent is speaking, about to, or has turns waiting."""
        c = self.coordinator
        return bool(self._speaking) or (c is not None and c.speaking)

    def stats(self) -> dict[str, float]:
        return {"audio_s": round(self._pts, 3), "lag_s": round(self.lag_seconds, 3), **self.counts}

    # -- internals --------------------------------------------------------------------------

    async def _speak(self, turn: int, text: str) -> None:
        """Transcripts-only sessions: Piper's sentences out as fast as they are synthesised."""
        loop = asyncio.get_running_loop()
        ex = self.models.tts_executor
        async with self._speak_lock:
            tts = await loop.run_in_executor(ex, self.models.tts)
            rate = tts.sample_rate
            self.counts["turns"] += 1
            self._emit(AgentText(reply=turn, text=text, pts=self._agent_pts))
            self._emit(TurnEvent(kind="agent_start", reply=turn, pts=self._agent_pts))
            interrupted = True
            try:
                chunks = tts.stream(text)
                while (chunk := await loop.run_in_executor(ex, next, chunks, None)) is not None:
                    self._emit(AgentAudio(samples=chunk, sample_rate=rate, reply=turn, pts=self._agent_pts))
                    self._agent_pts += len(chunk) / rate
                interrupted = False
            finally:
                if interrupted:
                    self._emit(TurnEvent(kind="barge_in", reason="interrupt", reply=turn, pts=self._agent_pts))
                else:
                    self._emit(TurnEvent(kind="agent_end", text=text, reply=turn, pts=self._agent_pts))

    async def _say_dialogue(self, text: str, number: list[int]) -> None:
        async with self._speak_lock:
            await self._running.wait()
            while self.coordinator is None or self.coordinator.speaking:  # the turn in progress ends first
                await asyncio.sleep(0.02)
            coord = self.coordinator
            self.counts["turns"] += 1
            number[0] = coord.say(text)
            await coord.finished(number[0])
            # its last turn event is on its way through the pipeline: say returns after it
            deadline = time.monotonic() + 2.0
            while number[0] in self._announced and number[0] not in self._ended and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    # -- dialogue: time, the player ---------------------------------------------------------

    def _clock_time(self, pts: float) -> float:
        """The session-clock time at which the audio at ``pts`` (seconds pushed) was pushed."""
        wall = self._wall_at(pts)
        now = self.clock.now()
        return now if wall is None else now - max(0.0, time.monotonic() - wall)

    def _audio_offset(self) -> float:
        """Audio time minus session-clock time, from the latest push (audio flows in real time)."""
        if not self._pushes:
            return 0.0
        end, wall = self._pushes[-1]
        return end - (self.clock.now() - (time.monotonic() - wall))

    def _wake_player(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._player_wake.set()
        else:
            loop.call_soon_threadsafe(self._player_wake.set)

    async def _play(self) -> None:
        """The agent's voice, in real time: every 20 ms on the session clock, while there is audio
        to play, the next block is pulled from ``Playback`` (which marks its words as heard and
        feeds the echo canceller's reference) and sent out as ``AgentAudio`` if it has sound."""
        pb = self.playback
        assert pb is not None
        dt = BLOCK / INTERNAL_RATE
        while True:
            self._player_wake.clear()
            if not pb.busy():
                await self._player_wake.wait()
                continue
            if self._reference is not None:
                self._reference.offset = self._audio_offset()
            t0, k = self.clock.now(), 0
            while pb.busy():
                t = t0 + k * dt
                await self.clock.sleep_until(t)
                behind = self.clock.now() - t
                if behind > MAX_BEHIND_S:  # the loop was held up: carry on from now, lose nothing
                    t0 += behind
                    t += behind
                before = pb.played_samples
                block = pb.pull(BLOCK, t)
                k += 1
                if pb.played_samples > before:
                    self._emit_audio(block, t)

    def _emit_audio(self, block: np.ndarray, t: float) -> None:
        reply = self.playback.current if self.playback.current is not None else self._last_reply
        if reply > 0 and reply not in self._announced:
            self._announce(reply)
            self.reply_starts.append((reply, time.monotonic()))
            self._emit(TurnEvent(kind="agent_start", reply=reply, pts=t))
        self._last_reply = reply
        self._emit(AgentAudio(samples=block, sample_rate=INTERNAL_RATE, reply=reply, pts=t))

    def _announce(self, reply: int) -> None:
        self._announced.add(reply)
        if len(self._announced) > 256:
            self._announced = set(sorted(self._announced)[-128:])

    def _on_coordinator_event(self, e: dict) -> None:
        kind = e.get("kind")
        if kind == "voice" and not e.get("early"):
            self._voice_off = None if e.get("speech") else e.get("at")
        elif kind == "agent_audio_start" and self._voice_off is not None:
            self.reply_latencies.append(round((e["t"] - self._voice_off) * 1000, 1))
            self._voice_off = None
        if kind == "error":
            self.counts["errors"] += 1
            self._emit(ErrorFrame(stage="coordinator", message=str(e.get("message", ""))[:300], pts=self.clock.now()))

    def _prepare_dialogue(self) -> None:
        """Worker thread: the LLM (if it was not loaded), Piper, and this session's dialogue state."""
        import torch

        torch.set_num_threads(1)  # one torch thread per model worker (the system prompt's prefill runs here)
        llm = self.models.load_llm()
        self.models.tts()
        if self.dialogue_llm is None:
            self.dialogue_llm = DialogueLLM(llm, self.cfg.dialogue, hotwords=self.asr_config.hotwords)

    # -- internals --------------------------------------------------------------------------

    async def _mark(self, action: str, payload: Any = None) -> None:
        if self._closed:
            raise RuntimeError(f"session {self.name} is closed")
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            await self.start()  # (a dialogue session takes audio once its dialogue state is built)
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
        if not self.dialogue:
            self._interp = _LateInterpreter(self)
            return [_VAD(self.cfg.vad, self.models.silero), _ASR(self._recognizer, self._hotwords), self._interp,
                    _Collect(self)]
        assert self.dialogue_llm is not None and self.playback is not None
        coord = _Coordinator(self, self.dialogue_llm, self.models.tts(), self.playback, self.cfg.turns,
                             on_event=self._on_coordinator_event)
        coord.clock = self.clock  # say() may come before the pipeline binds it
        self.coordinator = coord
        self._announced.clear()  # a new coordinator numbers its replies from 1 again
        stages: list[Stage] = []
        if self._echo is not None:
            stages.append(_AEC(self.cfg.aec, self._echo, canceller=self._canceller))
        self._interp = _LateInterpreter(self)
        stages += [_VAD(replace(self.cfg.vad, activity_events=True), self.models.silero), coord.tap(),
                   _ASR(self._recognizer, self._hotwords, echo_until(self.cfg, self._echo)), self._interp, coord,
                   _Collect(self)]
        return stages

    async def _supervise(self) -> None:
        """Run the pipeline; if a stage fails, report it and start a fresh one on the same input."""
        assert self._started is not None
        if self.dialogue:
            try:
                await asyncio.to_thread(self._prepare_dialogue)
            except Exception as exc:  # noqa: BLE001 - reported to whoever starts the session
                log.exception("session %s: the dialogue could not start", self.name)
                self._started.set_exception(DuplexError(f"session {self.name}: the dialogue could not start: {_first(exc)}"))
                return
        self._started.set_result(None)
        while True:
            pipeline = Pipeline(self._input, self._stages(), clock=self.clock, queue_size=self.cfg.pipeline.queue_size)
            self._running.set()  # (run() binds the stages before anything else gets to run)
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
                if self.playback is not None:
                    self.playback.clear(self.clock.now())
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
