"""Hotword biasing: a context prompt and a token-trie logit boost (shallow fusion).

Two mechanisms, used together:

* the hotwords are written into the decoder's previous-context prompt (``<|startofprev|>``), which
  primes Whisper's language model towards their spelling. The prompt is the list itself, space
  separated, capped at ``max_tokens`` (the first hotwords of the list win): every prompt token is
  prefilled on every decoding step. Where the prompted decode loops (Whisper copying the list),
  the recogniser decides again without it;
* ``HotwordBoost`` is a logit filter. Every spelling of every hotword, as a word (with its leading
  space), is tokenised into a trie. At a word start the first tokens of hotwords get
  ``start_boost``; inside a hotword the tokens that continue it get ``boost``. A boost is only
  granted where the model's own log-probability of the token is above ``gate``, and never against
  a token of the model's that spells the boosted one and more (" conferences" stays).

In a decode, ``HotwordBoost.session()`` follows each match and *withdraws* boosts that were not
borne out: ``decoder.decode`` rolls the hypothesis back to where the match began and decides that
position again with no boost there:

* a partial match that a boost steered (a boosted token won that would not have won without it)
  and that fails: the hypothesis leaves the trie before a hotword is complete;
* a completed hotword that the model itself finds too unlikely: the log-probability its tokens
  lost to the boosts (each against the model's own best token at that step), summed, is more than
  ``budget``. A boost may tip a close call; it may not complete a phrase the audio does not support.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

#: most tokens of hotword prompt (about 30 short words); the trie boost covers the whole list
PROMPT_TOKENS = 64


def parse_hotwords(items: Iterable[str]) -> tuple[str, ...]:
    """Split on commas and newlines, normalise Unicode (NFC) and whitespace, drop blanks and
    case-insensitive duplicates, keep the first spelling and the order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        for raw in item.replace("\n", ",").split(","):
            w = " ".join(unicodedata.normalize("NFC", raw).split())
            key = w.casefold()
            if w and key not in seen:
                seen.add(key)
                out.append(w)
    return tuple(out)


def prompt_text(hotwords: Iterable[str], tokenizer=None, max_tokens: int = PROMPT_TOKENS) -> str:
    """The hotwords as a decoder prompt: `` Asterisk PBX Digium``. With a tokenizer, only as many
    hotwords, in list order, as fit in ``max_tokens`` tokens."""
    words = list(hotwords)
    if tokenizer is None or not words:
        return (" " + " ".join(words)) if words else ""
    out, used = [], 0
    for w in words:
        n = len(tokenizer.encode(" " + w))
        if used + n > max_tokens:
            break
        out.append(w)
        used += n
    return (" " + " ".join(out)) if out else ""


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    terminal: bool = False
    ids: torch.Tensor | None = None  # children's token ids, for vectorised boosting

    def child_ids(self) -> torch.Tensor:
        if self.ids is None or len(self.ids) != len(self.children):
            self.ids = torch.tensor(sorted(self.children), dtype=torch.long)
        return self.ids


