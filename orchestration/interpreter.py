"""Interpreter and captions modes: a stage after ASR that translates stable clauses as they commit.

``Interpreter`` consumes ``PartialText`` / ``FinalText`` (and forwards every frame unchanged), asks
the simultaneous policy which stable piece is ready, translates it on its own worker thread and
pushes a ``TranslatedText`` (an ``AgentText``) downstream. In ``interpreter`` mode each
translation is also spoken: Piper on a second thread, into ``Playback`` (the speaker pulls it),
one playback reply per utterance. In ``dialogue`` mode it does nothing but forward.

The mode, target and source language switch at run time (``set_mode``); a switch applies from
the next utterance on, and an unsupported pair is refused at once with the installed pairs.

The recogniser must run the task the chosen engine expects: ``asr_task`` says which (Whisper's
``translate`` task when Whisper itself translates, else ``transcribe``). The composition root
sets it on the ASR config; a mode switch that changes it needs the recogniser's config changed
too (``Session.set_mode`` is where that belongs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from streaming.errors import DuplexError
from streaming.frames import AgentText, ErrorFrame, FinalText, Frame, PartialText
from streaming.pipeline import Stage
from streaming.resample import resample

from .simultaneous import Segment, SimultaneousPolicy
from .translate import TranslateConfig, Translator, TranslatorSet, UnsupportedPair

log = logging.getLogger(__name__)

MODES = ("dialogue", "interpreter", "captions")
#: playback reply ids of interpreter speech start here (the coordinator numbers its replies from 0)
REPLY_BASE = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TranslatedText(AgentText):
    """A translated segment. ``pts`` = ``source_end``: the audio time of the source it covers.
    ``reply`` is the utterance number; ``supersedes`` (captions) names the segments it replaces."""

    segment: int = 0
    source_text: str = ""
    source_language: str = ""
    target_language: str = ""
    engine: str = ""
    final: bool = False
    supersedes: tuple[int, ...] = ()
    #: wall time (time.time()) at which the translation was ready
    emitted_at: float = 0.0


def asr_task(translators: TranslatorSet, source: str, target: str) -> str:
    """``"translate"`` when Whisper translates this pair in the recogniser, else ``"transcribe"``."""
    try:
        return "translate" if translators.for_pair(source, target).in_recognizer else "transcribe"
    except UnsupportedPair:
        return "transcribe"


def check_pair(translators: TranslatorSet, source: str, target: str) -> None:
    """Raise ``UnsupportedPair`` unless ``source`` -> ``target`` can be translated. With
    ``source="auto"``, a text engine that reaches ``target`` from some language is enough (the
    language is detected per utterance and checked then)."""
    try:
        translators.for_pair(source, target)
    except UnsupportedPair:
        if source != "auto" or not any(t == target for e in translators.engines.values() if not e.in_recognizer
                                       for _, t in e.pairs()):
            raise


class Interpreter(Stage):
    name = "interpreter"

    def __init__(self, translators: TranslatorSet, config: TranslateConfig | None = None, *, tts=None, playback=None,
                 on_segment: Callable[[TranslatedText], None] | None = None) -> None:
        super().__init__()
        self.translators = translators
        self.config = config or TranslateConfig()
        self.policy = SimultaneousPolicy(self.config.policy_config())
        self.state = self.policy.init_state()
        self.mode, self.target, self.source = "dialogue", self.config.target, self.config.source
        self.tts = tts
        self.playback = playback
        self.on_segment = on_segment
        self._held: list[Segment] = []  # auto source, text engine: segments waiting for the language
        self._tts_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._tts_jobs: list[concurrent.futures.Future] = []
        self.set_mode(self.config.mode, self.config.target, self.config.source)

    # -- control ----------------------------------------------------------------------------

    def set_mode(self, mode: str, target: str | None = None, source: str | None = None) -> None:
        """Switch mode (and target/source language); refuses an unsupported pair with one line."""
        if mode not in MODES:
            raise DuplexError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        target = target or self.target
        source = source or self.source
        if mode != "dialogue":
            check_pair(self.translators, source, target)
            if mode == "interpreter" and (self.tts is None or self.playback is None):
                raise DuplexError("interpreter mode needs a voice and a playback queue (captions need neither)")
        self.mode, self.target, self.source = mode, target, source
        self.state = self.policy.init_state()
        self._held = []

    # -- stage ------------------------------------------------------------------------------

    async def process(self, frame: Frame) -> None:
        await self.push(frame)
        if self.mode == "dialogue":
            return
        if isinstance(frame, PartialText):
            segs = self.policy.partial(self.state, frame)
        elif isinstance(frame, FinalText):
            segs = self.policy.final(self.state, frame, captions=self.mode == "captions")
        else:
            return
        for seg in segs:
            await self._deliver(seg, frame)
        if isinstance(frame, FinalText) and not frame.continued and self.mode == "interpreter":
            rid = REPLY_BASE + frame.utterance
            self._speak(rid, None)  # in order after its clauses: no more for this reply

    async def flush(self) -> None:
        for job in self._tts_jobs:
            await asyncio.wrap_future(job)
        self._tts_jobs.clear()

    async def aclose(self) -> None:
        await super().aclose()
        if self._tts_pool is not None:
            self._tts_pool.shutdown(wait=False, cancel_futures=True)
            self._tts_pool = None

    # -- internals --------------------------------------------------------------------------

    async def _deliver(self, seg: Segment, frame: Frame) -> None:
        source = self.source
        language = seg.language or (frame.language if isinstance(frame, FinalText) else "")
        try:
            engine = self.translators.for_pair(source, self.target)
        except UnsupportedPair:
            engine = None  # auto source with a text engine: known once the language is
        if engine is None:
            if not language:
                self._held.append(seg)
                return
            held, self._held = self._held, []
            if held and not seg.supersedes:
                seg = replace(seg, text=" ".join([h.text for h in held] + [seg.text]), index=held[0].index)
            source = language
            try:
                engine = self.translators.for_pair(language, self.target)
            except UnsupportedPair as exc:
                await self.push(ErrorFrame(pts=seg.source_end, stage=self.name, message=str(exc)))
                return
        try:
            text = await self.run_blocking(engine.translate, seg.text, source, self.target)
        except DuplexError as exc:
            await self.push(ErrorFrame(pts=seg.source_end, stage=self.name, message=str(exc)))
            return
        if not text.strip():
            return
        out = TranslatedText(
            pts=seg.source_end, text=text, reply=seg.utterance, segment=seg.index, source_text=seg.text,
            source_language=language or source, target_language=self.target, engine=engine.name, final=seg.final,
            supersedes=seg.supersedes, emitted_at=time.time(),
        )
        if self.on_segment is not None:
            self.on_segment(out)
        await self.push(out)
        if self.mode == "interpreter" and not seg.supersedes:
            self._speak(REPLY_BASE + seg.utterance, text)

    def _speak(self, reply: int, text: str | None) -> None:
        """Synthesise ``text`` into the playback queue on the TTS thread (``None``: the reply is complete)."""
        if self.mode != "interpreter" or self.playback is None:
            return
        if self._tts_pool is None:
            self._tts_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-interp-tts")
        self._tts_jobs = [j for j in self._tts_jobs if not j.done()]
        self._tts_jobs.append(self._tts_pool.submit(self._synth, reply, text))

    def _synth(self, reply: int, text: str | None) -> None:
        if text is None:
            self.playback.finish(reply)
            return
        try:
            pieces = [resample(a, self.tts.sample_rate) for a in self.tts.stream(text)]
        except Exception as exc:  # Piper errors have many types; one bad clause must not end the stage
            log.warning("interpreter: TTS failed on %r: %s", text, exc)
            return
        if pieces:
            self.playback.enqueue(reply, text, np.concatenate(pieces))
