"""The coordinator's dialogue model: the whole conversation in one token stream and one KV cache.

The dialogue is serialized in the model's own chat template (system prompt and hotwords, then user
and assistant turns) and ``self.ids`` is exactly what the KV cache holds, at every moment. On top
of that one stream:

* ``user_words(text)`` prefills the stable words of the current user turn while the user is still
  speaking: only the tokens that changed are computed (the cache is cropped back to the longest
  common prefix when re-tokenising moved the boundary), so at the end of the turn only a few
  tokens remain;
* ``eot_probability()`` reads the semantic end-of-turn signal, the probability that the next token
  is the template's end-of-turn token, from the logits kept after the last prefilled token;
* ``respond()`` closes the user turn and decodes the reply token by token from the same cache, with
  cancellation between tokens, a runaway cap and a fallback for an empty reply; ``mark()`` and
  ``rollback_to()`` drop a speculative reply when the user turns out to go on speaking;
* ``truncate_agent_turn(heard)`` cuts the agent's turn to the words the user actually heard;
* the context is bounded: old turns are dropped (optionally summarised) into a replacement cache
  that is built on another thread and swapped in between calls, so the conversation never waits
  for the rebuild.

Thread confinement: one thread owns a ``DialogueLLM`` and makes every call on it. The only work that
runs elsewhere is ``prepare_compaction(plan)``, which touches nothing but the model's (read-only)
weights and its own new cache. No asyncio here: the coordinator runs this in a worker thread.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

import torch
from pydantic import Field

from streaming.errors import DuplexError

from .llm import ChatLLM

log = logging.getLogger(__name__)

# characters a complete sentence ends with: the calibrated end-of-turn score counts them as an ending
_FINAL_PUNCT = frozenset(".?!…")
_PREFILL_CHUNK = 256  # long prefills run in chunks to bound activation memory
_KEEP_LOGITS = 4  # next-token logits kept for the last few positions (sentence-end read before the punctuation)
_PUNCT_CACHE: dict[int, tuple[object, torch.Tensor]] = {}  # id(tokenizer) -> (tokenizer, its punctuation ids)


@dataclass(frozen=True)
class DialogueConfig:
    #: the agent's standing instructions, the first thing in the context
    system_prompt: str = "You are a helpful voice assistant. Keep your answers short."
    #: hard bound on the dialogue's tokens (also capped at the model's own context length)
    max_context: Annotated[int, Field(ge=256, le=131072)] = 1024
    #: background compaction starts when the dialogue passes this fraction of max_context
    compact_at: Annotated[float, Field(gt=0.2, lt=1.0)] = 0.75
    #: compaction keeps the most recent turns that fit in this fraction of max_context
    keep_fraction: Annotated[float, Field(gt=0.05, lt=0.9)] = 0.4
    #: compaction keeps at most this many recent turns (a user turn and a reply are two)
    keep_turns: Annotated[int, Field(ge=1, le=1000)] = 8
    #: a compaction also writes a one-line summary of the dropped turns, made by the model itself
    summarize: bool = False
    #: tokens of one user turn kept in the context; a longer monologue keeps its most recent part
    max_user_tokens: Annotated[int, Field(ge=16, le=65536)] = 256
    #: cap on the tokens of one reply (a runaway reply is cut here)
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    #: 0 decodes greedily; above 0, samples from the top_k tokens at this temperature
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    #: sampling considers only this many most likely tokens
    top_k: Annotated[int, Field(ge=1, le=1000)] = 40
    #: seed of the sampler (replies are reproducible)
    seed: int = 0
    #: what the agent says when the model produces an empty reply
    fallback_reply: str = "Sorry, could you say that again?"
    #: appended to an agent turn the user interrupted, so the next reply knows it was cut off
    interrupted_marker: str = "[interrupted]"
    #: build and swap in compactions on a background thread by itself (False: the owner calls
    #: plan_compaction / prepare_compaction / swap_in)
    auto_compact: bool = True


# ----------------------------------------------------------------------------- the chat template


@dataclass(frozen=True)
class ChatFormat:
    """The pieces of text the chat template puts around each message, read from the template by
    rendering placeholder messages. A template that cannot be cut into such pieces (one that
    rewrites earlier turns) cannot be served from one growing cache, and is refused."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        S, U, A, U2 = "\u27e6S\u27e7", "\u27e6U\u27e7", "\u27e6A\u27e7", "\u27e6V\u27e7"
        sys_m, usr, ast, usr2 = ({"role": "system", "content": S}, {"role": "user", "content": U},
                                 {"role": "assistant", "content": A}, {"role": "user", "content": U2})

        def render(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        try:
            r1, r2 = render([sys_m], False), render([sys_m, usr], False)
            r3, r4 = render([sys_m, usr], True), render([sys_m, usr, ast], False)
            r5 = render([sys_m, usr, ast, usr2], True)
            sp, ss = r1.split(S)
            up, us = r2[len(r1):].split(U)
            ap = r3[len(r2):]
            a_end = r4[len(r3):]
            if not (r2.startswith(r1) and r3.startswith(r2) and r4.startswith(r3) and a_end.startswith(A)):
                raise ValueError("earlier turns change when a turn is added")
            fmt = cls(sp, ss, up, us, ap, a_end[len(A):])
            if r5 != r4 + up + U2 + us + ap:
                raise ValueError("a second round renders differently from the first")
        except ValueError as exc:  # also: a placeholder missing or repeated (split did not give two parts)
            raise DuplexError(f"the LLM's chat template cannot be served from one growing KV cache: {exc}") from None
        return fmt


@dataclass(frozen=True)
class _Turn:
    role: str  # "user" or "assistant"
    start: int  # index in ids of the turn's first token (its template prefix)
    body: int  # index of the first content token
    end: int | None = None  # index just past the content (before the suffix); None while the turn is open
    skip_chars: int = 0  # user turns: characters of the text dropped from the front (a long monologue)

    def shifted(self, by: int) -> _Turn:
        return dataclasses.replace(self, start=self.start + by, body=self.body + by,
                                   end=None if self.end is None else self.end + by)


@dataclass(frozen=True)
class Mark:
    """A snapshot of the dialogue, to come back to with ``rollback_to``."""

    generation: int
    ids: tuple[int, ...]
    turns: tuple[_Turn, ...]
    pending: tuple[int, ...]
    logits: dict[int, torch.Tensor]


@dataclass(frozen=True)
class CompactionPlan:
    """What a compaction keeps: made by the owner thread, so building it touches no live state."""

    generation: int
    source_ids: tuple[int, ...]  # the dialogue prefix this plan replaces (ids[:len(source_ids)])
    cut: int  # first token kept from the source (the start of the oldest kept turn)
    system_text: str
    dropped_text: str  # the dropped turns as a transcript, for the optional summary
    summary: str  # the summary now in the system segment (kept when summarize is off)
    summarize: bool


@dataclass
class PreparedCompaction:
    plan: CompactionPlan
    ids: list[int]  # the new prefix: system segment (with summary) + kept turns
    cache: object
    logits: torch.Tensor
    summary: str
    build_seconds: float


class EotScores(NamedTuple):
    #: P(end-of-turn token | the user's text): the raw semantic endpointing signal
    p_eot: float
    #: P(the sentence ends here): the end-of-turn token or sentence-final punctuation as the next
    #: token, read before any punctuation the text ends with; separates complete sentences from
    #: fragments whether or not the recogniser punctuated them
    p_sentence_end: float


@dataclass
class ReplyStats:
    #: tokens prefilled by the last user_words call before the reply, and the closing of the turn
    words_tokens: int = 0
    words_ms: float = 0.0
    close_tokens: int = 0
    close_ms: float = 0.0
    #: from the respond() call to the first text piece
    ttft_ms: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    #: "eos", "cancelled", "cap", "loop", "empty" (the fallback was said) or "closed"
    stop_reason: str = ""

    @property
    def eot_tokens(self) -> int:
        """Tokens prefilled at the end of the user's turn: the last words and the turn closing."""
        return self.words_tokens + self.close_tokens

    @property
    def eot_ms(self) -> float:
        return self.words_ms + self.close_ms

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class DialogueStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    #: what the latest user_words call prefilled
    last_words_tokens: int = 0
    last_words_ms: float = 0.0
    compactions: int = 0  # swapped in
    stale_compactions: int = 0  # built but the dialogue had changed underneath: dropped
    foreground_compactions: int = 0  # the context was full before a background one was ready
    last_swap_ms: float = 0.0  # swap_in, including the replay of tokens added since the plan
    last_swap_replay_tokens: int = 0
    replies: deque[ReplyStats] = field(default_factory=lambda: deque(maxlen=256))  # the most recent replies


# ---------------------------------------------------------------------------------- the model


class DialogueLLM:
    def __init__(self, chat_llm: ChatLLM, config: DialogueConfig | None = None, *,
                 hotwords: Sequence[str] = (), **overrides) -> None:
        """``hotwords`` (names, jargon the user may say) go into the system prompt on one line;
        ``overrides`` replace fields of ``config`` (``system_prompt=..., max_context=...``)."""
        cfg = config or DialogueConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        self.hotwords = tuple(hotwords)
        self.llm = chat_llm
        self.model = chat_llm.model
        self.tokenizer = chat_llm.tokenizer
        self.fmt = ChatFormat.of(self.tokenizer)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else ("num_logits_to_keep" if "num_logits_to_keep" in params else None)
        self.max_context = min(cfg.max_context, chat_llm.context_length)
        enc = self._enc
        self._user_prefix, self._user_suffix = enc(self.fmt.user_prefix), enc(self.fmt.user_suffix)
        self._asst_prefix, self._asst_suffix = enc(self.fmt.assistant_prefix), enc(self.fmt.assistant_suffix)
        self.eot_id = self._user_suffix[0] if self._user_suffix else self.tokenizer.eos_token_id
        self._stop_ids = chat_llm.stop_ids() | {self.eot_id} | ({self._asst_suffix[0]} if self._asst_suffix else set())
        self._final_ids = self._punctuation_ids()
        self._final_set = frozenset(self._final_ids.tolist())
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self.stats = DialogueStats()
        self.reset()

    # ------------------------------------------------------------------------------ lifecycle

    def reset(self, system_prompt: str | None = None, hotwords: Sequence[str] | None = None) -> None:
        """Start a new conversation (optionally with a new system prompt or hotwords)."""
        self._close_active()
        if system_prompt is not None:
            self.config = dataclasses.replace(self.config, system_prompt=system_prompt)
        if hotwords is not None:
            self.hotwords = tuple(hotwords)
        self._generation = getattr(self, "_generation", -1) + 1  # outstanding marks and plans go stale
        self._shifts: dict[int, tuple[int, tuple[int, ...]]] = {}  # generation -> (cut, new system ids)
        self._future = None
        self.summary = ""
        self.cache = self._new_cache()
        self.ids: list[int] = []
        self._turns: list[_Turn] = []
        self._pending: list[int] = []  # reply tokens already yielded, not yet in the cache
        self._hist: dict[int, torch.Tensor] = {}  # position -> next-token logits after ids[position], the last few
        self._active: Reply | None = None
        self._forward(self._system_ids(self.system_text, ""))

    def close(self) -> None:
        """Stop the background compaction thread (the object stays usable without auto compaction)."""
        self._close_active()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._future = None

    @property
    def system_text(self) -> str:
        text = self.config.system_prompt.strip()
        words = [w.strip() for w in self.hotwords if w.strip()]
        if words:
            text += "\nNames and terms the user may say: " + ", ".join(words) + "."
        return text

    @property
    def text(self) -> str:
        """The dialogue as the model sees it (for logs and tests)."""
        return self.tokenizer.decode(self.ids + self._pending)

    @property
    def open_role(self) -> str | None:
        t = self._open_turn()
        return t.role if t else None

    # ------------------------------------------------------------------------------ user side

    def user_words(self, text_so_far: str) -> int:
        """The stable text of the current user turn so far (the whole turn each time, not a delta).
        Opens a user turn if none is open. Prefills only what changed; returns the tokens prefilled."""
        self._settle()
        text = " ".join(text_so_far.split())
        t0 = time.perf_counter()
        turn = self._open_turn()
        if turn is None or turn.role != "user":
            body, skip = self._user_body(text, 0)
            self._make_room(self._closing_len() + len(self._user_prefix) + len(body))
            closing = self._close_open_turn()
            start = len(self.ids) + len(closing)
            self._turns.append(_Turn("user", start, start + len(self._user_prefix), skip_chars=skip))
            new = closing + self._user_prefix + body
            self._forward(new)
            n = len(new)
        else:
            body, skip = self._user_body(text, turn.skip_chars)
            self._make_room(max(0, turn.body + len(body) - len(self.ids)))
            turn = dataclasses.replace(self._turns[-1], skip_chars=skip)  # (a compaction moves the turn)
            self._turns[-1] = turn
            n = self._replace_tail(turn.body, body)
        self.stats.last_words_tokens, self.stats.last_words_ms = n, (time.perf_counter() - t0) * 1e3
        self._maybe_compact(user_open=True)
        return n

    def eot_probability(self, text: str | None = None) -> float:
        """Probability that the user's turn ends here: the template's end-of-turn token as the next
        token after the user's text, read from the cached state (``text`` first updates it)."""
        return self.eot_scores(text).p_eot

    def eot_scores(self, text: str | None = None) -> EotScores:
        """Both end-of-turn signals from the cached state (``text`` first updates the user turn)."""
        if text is not None:
            self.user_words(text)
        else:
            self._settle()
        turn = self._open_turn()
        if turn is None or turn.role != "user":
            raise ValueError("no user turn is open: call user_words first")
        last = len(self.ids) - 1
        p = torch.softmax(self._hist[last].float(), dim=-1)
        p_eot = float(p[self.eot_id])
        # the sentence-end reading: where the text ends in punctuation, read the distribution just
        # before it (does the model itself put an end there?), so that an ASR full stop after a
        # fragment ("I'd like to book a.") does not count as an ending
        pos = last
        while pos > turn.body and self._is_final_punct(self.ids[pos]):
            pos -= 1
        if pos != last and pos in self._hist:
            q = torch.softmax(self._hist[pos].float(), dim=-1)
        else:
            q = p
        p_end = float(q[self._final_ids].sum() + q[self.eot_id])
        return EotScores(p_eot, min(1.0, p_end))

    def end_user_turn(self) -> None:
        """Close the open user turn without a reply (the agent chose not to answer)."""
        self._settle()
        t = self._open_turn()
        if t is not None and t.role == "user":
            self._forward(self._close_open_turn())

    # ----------------------------------------------------------------------------- agent side

    def respond(self, max_new_tokens: int | None = None, should_stop: Callable[[], bool] | None = None,
                text: str | None = None) -> Reply:
        """Close the user turn and start the reply. The returned ``Reply`` is an iterator of text
        pieces; ``reply.mark`` is the state before the turn was closed (``rollback_to`` it to drop
        a speculative reply). The closing is prefilled here, before the first piece is asked for.
        ``text``: the user turn's final text; its last words go through the model together with
        the closing, in one pass instead of two."""
        self._settle()
        cap = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        t0 = time.perf_counter()
        words: list[int] = []
        turn = self._open_turn()
        if text is not None and (turn is None or turn.role != "user"):
            self.user_words(text)  # opening a turn is one pass anyway
        elif text is not None:
            body, skip = self._user_body(" ".join(text.split()), turn.skip_chars)
            self._make_room(max(0, turn.body + len(body) - len(self.ids)) + len(self._user_suffix) + len(self._asst_prefix) + cap)
            turn = self._turns[-1] = dataclasses.replace(self._turns[-1], skip_chars=skip)
            keep = turn.body + _lcp(self.ids[turn.body:], body)
            if keep < turn.body + len(body):  # new words: crop to what is shared, the rest goes with the closing
                self._crop(keep)
                words = body[keep - turn.body:]
            else:  # unchanged, or only shorter
                self.user_words(text)
        self._make_room(len(words) + self._closing_len() + len(self._asst_prefix) + cap + len(self._asst_suffix))
        end = len(self.ids) + len(words)
        if words:
            self.stats.last_words_tokens, self.stats.last_words_ms = len(words), 0.0
        turns_before, pending_before = tuple(self._turns), tuple(self._pending)
        hist_before = {p: r for p, r in self._hist.items() if p < end}
        closing = words + self._close_open_turn()
        start = len(self.ids) + len(closing)
        self._turns.append(_Turn("assistant", start, start + len(self._asst_prefix)))
        new = closing + self._asst_prefix
        self._forward(new, keep=len(new) - len(words) + 1)
        # the state before the closing, for dropping the reply: the closing pass kept its logits
        hist_before.update((p, r) for p, r in self._hist.items() if p < end)
        mark = Mark(self._generation, tuple(self.ids[:end]), turns_before, pending_before, hist_before)
        stats = ReplyStats(words_tokens=self.stats.last_words_tokens, words_ms=self.stats.last_words_ms,
                           close_tokens=len(new) - len(words), close_ms=(time.perf_counter() - t0) * 1e3)
        self.stats.last_words_tokens, self.stats.last_words_ms = 0, 0.0
        self.stats.replies.append(stats)
        reply = Reply(self, mark, stats, t0)
        reply._gen = self._generate(reply, cap, should_stop or (lambda: False))
        self._active = reply
        return reply

    def agent_said(self, text: str) -> None:
        """Append an agent turn produced elsewhere (a scripted prompt, a translation)."""
        self._settle()
        content = self._enc(" ".join(text.split()))
        self._make_room(self._closing_len() + len(self._asst_prefix) + len(content) + len(self._asst_suffix))
        closing = self._close_open_turn()
        new = closing + self._asst_prefix + content + self._asst_suffix
        start = len(self.ids) + len(closing)
        body = start + len(self._asst_prefix)
        self._turns.append(_Turn("assistant", start, body, body + len(content)))
        self._forward(new)
        self._maybe_compact()

    def truncate_agent_turn(self, heard_text: str, marker: str | None = None) -> None:
        """Barge-in: cut the latest agent turn to the words the user heard, then `` … marker``,
        and close it. Turns after it (the interrupting user's words) are kept and re-prefilled."""
        self._settle()
        marker = self.config.interrupted_marker if marker is None else marker
        heard = " ".join(heard_text.split())
        target = self._enc(" ".join(p for p in (heard, "…", marker.strip()) if p))
        self._make_room(len(target) + len(self._asst_suffix))  # before reading positions: it may compact
        k = max((i for i, t in enumerate(self._turns) if t.role == "assistant"), default=None)
        if k is None:
            raise ValueError("there is no agent turn to truncate")
        turn = self._turns[k]
        new_end = turn.body + len(target)
        later: list[_Turn] = []
        after: list[int] = []
        if turn.end is not None and k + 1 < len(self._turns):  # the interrupting user's words, kept
            old_next = self._turns[k + 1].start
            later = [t.shifted(new_end + len(self._asst_suffix) - old_next) for t in self._turns[k + 1:]]
            after = self.ids[old_next:]
        self._pending = []  # an open turn's yielded tokens: re-prefilled where the user heard them
        self._turns = self._turns[:k] + [dataclasses.replace(turn, end=new_end)] + later
        self._replace_tail(turn.body, target + self._asst_suffix + after)
        self._maybe_compact()

    # ---------------------------------------------------------------------------- speculation

    def mark(self) -> Mark:
        """The dialogue as it is now. Cheap: the token list, the turn records and one logits row."""
        self._settle()
        return Mark(self._generation, tuple(self.ids), tuple(self._turns), tuple(self._pending), dict(self._hist))

    def rollback_to(self, mark: Mark) -> int:
        """Return the dialogue to ``mark`` (typically a speculative reply's ``reply.mark``); more
        user words can follow. Returns the tokens that had to be prefilled (0 for a plain crop)."""
        self._close_active()
        self._settle()
        ids, turns = list(mark.ids), list(mark.turns)
        for g in range(mark.generation + 1, self._generation + 1):
            if g not in self._shifts:
                raise ValueError("the mark predates a reset")
            cut, sys_ids = self._shifts[g]
            if len(ids) < cut:
                raise ValueError("the mark lies in turns a compaction has dropped")
            ids = list(sys_ids) + ids[cut:]
            turns = [t.shifted(len(sys_ids) - cut) for t in turns if t.start >= cut]
        keep = _lcp(self.ids, ids)
        if keep == len(ids) and keep < len(self.ids) and keep - 1 in mark.logits and mark.generation == self._generation:
            self._crop(keep)
            self._hist.update(mark.logits)
            n = 0
        else:
            n = self._replace_tail(keep, ids[keep:])
        self._turns = turns
        self._pending = list(mark.pending)
        return n

    # ----------------------------------------------------------------------------- compaction

    def plan_compaction(self) -> CompactionPlan | None:
        """What a compaction would keep now (owner thread); None when nothing can be dropped."""
        self._settle()
        return self._plan()

    def _plan(self) -> CompactionPlan | None:
        open_t = self._open_turn()
        source = open_t.start if open_t is not None else len(self.ids)
        sealed = [t for t in self._turns if t.start < source]
        budget = int(self.max_context * self.config.keep_fraction)
        first = len(sealed)
        while first > 0 and len(sealed) - (first - 1) <= self.config.keep_turns and source - sealed[first - 1].start <= budget:
            first -= 1
        while first < len(sealed) and sealed[first].role != "user":  # begin the kept part with the user
            first += 1
        if first == 0:
            return None
        cut = sealed[first].start if first < len(sealed) else source
        dropped = []
        for i, t in enumerate(sealed[:first]):
            end = t.end if t.end is not None else (sealed[i + 1].start if i + 1 < len(sealed) else source)
            who = "User" if t.role == "user" else "Assistant"
            dropped.append(f"{who}: {self.tokenizer.decode(self.ids[t.body:end]).strip()}")
        return CompactionPlan(self._generation, tuple(self.ids[:source]), cut,
                              self.system_text, ("Summary so far: " + self.summary + "\n" if self.summary else "") + "\n".join(dropped),
                              self.summary, self.config.summarize)

    def prepare_compaction(self, plan: CompactionPlan) -> PreparedCompaction:
        """Build the replacement cache for ``plan``: safe on any thread (reads only the weights)."""
        t0 = time.perf_counter()
        summary = self._summarize(plan.dropped_text) if plan.summarize else plan.summary
        ids = self._system_ids(plan.system_text, summary) + list(plan.source_ids[plan.cut:])
        cache = self._new_cache()
        logits = None
        with torch.inference_mode():
            for i in range(0, len(ids), _PREFILL_CHUNK):
                logits = self._run(cache, ids[i:i + _PREFILL_CHUNK])[-1]
        return PreparedCompaction(plan, ids, cache, logits, summary, time.perf_counter() - t0)

    def swap_in(self, prepared: PreparedCompaction) -> bool:
        """Adopt a prepared compaction (owner thread): the new cache replaces the old one, and the
        tokens added since the plan are replayed onto it. False if the dialogue changed underneath."""
        t0 = time.perf_counter()
        plan = prepared.plan
        n = len(plan.source_ids)
        if plan.generation != self._generation or len(self.ids) < n or tuple(self.ids[:n]) != plan.source_ids:
            self.stats.stale_compactions += 1
            log.info("dialogue compaction dropped: the dialogue changed while it was being built")
            return False
        new_sys = len(prepared.ids) - (n - plan.cut)
        shift = new_sys - plan.cut
        tail = self.ids[n:]
        self.cache, self.ids = prepared.cache, list(prepared.ids)
        self._hist = {len(self.ids) - 1: prepared.logits}
        self._turns = [t.shifted(shift) for t in self._turns if t.start >= plan.cut]
        self.summary = prepared.summary
        self._generation += 1
        self._shifts[self._generation] = (plan.cut, tuple(prepared.ids[:new_sys]))
        if tail:
            self._forward(tail)
        self.stats.compactions += 1
        self.stats.last_swap_replay_tokens = len(tail)
        self.stats.last_swap_ms = (time.perf_counter() - t0) * 1e3
        log.info("dialogue compacted to %d tokens (built in %.2f s, %d replayed)", len(self.ids), prepared.build_seconds, len(tail))
        return True

    def poll(self, wait: bool = False) -> bool:
        """Adopt a finished background compaction now (``wait``: block until it is built) instead of
        at the next call; True if one was swapped in."""
        before = self.stats.compactions
        self._close_active()
        self._poll_compaction(wait=wait)
        return self.stats.compactions > before

    def compact_now(self) -> bool:
        """Compact in the calling thread (the fallback when the context is full)."""
        self._settle()
        return self._compact_here()

    def _compact_here(self) -> bool:
        plan = self._plan()
        return plan is not None and self.swap_in(self.prepare_compaction(plan))

    # ------------------------------------------------------------------------------- internals

    def _enc(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _system_ids(self, system_text: str, summary: str) -> list[int]:
        text = system_text + (f"\nEarlier in this conversation: {summary.strip()}" if summary.strip() else "")
        return self._enc(self.fmt.system_prefix + text + self.fmt.system_suffix)

    def _punctuation_ids(self) -> torch.Tensor:
        """Tokens that are sentence-final punctuation (with quotes or whitespace): 0.1 s, once per tokenizer."""
        key = id(self.tokenizer)
        if key not in _PUNCT_CACHE:
            ids = []
            for tid in range(len(self.tokenizer)):
                s = self.tokenizer.decode([tid]).strip()
                if s and s[-1] in _FINAL_PUNCT and all(c in _FINAL_PUNCT or c in "\"')" for c in s):
                    ids.append(tid)
            _PUNCT_CACHE[key] = (self.tokenizer, torch.tensor(ids, dtype=torch.long))
        return _PUNCT_CACHE[key][1]

    def _is_final_punct(self, tid: int) -> bool:
        return tid in self._final_set

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def _run(self, cache, tokens: list[int], keep: int = 1) -> torch.Tensor:
        """Run ``tokens`` through the model on ``cache``; the logits of the last ``keep`` positions."""
        kw = {self._cache_arg: cache, "use_cache": True}
        if self._keep_arg:
            kw[self._keep_arg] = keep
        out = self.model(input_ids=torch.tensor([tokens]), **kw)
        return out.logits[0, -keep:].detach().clone()

    def _forward(self, tokens: list[int], keep: int = _KEEP_LOGITS) -> None:
        """Prefill ``tokens`` at the end of the stream; keeps ids, cache and logits in step (the
        logits of the last ``keep`` positions at least)."""
        if not tokens:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tokens), _PREFILL_CHUNK):
                chunk = tokens[i:i + _PREFILL_CHUNK]
                rows = self._run(self.cache, chunk, min(len(chunk), max(keep, _KEEP_LOGITS)))
                self._keep_logits(rows, len(self.ids) + len(chunk))
                self.ids.extend(chunk)
        self.stats.prefill_tokens += len(tokens)
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _keep_logits(self, rows: torch.Tensor, end: int) -> None:
        """Store the logits rows of the positions just before ``end``; forget all but the last few."""
        for i in range(rows.shape[0]):
            self._hist[end - rows.shape[0] + i] = rows[i]
        for p in [p for p in self._hist if p < end - max(_KEEP_LOGITS, rows.shape[0])]:
            del self._hist[p]

    def _crop(self, n: int) -> None:
        if n < len(self.ids):
            with torch.inference_mode():
                self.cache.crop(n - len(self.ids))  # negative: remove that many (old and new transformers)
            del self.ids[n:]
            self._hist = {p: r for p, r in self._hist.items() if p < n}

    def _replace_tail(self, pos: int, tokens: list[int]) -> int:
        """Make ids[pos:] equal ``tokens``: crop to the common prefix and prefill the rest. At least
        one token is prefilled whenever the stream changed, so the kept logits are those of the
        new last token. Returns the tokens prefilled."""
        keep = pos + _lcp(self.ids[pos:], tokens)
        target_len = pos + len(tokens)
        if keep == len(self.ids) == target_len:
            return 0
        new = tokens[keep - pos:]
        if not new:  # the stream only got shorter: re-run its new last token for its logits
            keep -= 1
            new = [self.ids[keep]]
        self._crop(keep)
        self._forward(new)
        return len(new)

    def _open_turn(self) -> _Turn | None:
        return self._turns[-1] if self._turns and self._turns[-1].end is None else None

    def _close_open_turn(self) -> list[int]:
        """Tokens that close the open turn (to be prefilled by the caller); marks the turn closed."""
        t = self._open_turn()
        if t is None:
            return []
        if t.role == "user":
            self._turns[-1] = dataclasses.replace(t, end=len(self.ids))
            return list(self._user_suffix)
        pending, self._pending = self._pending, []
        self._turns[-1] = dataclasses.replace(t, end=len(self.ids) + len(pending))
        return pending + self._asst_suffix

    def _closing_len(self) -> int:
        t = self._open_turn()
        if t is None:
            return 0
        return len(self._user_suffix) if t.role == "user" else len(self._pending) + len(self._asst_suffix)

    def _user_body(self, text: str, skip: int) -> tuple[list[int], int]:
        """Tokens of the user's text, and the characters dropped from its front: a monologue longer
        than max_user_tokens keeps its most recent part, from a word boundary that then stays put
        (so later words still extend the cached tokens) until the turn has grown by half again."""
        if skip > len(text):
            skip = 0
        body = self._user_tokens(text, skip)
        if len(body) > self.config.max_user_tokens:
            starts = [0] + [i + 1 for i, c in enumerate(text) if c == " "]
            lo, hi = 0, len(starts) - 1  # the first word start whose tail fits half the cap
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self._user_tokens(text, starts[mid])) <= self.config.max_user_tokens // 2:
                    hi = mid
                else:
                    lo = mid + 1
            skip = starts[lo]
            body = self._user_tokens(text, skip)
            log.info("user turn over %d tokens: the context keeps its last %d characters",
                     self.config.max_user_tokens, len(text) - skip)
        return body, skip

    def _user_tokens(self, text: str, skip: int) -> list[int]:
        return self._enc(text) if skip <= 0 else self._enc("… " + text[skip:])

    def _generate(self, reply: Reply, cap: int, should_stop: Callable[[], bool]) -> Iterator[str]:
        stats = reply.stats
        t_dec = time.perf_counter()
        n = 0
        reason = ""
        try:
            reason = "cancelled" if should_stop() else ""
            logits = self._hist[len(self.ids) - 1]
            while not reason:
                if n >= cap:
                    reason = "cap"
                    break
                tok = self._pick(logits)
                if tok in self._stop_ids:
                    reason = "eos"
                    break
                self._pending.append(tok)
                reply.tokens.append(tok)
                n += 1
                text = self.tokenizer.decode(reply.tokens, skip_special_tokens=True)
                if len(text) > len(reply.text) and not text.endswith("\ufffd"):
                    piece, reply.text = text[len(reply.text):], text
                    if not stats.ttft_ms:
                        stats.ttft_ms = (time.perf_counter() - reply.t0) * 1e3
                    yield piece
                if should_stop():
                    reason = "cancelled"
                elif n >= cap:
                    reason = "cap"
                elif _looping(reply.tokens):
                    reason = "loop"
                else:
                    pending, self._pending = self._pending, []
                    self._forward_decode(pending)
                    logits = self._hist[len(self.ids) - 1]
            if reason == "eos" and not reply.text.strip():
                log.warning("the LLM gave an empty reply: saying the fallback %r", self.config.fallback_reply)
                reason = "empty"
                fb = self._enc(self.config.fallback_reply)
                self._pending.extend(fb)
                reply.text += self.config.fallback_reply
                stats.ttft_ms = (time.perf_counter() - reply.t0) * 1e3
                yield self.config.fallback_reply
            if reason in ("cap", "loop"):
                log.warning("reply cut after %d tokens (%s): %r", n, "runaway cap" if reason == "cap" else "repetition loop", reply.text[-80:])
            if reason in ("eos", "empty", "cap", "loop"):  # finished: the turn is closed now, off the critical path
                self._active = None
                self._forward(self._close_open_turn())
                self._maybe_compact()
        finally:
            stats.stop_reason = reason or "closed"
            stats.new_tokens = n
            stats.decode_seconds = time.perf_counter() - t_dec
            reply.stop_reason = stats.stop_reason
            if self._active is reply:
                self._active = None

    def _forward_decode(self, tokens: list[int]) -> None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._keep_logits(self._run(self.cache, tokens), len(self.ids) + len(tokens))
        self.ids.extend(tokens)
        self.stats.decode_tokens += len(tokens)
        self.stats.decode_seconds += time.perf_counter() - t0

    def _pick(self, logits: torch.Tensor) -> int:
        t = self.config.temperature
        if t <= 0:
            return int(logits.argmax())
        top = torch.topk(logits.float() / t, min(self.config.top_k, logits.shape[-1]))
        i = torch.multinomial(torch.softmax(top.values, -1), 1, generator=self._rng)
        return int(top.indices[i])

    def _summarize(self, transcript: str) -> str:
        """A one-line summary of dropped turns, by the model itself, on a private cache."""
        msgs = [{"role": "system", "content": "You summarize conversations in one short sentence."},
                {"role": "user", "content": "Summarize this conversation in one sentence:\n\n" + transcript[-3000:]}]
        ids = self.llm.encode_chat(msgs)
        cache = self._new_cache()
        out: list[int] = []
        with torch.inference_mode():
            logits = self._run(cache, ids)[-1]
            for _ in range(48):
                tok = int(logits.argmax())
                if tok in self._stop_ids:
                    break
                out.append(tok)
                logits = self._run(cache, [tok])[-1]
        return " ".join(self.tokenizer.decode(out, skip_special_tokens=True).split())

    def _make_room(self, extra: int) -> None:
        """Before adding ``extra`` tokens: compact (a ready background one, else in the foreground)
        if they would not fit."""
        if len(self.ids) + len(self._pending) + extra <= self.max_context:
            return
        if self._future is not None:
            log.info("context full: waiting for the background compaction")
            self._poll_compaction(wait=True)
        if len(self.ids) + len(self._pending) + extra > self.max_context:
            log.warning("context full (%d + %d tokens): compacting in the foreground", len(self.ids), extra)
            self.stats.foreground_compactions += 1
            self._compact_here()
        if len(self.ids) + len(self._pending) + extra > self.max_context:
            raise DuplexError(f"{extra} more tokens do not fit the {self.max_context}-token dialogue context "
                              f"even after compaction ({len(self.ids)} tokens held)")

    def _maybe_compact(self, user_open: bool = False) -> None:
        """Start a background compaction past the threshold. Best planned right after an agent
        turn: the swap then replays only the user's words since. While the user speaks it waits
        until halfway between the threshold and the bound (their open turn would all be replayed)."""
        if not self.config.auto_compact or self._future is not None:
            return
        at = self.config.compact_at
        if len(self.ids) < (at + (1 - at) / 2 if user_open else at) * self.max_context:
            return
        plan = self._plan()
        if plan is None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dialogue-compact")
        self._future = self._executor.submit(self.prepare_compaction, plan)

    def _poll_compaction(self, wait: bool = False) -> None:
        fut = self._future
        if fut is None or not (wait or fut.done()):
            return
        self._future = None
        try:
            prepared = fut.result()
        except Exception:
            log.exception("background dialogue compaction failed")
            return
        if not self.swap_in(prepared):
            self._maybe_compact()

    def _settle(self) -> None:
        """Entry of every public call: finish a reply left mid-way, adopt a ready compaction."""
        self._close_active()
        self._poll_compaction()

    def _close_active(self) -> None:
        r = getattr(self, "_active", None)
        if r is not None:
            r.close()
            self._active = None


