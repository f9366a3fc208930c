"""Turn-taking: when to answer, when to wait, when to keep talking and when to yield.

A synchronous, I/O-free policy core (DESIGN.md, "the coordinator as a state machine"):
``step(state, event) -> (state, actions)``. ``TurnState`` is immutable and replaced on every step,
so a conversation replays deterministically from its event log. The coordinator feeds it what the
pipeline observed (VAD, transcripts, the LLM's end-of-turn probability, playback progress) and
carries out the actions it returns (generate, commit, drop, stop, pause, resume); it never
decides turn-taking itself.

Two modes. **LISTEN**: the user has the floor. Once the user's voice stops, the turn is taken when
the LLM's end-of-turn probability (eot) is high after a short gap, or after a longer gap whatever
the probability, unless the LLM is sure the sentence is unfinished (then we wait longer still). A
*speculative* reply starts generating earlier, when eot is very high; it is committed when the
turn is taken and dropped when the user's words change. No words (a cough, a noise) are never
answered. **SPEAK**: the agent has the floor. A voice onset pauses playback at once (the barge-in
fast path: the stop latency is the onset detector's latency, not the recogniser's); the words that
follow decide. A stop phrase or enough real words stop the agent; a backchannel ("uh-huh",
"yeah") or a noise with no words resumes it; speech that goes on without words stops it too.

Voice timing comes from two sources. ``UserSpeechStarted``/``UserSpeechEnded`` are VAD segment
decisions (late by ``vad.min_speech_ms`` and ``vad.min_silence_ms``). ``VoiceActivity`` is
optional: the VAD's raw per-hop decision. When it is fed, silence is measured from the last voiced
hop instead of the segment end, and a run of voiced hops counts as an onset: both needed for the
latency targets (answer p50 <= 300 ms, barge-in stop p90 <= 150 ms), which the segment decisions
alone cannot reach with the default VAD settings.

Ordering assumptions, which the pipeline's in-order frames give: an utterance's partials and final
come after its ``UserSpeechStarted`` and before the next one. ``UserText`` describes the current
utterance (cumulative: ``stable`` + ``unstable``); ``final=True`` closes it (also a long monologue's
``continued`` finals). Event times ``t`` are on the conversation clock, in seconds; a late event
with an earlier ``t`` does not move time backwards.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Annotated, Union

from pydantic import Field

__all__ = [
    "TurnConfig",
    "Mode",
    "ReplyState",
    "Barge",
    "TurnState",
    "initial_state",
    "step",
    "run",
    "normalize_words",
    "classify_words",
    # events
    "UserSpeechStarted",
    "UserSpeechEnded",
    "VoiceActivity",
    "UserText",
    "EotProbability",
    "Tick",
    "ReplyReady",
    "AgentAudioStarted",
    "AgentAudioFinished",
    "AgentWordsPlayed",
    "Event",
    # actions
    "StartReply",
    "CommitReply",
    "DropReply",
    "StopSpeaking",
    "PauseSpeaking",
    "ResumeSpeaking",
    "Backchannel",
    "Log",
    "Action",
]

DEFAULT_BACKCHANNELS = (
    "uh-huh", "mm-hmm", "mhm", "yeah", "yes", "yep", "yup", "right", "okay", "ok", "sure", "i see",
    "got it", "alright", "all right", "oh", "wow", "cool", "exactly", "true", "thanks", "thank you",
    # non-lexical sounds: Whisper writes a murmured "uh-huh"/"mm-hmm" as any of these
    "uh", "um", "a", "m", "mm", "hm", "hmm", "huh", "ah", "ahh", "aha", "eh", "ugh", "haha",
)
DEFAULT_STOP_PHRASES = (
    "stop", "wait", "hold on", "hang on", "no no", "excuse me", "sorry", "pause", "shut up",
    "be quiet", "enough", "never mind", "what",
)


@dataclass(frozen=True)
class TurnConfig:
    # -- LISTEN: taking the turn
    #: silence after the user's voice (ms) after which a likely turn end (eot >= respond_eot) is answered
    respond_gap_ms: Annotated[float, Field(ge=0, le=10000)] = 200.0
    #: the LLM's end-of-turn probability at or above which the user's turn counts as finished
    respond_eot: Annotated[float, Field(gt=0, le=1)] = 0.05
    #: silence (ms) after which the turn is answered without a confident eot (eot unknown or >= unfinished_eot)
    long_gap_ms: Annotated[float, Field(ge=0, le=10000)] = 700.0
    #: eot below which the user is clearly mid-sentence ("a table for"): wait up to max_wait_ms instead
    unfinished_eot: Annotated[float, Field(ge=0, le=1)] = 0.003
    #: silence (ms) after which any turn with words is answered, whatever the probability
    max_wait_ms: Annotated[float, Field(ge=0, le=60000)] = 2500.0
    #: eot at or above which a speculative reply starts generating before the turn is taken
    speculate_eot: Annotated[float, Field(gt=0, le=1)] = 0.2
    #: silence (ms) before a speculative reply may start
    speculate_gap_ms: Annotated[float, Field(ge=0, le=10000)] = 0.0
    #: eot at or above which a speculative reply starts while the user's voice is still on (the
    #: partial transcript already reads as a finished turn); 1 = never before the voice stops
    speculate_speech_eot: Annotated[float, Field(gt=0, le=1)] = 0.3
    #: eot at or above which the turn is taken after only confident_gap_ms of silence
    confident_eot: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: silence (ms) after which a confident turn end (eot >= confident_eot) is answered
    confident_gap_ms: Annotated[float, Field(ge=0, le=10000)] = 100.0
    # -- SPEAK: barge-in
    #: pause the agent's audio as soon as a user voice onset is heard while it speaks (fast barge-in)
    pause_on_onset: bool = True
    #: VoiceActivity only: voiced hops spanning this long (ms) make an onset (shorter runs are clicks)
    onset_ms: Annotated[float, Field(ge=0, le=2000)] = 30.0
    #: user voice lasting this long (ms) while the agent speaks, without words that are all backchannel,
    #: stops the agent; without VoiceActivity it includes VAD's end hangover (vad.min_silence_ms)
    interrupt_speech_ms: Annotated[float, Field(gt=0, le=10000)] = 1000.0
    #: this many words that are not backchannels stop the agent
    interrupt_words: Annotated[int, Field(ge=1, le=20)] = 2
    #: classify the unstable tail of partial transcripts too (faster than waiting for stable words)
    use_unstable: bool = True
    #: after a wordless voice has ended, wait this long (ms) for a transcript before resuming
    noise_grace_ms: Annotated[float, Field(ge=0, le=5000)] = 300.0
    #: a committed reply that has produced no audio after this long (ms) is dropped
    reply_timeout_ms: Annotated[float, Field(gt=0, le=60000)] = 5000.0
    #: words and phrases that acknowledge without taking the turn (compared after normalisation)
    backchannels: tuple[str, ...] = DEFAULT_BACKCHANNELS
    #: words and phrases that stop the agent at once, anywhere in what the user says over it
    stop_phrases: tuple[str, ...] = DEFAULT_STOP_PHRASES
    # -- LISTEN: the agent's own backchannels
    #: say a backchannel in a mid-turn pause after the user has held the floor this long, s (0 = never)
    backchannel_after_s: Annotated[float, Field(ge=0, le=600)] = 0.0
    #: silence (ms) in a mid-turn pause (eot below respond_eot) at which the backchannel is said
    backchannel_gap_ms: Annotated[float, Field(ge=0, le=10000)] = 300.0
    #: what the agent says as a backchannel
    backchannel_text: str = "mm-hmm"

    def __post_init__(self) -> None:
        if not self.respond_gap_ms <= self.long_gap_ms <= self.max_wait_ms:
            raise ValueError("need respond_gap_ms <= long_gap_ms <= max_wait_ms")
        if self.unfinished_eot > self.respond_eot:
            raise ValueError("unfinished_eot must not exceed respond_eot")
        if self.confident_eot < self.respond_eot or self.confident_gap_ms > self.respond_gap_ms:
            raise ValueError("need confident_eot >= respond_eot and confident_gap_ms <= respond_gap_ms")
        for name in ("backchannels", "stop_phrases"):
            if any(not normalize_words(p) for p in getattr(self, name)):
                raise ValueError(f"{name} entries must contain at least one word")


# --------------------------------------------------------------------------------------- words

_WORD = re.compile(r"[a-z0-9']+")
_RUN = re.compile(r"([a-z])\1{2,}")


def normalize_words(text: str) -> tuple[str, ...]:
    """Lower-case words without punctuation; hyphens split ("Uh-huh." -> ("uh", "huh")); a letter
    repeated three times or more counts twice ("MMMM" -> "mm", "Ahhh" -> "ahh")."""
    text = _RUN.sub(r"\1\1", text.lower().replace("\u2019", "'"))
    return tuple(w.strip("'") for w in _WORD.findall(text) if w.strip("'"))


@functools.lru_cache(maxsize=8)
def _lexicon(backchannels: tuple[str, ...], stop_phrases: tuple[str, ...]):
    bc = sorted({normalize_words(p) for p in backchannels}, key=len, reverse=True)
    stop = sorted({normalize_words(p) for p in stop_phrases}, key=len, reverse=True)
    return tuple(bc), tuple(stop)


def classify_words(words: tuple[str, ...], config: TurnConfig) -> tuple[str | None, int]:
    """(the stop phrase found or None, how many words are not covered by backchannel phrases)."""
    bc, stop = _lexicon(config.backchannels, config.stop_phrases)
    found = next((" ".join(p) for p in stop for i in range(len(words) - len(p) + 1) if words[i : i + len(p)] == p), None)
    return found, _uncovered(words, bc)


def _uncovered(words: tuple[str, ...], phrases) -> int:
    """Words left over when ``words`` are covered, left to right, by the longest matching phrases."""
    i = other = 0
    while i < len(words):
        p = next((p for p in phrases if words[i : i + len(p)] == p), None)
        if p is None:
            other += 1
            i += 1
        else:
            i += len(p)
    return other


def _no_content(words: tuple[str, ...], config: TurnConfig) -> bool:
    """Only backchannels and stop phrases ("yeah", "stop", "hold on"): nothing to answer."""
    bc, stop = _lexicon(config.backchannels, config.stop_phrases)
    return _uncovered(words, tuple(sorted(bc + stop, key=len, reverse=True))) == 0


# -------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class UserSpeechStarted:
    """VAD decided that user speech began (a new utterance)."""

    t: float
    #: estimated onset of the speech (audio time, before t); None = t
    onset: float | None = None


@dataclass(frozen=True, slots=True)
class UserSpeechEnded:
    """VAD decided that the user's speech ended."""

    t: float
    #: audio time at which the speech ended (before t, by VAD's silence hangover); None = t
    end: float | None = None


