"""Streaming recognition: Whisper on the audio that exists, stable words while the user speaks.

The core is synchronous and does no I/O (``init_state`` / ``start`` / ``push`` / ``end`` /
``finish``), so files replay deterministically and the pipeline stage is a thin wrapper.

While VAD reports speech, every ``step_ms`` of new audio the current utterance window is encoded
(only the audio that exists: no padding to 30 s) and decoded greedily after the committed tokens,
which are forced as a prefix. LocalAgreement-n commits the words on which the last n hypotheses
agree. When speech ends, a final pass decodes the whole window once more after the committed
prefix, taking back words committed early (from a short window) where the whole utterance's audio
contradicts them, and aligns words to the audio. Windows longer than ``max_window_s``
(``clause_max_window_s`` where whole clauses are committed) are cut after the last committed
word; the committed text travels on as decoder context, so cost stays flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from ..frames import INTERNAL_RATE, FinalText, Frame, PartialText, SpeechEnding, Word
from ..models.whisper import EncoderCache, log_mel
from ..models.whisper_load import WhisperBundle
from .alignment import SECONDS_PER_POSITION, group_words, warm_up_alignment, word_timings
from .decoder import (FALLBACK_TEMPERATURES, Decoded, Fallback, beam_decode, build_prompt, decode, length_floor,
                      rules_filter)
from .hotwords import HotwordBoost, parse_hotwords, prompt_text

log = logging.getLogger(__name__)

MAX_ENCODE_S = 29.5  # Whisper's encoder sees 30 s at most
#: a window in which nothing was committed is closed whole this long after ``max_window_s``, and
#: a second before MAX_ENCODE_S at the latest (its last partial step must still see it all)
OVERDUE_S = 5.0
STEPS_KEPT = 1000  # ASRState.step_seconds keeps the last 1000 to 2000 step times
TRIM_EVERY_S = 10.0  # release_memory() at most this often, in seconds of audio
#: audio kept between utterances beyond the pre-roll: VAD reports a start up to this late (its
#: decision lags the onset it reports), and the pre-roll is counted back from that onset
LOOKBACK_S = 1.0
#: punctuation that ends a clause, for ``ASRConfig.commit = "clause"``
CLAUSE_END = (",", ";", ":", ".", "?", "!")
#: a word the alignment gives less audio than this has none: the decoder ran past the audio
SQUEEZED_S = 0.02
#: words committed while the window held less audio than this are the ones the final pass may take
#: back (``ASRConfig.final_revision``): two hypotheses of a short window agree on errors the rest of
#: the utterance disproves ("dal one" for "dial one")
EARLY_COMMIT_S = 3.0
#: after VAD's SpeechEnding, partial steps wait until its decision time plus this; no decision and
#: no word that the voice came back by then (a VAD that does not say): the hint is dropped
HINT_GRACE_S = 0.3
#: a language detected (``language = "auto"``) on a window with less audio than this is detected
#: again at the next step, and nothing is committed until it stands: on the first 0.4 s of an
#: English prompt ("demo-thanks") Whisper base found Hindi most likely
LANGUAGE_SETTLED_S = 2.0


@dataclass(frozen=True)
class ASRConfig:
    #: a new partial hypothesis after this much new audio, ms
    step_ms: Annotated[float, Field(ge=50, le=5000)] = 400.0
    #: LocalAgreement-n: a word is stable once this many successive hypotheses agree on it
    agreement: Annotated[int, Field(ge=1, le=5)] = 2
    #: language code, or "auto" to detect it per utterance (multilingual models only)
    language: str = "en"
    #: "transcribe", or "translate" (to English; multilingual models only)
    task: Literal["transcribe", "translate"] = "transcribe"
    #: what the agreement may commit: any agreed "word", or only whole agreed "clause"s (up to a
    #: , ; : . ? !); "auto": clauses when translating (a translation's first words depend on the
    #: rest of the clause, and a committed prefix cannot be revised), words when transcribing
    commit: Literal["auto", "word", "clause"] = "auto"
    #: windows longer than this are cut after the last stable word, s (Whisper sees at most 30 s)
    max_window_s: Annotated[float, Field(ge=5, le=28)] = 20.0
    #: the same where whole clauses are committed (translating): a clause waits until two
    #: hypotheses agree on all of it, and a cut inside a sentence loses the words at the cut
    #: (the next window's translation starts over without them)
    clause_max_window_s: Annotated[float, Field(ge=5, le=28)] = 28.0
    #: a cut window's successor starts this long before the last committed word's end, in ms: the
    #: alignment ends that word late, and the next word's first sound went with it (``duplex
    #: bench asr --monologue-minutes 5``, base: WER 0.063 with 0 ms -> 0.031)
    cut_overlap_ms: Annotated[float, Field(ge=0, le=1000)] = 250.0
    #: a whole clause commits only where the agreeing hypotheses also agree on this many tokens
    #: after it: the last clause of a hypothesis ends where its audio ends, and Whisper closes it
    #: with a full stop that the next words of the sentence take back (0: the clause alone)
    clause_confirm: Annotated[int, Field(ge=0, le=5)] = 1
    #: "window": re-encode the whole utterance window each step; "cached": keep earlier chunks'
    #: keys and values and encode only the new audio (cheaper, but earlier audio never sees later)
    encoder: Literal["window", "cached"] = "window"
    #: partial hypotheses ("window" encoder): encoder input zero-padded to at least this many seconds (0 = only the
    #: real audio); padding costs encoder time but Whisper, trained on 30 s windows, errs less
    min_encode_s: Annotated[float, Field(ge=0, le=30)] = 10.0
    #: the final pass: encoder input zero-padded to at least this many seconds
    final_min_encode_s: Annotated[float, Field(ge=0, le=30)] = 10.0
    #: utterances shorter than this are ignored (clicks), ms
    min_utterance_ms: Annotated[float, Field(ge=0)] = 100.0
    #: audio kept before VAD's speech start, ms (VAD already pads its own estimate)
    preroll_ms: Annotated[float, Field(ge=0, le=2000)] = 300.0
    #: the same where the agent holds a conversation (``in_conversation``): tiny.en's hypotheses on
    #: the extra audio shifted the turn-taking, and before an onset over the agent's voice the
    #: pre-roll is its echo residue
    conversation_preroll_ms: Annotated[float, Field(ge=0, le=2000)] = 0.0
    #: tokens of earlier text carried into the decoder prompt as context
    context_tokens: Annotated[int, Field(ge=0, le=200)] = 64
    #: cap on text tokens per second of audio (fast speech is about 5; stops hallucinations early)
    max_tokens_per_second: Annotated[float, Field(gt=0)] = 7.0
    #: words and phrases to favour (also settable at run time)
    hotwords: tuple[str, ...] = ()
    #: logit boost for tokens that continue a hotword already begun
    hotword_boost: Annotated[float, Field(ge=0, le=20)] = 5.0
    #: logit boost for the first token of a hotword
    hotword_start_boost: Annotated[float, Field(ge=0, le=20)] = 2.0
    #: a boost is only granted where the model's own log-probability is above this
    hotword_gate: Annotated[float, Field(le=0)] = -8.0
    #: a boosted hotword is withdrawn when its tokens together lost more than this much
    #: log-probability to the boosts (against the model's own best token at each step)
    hotword_budget: Annotated[float, Field(ge=0, le=50)] = 4.0
    #: most tokens of the hotword list written into the decoder prompt (list order; 0 = none)
    hotword_prompt_tokens: Annotated[int, Field(ge=0, le=200)] = 64
    #: no end of text before the window holds this many tokens per second of audio (beyond the
    #: first 1.5 s): Whisper without timestamps may stop after a long window's first sentence
    min_tokens_per_second: Annotated[float, Field(ge=0, le=5)] = 1.5
    #: the final pass may take back stable words committed from a short window (EARLY_COMMIT_S):
    #: from the first such token that the whole utterance's audio makes this many nats less likely
    #: than the model's own choice, it decodes afresh (0 = never; translations never: their clauses
    #: are spoken as they commit)
    final_revision: Annotated[float, Field(ge=0, le=20)] = 2.0
    #: each decode takes the last hypothesis's uncommitted words as a draft, verified in its prefill:
    #: the tokens it chooses again cost no decoder step each (the same text, sooner; near ties aside)
    draft: bool = True
    #: the final pass samples again at rising temperatures where its greedy decode looped or is
    #: unsure (Whisper's temperature fallback); "auto": when translating, whose final the
    #: simultaneous policy speaks as it comes
    final_fallback: Literal["auto", "on", "off"] = "auto"
    #: whole-file decoding (``--offline``, the benchmarks' offline reference): beams of Whisper's
    #: beam search (its default, and faster-whisper's, is 5); 1 decodes greedily. Streaming's
    #: partial steps are greedy (each step's hypothesis is revised by the next); its final pass,
    #: see final_beam_size
    offline_beam_size: Annotated[int, Field(ge=1, le=10)] = 5
    #: the final pass's first decode by beam search with this many beams, where words commit
    #: (transcribing; 1: greedily, as the partial steps)
    final_beam_size: Annotated[int, Field(ge=1, le=10)] = 1
    #: where whole clauses commit (translating): the final pass's beams, and its encoder input
    #: padded to this many seconds. A translation's final reads the clauses still uncommitted
    #: after the committed ones, and beam search on Whisper's own 30 s window finds better wording
    #: there (replaying every 400 ms step, es/fr/it->en 21.4/18.2/26.4 -> 21.9/18.9/28.3 BLEU).
    #: On a 10 s window beam 5 added repeated tails instead (21.8/18.7/25.6 -> 20.4/17.5/25.5)
    clause_final_beam_size: Annotated[int, Field(ge=1, le=10)] = 5
    clause_final_min_encode_s: Annotated[float, Field(ge=0, le=30)] = 30.0


    def in_conversation(self) -> "ASRConfig":
        """This configuration where the agent holds a conversation: its own pre-roll, and no
        draft. Conversations run Whisper in dynamic int8 (``models.conversation_asr_precision``),
        which scales a prefill's activations otherwise than a step's (their logits differ by up to
        5 nats, not 0.3 as in int8-tok), and the turn-taking was tuned on step-decoded hypotheses."""
        return replace(self, preroll_ms=self.conversation_preroll_ms, draft=False)


@dataclass
class ASRState:
    """One stream's recognition state. Create it with ``StreamingRecognizer.init_state``."""

    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    buf_start: float | None = None  # pipeline time of buf[0]
    in_speech: bool = False
    window_start: float = 0.0
    #: seconds of zeros the window starts with: the part of the pre-roll the stream did not have
    #: (it began with speech). Whisper drops a first word that starts its input
    lead: float = 0.0
    last_decode_end: float = 0.0
    utterance: int = 0
    committed: list[int] = field(default_factory=list)
    committed_logprobs: list[float] = field(default_factory=list)
    #: the first ``early`` committed tokens were committed from a window shorter than EARLY_COMMIT_S
    early: int = 0
    history: list[list[int]] = field(default_factory=list)  # recent hypotheses
    context: list[int] = field(default_factory=list)
    language: str | None = None
    #: ``language`` was pinned, or detected on at least LANGUAGE_SETTLED_S of audio (or a final's)
    language_settled: bool = True
    enc_cache: EncoderCache | None = None  # the "cached" encoder's state for the current window
    hotwords: tuple[str, ...] = ()
    biaser: HotwordBoost | None = None
    hotword_prompt: list[int] = field(default_factory=list)
    decodes: int = 0  # for the benchmarks: decoder passes run
    trimmed_at: float = -1e9  # pipeline time of the last release_memory()
    #: compute time of recent partial steps, s (bounded: a stream may run for days)
    step_seconds: list[float] = field(default_factory=list)
    #: VAD's SpeechEnding: the voice stopped, the utterance probably ends here (``prepare_end``)
    ending: float | None = None
    #: ... and when VAD will have decided (no SpeechEnded by then: the hint is dropped)
    ending_decided: float = 0.0
    #: the final prepared for ``ending``: (what it depends on, its tokens and frame)
    prepared: tuple | None = None
    #: ... or still being prepared: (what it depends on, its ``_FinalPass``), one fallback decode a push
    preparing: tuple | None = None


