"""File transcription, streaming (the product path) or offline (a whole-file reference)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from streaming.asr.decoder import (COMPRESSION_LIMIT, Decoded, beam_decode, build_prompt, compression_ratio, decode, length_floor,
                                   rules_filter, with_fallback)
from streaming.asr.hotwords import HotwordBoost, parse_hotwords, prompt_text
from streaming.asr.recognizer import ASRConfig, StreamingRecognizer, detect_language
from streaming.asr.stage import ASRStage
from streaming.asr.alignment import word_timings
from streaming.audio_file import FileSource, read_audio
from streaming.clock import Clock, RealClock, SimulatedClock
from streaming.errors import DuplexError
from streaming.frames import EndOfStream, FinalText, Frame, PartialText, Word
from streaming.models.whisper import log_mel
from streaming.models.whisper_load import WhisperBundle
from streaming.pipeline import Pipeline, Source
from streaming.stages import Callback
from streaming.vad import TwoStageVAD, VADConfig, VADStage

from .config import DuplexConfig

WINDOW = 30 * 16000
#: the speech segments whole-file decoding's windows end between: Silero's silences of 100 ms or
#: more, not padded
PAUSES = VADConfig(min_silence_ms=100.0, speech_pad_ms=0.0)


@dataclass
class Transcript:
    file: str
    text: str
    language: str
    words: list[Word]
    audio_seconds: float
    processing_seconds: float
    final_latency_ms: float | None
    finals: list[FinalText] = field(default_factory=list)
    partials: list[tuple[float, PartialText]] = field(default_factory=list)  # (wall time, frame)

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "text": self.text,
            "language": self.language,
            "words": [w.as_dict() for w in self.words],
            "audio_seconds": round(self.audio_seconds, 3),
            "processing_seconds": round(self.processing_seconds, 3),
            "final_latency_ms": None if self.final_latency_ms is None else round(self.final_latency_ms, 1),
        }


class _MarkLastSample(Source):
    """Wraps a source and records the wall time at which its last audio left it."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.last_sample_wall: float | None = None

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        async for f in self.inner.frames(clock):
            if isinstance(f, EndOfStream):
                self.last_sample_wall = time.perf_counter()
            yield f

    async def aclose(self) -> None:
        await self.inner.aclose()


def asr_config(cfg: DuplexConfig, language: str | None, task: str | None, hotwords: tuple[str, ...]) -> ASRConfig:
    c = cfg.asr
    changes: dict = {}
    if language:
        changes["language"] = language
    if task:
        changes["task"] = task
    if hotwords:
        changes["hotwords"] = parse_hotwords(hotwords)
    return replace(c, **changes)


async def transcribe_streaming(
    path: str | Path, bundle: WhisperBundle, cfg: DuplexConfig, asr: ASRConfig, pace: str = "realtime"
) -> Transcript:
    try:
        recognizer = StreamingRecognizer(bundle, asr)
    except ValueError as exc:
        raise DuplexError(str(exc)) from None
    clock: Clock = SimulatedClock() if pace == "fast" else RealClock()
    source = _MarkLastSample(FileSource(path, pace="realtime", block_ms=cfg.audio.block_ms, start_pts=0.0))
    finals: list[FinalText] = []
    partials: list[tuple[float, PartialText]] = []
    final_wall: list[float] = []

    def collect(frame: Frame) -> None:
        if isinstance(frame, FinalText):
            finals.append(frame)
            final_wall.append(time.perf_counter())
        elif isinstance(frame, PartialText):
            partials.append((time.perf_counter(), frame))

    stages = [VADStage(cfg.vad), ASRStage(recognizer), Callback(collect, (FinalText, PartialText), name="collect")]
    t0 = time.perf_counter()
    await Pipeline(source, stages, clock=clock, queue_size=cfg.pipeline.queue_size).run()
    elapsed = time.perf_counter() - t0
    latency = None
    if final_wall and source.last_sample_wall is not None:
        latency = (final_wall[-1] - source.last_sample_wall) * 1000
    audio_s = _duration(path)
    return Transcript(
        file=str(path),
        text=" ".join(f.text for f in finals).strip(),
        language=next((f.language for f in finals if f.language), asr.language),
        words=[w for f in finals for w in f.words],
        audio_seconds=audio_s,
        processing_seconds=elapsed,
        final_latency_ms=latency,
        finals=finals,
        partials=partials,
    )


def _duration(path: str | Path) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / info.samplerate