@dataclass(frozen=True, slots=True)
class VoiceActivity:
    """Optional: the VAD's raw decision for the audio hop ending at t (voiced or not)."""

    t: float
    speech: bool
    #: an onset only WebRTC heard so far (an unvoiced consonant, or a noise): it may pause the
    #: agent's voice, but while listening it does not count as the user's voice until confirmed
    early: bool = False


@dataclass(frozen=True, slots=True)
class UserText:
    """The current utterance's transcript so far (cumulative); final=True closes the utterance."""

    t: float
    stable: str = ""
    unstable: str = ""
    final: bool = False


@dataclass(frozen=True, slots=True)
class EotProbability:
    """The LLM's probability of the end-of-turn token after the user's text."""

    t: float
    p: float
    #: the user text it was computed after (compare ``TurnState.turn_text``); when given and its
    #: words are no longer the current turn's, it is stale and ignored. None: applies to the current text
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes (silence durations and timeouts are computed from times)."""

    t: float


@dataclass(frozen=True, slots=True)
class ReplyReady:
    """The first clause of the pending reply has been generated (empty text: the LLM gave nothing)."""

    t: float
    text: str = ""


@dataclass(frozen=True, slots=True)
class AgentAudioStarted:
    """The first sample of the agent's reply left for the speaker."""

    t: float


