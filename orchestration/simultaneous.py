"""The simultaneous policy: when a stable piece of the source is ready to translate and emit.

Synchronous and free of I/O (``init_state`` / ``partial`` / ``final``), so it replays files
deterministically and is tested with tables. It sees what the recogniser commits: the stable
prefix of each ``PartialText`` (LocalAgreement: it will not change) and the ``FinalText`` that
closes the utterance (or a committed segment of a long one).

Policies:

* ``clause``: emit the stable words up to the last clause boundary (a word ending in , ; : . ? !)
  once that piece holds ``min_words``; emit anyway at ``max_words`` pending words;
* ``wait-k``: emit the pending stable words once there are ``wait_k`` of them;
* ``final``: emit nothing before the final transcript (whole utterances; the reference point).

The final transcript emits whatever is left. Emitted segments are never revised: the words of
a final that were already emitted are skipped (counted, since the final pass keeps the committed
prefix; aligned word by word where it took back an early commit). When the final's text differs
from what was emitted (the recogniser rewrote a word), captions may show the whole final again:
a segment with ``supersedes`` naming the segments it replaces. Speech never gets one (what was
said stays said).

``source_end`` is the audio time the segment covers: the end time of its last word in a final,
or, for a segment emitted from partials, the audio time of the first hypothesis that already held
its last word (an upper bound, within one recogniser step of the word's end).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from streaming.frames import FinalText, PartialText

CLAUSE_END = (",", ";", ":", ".", "?", "!", "¿", "¡", "。", "、", "，")
SENTENCE_END = (".", "?", "!", "。")
#: the most words a long utterance's next window may repeat from the end of the one before it
OVERLAP_WORDS = 10


@dataclass(frozen=True)
class SimultaneousConfig:
    #: "clause" (punctuation), "wait-k" (every k stable words) or "final" (whole utterances)
    policy: Literal["clause", "wait-k", "final"] = "clause"
    #: wait-k: emit once this many stable words are pending
    wait_k: Annotated[int, Field(ge=1, le=50)] = 4
    #: clause: a clause shorter than this waits to be joined by the next
    min_words: Annotated[int, Field(ge=1, le=50)] = 3
    #: clause: emit this many pending stable words even without punctuation
    max_words: Annotated[int, Field(ge=1, le=200)] = 12
    #: captions: emit a superseding segment when a final differs from what was emitted
    revise_captions: bool = True


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of source text ready to translate. ``index`` counts segments over the stream."""

    index: int
    utterance: int
    text: str
    #: audio time (pipeline clock, s) of the end of the source the segment covers
    source_end: float
    #: emitted by the final transcript (the rest of an utterance), not from a partial
    final: bool = False
    #: captions only: this segment replaces these earlier ones (a revision of shown text)
    supersedes: tuple[int, ...] = ()
    #: language of the source, when the final told it ("" from partials)
    language: str = ""


@dataclass
class PolicyState:
    """One stream's policy state. Create it with ``SimultaneousPolicy.init_state``."""

    utterance: int = -1
    #: stable words of the current utterance segment (since the last continued final)
    stable: list[str] = field(default_factory=list)
    #: how many of ``stable`` are emitted
    emitted: int = 0
    #: audio time of the first hypothesis that held each word position with its current word
    seen_at: list[float] = field(default_factory=list)
    seen_words: list[str] = field(default_factory=list)
    #: segments emitted for the current utterance segment (for superseding)
    shown: list[Segment] = field(default_factory=list)
    next_index: int = 0
    #: after a continued final (the recogniser cut a long utterance's window): its last words, which
    #: the next window may say again where it starts before their audio ends (None: not after a cut)
    before_cut: list[str] | None = None


def ends_clause(word: str) -> bool:
    return word.rstrip("\"')»”").endswith(CLAUSE_END)


def _covered(emitted: list[str], final: list[str]) -> int:
    """How many of the final's words the emitted words stand for. The final pass keeps the
    committed words as a rule, so that is their count; where it took some back ("dal one" ->
    "dial one", "but do not want the whole" -> "but though on the whole"), it is the position in
    the final that a word alignment maps the end of the emitted words to, so that nothing is said
    twice and nothing is skipped."""
    a, b = [_norm(w) for w in emitted], [_norm(w) for w in final]
    if a == b[: len(a)]:
        return len(a)
    end = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if i1 >= len(a):
            break  # what the final has beyond the emitted words
        n = min(i2, len(a)) - i1  # emitted words this step of the alignment covers
        if tag == "equal":
            end = j1 + n
        elif tag == "replace":
            end = min(j2, j1 + n)  # a rewritten last word is one word, not the final's rest
        else:
            end = j2  # "delete": j1 == j2; "insert": final words inside the emitted span
    return min(end, len(b))


