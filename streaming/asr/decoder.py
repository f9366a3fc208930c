"""Whisper decoding with a forced prefix, KV caches and pluggable logit filters.

A decode builds ``[<|startofprev|> context] <|startoftranscript|> ... forced`` and continues it
greedily. The prompt and forced prefix are prefilled in one forward pass; each new token then costs
one step on the cached keys and values. Cross-attention keys and values are computed once per
encoder pass (``Decoder.cross_cache``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.whisper import DecoderCache, Whisper
from ..models.whisper_text import DecodeRules, WhisperTokenizer

MAX_PROMPT = 223  # Whisper's previous-context budget: half of its 448-token window, minus one
#: a draft token's logits decide the next token only where its best leads the second by this
#: many nats (more than prefill and step ever differ); a closer call gets a step of its own
DRAFT_MARGIN = 1.0
#: Whisper's fallback for a decode that failed: sample again at these temperatures in turn
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
#: a decode fails when the loop guard cut it, or when its average log-probability per token is
#: below this: the model is guessing. (Whisper also rejects text that gzip compresses more than 2.4x;
#: an IVR menu is that repetitive, and the fallback then lost it->en 27.3 -> 24.8 BLEU)
LOGPROB_LIMIT = -1.0
#: Whisper's limit on a decode's ``compression_ratio``: above it the text repeats itself
COMPRESSION_LIMIT = 2.4
#: where no decode passed, a whole one is kept over one the loop guard cut unless the cut one is
#: more likely than this (log-probability per token; see ``best_of``)
CUT_MARGIN = 0.5


class LogitFilter(Protocol):
    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        """Modify ``logits`` (one row, the next token) in place; ``tokens`` are the text so far."""


class SuppressTokens:
    def __init__(self, ids: tuple[int, ...], first_ids: tuple[int, ...], specials_from: int) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.first_ids = torch.tensor(first_ids, dtype=torch.long)
        self.specials_from = specials_from

    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        if len(self.ids):
            logits[self.ids] = -torch.inf
        if not tokens and len(self.first_ids):
            logits[self.first_ids] = -torch.inf
        # no timestamp or other special tokens in text: they start after end-of-text
        logits[self.specials_from :] = -torch.inf


class MinLength:
    """No end-of-text before the text holds ``n`` tokens. Without timestamps Whisper sometimes
    ends a long window after its first sentence; speech that VAD still hears is not over."""

    def __init__(self, eot: int, n: int) -> None:
        self.eot, self.n = eot, n

    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        if len(tokens) < self.n:
            logits[self.eot] = -torch.inf


def length_floor(eot: int, tokens_per_second: float, seconds: float) -> list[MinLength]:
    """The ``MinLength`` filter for ``seconds`` of speech: no end of text before it holds
    ``tokens_per_second`` of the speech beyond its first 1.5 s (none for shorter speech)."""
    floor = int(tokens_per_second * (seconds - 1.5))
    return [MinLength(eot, floor)] if floor > 0 else []


@dataclass
class Decoded:
    #: tokens generated after the forced prefix
    tokens: list[int]
    logprobs: list[float]
    #: tokens the prompt was made of (for alignment later)
    prompt: list[int] = field(default_factory=list)
    hit_limit: bool = False
    #: raw logits of every step (before filters), kept only when asked: for conversion checks
    logits: list[torch.Tensor] = field(default_factory=list)
    #: the generated tokens as text
    text: str = ""
    #: how many tokens of the forced prefix were kept (fewer than it had: the rest was revised)
    kept_forced: int = 0
    #: the decode's keys and values (its prompt's first): word alignment reuses them
    cache: DecoderCache | None = field(default=None, repr=False, compare=False)
    #: draft tokens the decode accepted without a decoder step of their own
    drafted: int = 0


def build_prompt(tok: WhisperTokenizer, context: list[int], sot_seq: list[int]) -> list[int]:
    if not context:
        return list(sot_seq)
    return [tok.sot_prev, *context[-MAX_PROMPT:], *sot_seq]


@torch.inference_mode()
def decode(
    model: Whisper,
    tok: WhisperTokenizer,
    features: torch.Tensor,
    prompt: list[int],
    forced: list[int],
    filters: list[LogitFilter],
    max_tokens: int,
    keep_logits: bool = False,
    revisable: list[bool] | None = None,
    revise_margin: float = 2.0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    draft: list[int] | None = None,
) -> Decoded:
    """Greedy continuation of ``prompt + forced`` over ``features`` [1, frames, d].

    ``revisable`` (one flag per forced token) lets the decode take back a forced token that the
    model, seeing these features, now finds far less likely than its own first choice (by more
    than ``revise_margin`` nats, after the plain filters): the decode continues from the first
    such token instead of after the prefix, with ``max_tokens`` grown by the tokens given back.
    ``Decoded.kept_forced`` says how many forced tokens stand.

    ``temperature`` > 0 samples each token instead of taking the best (Whisper's fallback when a
    greedy decode fails), from ``generator`` so that a run can be repeated.

    ``draft``: tokens the continuation probably starts with (the previous step's hypothesis after
    the committed words). They are prefilled with the prefix, and each one the decode chooses
    anyway costs no decoder step of its own; from the first it does not choose, decoding goes on
    as without a draft. The text is the same as without one (greedy; ties aside), only sooner.

    A filter with a ``session(start)`` method (``HotwordBoost``) is replaced by the session for
    this decode, which may ask, after a token is chosen, to roll the text back to an earlier
    position and decide again (a boost withdrawn); the decoder keeps the raw logits of the last
    few positions for that and truncates its self-attention cache."""
    if features.dim() == 2:
        features = features.unsqueeze(0)
    cache: DecoderCache = model.decoder.cross_cache(features)
    draft = list(draft or [])[:max_tokens] if temperature <= 0 else []
    first = len(prompt) - 1  # the row that predicts the first forced token
    n = 0
    if revisable is not None and forced:
        # logits before each revisable token (the flags end on a run of False)
        n = max((j + 1 for j, r in enumerate(revisable) if r), default=0)
    # then the logits after the prefix and after each draft token
    pick = [*range(first, first + n), *range(first + len(forced), first + len(forced) + len(draft) + 1)]
    rows = model.decoder(torch.tensor([prompt + forced + draft]), cache, pick=pick)[0]
    ahead = list(rows[n:])  # ahead[j]: logits after forced + draft[:j]
    if n:
        plain = [f for f in filters if not hasattr(f, "session")]
        at = _first_revision(rows[:n], forced, revisable, plain, revise_margin)
        if at < len(forced):
            cache.truncate(len(prompt) + at)
            max_tokens += len(forced) - at
            forced = forced[:at]
            ahead, draft = [rows[at]], []
    logits = ahead[0]
    on_draft = 0 if draft else None  # draft tokens accepted so far; None: off the draft
    drafted = 0
    filters = [f.session(len(forced)) if hasattr(f, "session") else f for f in filters]
    sessions = [f for f in filters if hasattr(f, "after")]
    keep = max([getattr(f.b, "max_len", 0) for f in sessions] + [0]) + 2
    raw: dict[int, torch.Tensor] = {}  # position -> logits that decided it (for roll-backs)
    text = list(forced)
    out: list[int] = []
    logprobs: list[float] = []
    kept: list[torch.Tensor] = []
    steps = 0
    while len(out) < max_tokens and steps < 2 * max_tokens + 8:
        steps += 1
        pos = len(text)
        if sessions:
            raw[pos] = logits
            raw.pop(pos - keep, None)
        row = logits.float().clone()
        if keep_logits:
            kept.append(row.clone())
        for f in filters:
            f.apply(row, text)
        lp = torch.log_softmax(row, dim=-1)
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(row / temperature, dim=-1), 1, generator=generator))
        else:
            nxt = int(torch.argmax(lp))
            if on_draft:
                # these logits come from the prefill, whose sums run in another order than a
                # step's (int8-tok: up to 0.25 nats apart): a near tie is decided by a step
                top = torch.topk(lp, 2).values
                if float(top[0] - top[1]) < DRAFT_MARGIN:
                    cache.truncate(len(prompt) + len(text) - 1)
                    logits = model.decoder(torch.tensor([text[-1:]]), cache)[0, -1]
                    on_draft = None
                    if keep_logits:
                        kept.pop()
                    continue
        back = None
        for sess in sessions:
            b = sess.after(pos, nxt, text)
            if b is not None:
                back = b if back is None else min(back, b)
        if back is not None and back in raw and back >= len(forced):
            # withdraw: forget the tokens from ``back`` on and decide that position again
            drop = pos - back
            text, out, logprobs = text[:back], out[: len(out) - drop], logprobs[: len(logprobs) - drop]
            cache.truncate(len(prompt) + back)
            on_draft = None
            logits = raw[back]
            for p in [p for p in raw if p > back]:
                del raw[p]
            if keep_logits:
                kept = kept[: len(kept) - drop - 1]
            continue
        if nxt == tok.eot:
            return Decoded(out, logprobs, prompt, logits=kept, text=tok.decode(out).strip(), kept_forced=len(forced),
                           cache=cache, drafted=drafted)
        out.append(nxt)
        text.append(nxt)
        logprobs.append(float(lp[nxt]))
        repeat = _looping(text)
        if repeat:
            # keep one copy of the repeated text, not the loop
            drop = min(repeat, len(out))
            out, logprobs = out[: len(out) - drop], logprobs[: len(logprobs) - drop]
            return Decoded(out, logprobs, prompt, hit_limit=True, logits=kept, text=tok.decode(out).strip(),
                           kept_forced=len(forced), cache=cache, drafted=drafted)
        if on_draft is not None:
            if on_draft < len(draft) and nxt == draft[on_draft]:
                # the draft's token: its keys and values are cached and its logits computed
                on_draft += 1
                drafted += 1
                logits = ahead[on_draft]
                continue
            cache.truncate(len(prompt) + len(text) - 1)  # off the draft: forget the rest of it
            on_draft = None
        logits = model.decoder(torch.tensor([[nxt]]), cache)[0, -1]
    return Decoded(out, logprobs, prompt, hit_limit=True, logits=kept, text=tok.decode(out).strip(),
                   kept_forced=len(forced), cache=cache, drafted=drafted)


@dataclass
class _Beam:
    tokens: list[int]
    logprobs: list[float]
    #: sum of the tokens' log-probabilities (with the end of text once finished)
    score: float
    looped: bool = False


def _per_token(b: _Beam) -> float:
    """What beam search ranks by: log-probability per token (Whisper's default length penalty)."""
    return b.score / max(1, len(b.tokens))


@torch.inference_mode()
def beam_decode(
    model: Whisper,
    tok: WhisperTokenizer,
    features: torch.Tensor,
    prompt: list[int],
    filters: list[LogitFilter],
    max_tokens: int,
    beam_size: int = 5,
    patience: float = 1.0,
    forced: list[int] | None = None,
) -> Decoded:
    """Beam search over ``prompt`` as Whisper's own decoder runs it at temperature 0: each step
    extends every live beam by its ``beam_size + 1`` best tokens, keeps the ``beam_size`` best
    unfinished sequences by summed log-probability, and sets aside those that end; it stops once
    ``beam_size * patience`` have ended, and returns the one with the best log-probability per
    token. (An end of text ranks among the first steps' candidates even where it is unlikely: a
    long window wants a ``MinLength`` filter, or five such ends stop the search on its first word.
    Going on instead while a live beam reads better per token lost es->en 23.0 -> 20.6 BLEU: the
    beams past the real end copy the menus' text.) The beams run as one batch
    over the prompt's prefill, and share the one encoder pass's cross-attention keys and values.

    A beam that the loop guard (``_looping``) catches is dropped from the search; where nothing
    but loops ended, the best loop stands, cut to one copy and marked ``hit_limit``, so that the
    fallback samples again. Filters with a ``session`` (hotword boosting) are applied plainly:
    the search itself weighs a boosted hotword against the model's own reading.

    ``forced``: text that stands (a streaming final's committed words), prefilled with the
    prompt; the beams continue it, and the filters see it as the text so far. The result's
    ``cache`` holds the prompt's keys and values, for the word alignment."""
    if features.dim() == 2:
        features = features.unsqueeze(0)
    forced = list(forced or [])
    cache: DecoderCache = model.decoder.cross_cache(features)
    rows = model.decoder(torch.tensor([prompt + forced]), cache, last=1)[:, -1]  # [beams, vocab]
    beams = [_Beam([], [], 0.0)]
    done: list[_Beam] = []
    loops: list[_Beam] = []
    want = max(1, round(beam_size * patience))
    for _ in range(max_tokens):
        candidates: list[tuple[float, int, int, float]] = []  # (score, beam, token, logprob)
        for b, beam in enumerate(beams):
            row = rows[b].float().clone()
            for f in filters:
                f.apply(row, forced + beam.tokens)
            lp = torch.log_softmax(row, dim=-1)
            top = torch.topk(lp, beam_size + 1)
            for v, t in zip(top.values.tolist(), top.indices.tolist()):
                if v > -torch.inf:
                    candidates.append((beam.score + v, b, t, v))
        candidates.sort(key=lambda c: -c[0])
        nxt: list[_Beam] = []
        parents: list[int] = []
        for score, b, t, v in candidates:
            beam = beams[b]
            if t == tok.eot:
                done.append(_Beam(beam.tokens, beam.logprobs, score))
                continue
            seq = [*beam.tokens, t]
            repeat = _looping(forced + seq)
            if repeat:
                keep = max(0, len(seq) - repeat)
                loops.append(_Beam(seq[:keep], [*beam.logprobs, v][:keep], score, looped=True))
                continue
            nxt.append(_Beam(seq, [*beam.logprobs, v], score))
            parents.append(b)
            if len(nxt) == beam_size:
                break
        if len(done) >= want or not nxt:
            break
        cache.select(parents)
        beams = nxt
        rows = model.decoder(torch.tensor([[b.tokens[-1]] for b in beams]), cache)[:, -1]
    else:
        # out of tokens: the live beams stand as they are, cut by the length limit
        done += [_Beam(b.tokens, b.logprobs, b.score, looped=True) for b in beams]
    # every beam shares the prompt: its keys and values, one row of them, serve the alignment
    cache.truncate(len(prompt))
    cache.select([0])
    pool = [b for b in done if not b.looped] or done or loops
    if not pool:
        return Decoded([], [], prompt, hit_limit=True, kept_forced=len(forced), cache=cache)
    best = max(pool, key=_per_token)
    return Decoded(best.tokens, best.logprobs, prompt, hit_limit=best.looped, text=tok.decode(best.tokens).strip(),
                   kept_forced=len(forced), cache=cache)


def avg_logprob(d: Decoded) -> float:
    return sum(d.logprobs) / (len(d.logprobs) + 1)  # + 1: the end of text, as Whisper counts


def compression_ratio(text: str) -> float:
    """Whisper's measure of repetitive text: its UTF-8 length over its zlib-compressed length."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def failed(d: Decoded) -> bool:
    """Whisper's test of a decode: cut by the loop guard, or too unsure on average."""
    return d.hit_limit or avg_logprob(d) < LOGPROB_LIMIT


class Fallback:
    """Whisper's temperature fallback around a greedy decode ``first``, one decode at a time: while
    the last decode failed, ``step()`` decodes again with ``sample(temperature, generator)`` at the
    next of the rising temperatures; ``result()`` is the first that passed or, where none did,
    ``best_of`` them. The generator is seeded, so the same input gives the same text. The streaming
    recogniser steps it in the silence while VAD decides whether an utterance ended, so a voice
    that comes back stops it between decodes."""

    def __init__(self, first: Decoded, sample: Callable[[float, torch.Generator], Decoded],
                 temperatures: Sequence[float] = FALLBACK_TEMPERATURES) -> None:
        self.tried = [first]
        self._sample = sample
        self._temperatures = list(temperatures)
        self._generator = torch.Generator().manual_seed(0)

    @property
    def done(self) -> bool:
        return not failed(self.tried[-1]) or not self._temperatures

    def step(self) -> None:
        if not self.done:
            self.tried.append(self._sample(self._temperatures.pop(0), self._generator))

    def result(self) -> Decoded:
        while not self.done:
            self.step()
        last = self.tried[-1]
        return last if not failed(last) else best_of(self.tried)


def with_fallback(first: Decoded, sample: Callable[[float, torch.Generator], Decoded]) -> Decoded:
    """``Fallback`` run to its end: ``first`` where it passed, else sampled again until one passes."""
    return Fallback(first, sample).result()


def best_of(tried: list[Decoded]) -> Decoded:
    """The decode kept when none passed: the most likely of those the loop guard did not cut, as
    faster-whisper keeps the most likely below its compression limit, unless one that was cut is
    more likely by more than ``CUT_MARGIN`` per token. A cut text is what is left before its loop:
    a fraction of the window where the model lost its way (fr->en, 13 s of "demo-abouttotry" kept
    "I will now try to enter a connection with a device", average log-probability -1.02, over a
    whole sampled translation, -1.04), the whole text where the loop came after the speech ended
    (es->en "conf-usermenu": five decodes read its last clause and looped, -0.36 to -0.76, and the
    one at temperature 1.0 that did not loop, -1.93, repeated the clause four times in fragments of
    words: "Number 7, or 9, for youVolumen Studio. Or number 8, for withinplay. ...")."""
    best = max(tried, key=avg_logprob)
    whole = max((d for d in tried if not d.hit_limit), key=avg_logprob, default=None)
    return best if whole is None or avg_logprob(best) - avg_logprob(whole) > CUT_MARGIN else whole


def _first_revision(rows: torch.Tensor, forced: list[int], revisable: list[bool], filters: list[LogitFilter],
                    margin: float) -> int:
    """The first forced position whose token is more than ``margin`` nats below the model's best
    choice there (``rows[j]`` are the logits that predict ``forced[j]``, for the first positions);
    ``len(forced)``: none."""
    for j in range(len(rows)):
        if not revisable[j]:
            continue
        row = rows[j].float().clone()
        for f in filters:
            f.apply(row, forced[:j])
        lp = torch.log_softmax(row, dim=-1)
        if float(lp.max() - lp[forced[j]]) > margin:
            return j
    return len(forced)


def _looping(tokens: list[int], max_n: int = 8, times: int = 3, restart: int = 6) -> int:
    """Whisper's hallucination loops, common on audio cut mid-word: the same short n-gram
    (n <= 8) three times in a row, or the model starting over: the last ``restart`` tokens or more
    copy the text's beginning or the run just before them ("whatever they were whatever they
    were"), or copy any earlier run of at least ``2 * restart`` tokens. (A shorter run from
    further back may simply be said again: an IVR menu repeats "all non-administrator users".)
    Returns how many trailing tokens are the repeat (0: no loop)."""
    for n in range(1, max_n + 1):
        if len(tokens) < n * times:
            break
        tail = tokens[-n:]
        if all(tokens[len(tokens) - (i + 1) * n : len(tokens) - i * n] == tail for i in range(1, times)):
            return n * (times - 1)
    if len(tokens) > restart:
        tail = tokens[-restart:]
        for i in range(len(tokens) - restart):
            if tokens[i : i + restart] == tail:
                # the repeat may have begun before its last ``restart`` tokens: walk back
                k, j = len(tokens) - restart, i
                while k > i + restart and j > 0 and tokens[k - 1] == tokens[j - 1]:
                    k, j = k - 1, j - 1
                if j == 0 or k == i + restart or len(tokens) - k >= 2 * restart:
                    return len(tokens) - k
    return 0


def rules_filter(tok: WhisperTokenizer, rules: DecodeRules) -> SuppressTokens:
    return SuppressTokens(rules.suppress, rules.suppress_begin, tok.eot + 1)


def greedy(model: Whisper, tok: WhisperTokenizer, rules: DecodeRules, features: torch.Tensor, prompt: list[int],
           max_tokens: int = 224, keep_logits: bool = False) -> Decoded:
    """Plain greedy decoding of a whole window with the checkpoint's suppression rules only."""
    return decode(model, tok, features, prompt, [], [rules_filter(tok, rules)], max_tokens, keep_logits)