@dataclass(frozen=True, slots=True)
class AgentAudioFinished:
    """The agent's reply has played to its end."""

    t: float


@dataclass(frozen=True, slots=True)
class AgentWordsPlayed:
    """What the user has heard of the agent's current turn so far (cumulative)."""

    t: float
    text: str


Event = Union[
    UserSpeechStarted, UserSpeechEnded, VoiceActivity, UserText, EotProbability, Tick, ReplyReady,
    AgentAudioStarted, AgentAudioFinished, AgentWordsPlayed,
]

# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class StartReply:
    """Generate a reply to ``text``. Speculative: keep it unplayed until CommitReply (or DropReply).
    Not speculative: the turn is taken, play it as soon as it is ready."""

    speculative: bool
    reason: str
    #: the user's turn being answered (all of it since the last turn change)
    text: str = ""


@dataclass(frozen=True, slots=True)
class CommitReply:
    """The speculative reply becomes the agent's turn: play it (now, or as soon as it is ready)."""

    reason: str


@dataclass(frozen=True, slots=True)
class DropReply:
    """Abandon the pending reply (cancel generation, roll the LLM cache back); nothing was heard."""

    reason: str


@dataclass(frozen=True, slots=True)
class StopSpeaking:
    """Yield: cancel generation, TTS and playback, and truncate the agent's turn to ``heard``."""

    reason: str
    #: the words of the agent's turn the user heard (the last AgentWordsPlayed)
    heard: str = ""