class Reply:
    """A reply being generated: iterate for text pieces. ``text``, ``tokens`` and ``stop_reason``
    say what it produced; ``mark`` is the dialogue before the user's turn was closed."""

    def __init__(self, dialogue: DialogueLLM, mark: Mark, stats: ReplyStats, t0: float) -> None:
        self.dialogue = dialogue
        self.mark = mark
        self.stats = stats
        self.t0 = t0
        self.text = ""
        self.tokens: list[int] = []
        self.stop_reason = ""
        self._gen: Iterator[str] | None = None

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stop generating now (the tokens produced so far stay in the agent's turn)."""
        self._gen.close()
        if not self.stop_reason:  # closed before the first piece was asked for
            self.stop_reason = self.stats.stop_reason = "closed"
        if self.dialogue._active is self:
            self.dialogue._active = None

    def drop(self) -> int:
        """Forget this reply and close of the user's turn: back to ``mark`` (speculation lost)."""
        return self.dialogue.rollback_to(self.mark)

    def result(self) -> str:
        """Run to the end and return the whole text."""
        for _ in self:
            pass
        return self.text


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _looping(tokens: list[int], min_repeats: int = 3, max_period: int = 24) -> bool:
    """The reply's tail is one short token sequence repeated (a small model's runaway)."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        reps = max(min_repeats, -(-12 // p))  # at least 12 tokens of repetition for short periods
        span = p * reps
        if span > n:
            break
        tail = tokens[n - span:]
        if all(tail[i] == tail[i % p] for i in range(span)):
            return True
    return False