@torch.inference_mode()
def transcribe_offline(path: str | Path, bundle: WhisperBundle, asr: ASRConfig,
                       vad: TwoStageVAD | None = None, audio: np.ndarray | None = None) -> Transcript:
    """Plain whole-file decoding for comparison: windows of up to 30 s that end in a pause
    (``offline_windows``), padded to 30 s as Whisper was trained, each decoded by beam search
    (``asr.offline_beam_size``; 1: greedily), with Whisper's temperature fallback where that
    fails, and the previous window's text as context. Windows in which ``vad`` (the default
    two-stage detector) hears no speech are not decoded. ``audio``: the file's samples, read
    already (16 kHz mono; the benchmarks' altered copies)."""
    t0 = time.perf_counter()
    audio = read_audio(path) if audio is None else audio
    speech = (vad or TwoStageVAD()).segments(audio)
    # where a window must end before the file does, it ends in a pause of a word's length or more
    # (the segments above bridge 400 ms: the pauses of a 40-85 s prompt are 0.13-0.5 s)
    finer = TwoStageVAD(PAUSES).segments(audio) if len(audio) > WINDOW else speech
    tok = bundle.tokenizer
    hot = parse_hotwords(asr.hotwords)
    biaser = HotwordBoost(tok, hot, asr.hotword_boost, asr.hotword_start_boost, asr.hotword_gate)
    hot_prompt = tok.encode(prompt_text(hot)) if hot else []
    filters = [rules_filter(tok, bundle.rules)] + ([biaser] if biaser else [])
    texts, words, context = [], [], []
    language = asr.language
    for start, stop in offline_windows(finer, len(audio)):
        chunk = audio[start:stop]
        a, b = start / 16000, (start + len(chunk)) / 16000
        voiced = sum(max(0.0, min(b, hi) - max(a, lo)) for lo, hi in speech)
        if len(chunk) < 1600 or not voiced:
            continue  # a window VAD hears no speech in: Whisper says "Thank you very much." to silence
        feats = bundle.model.encode(log_mel(chunk, bundle.dims.n_mels, pad_to=WINDOW))
        if bundle.multilingual and language == "auto":
            language = detect_language(bundle, feats)
        sot = tok.prompt(language if bundle.multilingual else None, asr.task)
        carried = context[-asr.context_tokens :] if asr.context_tokens else []
        prompt = build_prompt(tok, hot_prompt + carried, sot)
        # no end of text before the text holds min_tokens_per_second of the window's speech (as
        # VAD marks it, beyond 1.5 s), as in the streaming recogniser: beam search otherwise
        # collects the unlikely ends of its first steps, and a 30 s window of speech ended on "if".
        # (Speech, not the window: a floor on silence would make the model invent words.)
        at_least = length_floor(tok.eot, asr.min_tokens_per_second, voiced)
        d = decode_with_fallback(bundle.model, tok, feats, prompt, filters + at_least, beam_size=asr.offline_beam_size)
        if carried and compression_ratio(d.text) > COMPRESSION_LIMIT:
            # text that repeats itself where the window's audio may not: the previous window's text
            # as context can lead Whisper to copy its pattern ("Press 1 to ..." of a menu became
            # "Press Unit 10 to send messages back. Press Unit 11 ..." over a 29 s window of other
            # prompts, whose last sentence it lost). Decoded without the context, the window says
            # what it says; where that repeats too, the audio does (an IVR menu), and the first stands.
            bare = build_prompt(tok, hot_prompt, sot)
            alone = decode_with_fallback(bundle.model, tok, feats, bare, filters + at_least, beam_size=asr.offline_beam_size)
            if compression_ratio(alone.text) <= COMPRESSION_LIMIT:
                d, prompt = alone, bare
        real = len(chunk) // 320 + 1
        words += word_timings(bundle.model, tok, feats, prompt, d.tokens, d.logprobs, bundle.alignment_heads, start / 16000, real)
        texts.append(tok.decode(d.tokens).strip())
        context += d.tokens
    return Transcript(
        file=str(path), text=" ".join(t for t in texts if t), language=language if bundle.multilingual else "en",
        words=words, audio_seconds=len(audio) / 16000, processing_seconds=time.perf_counter() - t0, final_latency_ms=None,
    )


def offline_windows(speech: list[tuple[float, float]], n_samples: int) -> list[tuple[int, int]]:
    """Whole-file decoding's windows, as (start, stop) samples: each up to 30 s (Whisper's input),
    ending in a pause between two of the ``speech`` segments (seconds), so that no word
    is cut in two: the longest pause in the window's last 20 s (a sentence ends there more often
    than between words), else the last, else at 30 s. A fixed 30 s grid cut a word wherever it
    fell ("... to consider how much ..." lost its "how"). Whisper's own recipe seeks to its last
    timestamp instead; without timestamps, VAD's pauses are what is known of the words."""
    # the silence before the first word is a pause too: a window of it alone is not decoded
    pauses = [(0.0, speech[0][0])] if speech else []
    pauses += [(end, nxt) for (_, end), (nxt, _) in zip(speech, speech[1:])]
    out: list[tuple[int, int]] = []
    start = 0
    while n_samples - start > WINDOW:
        limit = start + WINDOW
        late, last = None, None  # (length, cut) of the longest pause in the last 20 s; the last cut
        for end, nxt in pauses:
            if int(end * 16000) >= limit:
                break
            cut = min(int((end + nxt) / 2 * 16000), limit)
            if cut > start + 16000:  # (a window of at least 1 s)
                last = cut
                if cut > start + 10 * 16000 and (late is None or nxt - end >= late[0]):
                    late = (nxt - end, cut)
        stop = late[1] if late else last or limit
        out.append((start, stop))
        start = stop
    out.append((start, n_samples))
    return out


def decode_with_fallback(model, tok, feats, prompt: list[int], filters: list, max_tokens: int = 224,
                         beam_size: int = 1) -> Decoded:
    """A whole window decoded as Whisper's own recipe does: greedily (``beam_size`` 1) or by beam
    search, and where that fails (a loop, or a low average log-probability) sampled again at rising
    temperatures (``with_fallback``)."""
    def run(temperature=0.0, generator=None):
        return decode(model, tok, feats, prompt, [], filters, max_tokens=max_tokens, temperature=temperature,
                      generator=generator)

    first = beam_decode(model, tok, feats, prompt, filters, max_tokens, beam_size) if beam_size > 1 else run()
    return with_fallback(first, run)


def run_streaming(path, bundle, cfg, asr, pace) -> Transcript:
    return asyncio.run(transcribe_streaming(path, bundle, cfg, asr, pace))