@dataclass(frozen=True, slots=True)
class PauseSpeaking:
    """Hold playback (keep what is queued): a possible interruption is being classified."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResumeSpeaking:
    """Continue playback where it was held: it was a backchannel or a noise."""

    reason: str


@dataclass(frozen=True, slots=True)
class Backchannel:
    """Say ``text`` without taking the turn (the user keeps the floor)."""

    text: str
    reason: str


@dataclass(frozen=True, slots=True)
class Log:
    """A decision that changes nothing outside, for the event log."""

    reason: str


Action = Union[StartReply, CommitReply, DropReply, StopSpeaking, PauseSpeaking, ResumeSpeaking, Backchannel, Log]

# --------------------------------------------------------------------------------------- state


class Mode(str, Enum):
    LISTEN = "listen"
    SPEAK = "speak"


class ReplyState(str, Enum):
    NONE = "none"
    #: generating (or generated) without having taken the turn
    SPECULATIVE = "speculative"
    #: the agent's turn (mode SPEAK)
    COMMITTED = "committed"


@dataclass(frozen=True, slots=True)
class Barge:
    """A possible interruption while the agent holds the floor."""

    #: when the user's voice began
    onset: float
    #: we sent PauseSpeaking and have not resumed
    paused: bool
    #: leading tokens of the current utterance spoken before this onset (not part of it)
    skip: int = 0
    #: a VAD segment belongs to it (its transcript will come), not only voiced hops
    vad: bool = False
    #: the utterance's final transcript arrived
    final: bool = False
    #: its words so far are all backchannel (resumed on them)
    backchannel: bool = False


@dataclass(frozen=True, slots=True)
class TurnState:
    config: TurnConfig = field(default_factory=TurnConfig)
    mode: Mode = Mode.LISTEN
    #: the latest event time seen
    now: float = 0.0
    # -- the user's voice
    #: a VAD segment is open
    vad_speech: bool = False
    #: decision time of the last VAD segment end
    vad_end_t: float | None = None
    #: the last VoiceActivity decision (None: never fed, segment decisions only)
    hop_voice: bool | None = None
    #: first hop of the current voiced run
    hop_run: float | None = None
    #: when the user's voice last ended (audio time)
    last_voice: float | None = None
    # -- the user's words
    #: finished utterances of the current user turn (raw text) and their normalised words
    done: str = ""
    done_words: tuple[str, ...] = ()
    #: the current utterance's transcript (stable + unstable) and its stable part
    utt: str = ""
    utt_stable: str = ""
    #: leading whitespace tokens of ``utt`` that do not belong to the current user turn
    skip: int = 0
    #: when the current user turn began (its first VAD onset)
    turn_start: float | None = None
    #: end-of-turn probability for the current turn text (None: not known for this text)
    eot: float | None = None
    # -- the reply
    reply: ReplyState = ReplyState.NONE
    #: normalised user words the pending reply answers
    reply_for: tuple[str, ...] = ()
    reply_ready: bool = False
    #: when the reply was committed, or last resumed (for the reply timeout)
    reply_since: float = 0.0
    # -- the agent's turn
    audio_started: bool = False
    heard: str = ""
    barge: Barge | None = None
    #: the utterance the reply answers is still open (its late words are not an interruption)
    answered_open: bool = False
    #: the user's turn as it stood when the agent took the turn (finished part, and tokens of the
    #: then-current utterance that belonged to earlier turns): restored when the agent is stopped
    #: before the user heard anything, so the user's turn simply goes on
    prior_done: str = ""
    prior_done_words: tuple[str, ...] = ()
    prior_skip: int = 0
    #: the current user turn began over the agent's speech (all-backchannel words are then no turn)
    overlapped: bool = False
    # -- bookkeeping
    waiting_logged: bool = False
    last_backchannel: float | None = None

    @property
    def turn_text(self) -> str:
        """The user's current turn: finished utterances plus the current one."""
        tail = " ".join(self.utt.split()[self.skip :])
        return " ".join(p for p in (self.done, tail) if p)

    @property
    def turn_words(self) -> tuple[str, ...]:
        return self.done_words + normalize_words(" ".join(self.utt.split()[self.skip :]))


def initial_state(config: TurnConfig | None = None) -> TurnState:
    return TurnState(config=config or TurnConfig())


# ---------------------------------------------------------------------------------------- step


