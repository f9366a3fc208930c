"""``duplex translate``: speech files translated, streaming (the interpreter path) or offline.

Streaming runs the file through VAD -> ASR -> ``Interpreter`` (captions mode) at real-time pace
(``--pace fast``: a simulated clock, as fast as the CPU allows) and reports each emitted segment:
``emitted_at`` is the wall time since the file began streaming, ``source_end`` the audio time of
the end of the source it covers. Offline decodes the whole file (Whisper 30 s windows) and then
translates the text sentence by sentence when a text engine does the pair.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestration.interpreter import Interpreter, TranslatedText, asr_task, check_pair
from orchestration.translate import TranslateConfig, TranslatorSet, UnsupportedPair
from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
from streaming.asr.stage import ASRStage
from streaming.audio_file import FileSource, open_audio
from streaming.clock import Clock, RealClock, SimulatedClock
from streaming.errors import DuplexError
from streaming.frames import ErrorFrame, FinalText, Frame
from streaming.pipeline import Pipeline
from streaming.stages import Callback
from streaming.vad import VADStage

from .config import DuplexConfig

#: the model translation needs when the configured recogniser is English-only
MULTILINGUAL_DEFAULT = "whisper:base"


@dataclass
class Translation:
    file: str
    source_language: str
    source_text: str | None
    text: str
    segments: list[dict] = field(default_factory=list)
    audio_seconds: float = 0.0
    processing_seconds: float = 0.0
    engine: str = ""
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {
            "file": self.file, "source_language": self.source_language, "source_text": self.source_text,
            "text": self.text, "segments": self.segments, "audio_seconds": round(self.audio_seconds, 3),
            "processing_seconds": round(self.processing_seconds, 3), "engine": self.engine,
        }
        if self.warnings:
            d["warnings"] = self.warnings
        return d


def model_name(cfg: DuplexConfig, override: str | None) -> str:
    if override:
        return override
    return cfg.models.asr if not cfg.models.asr.endswith(".en") else MULTILINGUAL_DEFAULT


def translators_for(cfg: TranslateConfig, bundle, llm=None) -> TranslatorSet:
    langs = tuple(bundle.tokenizer.languages) if bundle.multilingual else ()
    return TranslatorSet.from_config(cfg, whisper_languages=langs, llm=llm)


def plan(translators: TranslatorSet, asr: ASRConfig, source: str, target: str) -> ASRConfig:
    """The recogniser's config for this pair (task and pinned language); refuses an unsupported pair."""
    check_pair(translators, source, target)
    return replace(asr, task=asr_task(translators, source, target), language=source)


def engine_name(translators: TranslatorSet, source: str, target: str) -> str:
    try:
        return translators.for_pair(source, target).name
    except UnsupportedPair:
        return "per-utterance"


async def translate_streaming(path, bundle, cfg: DuplexConfig, asr: ASRConfig, translators: TranslatorSet,
                              tcfg: TranslateConfig, pace: str = "realtime") -> Translation:
    try:
        recognizer = StreamingRecognizer(bundle, asr)
    except ValueError as exc:
        raise DuplexError(str(exc)) from None
    interp = Interpreter(translators, replace(tcfg, mode="captions"))
    clock: Clock = SimulatedClock() if pace == "fast" else RealClock()
    source = FileSource(path, pace="realtime", block_ms=cfg.audio.block_ms, start_pts=0.0)
    segs: list[TranslatedText] = []
    finals: list[FinalText] = []
    warnings: list[str] = []

    def collect(frame: Frame) -> None:
        if isinstance(frame, TranslatedText):
            segs.append(frame)
        elif isinstance(frame, FinalText):
            finals.append(frame)
        elif isinstance(frame, ErrorFrame):
            warnings.append(frame.message)

    stages = [VADStage(cfg.vad), ASRStage(recognizer), interp,
              Callback(collect, (TranslatedText, FinalText, ErrorFrame), name="collect")]
    t0w, t0 = time.time(), time.perf_counter()
    await Pipeline(source, stages, clock=clock, queue_size=cfg.pipeline.queue_size).run()
    elapsed = time.perf_counter() - t0
    language = next((f.language for f in finals if f.language), asr.language)
    kept = [s for s in segs if not any(s.segment in o.supersedes for o in segs)]
    out_segments = []
    for s in segs:
        d = {"text": s.text, "emitted_at": round(s.emitted_at - t0w, 3), "source_end": round(s.pts, 3)}
        if s.supersedes:
            d["supersedes"] = list(s.supersedes)
        out_segments.append(d)
    task_translated = asr.task == "translate"
    return Translation(
        file=str(path), source_language=language,
        source_text=None if task_translated else " ".join(f.text for f in finals).strip(),
        text=" ".join(s.text for s in kept).strip(), segments=out_segments, audio_seconds=_duration(path),
        processing_seconds=elapsed, engine=engine_name(translators, asr.language, tcfg.target), warnings=warnings,
    )


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def translate_offline(path, bundle, asr: ASRConfig, translators: TranslatorSet, target: str) -> Translation:
    from .transcribe import transcribe_offline

    t0 = time.perf_counter()
    tr = transcribe_offline(path, bundle, asr)
    language = tr.language
    warnings: list[str] = []
    if asr.task == "translate" or not tr.text:
        text = tr.text
        engine = "whisper" if asr.task == "translate" else "none"
    else:
        try:
            eng = translators.for_pair(language, target, speech=False)
            text = " ".join(eng.translate(s, language, target) for s in split_sentences(tr.text))
            engine = eng.name
        except UnsupportedPair as exc:
            text, engine = "", "none"
            warnings.append(str(exc))
    elapsed = time.perf_counter() - t0
    segs = [{"text": text, "emitted_at": round(elapsed, 3), "source_end": round(tr.audio_seconds, 3)}] if text else []
    return Translation(str(path), language, None if asr.task == "translate" else tr.text, text, segs,
                       tr.audio_seconds, elapsed, engine, warnings)


def _duration(path) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / info.samplerate


def run_translate(args, cfg: DuplexConfig) -> int:
    import json

    from . import models

    for f in args.files:
        open_audio(f).close()
    tcfg = cfg.translate
    target = args.target or tcfg.target
    source = args.source or tcfg.source
    resolver = models.resolver_for(cfg.models.cache_dir)
    name = model_name(cfg, args.model)
    bundle = resolver.whisper(name, cfg.models.asr_precision, translating=True)
    if bundle.multilingual and source not in ("auto", *bundle.tokenizer.languages):
        raise DuplexError(f"unknown source language {source!r}")
    if not bundle.multilingual and source not in ("en", "auto"):
        raise DuplexError(f"{name} is English-only: it cannot recognise {source!r}; use --model whisper:base")
    llm = resolver.llm(tcfg.llm, cfg.models.llm_precision) if tcfg.llm else None
    translators = translators_for(tcfg, bundle, llm)
    if not bundle.multilingual and source == "auto":
        source = "en"
    asr = plan(translators, cfg.asr, source, target)
    import torch

    torch.set_num_threads(1)
    for f in args.files:
        if args.offline:
            result = translate_offline(f, bundle, asr, translators, target)
        else:
            result = asyncio.run(translate_streaming(f, bundle, cfg, asr, translators, replace(tcfg, target=target, source=source),
                                                     args.pace))
        if args.json:
            print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"{f} [{result.source_language}->{target}]: {result.text}", flush=True)
            for w in result.warnings:
                print(f"  warning: {w}", flush=True)
    return 0