def _norm(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


class SimultaneousPolicy:
    def __init__(self, config: SimultaneousConfig | None = None) -> None:
        self.config = config or SimultaneousConfig()

    def init_state(self) -> PolicyState:
        return PolicyState()

    # -- events -----------------------------------------------------------------------------

    def partial(self, state: PolicyState, p: PartialText) -> list[Segment]:
        """A new hypothesis: segments that are safe to emit now (possibly none)."""
        if state is None:
            raise ValueError("SimultaneousPolicy.partial needs a state from init_state()")
        if p.utterance != state.utterance:
            self._new_utterance(state, p.utterance)
        self._note_seen(state, (p.stable + p.unstable).split(), p.pts)
        stable = p.stable.split()
        # the stable prefix only grows; trust its length over new_stable_words (which a caller
        # that drops partials would miss), but never shrink what was counted
        if len(stable) >= len(state.stable):
            state.stable = stable
        return self._emit_ready(state)

    def final(self, state: PolicyState, f: FinalText, *, captions: bool = False) -> list[Segment]:
        """The final transcript of an utterance (or of a cut segment of a long one): the rest."""
        if state is None:
            raise ValueError("SimultaneousPolicy.final needs a state from init_state()")
        if f.utterance != state.utterance:
            self._new_utterance(state, f.utterance)
        words = f.text.split()
        out: list[Segment] = []
        skipped = self._skip_overlap(state, words)
        done = skipped or _covered(state.stable[: state.emitted], words)
        rest = words[done:]
        end = f.words[-1].end if f.words else f.pts
        if rest:
            out.append(self._segment(state, " ".join(rest), end, final=True, language=f.language))
        revised = [_norm(w) for w in words[:done]] != [_norm(w) for w in state.stable[: state.emitted]]
        if captions and self.config.revise_captions and revised and state.shown:
            replaced = tuple(s.index for s in state.shown)
            out.append(self._segment(state, " ".join(words), end, final=True, supersedes=replaced, language=f.language))
        # a continued final cuts a long utterance: the recogniser's stable words restart with the
        # next window, so the count restarts too (same utterance number)
        self._new_utterance(state, f.utterance)
        if f.continued:
            state.before_cut = words[-OVERLAP_WORDS:]
        return out

    # -- internals --------------------------------------------------------------------------

    def _new_utterance(self, state: PolicyState, utterance: int) -> None:
        state.utterance = utterance
        state.stable, state.emitted, state.shown = [], 0, []
        state.seen_at, state.seen_words = [], []
        state.before_cut = None

    def _skip_overlap(self, state: PolicyState, words: list[str]) -> int:
        """The first words of a window after a cut that repeat the last ones before it, two words
        or more, count as emitted. The recogniser's next window starts a little before the end of
        the last committed word (its alignment may end a word early), and a translation, whose
        word times are rough, may say that audio's words again: "..., or the volume of your eye,"
        | "or the volume of your eye to go out." Decided once, with the window's first words."""
        if state.before_cut is None or state.emitted:
            return 0
        tail = [_norm(w) for w in state.before_cut]
        head = [_norm(w) for w in words]
        state.before_cut = None
        for k in range(min(len(tail), len(head)), 1, -1):
            if head[:k] == tail[-k:]:
                return k
        return 0

    def _note_seen(self, state: PolicyState, hyp: list[str], pts: float) -> None:
        for i, w in enumerate(hyp):
            if i < len(state.seen_words) and _norm(state.seen_words[i]) == _norm(w):
                continue
            del state.seen_words[i:], state.seen_at[i:]
            state.seen_words.append(w)
            state.seen_at.append(pts)

    def _cut(self, state: PolicyState) -> int:
        """How many stable words (from the start of the utterance segment) may be emitted now."""
        c = self.config
        pending = state.stable[state.emitted :]
        n = len(pending)
        if c.policy == "final" or n == 0:
            return state.emitted
        if c.policy == "wait-k":
            return state.emitted + n if n >= c.wait_k else state.emitted
        # clause: the last boundary that leaves a piece of at least min_words
        last = 0
        for i, w in enumerate(pending, 1):
            if ends_clause(w) and i >= c.min_words:
                last = i
        if last:
            return state.emitted + last
        if n >= c.max_words:
            return state.emitted + n
        return state.emitted

    def _emit_ready(self, state: PolicyState) -> list[Segment]:
        cut = self._cut(state)
        if cut <= state.emitted:
            return []
        if state.before_cut is not None:
            state.emitted = self._skip_overlap(state, state.stable)
            cut = self._cut(state)
            if cut <= state.emitted:
                return []
        words = state.stable[state.emitted : cut]
        i = cut - 1
        end = state.seen_at[i] if i < len(state.seen_at) else (state.seen_at[-1] if state.seen_at else 0.0)
        state.emitted = cut
        return [self._segment(state, " ".join(words), end)]

    def _segment(self, state: PolicyState, text: str, end: float, *, final: bool = False,
                 supersedes: tuple[int, ...] = (), language: str = "") -> Segment:
        seg = Segment(state.next_index, state.utterance, text, end, final, supersedes, language)
        state.next_index += 1
        if not supersedes:
            state.shown.append(seg)
        return seg