def step(state: TurnState, event: Event) -> tuple[TurnState, list[Action]]:
    """Apply one event; return the new state and the actions to carry out, in order."""
    if not isinstance(state, TurnState):
        raise TypeError("step needs a TurnState from initial_state()")
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"unknown turn event {type(event).__name__}")
    acts: list[Action] = []
    s = replace(state, now=max(state.now, float(event.t)))
    s = handler(s, event, acts)
    s = (_decide_listen if s.mode is Mode.LISTEN else _decide_speak)(s, acts)
    return s, acts


def run(events, config: TurnConfig | None = None, state: TurnState | None = None):
    """Fold ``events`` through ``step``; returns (final state, [(event, actions), ...])."""
    s = state or initial_state(config)
    trace = []
    for ev in events:
        s, acts = step(s, ev)
        trace.append((ev, acts))
    return s, trace


# -- event handlers (update the state; decisions are made afterwards, in one place per mode)


def _on_speech_started(s: TurnState, ev: UserSpeechStarted, acts: list[Action]) -> TurnState:
    onset = ev.t if ev.onset is None else min(float(ev.onset), s.now)
    if s.mode is Mode.LISTEN and " ".join(s.utt.split()[s.skip :]):
        # an utterance without its final transcript: keep its words rather than lose them
        acts.append(Log(f"utterance closed without a final transcript: {s.utt.strip()!r}"))
        s = _close_utterance(s)
    if s.mode is Mode.SPEAK and s.answered_open:
        # the answered utterance ended without its final: its words stay part of the answered turn
        tail = " ".join(s.utt.split()[s.prior_skip :])
        s = replace(s, prior_skip=0, prior_done=" ".join(p for p in (s.prior_done, tail) if p),
                    prior_done_words=s.prior_done_words + normalize_words(tail))
    s = replace(s, vad_speech=True, utt="", utt_stable="", skip=0, answered_open=False)
    if s.mode is Mode.LISTEN:
        if s.turn_start is None:
            s = replace(s, turn_start=onset)
        return s
    if s.barge is not None:
        b = replace(s.barge, skip=0, vad=True, final=False, backchannel=False)
        if not b.paused and s.config.pause_on_onset:
            acts.append(PauseSpeaking(f"possible interruption: user speech again at {onset:.2f}s"))
            b = replace(b, paused=True)
        return replace(s, barge=b)
    return _onset(s, onset, "VAD speech start", acts, vad=True, skip=0)


def _on_speech_ended(s: TurnState, ev: UserSpeechEnded, acts: list[Action]) -> TurnState:
    end = ev.t if ev.end is None else min(float(ev.end), s.now)
    s = replace(s, vad_speech=False, vad_end_t=s.now)
    if s.hop_voice is None or s.last_voice is None:
        s = replace(s, last_voice=end)
    return s


def _on_voice(s: TurnState, ev: VoiceActivity, acts: list[Action]) -> TurnState:
    if ev.speech and ev.early and s.mode is Mode.LISTEN:
        return s  # a silence in the user's turn is not broken by a breath or a click
    if ev.speech:
        run_start = s.hop_run if s.hop_voice and s.hop_run is not None else s.now
        s = replace(s, hop_voice=True, hop_run=run_start)
        if s.mode is Mode.SPEAK and s.barge is None and _voice_active(s):
            s = _onset(s, run_start, "voiced hops", acts, vad=s.vad_speech, skip=len(s.utt.split()))
        return s
    if s.hop_voice and s.hop_run is not None and (s.now - s.hop_run) * 1000 >= s.config.onset_ms:
        s = replace(s, last_voice=s.now)
    return replace(s, hop_voice=False, hop_run=None)


def _on_text(s: TurnState, ev: UserText, acts: list[Action]) -> TurnState:
    text = " ".join(p for p in (ev.stable.strip(), ev.unstable.strip()) if p)
    stable = text if ev.final else ev.stable.strip()
    before = s.turn_words
    if s.mode is Mode.SPEAK and s.barge is None and not s.answered_open and normalize_words(text):
        # words of an utterance whose onset we did not see, or that came after we had given up
        # waiting for them: classify them all the same (a final needs no pause: it decides now)
        s = _onset(s, s.now, "words without a voice onset", acts, vad=True, skip=0, pause=not ev.final)
    s = replace(s, utt=text, utt_stable=stable)
    if s.mode is Mode.LISTEN:
        if ev.final:
            if not normalize_words(" ".join(text.split()[s.skip :])) and not s.turn_words:
                acts.append(Log("no words in the user's speech: nothing to answer"))
            s = _close_utterance(s)
        if s.turn_words != before:
            s = replace(s, eot=None, waiting_logged=False)
        return s
    # SPEAK
    if s.barge is None:  # late words of the utterance being answered: not an interruption
        if ev.final:
            tail = " ".join(text.split()[s.prior_skip :])
            s = replace(s, utt="", utt_stable="", skip=0, answered_open=False, prior_skip=0,
                        prior_done=" ".join(p for p in (s.prior_done, tail) if p),
                        prior_done_words=s.prior_done_words + normalize_words(tail))
        return s
    if ev.final:
        s = replace(s, barge=replace(s.barge, final=True))
    return s


