"""Hotword biasing: a context prompt and a token-trie logit boost (shallow fusion).

Two mechanisms, used together:

* the hotwords are written into the decoder's previous-context prompt (``<|startofprev|>``), which
  primes Whisper's language model towards their spelling;
* ``HotwordBoost`` is a one-method logit filter. Every spelling of every hotword is tokenised into a
  trie. At each decoding step, a hypothesis that is inside a hotword (its last tokens spell a trie
  prefix) gets ``boost`` added to the tokens that continue it; at a word start, the first tokens of
  hotwords get a smaller ``start_boost``. A boost is only granted where the model itself already
  gives the token a log-probability above ``gate`` — that is what keeps hotwords that were not
  spoken out of the output. Once a partial match fails, its boost is gone (the next step finds no
  active match), so a wrong start cannot drag the rest of a hotword in.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


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


def prompt_text(hotwords: Iterable[str]) -> str:
    words = list(hotwords)
    return (" " + ", ".join(words) + ".") if words else ""


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    terminal: bool = False


class HotwordBoost:
    """Logit filter: ``apply(logits, tokens)`` adds the boost in place."""

    def __init__(self, tokenizer, hotwords: Iterable[str], boost: float = 5.0, start_boost: float = 2.0, gate: float = -8.0) -> None:
        self.boost = boost
        self.start_boost = start_boost
        self.gate = gate
        self.root = _Node()
        self.max_len = 0
        self.hotwords = tuple(hotwords)
        for w in self.hotwords:
            # the user's spelling is the one to favour; a lower-case entry may also start a
            # sentence capitalised
            spellings = {w, w[:1].upper() + w[1:]} if w[:1].islower() else {w}
            for spelling in spellings:
                for variant in (" " + spelling, spelling):
                    ids = tokenizer.encode(variant)
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

    def apply(self, logits: torch.Tensor, tokens: list[int]) -> None:
        if not self:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        boosts: dict[int, float] = {}
        for node in self._active(tokens):
            for t in node.children:
                boosts[t] = max(boosts.get(t, 0.0), self.boost)
        for t in self.root.children:
            boosts.setdefault(t, self.start_boost)
        for t, b in boosts.items():
            if logprobs[t] > self.gate:
                logits[t] += b