class StreamingRecognizer:
    def __init__(self, model: WhisperBundle, config: ASRConfig | None = None) -> None:
        self.m = model
        self.config = config or ASRConfig()
        c = self.config
        if c.task == "translate" and not model.multilingual:
            raise ValueError("translation needs a multilingual Whisper model")
        if c.language not in ("auto", *model.tokenizer.languages) and model.multilingual:
            raise ValueError(f"unknown language {c.language!r}")
        self._suppress = rules_filter(model.tokenizer, model.rules)
        #: commit whole clauses only (see ASRConfig.commit)
        self._clauses = c.commit == "clause" or (c.commit == "auto" and c.task == "translate")
        #: windows longer than this are cut after the committed words
        self._max_window = c.clause_max_window_s if self._clauses else c.max_window_s
        #: the final pass's beams and encoder padding (a translation's own, see ASRConfig)
        self._final_beams = c.clause_final_beam_size if self._clauses else c.final_beam_size
        self._final_pad_s = c.clause_final_min_encode_s if self._clauses else c.final_min_encode_s
        #: tokens after a clause that must agree too before it commits (clause commits only)
        self._confirm = c.clause_confirm if self._clauses else 0
        self._fallback = c.final_fallback == "on" or (c.final_fallback == "auto" and c.task == "translate")
        warm_up_alignment()

    # -- state ------------------------------------------------------------------------------

    def init_state(self) -> ASRState:
        s = ASRState()
        self.set_hotwords(s, self.config.hotwords)
        return s

    def set_hotwords(self, state: ASRState, hotwords) -> None:
        """Replace the hotword list; takes effect from the next decode, no restart."""
        c = self.config
        state.hotwords = parse_hotwords(hotwords)
        tok = self.m.tokenizer
        state.biaser = HotwordBoost(tok, state.hotwords, c.hotword_boost, c.hotword_start_boost, c.hotword_gate,
                                    c.hotword_budget)
        text = prompt_text(state.hotwords, tok, c.hotword_prompt_tokens) if c.hotword_prompt_tokens else ""
        state.hotword_prompt = tok.encode(text) if text else []

    # -- events -----------------------------------------------------------------------------

    def push(self, state: ASRState, samples: np.ndarray, pts: float, hypothesise: bool = True) -> list[Frame]:
        """Audio (16 kHz mono) whose first sample is at ``pts``. With ``hypothesise=False`` the
        audio is only buffered (the caller is behind real time and catching up)."""
        if state is None:
            raise ValueError("StreamingRecognizer.push needs a state from init_state()")
        if state.buf_start is None:
            state.buf_start = pts
        samples = np.asarray(samples, dtype=np.float32)
        if not np.isfinite(samples).all():
            # a broken source (NaN or infinite samples) would poison the mel spectrogram of the
            # whole window: such samples are heard as silence
            samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
        state.buf = np.concatenate([state.buf, samples]) if len(state.buf) else samples.copy()
        if not state.in_speech:
            keep = int((self.config.preroll_ms / 1000 + LOOKBACK_S) * INTERNAL_RATE)
            if len(state.buf) > keep:
                drop = len(state.buf) - keep
                state.buf = state.buf[drop:]
                state.buf_start += drop / INTERNAL_RATE
            return []
        end = self._buf_end(state)
        if state.ending is not None:
            if end <= state.ending_decided + HINT_GRACE_S:
                # (once the audio up to the ending has arrived; a fallback decode only when not
                # behind: the frames queued may say the voice came back)
                self._prepare(state, step=hypothesise)
                return []  # silence: no partial steps while VAD decides
            self.resume(state)  # VAD neither ended the utterance nor said the voice came back
        if end > self._close_at(state):
            # even when behind real time the window must not outgrow what Whisper can see
            if end - state.window_start > MAX_ENCODE_S:  # (a push of more than that at once)
                return self._final(state, end, continued=True)
            return self._partial(state, end)
        if not hypothesise or (end - state.last_decode_end) * 1000 < self.config.step_ms:
            return []
        return self._partial(state, end)

    def hypothesise(self, state: ASRState, min_new_ms: float = 100.0) -> list[Frame]:
        """A hypothesis now, off the step grid: the speaker paused, and whoever waits for the
        words (the coordinator deciding whether the turn is over) wants them before VAD ends
        the utterance. Nothing when less than ``min_new_ms`` of audio is new."""
        if not state.in_speech or state.buf_start is None or state.ending is not None:
            return []
        end = self._buf_end(state)
        if (end - state.last_decode_end) * 1000 < min_new_ms:
            return []
        return self._partial(state, end)

    def prepare_end(self, state: ASRState, pts: float, decide_at: float | None = None) -> None:
        """VAD heard the voice stop: the utterance probably ends at ``pts``, and VAD decides at
        ``decide_at``. The final transcript is computed now, in the silence before the decision,
        and ``end`` at this ``pts`` returns it at once. Until then no partial steps run (the audio
        is silence); ``resume`` undoes this when the voice comes back."""
        if not state.in_speech or state.buf_start is None:
            return
        state.ending = pts
        state.ending_decided = pts + 1.0 if decide_at is None else decide_at
        state.prepared, state.preparing = None, None
        self._prepare(state)

    def ending(self, state: ASRState, frame: SpeechEnding) -> None:
        """VAD's SpeechEnding: ``prepare_end``, or ``resume`` where the voice came back."""
        if frame.resumed:
            self.resume(state)
        else:
            self.prepare_end(state, frame.pts, frame.decide_at)

    def resume(self, state: ASRState) -> None:
        """The voice came back before VAD ended the utterance: drop what ``prepare_end`` made."""
        state.ending, state.prepared, state.preparing = None, None, None

    def start(self, state: ASRState, pts: float, not_before: float = -np.inf) -> None:
        """Speech began at ``pts`` (VAD's padded estimate). The pre-roll reaches no further back
        than ``not_before``: the caller knows the audio before it holds the agent's own voice
        (echo residue, which Whisper turns into words), so an onset over the agent's speech gets
        none."""
        if state.in_speech:
            return
        state.in_speech = True
        state.ending, state.prepared, state.preparing = None, None, None
        state.utterance += 1
        self._maybe_release(state, pts)
        start = max(pts - self.config.preroll_ms / 1000, min(not_before, pts))
        state.window_start = max(start, state.buf_start if state.buf_start is not None else start)
        state.lead = state.window_start - start
        state.last_decode_end = state.window_start
        state.committed, state.committed_logprobs, state.history, state.early = [], [], [], 0
        state.enc_cache = EncoderCache()
        if self.config.language == "auto" or not self.m.multilingual:
            state.language = None if self.m.multilingual else "en"
        else:
            state.language = self.config.language
        state.language_settled = state.language is not None

    def end(self, state: ASRState, pts: float) -> list[Frame]:
        """Speech ended at ``pts``: the final transcript of the utterance."""
        if not state.in_speech:
            return []
        state.in_speech = False
        out = self._final(state, min(pts, self._buf_end(state)), continued=False)
        # keep only the pre-roll's worth of audio (and VAD's decision lag) for the next utterance
        self._trim_to(state, self._buf_end(state) - self.config.preroll_ms / 1000 - LOOKBACK_S)
        return out

    def finish(self, state: ASRState) -> list[Frame]:
        """End of stream: close an open utterance (where VAD heard the voice stop, there)."""
        if state.in_speech and state.buf_start is not None:
            return self.end(state, state.ending if state.ending is not None else self._buf_end(state))
        return []

    # -- internals --------------------------------------------------------------------------

    def _maybe_release(self, s: ASRState, now: float) -> None:
        """``release_memory`` at a moment nothing waits on (a speech start, a long window's cut),
        at most every ``TRIM_EVERY_S`` of audio."""
        if now - s.trimmed_at >= TRIM_EVERY_S:
            s.trimmed_at = now
            release_memory()

    def _close_at(self, s: ASRState) -> float:
        """When a window with nothing committed is closed whole (``OVERDUE_S``)."""
        return s.window_start + min(self._max_window + OVERDUE_S, MAX_ENCODE_S - 1.0)

    def _buf_end(self, s: ASRState) -> float:
        return (s.buf_start or 0.0) + len(s.buf) / INTERNAL_RATE

    def _window(self, s: ASRState, end: float) -> np.ndarray:
        a = int(round((s.window_start - s.buf_start) * INTERNAL_RATE))
        b = int(round((end - s.buf_start) * INTERNAL_RATE))
        audio = s.buf[max(0, a) : max(0, b)]
        if s.lead > 0 and len(audio):
            audio = np.concatenate([np.zeros(int(round(s.lead * INTERNAL_RATE)), np.float32), audio])
        return audio

    def _origin(self, s: ASRState) -> float:
        """Pipeline time of the window's first sample, the lead of zeros included."""
        return s.window_start - s.lead

    def _trim_to(self, s: ASRState, t: float) -> None:
        if s.buf_start is None or t <= s.buf_start:
            return
        drop = min(len(s.buf), int(round((t - s.buf_start) * INTERNAL_RATE)))
        s.buf = s.buf[drop:]
        s.buf_start += drop / INTERNAL_RATE

    @torch.inference_mode()
    def _encode(self, s: ASRState, audio: np.ndarray, final: bool = False) -> tuple[torch.Tensor, int]:
        """Encoder output for ``audio`` (the window) and the number of positions of real audio."""
        if self.config.encoder == "cached":
            if s.enc_cache is None:
                s.enc_cache = EncoderCache()
            mel = log_mel(audio, self.m.dims.n_mels).unsqueeze(0)
            feats = self.m.model.encoder.forward_cached(mel, s.enc_cache)
            return feats, feats.shape[1]
        pad_s = self._final_pad_s if final else self.config.min_encode_s
        pad_to = int(pad_s * INTERNAL_RATE) or None
        mel = log_mel(audio, self.m.dims.n_mels, pad_to=pad_to)
        real = min(mel.shape[-1], (len(audio) // 160)) // 2 + 1
        return self.m.model.encode(mel), real

    def _detect(self, s: ASRState, feats: torch.Tensor, seconds: float, final: bool = False) -> None:
        """The utterance's language, while it does not stand yet (``LANGUAGE_SETTLED_S``): detected
        on this window; a change drops the hypotheses so far (they were in the other language)."""
        if s.language_settled:
            return
        language = detect_language(self.m, feats)
        if language != s.language:
            if s.language is not None:
                log.debug("language %s -> %s on %.1f s", s.language, language, seconds)
            s.language, s.history = language, []
        s.language_settled = final or seconds >= LANGUAGE_SETTLED_S

    def _sot(self, s: ASRState, feats: torch.Tensor) -> list[int]:
        tok = self.m.tokenizer
        if s.language is None:
            s.language = detect_language(self.m, feats)
        return tok.prompt(s.language if self.m.multilingual else None, self.config.task)

    def _prompt(self, s: ASRState, feats: torch.Tensor, hotwords: bool = True) -> list[int]:
        """Hotwords, then the last ``context_tokens`` of earlier text, then the start sequence."""
        n = self.config.context_tokens
        carried = s.context[-n:] if n else []  # (a [-0:] slice would keep everything)
        return build_prompt(self.m.tokenizer, (s.hotword_prompt if hotwords else []) + carried, self._sot(s, feats))

    def _filters(self, s: ASRState, seconds: float) -> list:
        filters = [self._suppress, *length_floor(self.m.tokenizer.eot, self.config.min_tokens_per_second, seconds)]
        if s.biaser:
            filters.append(s.biaser)  # last: it weighs the model's log-probabilities as the other filters leave them
        return filters

    def _budget(self, s: ASRState, seconds: float) -> int:
        """The whole window's text may hold at most this many tokens: a hypothesis longer than
        speech can be is a hallucination, and capping it bounds the cost of a bad step."""
        return max(4, int(self.config.max_tokens_per_second * seconds) + 4 - len(s.committed))

    def _beam(self, s: ASRState, feats: torch.Tensor, seconds: float) -> Decoded:
        """A final pass's first decode by beam search (``final_beam_size``, ``clause_final_beam_size``),
        after the committed words."""
        s.decodes += 1
        return beam_decode(self.m.model, self.m.tokenizer, feats, self._prompt(s, feats), self._filters(s, seconds),
                           self._budget(s, seconds), self._final_beams, forced=s.committed)

    def _decode(self, s: ASRState, feats: torch.Tensor, seconds: float, revise: bool = False,
                temperature: float = 0.0, generator: torch.Generator | None = None) -> Decoded:
        tok = self.m.tokenizer
        prompt = self._prompt(s, feats)
        forced = s.committed
        revisable = self._revisable(s) if revise and forced and self.config.final_revision > 0 else None
        filters = self._filters(s, seconds)
        budget = self._budget(s, seconds)
        s.decodes += 1
        draft = self._draft(s)
        sampling = dict(temperature=temperature, generator=generator)
        d = decode(self.m.model, tok, feats, prompt, forced, filters, max_tokens=budget, revisable=revisable,
                   revise_margin=self.config.final_revision, draft=draft, **sampling)
        if d.hit_limit and s.hotword_prompt:
            # a loop or a runaway: Whisper copying its prompt (a hotword list written over the
            # first words, or repeated after the last), as tiny.en does where the audio is unclear.
            # Decide again without the list; the trie boost still applies
            s.decodes += 1
            log.debug("prompted decode looped (%r); again without the hotword prompt", d.text)
            d = decode(self.m.model, tok, feats, self._prompt(s, feats, hotwords=False), forced, filters,
                       max_tokens=budget, revisable=revisable, revise_margin=self.config.final_revision, draft=draft,
                       **sampling)
        return d

    def _draft(self, s: ASRState) -> list[int]:
        """What the last hypothesis said after the committed words: the next decode most likely
        says it again, and verifies it in its prefill instead of a step per token."""
        if not self.config.draft or not s.history:
            return []
        last = s.history[-1]
        n = len(s.committed)
        return last[n:] if last[:n] == s.committed else []

    def _revisable(self, s: ASRState) -> list[bool] | None:
        """Which committed tokens the final may take back: those committed from a short window
        (EARLY_COMMIT_S), but none in a translation (its clauses are spoken as they commit), and
        none in a word of the hotword list (the boost, not the audio, may have put it there)."""
        if self._clauses or self.config.task == "translate" or not s.early:
            return None
        tok = self.m.tokenizer
        listed = {_norm_word(w) for h in s.hotwords for w in h.split()}
        flags = [i < s.early for i in range(len(s.committed))]
        for g in group_words(tok, s.committed):
            if _norm_word(tok.decode([s.committed[i] for i in g])) in listed:
                for i in g:
                    flags[i] = False
        return flags

    def _partial(self, s: ASRState, end: float) -> list[Frame]:
        import time

        t0 = time.perf_counter()
        audio = self._window(s, end)
        s.last_decode_end = end
        feats, real = self._encode(s, audio)
        self._detect(s, feats, len(audio) / INTERNAL_RATE - s.lead)
        d = self._decode(s, feats, len(audio) / INTERNAL_RATE - s.lead)
        d = self._unloop(s, feats, real, d)
        hyp = s.committed + d.tokens
        s.history = (s.history + [hyp])[-self.config.agreement :]
        newly = self._agree(s, d)
        if newly and end - s.window_start < EARLY_COMMIT_S:
            s.early = len(s.committed)
        # the hypothesis after the words committed now (a cut aligns the committed words and these)
        just = len(s.committed) + len(d.tokens) - len(hyp)  # tokens committed by this step
        d = replace(d, tokens=d.tokens[just:], logprobs=d.logprobs[just:])
        out: list[Frame] = []
        tok = self.m.tokenizer
        unstable = tok.decode(d.tokens)
        out.append(
            PartialText(
                pts=end, utterance=s.utterance, stable=tok.decode(s.committed), unstable=unstable,
                new_stable_words=tuple(newly),
            )
        )
        s.step_seconds.append(time.perf_counter() - t0)
        if len(s.step_seconds) > 2 * STEPS_KEPT:
            del s.step_seconds[:-STEPS_KEPT]
        if (end - s.window_start) > self._max_window:
            out.extend(self._cut(s, feats, end, d))
        return out

    def _unloop(self, s: ASRState, feats: torch.Tensor, real: int, d: Decoded) -> Decoded:
        """A hypothesis that runs past the audio loops back over words it already has ("the
        purpose of this test is the purpose of this test"), and two such steps in a row would
        commit the loop. Where the new words repeat three words of the window, align the
        hypothesis and keep only the words up to the last one with audio of its own."""
        tok = self.m.tokenizer
        tokens = s.committed + d.tokens
        groups = group_words(tok, tokens)
        n_committed = sum(1 for g in groups if g[0] < len(s.committed))  # committed ends on a word
        if not _repeats(tok, tokens, groups, n_committed):
            return d
        words = word_timings(self.m.model, tok, feats, d.prompt, tokens, s.committed_logprobs + d.logprobs,
                             self.m.alignment_heads, self._origin(s), real, cache=d.cache)
        keep = len(words)
        while keep > n_committed and words[keep - 1].end - words[keep - 1].start < SQUEEZED_S:
            keep -= 1
        if keep == len(words):
            return d
        cut = groups[keep][0] - len(s.committed)
        log.debug("hypothesis ran past the audio and looped: kept %r", tok.decode(d.tokens[:cut]))
        return replace(d, tokens=d.tokens[:cut], logprobs=d.logprobs[:cut])

    def _agree(self, s: ASRState, d: Decoded) -> list[str]:
        """Commit the words every recent hypothesis agrees on (LocalAgreement-n)."""
        if len(s.history) < self.config.agreement or not s.language_settled:
            return []
        n0 = len(s.committed)
        tails = [h[n0:] for h in s.history]
        lcp = 0
        while all(len(t) > lcp for t in tails) and len({t[lcp] for t in tails}) == 1:
            lcp += 1
        cur = tails[-1]
        # back off to a word boundary: the token after the agreed part must start a new word in
        # the current hypothesis, otherwise the last agreed word may still grow
        tok = self.m.tokenizer
        cut = 0
        for i in range(1, lcp + 1 - self._confirm):
            if i < len(cur) and tok.token_text(cur[i]).startswith(" "):
                if not self._clauses or tok.token_text(cur[i - 1]).rstrip().endswith(CLAUSE_END):
                    cut = i
        if cut == 0:
            return []
        words = [tok.decode([cur[j] for j in w]).strip() for w in group_words(tok, cur[:cut])]
        s.committed = s.committed + cur[:cut]
        s.committed_logprobs = s.committed_logprobs + d.logprobs[:cut]
        return words

    def _cut(self, s: ASRState, feats: torch.Tensor, end: float, latest: Decoded) -> list[Frame]:
        """A long window: emit the committed words as a final segment and start the window after
        them, so the encoder never sees more than the window bound and cost stays flat."""
        if not s.committed:
            if end <= self._close_at(s):
                return []
            return self._final(s, end, continued=True)  # no agreement for too long: close it all
        tok = self.m.tokenizer
        real = int((end - self._origin(s)) / SECONDS_PER_POSITION)
        # align the whole latest hypothesis, not the committed words alone: DTW must place every
        # token, so the last committed word would otherwise stretch over the audio after it
        n_words = len(group_words(tok, s.committed))
        words = word_timings(self.m.model, tok, feats, latest.prompt, s.committed + latest.tokens,
                             s.committed_logprobs + latest.logprobs, self.m.alignment_heads, self._origin(s), real,
                             cache=latest.cache)
        words = _clamp(words[:n_words], s.window_start)
        cut_at = words[-1].end if words else end
        frame = FinalText(
            pts=cut_at, utterance=s.utterance, text=tok.decode(s.committed).strip(), start=s.window_start,
            words=tuple(words), language=s.language or "", continued=True,
        )
        s.context = (s.context + s.committed)[-200:]
        s.committed, s.committed_logprobs, s.history, s.early = [], [], [], 0
        start = max(s.window_start, cut_at - self.config.cut_overlap_ms / 1000)
        s.window_start, s.lead = start, 0.0
        s.enc_cache = EncoderCache()
        self._trim_to(s, start - 0.05)
        self._maybe_release(s, end)
        return [frame]

    def _final(self, s: ASRState, end: float, continued: bool) -> list[Frame]:
        out: list[Frame] = []
        while end - s.window_start > MAX_ENCODE_S:
            # a window Whisper cannot see at once (only after a long stretch without
            # hypotheses): close it in pieces
            out += self._final(s, s.window_start + self._max_window, continued=True)
        prepared, preparing = s.prepared, s.preparing
        s.prepared, s.preparing, s.ending = None, None, None
        key = self._final_key(s, end)
        if prepared is not None and prepared[0] == key:
            result = prepared[1]
        elif preparing is not None and preparing[0] == key:
            result = self._final_finish(s, preparing[1])
        else:
            result = self._final_result(s, end)
        s.committed, s.committed_logprobs, s.history, s.early = [], [], [], 0
        if result is None:
            return out
        tokens, frame = result
        s.context = (s.context + tokens)[-200:]
        if continued:
            frame = replace(frame, continued=True)
            s.window_start, s.lead = end, 0.0
            s.last_decode_end = end
            s.enc_cache = EncoderCache()
        return out + ([frame] if frame.text else [])

    def _prepare(self, s: ASRState, step: bool = True) -> None:
        """The final for ``s.ending``, unless made already or the audio is not there yet: the
        first call encodes and decodes greedily; where that failed (``Fallback``), each later call
        with ``step`` decodes once more at the next temperature, so VAD is heard between decodes
        (a translation's fallback is up to five more decodes, 3-6 s on a slow CPU, all wasted
        where the voice comes back). ``end`` finishes whatever is left."""
        end = s.ending
        if s.prepared is not None or end is None or end > self._buf_end(s) + 1e-6:
            return
        if end - s.window_start > MAX_ENCODE_S:
            return  # made in pieces: left to ``end``
        if s.preparing is None:
            p = self._final_begin(s, end)  # (first: it may detect the language, part of the key)
            s.preparing = (self._final_key(s, end), p)
        elif step:
            p = s.preparing[1]
            p.fallback.step()
        else:
            return
        if p is None or p.fallback.done:
            s.prepared, s.preparing = (s.preparing[0], self._final_finish(s, p)), None

    def _final_key(self, s: ASRState, end: float) -> tuple:
        """All a final depends on besides the audio: a prepared one stands while this does."""
        return (s.utterance, round(end, 4), s.window_start, s.lead, tuple(s.committed), s.early, s.biaser,
                tuple(s.context[-self.config.context_tokens:]), s.language)

    def _final_result(self, s: ASRState, end: float) -> tuple[list[int], FinalText] | None:
        """The final pass over the window up to ``end``: its tokens and frame (None: too short to
        hold words). Leaves the state as it was (but for a language detected on the way)."""
        return self._final_finish(s, self._final_begin(s, end))

    def _final_begin(self, s: ASRState, end: float) -> _FinalPass | None:
        """A final pass's encoding and greedy decode (None: too short to hold words)."""
        audio = self._window(s, end)
        if len(audio) < self.config.min_utterance_ms / 1000 * INTERNAL_RATE:
            return None
        feats, real = self._encode(s, audio, final=True)
        seconds = len(audio) / INTERNAL_RATE - s.lead
        self._detect(s, feats, seconds, final=True)

        def run(temperature=0.0, generator=None):
            return self._decode(s, feats, seconds, revise=True, temperature=temperature, generator=generator)

        temperatures = FALLBACK_TEMPERATURES if self._fallback else ()
        first = self._beam(s, feats, seconds) if self._final_beams > 1 else run()
        return _FinalPass(end, feats, real, Fallback(first, run, temperatures))

    def _final_finish(self, s: ASRState, p: _FinalPass | None) -> tuple[list[int], FinalText] | None:
        """A final pass's text, fallback decodes still to run included, aligned to the audio."""
        if p is None:
            return None
        d, feats, real, end = p.fallback.result(), p.feats, p.real, p.end
        tokens = s.committed[: d.kept_forced] + d.tokens
        logprobs = s.committed_logprobs[: d.kept_forced] + d.logprobs
        if d.kept_forced < len(s.committed):
            log.debug("final took back %r", self.m.tokenizer.decode(s.committed[d.kept_forced :]))
        words = word_timings(self.m.model, self.m.tokenizer, feats, d.prompt, tokens, logprobs,
                             self.m.alignment_heads, self._origin(s), real, cache=d.cache)
        words = _clamp(words, s.window_start)
        new_from = len(group_words(self.m.tokenizer, s.committed[: d.kept_forced]))
        while echo := _echoed_tail(words, new_from):
            log.debug("final pass repeated its last %d words without audio: dropped", echo)
            keep = group_words(self.m.tokenizer, tokens)[len(words) - echo][0]
            tokens, logprobs, words = tokens[:keep], logprobs[:keep], words[: len(words) - echo]
        text = self.m.tokenizer.decode(tokens).strip()
        frame = FinalText(
            pts=end, utterance=s.utterance, text=text, start=s.window_start, words=tuple(words),
            language=s.language or "", continued=False,
        )
        return tokens, frame


@dataclass
class _FinalPass:
    """A final pass under way: the window's encoding and its decodes so far."""

    end: float
    feats: torch.Tensor
    real: int
    fallback: Fallback


def _norm_word(word: str) -> str:
    """A word compared without case and punctuation."""
    return "".join(ch for ch in word.lower() if ch.isalnum())


def _repeats(tok, tokens: list[int], groups: list[list[int]], first: int, n: int = 3) -> bool:
    """Does a word n-gram starting at or after word ``first`` occur earlier in the words?"""
    norm = [_norm_word(tok.decode([tokens[i] for i in g])) for g in groups]
    seen: set[tuple[str, ...]] = set()
    for j in range(len(norm) - n + 1):
        gram = tuple(norm[j : j + n])
        if j >= first and gram in seen:
            return True
        seen.add(gram)
    return False


def _echoed_tail(words: list[Word], new_from: int | None = None) -> int:
    """How many words at the end of a final are a loop, not speech: a run of words repeating the
    words just before it ("... by a similar process by a similar process") that the alignment
    squeezes into no audio at the end of the window, or, where the final pass itself wrote the
    repeat (its words from ``new_from`` on), a repeat of three words or more that has less than
    half the original's audio (the last word soaks up the window's trailing frames, so a copy is
    not always squeezed to nothing). Whisper does this when the forced prefix already holds the
    last words, most with a hotword prompt. 0 when there is none."""
    squeezed = 0
    for w in reversed(words):
        if w.end - w.start >= SQUEEZED_S:
            break
        squeezed += 1
    norm = [_norm_word(w.word) for w in words]
    n = len(words)
    for k in range(min(squeezed, n // 2), 0, -1):
        if norm[n - k :] == norm[n - 2 * k : n - k]:
            return k
    if new_from is not None:
        for k in range(min(n - new_from, n // 2), 2, -1):
            if norm[n - k :] == norm[n - 2 * k : n - k]:
                copy = words[-1].end - words[n - k].start
                original = words[n - k - 1].end - words[n - 2 * k].start
                if copy < original / 2:
                    return k
    return 0


def _clamp(words: list[Word], start: float) -> list[Word]:
    """Word times no earlier than the window's real audio (DTW may place a first word in the lead)."""
    return [w if w.start >= start else replace(w, start=start, end=max(w.end, start)) for w in words]


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc only; elsewhere nothing).

    Whisper's tensors change size with every step, so glibc's mmap threshold climbs (it follows
    the largest block freed, up to 32 MB) and serves them from the heap, whose freed pages it
    keeps: over a 10-minute monologue the resident size grew from 0.9 to 1.2 GB while the live
    objects stayed flat (``malloc_trim`` brought it back to 0.6 GB; a fixed 128 kB mmap threshold
    did too, but page faults made every step 60 % slower). A trim takes 5-45 ms."""
    if _TRIM is not None:
        _TRIM(0)


@torch.inference_mode()
def detect_language(m: WhisperBundle, feats: torch.Tensor) -> str:
    """The language token Whisper finds most likely right after <|startoftranscript|>."""
    tok = m.tokenizer
    if not m.multilingual:
        return "en"
    cache = m.model.decoder.cross_cache(feats if feats.dim() == 3 else feats.unsqueeze(0))
    logits = m.model.decoder(torch.tensor([[tok.sot]]), cache)[0, -1]
    codes = list(tok.languages)
    ids = torch.tensor([tok.languages[c] for c in codes])
    return codes[int(torch.argmax(logits[ids]))]