def _on_eot(s: TurnState, ev: EotProbability, acts: list[Action]) -> TurnState:
    if s.mode is not Mode.LISTEN:
        return s
    if ev.text is not None and normalize_words(ev.text) != s.turn_words:
        acts.append(Log(f"stale eot {ev.p:.2f} for {ev.text!r} ignored"))
        return s
    return replace(s, eot=min(1.0, max(0.0, float(ev.p))))


def _on_tick(s: TurnState, ev: Tick, acts: list[Action]) -> TurnState:
    # voiced hops arrive as changes only: a run becomes an onset once it has lasted onset_ms
    if s.mode is Mode.SPEAK and s.barge is None and s.hop_voice and _voice_active(s):
        return _onset(s, s.hop_run, "voiced hops", acts, vad=s.vad_speech, skip=len(s.utt.split()))
    return s


def _on_reply_ready(s: TurnState, ev: ReplyReady, acts: list[Action]) -> TurnState:
    if s.reply is ReplyState.NONE:
        acts.append(Log("a reply arrived with none pending: ignored"))
        return s
    if ev.text.strip():
        return replace(s, reply_ready=True)
    # an empty reply: answering the same words again would give the same nothing
    acts.append(DropReply("the LLM produced an empty reply; the user's turn goes unanswered"))
    if s.barge is not None:  # the user is already saying something new: that stays
        return _to_listen(replace(s, skip=s.barge.skip), keep_user=True, turn_start=s.barge.onset)
    return _to_listen(s, keep_user=False)


def _on_audio_started(s: TurnState, ev: AgentAudioStarted, acts: list[Action]) -> TurnState:
    if s.mode is Mode.SPEAK:
        return replace(s, audio_started=True)
    return s  # e.g. a backchannel playing while the user holds the floor


def _on_audio_finished(s: TurnState, ev: AgentAudioFinished, acts: list[Action]) -> TurnState:
    if s.mode is not Mode.SPEAK:
        return s
    b = s.barge
    if b is None:
        acts.append(Log("agent finished its turn"))
        return _to_listen(s, keep_user=False)
    words = _barge_words(s, b)
    _, other = classify_words(words, s.config)
    if words and other == 0:
        # a backchannel to the turn that just ended is not a turn of its own
        acts.append(Log(f"agent finished its turn; backchannel {' '.join(words)!r} dropped"))
        return _to_listen(s, keep_user=False)
    acts.append(Log("agent finished its turn; the user's speech over its end starts the next turn"))
    return _to_listen(replace(s, skip=b.skip), keep_user=True, turn_start=b.onset)


def _on_words_played(s: TurnState, ev: AgentWordsPlayed, acts: list[Action]) -> TurnState:
    return replace(s, heard=ev.text) if s.mode is Mode.SPEAK else s


_HANDLERS = {
    UserSpeechStarted: _on_speech_started,
    UserSpeechEnded: _on_speech_ended,
    VoiceActivity: _on_voice,
    UserText: _on_text,
    EotProbability: _on_eot,
    Tick: _on_tick,
    ReplyReady: _on_reply_ready,
    AgentAudioStarted: _on_audio_started,
    AgentAudioFinished: _on_audio_finished,
    AgentWordsPlayed: _on_words_played,
}

# -- helpers


def _voice_active(s: TurnState) -> bool:
    """Is the user's voice on now? Voiced hops when fed (runs shorter than onset_ms are clicks),
    else the VAD segment."""
    if s.hop_voice is None:
        return s.vad_speech
    return bool(s.hop_voice) and s.hop_run is not None and (s.now - s.hop_run) * 1000 >= s.config.onset_ms


def _silence_ms(s: TurnState) -> float:
    if _voice_active(s) or s.last_voice is None:
        return 0.0
    return max(0.0, (s.now - s.last_voice) * 1000)