class HotwordBoost:
    """Logit filter: ``apply(logits, tokens)`` adds the boost in place (stateless: the match is
    read off the hypothesis' last tokens). ``session()`` gives the decoder the stateful version
    that withdraws boosts."""

    def __init__(self, tokenizer, hotwords: Iterable[str], boost: float = 5.0, start_boost: float = 2.0,
                 gate: float = -8.0, budget: float = 4.0) -> None:
        self.boost = boost
        self.start_boost = start_boost
        self.gate = gate
        self.budget = budget
        self.root = _Node()
        self.max_len = 0
        self.hotwords = tuple(hotwords)
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        # a hotword is a word of its own: only its spelling after a space goes into the trie, so
        # no boost ever starts inside another word
        for w in self.hotwords:
            # the user's spelling is the one to favour; a lower-case entry may also start a
            # sentence capitalised
            spellings = {w, w[:1].upper() + w[1:]} if w[:1].islower() else {w}
            for spelling in spellings:
                ids = tokenizer.encode(" " + spelling)
                if not ids:
                    continue
                node = self.root
                for t in ids:
                    node = node.children.setdefault(t, _Node())
                node.terminal = True
                self.max_len = max(self.max_len, len(ids))

    def __bool__(self) -> bool:
        return bool(self.root.children)

    def _active(self, tokens: list[int]) -> list[_Node]:
        """Trie nodes reached by the hypothesis' last k tokens, for every k that matches."""
        nodes = []
        for k in range(1, min(self.max_len, len(tokens)) + 1):
            node = self.root
            for t in tokens[-k:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.children:
                nodes.append(node)
        return nodes

    def _text(self, t: int) -> str:
        s = self._texts.get(t)
        if s is None:
            s = self._texts[t] = self.tokenizer.token_text(t).casefold() if self.tokenizer is not None else ""
        return s

    def _boosts(self, logprobs: torch.Tensor, nodes: list[_Node], at_start: bool) -> dict[int, float]:
        """Token -> boost, for the continuations of ``nodes`` and (``at_start``) the first tokens
        of hotwords, each only where the model's own log-probability clears the gate, and never
        against the model's own choice when that choice spells the boosted token and more
        (" conferences" is not to become " conference")."""
        out: dict[int, float] = {}
        groups = [(n.child_ids(), self.boost) for n in nodes]
        if at_start:
            groups.append((self.root.child_ids(), self.start_boost))
        best = self._text(int(torch.argmax(logprobs)))
        for ids, b in groups:
            ok = ids[logprobs[ids] > self.gate]
            for t in ok.tolist():
                text = self._text(t)
                if len(best) > len(text) and best.startswith(text):
                    continue
                out[t] = max(out.get(t, 0.0), b)
        return out

    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        if not self:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for t, b in self._boosts(logprobs, self._active(tokens), True).items():
            logits[t] += b

    def session(self, start: int) -> "BoostSession":
        """The filter for one decode whose generated text begins at position ``start``."""
        return BoostSession(self, start)


@dataclass
class _Match:
    start: int  # position in the text of the hotword's first token
    node: _Node
    lost: float = 0.0  # log-probability given up to boosts so far (>= 0)
    steered: bool = False  # some boost changed the winner
    tokens: tuple[int, ...] = ()


class BoostSession:
    """One decode's hotword boosting with withdrawal. The decoder calls ``apply(logits, text)``
    before choosing the token at ``len(text)`` and ``after(position, token)`` once it has; a
    returned position means "roll back to here and decide again": from then on no boost is
    granted at that position, so the model decides it on its own."""

    def __init__(self, boost: HotwordBoost, start: int) -> None:
        self.b = boost
        self.start = start
        self.matches: list[_Match] = []
        self.banned: set[int] = set()
        self._history: dict[int, list[_Match]] = {}  # matches before each recent position
        self._step: tuple[int, torch.Tensor, dict[int, float]] | None = None
        #: (hotword text, log-probability lost to boosts, kept) of every boosted match that ended
        self.outcomes: list[tuple[str, float, bool]] = []

    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        pos = len(tokens)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        nodes = [m.node for m in self.matches if m.start not in self.banned and m.node.children]
        boosts = self.b._boosts(logprobs, nodes, pos not in self.banned) if self.b else {}
        for t, v in boosts.items():
            logits[t] += v
        self._step = (pos, logprobs, boosts)

    def after(self, pos: int, token: int, text: list[int] | None = None) -> int | None:
        """The token chosen at ``pos``; returns a position to roll back to, or None."""
        if self._step is None or self._step[0] != pos:
            return None
        _, logprobs, boosts = self._step
        self._history[pos] = [_Match(m.start, m.node, m.lost, m.steered, m.tokens) for m in self.matches]
        self._history.pop(pos - self.b.max_len - 2, None)
        # what the boost cost the model here: its own best token against the one chosen
        lost = float(logprobs.max() - logprobs[token]) if token in boosts else 0.0
        steered = lost > 0.0
        back: int | None = None
        kept: list[_Match] = []
        for m in self.matches:
            nxt = m.node.children.get(token)
            if nxt is not None:
                m.node, m.lost, m.steered, m.tokens = nxt, m.lost + lost, m.steered or steered, m.tokens + (token,)
                kept.append(m)
            else:
                back = self._ended(m, back)
        first = self.b.root.children.get(token)
        if first is not None:
            kept.append(_Match(pos, first, lost, steered, (token,)))
        self.matches = []
        for m in kept:
            if m.node.children:
                self.matches.append(m)
            else:  # a whole hotword with nothing longer to grow into
                back = self._ended(m, back)
        if back is not None:
            self.banned.add(back)
            self.matches = self._history.get(back, [])
            for p in [p for p in self._history if p >= back]:
                del self._history[p]
        return back

    def _ended(self, m: _Match, back: int | None) -> int | None:
        """A match ended: keep it, or the earliest position to roll back to."""
        if not m.steered:
            return back  # the model's own choice throughout: nothing to withdraw
        ok = m.node.terminal and m.lost <= self.b.budget
        word = self.b.tokenizer.decode(list(m.tokens)) if self.b.tokenizer is not None else str(m.tokens)
        log.debug("hotword %r at %d %s: lost %.2f, %s", word, m.start, "complete" if m.node.terminal else "unfinished",
                  m.lost, "kept" if ok else "withdrawn")
        self.outcomes.append((word, m.lost, ok))
        if ok or m.start < self.start:
            return back
        return m.start if back is None else min(back, m.start)