def _close_utterance(s: TurnState) -> TurnState:
    tail = " ".join(s.utt.split()[s.skip :])
    done = " ".join(p for p in (s.done, tail) if p)
    return replace(s, done=done, done_words=s.done_words + normalize_words(tail), utt="", utt_stable="", skip=0)


def _barge_words(s: TurnState, b: Barge) -> tuple[str, ...]:
    text = s.utt if s.config.use_unstable or b.final else s.utt_stable
    return normalize_words(" ".join(text.split()[b.skip :]))


def _onset(s: TurnState, onset: float, why: str, acts: list[Action], vad: bool, skip: int,
           pause: bool = True) -> TurnState:
    b = Barge(onset=onset, paused=pause and s.config.pause_on_onset, skip=skip, vad=vad)
    if b.paused:
        acts.append(PauseSpeaking(f"possible interruption: {why} at {onset:.2f}s"))
    return replace(s, barge=b)


def _to_listen(s: TurnState, keep_user: bool, turn_start: float | None = None) -> TurnState:
    """Back to LISTEN. keep_user: the current utterance (after ``skip``) starts the user's next turn."""
    s = replace(s, mode=Mode.LISTEN, reply=ReplyState.NONE, reply_for=(), reply_ready=False,
                audio_started=False, heard="", barge=None, answered_open=False, eot=None,
                waiting_logged=False, done="", done_words=(), turn_start=turn_start,
                overlapped=keep_user)
    if not keep_user:
        s = replace(s, skip=len(s.utt.split()), turn_start=None)
    return s


def _take_turn(s: TurnState, reason: str, acts: list[Action]) -> TurnState:
    if s.reply is ReplyState.SPECULATIVE:
        acts.append(CommitReply(reason))
    else:
        acts.append(StartReply(speculative=False, reason=reason, text=s.turn_text))
    return replace(
        s, mode=Mode.SPEAK, reply=ReplyState.COMMITTED, reply_since=s.now, audio_started=False, heard="",
        barge=None, answered_open=s.vad_speech or bool(s.utt.strip()), skip=len(s.utt.split()), done="",
        done_words=(), turn_start=None, eot=None, waiting_logged=False, prior_done=s.done,
        prior_done_words=s.done_words, prior_skip=s.skip, overlapped=False,
    )


def _fmt_eot(p: float | None) -> str:
    return "unknown" if p is None else f"{p:.2f}"


# -- decisions


def _decide_listen(s: TurnState, acts: list[Action]) -> TurnState:
    c = s.config
    words = s.turn_words
    if s.reply is ReplyState.SPECULATIVE and words != s.reply_for:
        why = "the user continued" if words else "the transcript is empty"
        acts.append(DropReply(f"speculative reply dropped: {why}"))
        s = replace(s, reply=ReplyState.NONE, reply_for=(), reply_ready=False)
    if not words:
        return s
    if _voice_active(s):
        if (s.reply is ReplyState.NONE and s.eot is not None and s.eot >= c.speculate_speech_eot
                and not (s.overlapped and _no_content(words, c))):
            # the words so far read as a finished turn: start writing the answer while the voice
            # fades (dropped, as any speculation, if the words change)
            acts.append(StartReply(speculative=True, reason=f"likely turn end: eot {s.eot:.2f} while the user speaks",
                                   text=s.turn_text))
            s = replace(s, reply=ReplyState.SPECULATIVE, reply_for=words, reply_ready=False)
        return s
    if s.overlapped and _no_content(words, c):
        # "okay" said over the agent's last words acknowledges that turn, and "stop" asked for
        # silence: neither is a turn to answer
        if not s.utt.strip() and not s.vad_speech:
            acts.append(Log(f"{' '.join(words)!r} said over the agent: not a turn to answer"))
            s = replace(s, done="", done_words=(), overlapped=False, turn_start=None)
        return s
    gap = _silence_ms(s)
    eot = s.eot
    if eot is not None and ((eot >= c.respond_eot and gap >= c.respond_gap_ms)
                            or (eot >= c.confident_eot and gap >= c.confident_gap_ms)):
        return _take_turn(s, f"turn end: eot {eot:.2f} after {gap:.0f} ms of silence", acts)
    if gap >= c.long_gap_ms and (eot is None or eot >= c.unfinished_eot):
        return _take_turn(s, f"turn end: {gap:.0f} ms of silence (eot {_fmt_eot(eot)})", acts)
    if gap >= c.max_wait_ms:
        return _take_turn(s, f"turn end: {gap:.0f} ms of silence, although eot {_fmt_eot(eot)} says unfinished", acts)
    if s.reply is ReplyState.NONE and eot is not None and eot >= c.speculate_eot and gap >= c.speculate_gap_ms:
        acts.append(StartReply(speculative=True, reason=f"likely turn end: eot {eot:.2f} after {gap:.0f} ms", text=s.turn_text))
        return replace(s, reply=ReplyState.SPECULATIVE, reply_for=words, reply_ready=False)
    if gap >= c.long_gap_ms and not s.waiting_logged:
        acts.append(Log(f"waiting: mid-turn pause of {gap:.0f} ms, eot {_fmt_eot(eot)} < {c.unfinished_eot:.2f}"))
        s = replace(s, waiting_logged=True)
    if (
        c.backchannel_after_s > 0
        and s.reply is ReplyState.NONE
        and gap >= c.backchannel_gap_ms
        and (eot is None or eot < c.respond_eot)
        and s.turn_start is not None
        and s.now - max(s.turn_start, s.last_backchannel or s.turn_start) >= c.backchannel_after_s
        and (s.last_backchannel is None or s.last_voice is None or s.last_backchannel < s.last_voice)
    ):
        acts.append(Backchannel(c.backchannel_text, f"the user has held the floor {s.now - s.turn_start:.1f} s; pause of {gap:.0f} ms"))
        s = replace(s, last_backchannel=s.now)
    return s


def _decide_speak(s: TurnState, acts: list[Action]) -> TurnState:
    c = s.config
    b = s.barge
    if b is None:
        if not s.audio_started and (s.now - s.reply_since) * 1000 >= c.reply_timeout_ms:
            acts.append(DropReply(f"no reply audio {c.reply_timeout_ms:.0f} ms after taking the turn"))
            return _to_listen(s, keep_user=False)
        return s
    words = _barge_words(s, b)
    stop, other = classify_words(words, c)
    said = " ".join(words)
    if stop is not None:
        return _stop(s, f"stop phrase {stop!r} in {said!r}", acts)
    if other >= c.interrupt_words:
        return _stop(s, f"interrupted: {other} words that are not backchannel ({said!r})", acts)
    voiced_ms = (s.now - b.onset) * 1000 if _voice_active(s) else 0.0
    if voiced_ms >= c.interrupt_speech_ms and not (words and other == 0):
        return _stop(s, f"the user has spoken for {voiced_ms:.0f} ms" + (f" ({said!r})" if words else " (no words yet)"), acts)
    if words and other == 0 and not b.backchannel:
        if b.paused:
            acts.append(ResumeSpeaking(f"backchannel {said!r}: keep speaking"))
        else:
            acts.append(Log(f"backchannel {said!r}: keep speaking"))
        b = replace(b, paused=False, backchannel=True)
        s = replace(s, barge=b, reply_since=s.now)
    if b.final:
        # the utterance is over and did not interrupt: its words are not a turn
        if b.paused:
            acts.append(ResumeSpeaking(f"not an interruption ({said!r}): keep speaking" if words else "empty transcript: keep speaking"))
        elif not b.backchannel:
            acts.append(Log(f"not an interruption ({said!r})"))
        return replace(s, barge=None, utt="", utt_stable="", skip=0, reply_since=s.now)
    if not normalize_words(" ".join(s.utt.split()[b.skip :])) and not _voice_active(s) and not s.vad_speech:
        # a wordless voice that has ended: give the transcript a moment, then carry on
        since = s.vad_end_t if b.vad and s.vad_end_t is not None else s.last_voice
        if since is None or (s.now - since) * 1000 >= c.noise_grace_ms:
            if b.paused:
                acts.append(ResumeSpeaking(f"no words {c.noise_grace_ms:.0f} ms after the voice ended (a noise): keep speaking"))
            else:
                acts.append(Log("no words: a noise"))
            return replace(s, barge=None, reply_since=s.now)
    return s


def _stop(s: TurnState, reason: str, acts: list[Action]) -> TurnState:
    b = s.barge
    heard = s.heard.strip()
    acts.append(StopSpeaking(reason + ("" if heard else "; nothing was heard, the user's turn goes on"), heard=s.heard))
    s = replace(s, skip=b.skip if b is not None else s.skip)
    onset = b.onset if b is not None else s.now
    if heard:
        return _to_listen(s, keep_user=True, turn_start=onset)
    # the agent's turn vanishes: the words it answered and the new ones make one user turn
    same_utterance = s.answered_open
    s = _to_listen(s, keep_user=True, turn_start=onset)
    return replace(s, done=s.prior_done, done_words=s.prior_done_words, overlapped=False,
                   skip=s.prior_skip if same_utterance else s.skip)
