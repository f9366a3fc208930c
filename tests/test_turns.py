"""Turn-taking core: tables of event sequences in, actions out.

Event timings imitate the real pipeline with its default settings: VAD decides a speech start
192 ms after the voice onset (min_speech_ms 160 + one 32 ms hop) and reports the onset padded by
64 ms; it decides the end 400 ms after the voice stops (min_silence_ms); the recogniser's first
partial comes about 550 ms after the onset and its final about 250 ms after VAD's end; raw VAD hops
(VoiceActivity) are 32 ms.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from orchestration.turns import (
    AgentAudioFinished,
    AgentAudioStarted,
    AgentWordsPlayed,
    Backchannel,
    CommitReply,
    DropReply,
    EotProbability,
    Log,
    Mode,
    PauseSpeaking,
    ReplyReady,
    ResumeSpeaking,
    StartReply,
    StopSpeaking,
    Tick,
    TurnConfig,
    TurnState,
    UserSpeechEnded,
    UserSpeechStarted,
    UserText,
    VoiceActivity,
    classify_words,
    initial_state,
    normalize_words,
    run,
    step,
)

HOP = 0.032
VAD_START_DELAY = 0.192
VAD_END_DELAY = 0.400
PAD = 0.064
FINAL_DELAY = 0.25


def ticks(a: float, b: float, dt: float = 0.05) -> list[Tick]:
    n = int(round((b - a) / dt))
    return [Tick(round(a + i * dt, 4)) for i in range(n + 1)]


def voice(onset: float, end: float, hops: bool) -> list:
    """Raw per-hop VAD decisions for a voice from onset to end (only when hops=True)."""
    if not hops:
        return []
    out, t = [], onset + HOP
    while t <= end + 1e-9:
        out.append(VoiceActivity(round(t, 4), True))
        t += HOP
    out.append(VoiceActivity(round(t, 4), False))
    return out


def utterance(onset: float, end: float, partials=(), final: str | None = None, hops: bool = False) -> list:
    """One user utterance as the pipeline reports it. partials: (t, stable, unstable)."""
    evs = [UserSpeechStarted(round(onset + VAD_START_DELAY, 4), onset=round(onset - PAD, 4))]
    evs += [UserText(t, stable, unstable) for t, stable, unstable in partials]
    evs.append(UserSpeechEnded(round(end + VAD_END_DELAY, 4), end=round(end + PAD, 4)))
    if final is not None:
        evs.append(UserText(round(end + VAD_END_DELAY + FINAL_DELAY, 4), final, final=True))
    return evs + voice(onset, end, hops)


# the eot values in these tables are written against these thresholds; the shipped defaults are
# calibrated to the dialogue model's sentence-end reading and may move without changing the policy
TABLE_THRESHOLDS = dict(respond_eot=0.5, unfinished_eot=0.15, speculate_eot=0.8, speculate_gap_ms=100.0, long_gap_ms=800.0,
                        speculate_speech_eot=1.0, confident_eot=1.0, confident_gap_ms=0.0, onset_ms=60.0)


def play(events, **cfg):
    """Run time-sorted events (stable for equal times); return (state, [(t, action)])."""
    state, trace = run(sorted(events, key=lambda e: e.t), TurnConfig(**{**TABLE_THRESHOLDS, **cfg}))
    return state, [(ev.t, a) for ev, acts in trace for a in acts]


def names(acts) -> list[str]:
    return [type(a).__name__ for _, a in acts if not isinstance(a, Log)]


def first(acts, kind):
    return next(((t, a) for t, a in acts if isinstance(a, kind)), (None, None))


# the agent is speaking: a question, answered, its reply playing from t=2.0
SPEAKING = (
    utterance(0.0, 1.0, [(0.55, "", "Tell me"), (0.95, "Tell me", "a story")], "Tell me a story.")
    + [EotProbability(1.7, 0.9), ReplyReady(1.85, "Once upon a time,"), AgentAudioStarted(2.0),
       AgentWordsPlayed(2.5, "Once upon"), AgentWordsPlayed(2.9, "Once upon a time,")]
    + ticks(1.0, 2.9)
)


def speaking_state(**cfg) -> TurnState:
    state, acts = play(SPEAKING, **cfg)
    assert state.mode is Mode.SPEAK and state.audio_started, names(acts)
    return state


def after(state: TurnState, events):
    s, trace = run(sorted(events, key=lambda e: e.t), state=state)
    return s, [(ev.t, a) for ev, acts in trace for a in acts]


# --------------------------------------------------------------------------------- LISTEN table

LISTEN_CASES = [
    dict(
        id="respond: eot high after VAD end",
        events=utterance(0.0, 1.2, [(0.55, "", "What time"), (0.95, "What time", "is it")], "What time is it?")
        + [EotProbability(1.9, 0.92)] + ticks(1.2, 3.0),
        expect=["StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[0] == 1.9 and not first(acts, StartReply)[1].speculative
        and first(acts, StartReply)[1].text == "What time is it?",
    ),
    dict(
        id="respond: speculative on hops, committed at the short gap",
        events=utterance(0.0, 1.2, [(0.55, "", "What time"), (1.25, "What time", "is it")], "What time is it?", hops=True)
        + [EotProbability(1.3, 0.9)] + ticks(1.2, 3.0, 0.02),
        expect=["StartReply", "CommitReply"],
        mode=Mode.SPEAK,
        # voice ended at the first silent hop (1.2 + 32 ms); committed 200 ms later, long before VAD ends
        check=lambda acts: first(acts, StartReply)[1].speculative and first(acts, CommitReply)[0] == pytest.approx(1.44, abs=0.021),
    ),
    dict(
        id="speculative while the voice is still on, committed at the confident gap",
        # the partial already reads as a finished question while the last word fades out
        events=utterance(0.0, 1.2, [(0.55, "", "What time"), (1.0, "What time", "is it")], "What time is it?", hops=True)
        + [EotProbability(1.05, 0.9)] + ticks(1.0, 3.0, 0.02),
        cfg=dict(speculate_speech_eot=0.5, confident_eot=0.85, confident_gap_ms=100.0),
        expect=["StartReply", "CommitReply"],
        mode=Mode.SPEAK,
        # started before the voice ended (1.2 + 32 ms); committed 100 ms after it, not 200
        check=lambda acts: first(acts, StartReply)[0] == 1.05 and first(acts, StartReply)[1].speculative
        and first(acts, CommitReply)[0] == pytest.approx(1.34, abs=0.021),
    ),
    dict(
        id="a moderate eot is not confident: the ordinary gap applies",
        events=utterance(0.0, 1.2, [(0.55, "", "What time"), (1.0, "What time", "is it")], "What time is it?", hops=True)
        + [EotProbability(1.05, 0.6)] + ticks(1.0, 3.0, 0.02),
        cfg=dict(respond_eot=0.5, speculate_speech_eot=0.7, confident_eot=0.85, confident_gap_ms=100.0),
        expect=["StartReply"],
        mode=Mode.SPEAK,
        # below speculate_speech_eot (and speculate_eot): nothing while voiced; taken after
        # respond_gap_ms (200), not confident_gap_ms
        check=lambda acts: not first(acts, StartReply)[1].speculative
        and first(acts, StartReply)[0] == pytest.approx(1.42, abs=0.021),
    ),
    dict(
        id="wait: mid-turn pause with low eot, then respond to the whole turn",
        events=utterance(0.0, 1.5, [(0.55, "", "I'd like to"), (0.95, "I'd like to", "book a table")], "I'd like to book a table for")
        + [EotProbability(2.2, 0.03)]
        + utterance(2.4, 3.8, [(2.95, "", "two people"), (3.35, "two people", "tomorrow")], "two people tomorrow evening.")
        + [EotProbability(4.5, 0.88)] + ticks(1.5, 5.0),
        expect=["StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[0] == 4.5
        and first(acts, StartReply)[1].text == "I'd like to book a table for two people tomorrow evening."
        and any(isinstance(a, Log) and a.reason.startswith("waiting") for _, a in acts),
    ),
    dict(
        id="speculative start, dropped when the user continues",
        events=utterance(0.0, 1.2, [(0.55, "", "Book a table")], "Book a table for two.")
        + [EotProbability(1.9, 0.85)]
        + utterance(1.75, 3.0, [(2.3, "", "people"), (2.7, "people", "tonight")], "people tonight.")
        + [EotProbability(3.7, 0.9)] + ticks(1.2, 4.0),
        cfg=dict(respond_eot=0.9),
        expect=["StartReply", "DropReply", "StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[1].speculative and first(acts, DropReply)[0] == 2.3
        and "continued" in first(acts, DropReply)[1].reason,
    ),
    dict(
        id="speculative reply survives a cough (no new words), then is committed",
        events=utterance(0.0, 1.2, [(0.55, "", "Is it raining")], "Is it raining?")
        + [EotProbability(1.7, 0.85)]
        + utterance(1.75, 1.95, [], None) + ticks(1.2, 4.0),
        cfg=dict(respond_eot=0.9),
        expect=["StartReply", "CommitReply"],
        mode=Mode.SPEAK,
        # the cough's VAD segment ends at 2.35 (end 2.014): 800 ms of silence after it
        check=lambda acts: first(acts, CommitReply)[0] == pytest.approx(2.85, abs=0.051),
    ),
    dict(
        id="no eot: respond after the long gap",
        events=utterance(0.0, 1.0, [(0.55, "", "Hello there")], "Hello there.") + ticks(1.0, 3.0),
        expect=["StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[0] == pytest.approx(1.0 + PAD + 0.8, abs=0.051),
    ),
    dict(
        id="unfinished eot: wait past the long gap, answer at max_wait",
        events=utterance(0.0, 1.0, [(0.55, "", "Can you tell me about")], "Can you tell me about")
        + [EotProbability(1.7, 0.02)] + ticks(1.0, 5.0),
        expect=["StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[0] == pytest.approx(1.0 + PAD + 2.5, abs=0.051),
    ),
    dict(
        id="empty transcript (a cough): never answered",
        events=utterance(0.0, 0.3, [], None) + ticks(0.0, 6.0),
        expect=[],
        mode=Mode.LISTEN,
    ),
    dict(
        id="final without words: never answered",
        events=utterance(0.0, 0.3, [(0.5, "", "")], "...") + ticks(0.0, 6.0),
        expect=[],
        mode=Mode.LISTEN,
        check=lambda acts: any(isinstance(a, Log) and "no words" in a.reason for _, a in acts),
    ),
    dict(
        id="stale eot for an older prefix is ignored",
        events=utterance(0.0, 1.5, [(0.55, "", "Book a table"), (1.2, "Book a table", "for")], "Book a table for")
        + [EotProbability(2.2, 0.95, text="Book a table")] + ticks(1.5, 2.3),
        expect=[],
        mode=Mode.LISTEN,
        check=lambda acts: any(isinstance(a, Log) and "stale" in a.reason for _, a in acts),
    ),
    dict(
        id="agent backchannels in a long monologue's pause when enabled",
        events=utterance(0.0, 9.0, [(0.55, "", "So yesterday"), (8.0, "So yesterday I went", "to the")], "So yesterday I went to the market and")
        + [EotProbability(9.7, 0.05)] + ticks(9.0, 10.0),
        cfg=dict(backchannel_after_s=5.0),
        expect=["Backchannel"],
        mode=Mode.LISTEN,
        check=lambda acts: first(acts, Backchannel)[0] == 9.4,
    ),
    dict(
        id="empty reply: dropped, the turn is not retried",
        events=utterance(0.0, 1.0, [(0.55, "", "Hi")], "Hi.") + [EotProbability(1.7, 0.9), ReplyReady(1.9, "")] + ticks(1.0, 6.0),
        expect=["StartReply", "DropReply"],
        mode=Mode.LISTEN,
    ),
    dict(
        id="reply never plays: dropped after the timeout",
        events=utterance(0.0, 1.0, [(0.55, "", "Hi")], "Hi.") + [EotProbability(1.7, 0.9)] + ticks(1.0, 7.0),
        expect=["StartReply", "DropReply"],
        mode=Mode.LISTEN,
        check=lambda acts: first(acts, DropReply)[0] == pytest.approx(6.7, abs=0.051),
    ),
]


@pytest.mark.parametrize("case", LISTEN_CASES, ids=[c["id"] for c in LISTEN_CASES])
def test_listen(case):
    state, acts = play(case["events"], **case.get("cfg", {}))
    assert names(acts) == case["expect"], [(t, a) for t, a in acts]
    assert state.mode is case["mode"]
    if "check" in case:
        assert case["check"](acts), [(t, a) for t, a in acts]


# ---------------------------------------------------------------------------------- SPEAK table

SPEAK_CASES = [
    dict(
        id="backchannel: pause at onset, resume on 'uh-huh'",
        events=utterance(3.0, 3.4, [(3.55, "", "Uh-huh.")], "Uh-huh.") + ticks(3.0, 5.0),
        expect=["PauseSpeaking", "ResumeSpeaking"],
        mode=Mode.SPEAK,
    ),
    *[
        dict(
            id=f"backchannel {word!r} keeps the agent speaking",
            events=utterance(3.0, 3.4, [(3.55, "", word)], word) + ticks(3.0, 5.0),
            expect=["PauseSpeaking", "ResumeSpeaking"],
            mode=Mode.SPEAK,
        )
        for word in ["Yeah.", "Right.", "Okay.", "Mm-hmm.", "Sure.", "I see.", "Yeah, yeah.", "OK, right."]
    ],
    dict(
        id="real interruption stops on two words",
        events=utterance(3.0, 4.5, [(3.55, "", "What about"), (3.95, "What about", "Tuesday")], "What about Tuesday instead?")
        + ticks(3.0, 6.0),
        expect=["PauseSpeaking", "StopSpeaking", "StartReply"],
        mode=Mode.SPEAK,
        # the user's words become the next turn (no eot fed here: answered after the long gap)
        check=lambda acts: first(acts, StopSpeaking)[0] == 3.55 and first(acts, StopSpeaking)[1].heard == "Once upon a time,"
        and first(acts, StartReply)[1].text == "What about Tuesday instead?",
    ),
    dict(
        id="stop phrase stops on one word",
        events=utterance(3.0, 3.3, [(3.55, "", "Stop.")], "Stop.") + ticks(3.0, 5.0),
        expect=["PauseSpeaking", "StopSpeaking"],
        mode=Mode.LISTEN,
    ),
    dict(
        id="'hold on' after 'yeah' stops (and is not answered: it only asked for silence)",
        events=utterance(3.0, 4.0, [(3.55, "", "Yeah"), (3.95, "Yeah", "hold on")], "Yeah, hold on.") + ticks(3.0, 7.0),
        expect=["PauseSpeaking", "ResumeSpeaking", "StopSpeaking"],
        mode=Mode.LISTEN,
        check=lambda acts: any(isinstance(a, Log) and "not a turn" in a.reason for _, a in acts),
    ),
    dict(
        id="cough: no words, resumed after the grace window",
        events=utterance(3.0, 3.25, [], None) + ticks(3.0, 5.0),
        expect=["PauseSpeaking", "ResumeSpeaking"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, ResumeSpeaking)[0] == pytest.approx(3.25 + VAD_END_DELAY + 0.3, abs=0.051),
    ),
    dict(
        id="long speech with no words yet stops",
        events=utterance(3.0, 5.0, [], None) + ticks(3.0, 7.0),
        expect=["PauseSpeaking", "StopSpeaking"],
        mode=Mode.LISTEN,
        check=lambda acts: first(acts, StopSpeaking)[0] == pytest.approx(3.0 - PAD + 1.0, abs=0.051),
    ),
    dict(
        id="one real word is not enough: resumed at the final",
        events=utterance(3.0, 3.3, [(3.55, "", "Nice")], "Nice.") + ticks(3.0, 5.0),
        expect=["PauseSpeaking", "ResumeSpeaking"],
        mode=Mode.SPEAK,
    ),
    dict(
        id="no pause at onset when disabled: a backchannel changes nothing",
        events=utterance(3.0, 3.4, [(3.55, "", "Uh-huh.")], "Uh-huh.") + ticks(3.0, 5.0),
        cfg=dict(pause_on_onset=False),
        expect=[],
        mode=Mode.SPEAK,
    ),
    dict(
        id="no pause at onset when disabled: real words still stop",
        events=utterance(3.0, 4.0, [(3.55, "", "Wait a second")], "Wait a second.") + ticks(3.0, 6.0),
        cfg=dict(pause_on_onset=False),
        expect=["StopSpeaking", "StartReply"],
        mode=Mode.SPEAK,
    ),
    dict(
        id="stable text only (use_unstable off): the stop waits for stable words",
        events=utterance(3.0, 4.5, [(3.55, "", "What about"), (3.95, "What about", "Tuesday")], "What about Tuesday?") + ticks(3.0, 5.0),
        cfg=dict(use_unstable=False),
        expect=["PauseSpeaking", "StopSpeaking"],
        mode=Mode.LISTEN,
        check=lambda acts: first(acts, StopSpeaking)[0] == 3.95,
    ),
    dict(
        id="a click (one voiced hop) does not pause",
        events=voice(3.0, 3.05, True) + ticks(3.0, 4.0),
        expect=[],
        mode=Mode.SPEAK,
    ),
    dict(
        id="voiced hops that VAD never confirms: paused, resumed after the grace window",
        events=voice(3.0, 3.15, True) + ticks(3.0, 4.0, 0.02),
        expect=["PauseSpeaking", "ResumeSpeaking"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, PauseSpeaking)[0] == 3.096 and first(acts, ResumeSpeaking)[0] == pytest.approx(3.46, abs=0.021),
    ),
    dict(
        id="agent finished -> LISTEN",
        events=[AgentWordsPlayed(4.0, "Once upon a time, there was a dragon."), AgentAudioFinished(4.2)] + ticks(4.2, 7.0),
        expect=[],
        mode=Mode.LISTEN,
        check=lambda acts: any(isinstance(a, Log) and "finished" in a.reason for _, a in acts),
    ),
    dict(
        id="a backchannel over the agent's last words is not answered",
        events=utterance(3.0, 3.4, [(3.55, "", "Okay.")], "Okay.") + [AgentAudioFinished(3.5)] + ticks(3.0, 7.0),
        expect=["PauseSpeaking"],
        mode=Mode.LISTEN,
        check=lambda acts: any(isinstance(a, Log) and "not a turn" in a.reason for _, a in acts),
    ),
    dict(
        id="a question started over the agent's last words is answered",
        events=[AgentAudioFinished(3.3)]
        + utterance(3.0, 4.2, [(3.55, "", "And then"), (3.95, "And then", "what")], "And then what happened?")
        + [EotProbability(4.9, 0.9)] + ticks(3.0, 6.0),
        expect=["PauseSpeaking", "StartReply"],
        mode=Mode.SPEAK,
        check=lambda acts: first(acts, StartReply)[1].text == "And then what happened?",
    ),
]


@pytest.mark.parametrize("case", SPEAK_CASES, ids=[c["id"] for c in SPEAK_CASES])
def test_speak(case):
    state, acts = after(speaking_state(**case.get("cfg", {})), case["events"])
    assert names(acts) == case["expect"], [(t, a) for t, a in acts]
    assert state.mode is case["mode"]
    if "check" in case:
        assert case["check"](acts), [(t, a) for t, a in acts]


def test_interruption_becomes_the_next_user_turn():
    s, acts = after(speaking_state(), utterance(3.0, 4.5, [(3.55, "", "What about"), (3.95, "What about", "Tuesday")],
                                                "What about Tuesday instead?") + [EotProbability(5.2, 0.9)] + ticks(3.0, 6.0))
    assert names(acts) == ["PauseSpeaking", "StopSpeaking", "StartReply"]
    assert first(acts, StartReply)[1].text == "What about Tuesday instead?"
    assert s.mode is Mode.SPEAK


def test_late_words_of_the_answered_utterance_are_not_a_barge_in():
    # committed on 200 ms of hop silence, before VAD's end and the final: the final's extra word
    # belongs to the turn being answered
    evs = utterance(0.0, 1.2, [(0.55, "", "What time"), (1.25, "What time", "is")], "What time is it?", hops=True)
    evs += [EotProbability(1.3, 0.9)] + ticks(1.2, 3.0, 0.02)
    s, acts = play(evs)
    assert names(acts) == ["StartReply", "CommitReply"]
    assert s.mode is Mode.SPEAK and s.barge is None and not s.answered_open


def test_user_resuming_after_an_early_commit_is_a_barge_in():
    # committed 200 ms into a pause, but the user goes on in the same VAD segment
    evs = utterance(0.0, 2.6, [(0.55, "", "Book a table"), (1.25, "Book a table", "for two"),
                               (2.1, "Book a table for two", "people please")], "Book a table for two people please.")
    evs = [e for e in evs if not isinstance(e, VoiceActivity)]
    evs += voice(0.0, 1.2, True) + voice(1.5, 2.6, True)  # a 300 ms pause inside one VAD segment
    evs += [EotProbability(1.3, 0.9)] + ticks(1.2, 4.0, 0.02)
    s, acts = play(evs)
    assert names(acts)[:3] == ["StartReply", "CommitReply", "PauseSpeaking"]
    t_pause, _ = first(acts, PauseSpeaking)
    assert t_pause == pytest.approx(1.5 + HOP + 0.064, abs=0.001)  # the third voiced hop
    t_stop, stop = first(acts, StopSpeaking)
    assert t_stop == 2.1 and "people please" in stop.reason
    # nothing of the reply was heard: the agent's turn vanishes and the user's turn goes on
    assert "nothing was heard" in stop.reason and stop.heard == ""
    replies = [a for _, a in acts if isinstance(a, StartReply)]
    assert len(replies) == 2 and replies[1].text == "Book a table for two people please."


def test_user_keeps_talking_for_minutes():
    minutes = 3
    evs = [UserSpeechStarted(0.192, onset=0.0)]
    words = []
    t = 0.6
    while t < minutes * 60:
        words.append(f"word{len(words)}")
        evs.append(UserText(round(t, 3), " ".join(words[-40:-2]), " ".join(words[-2:])))
        if len(words) % 40 == 0:  # a long monologue's window is cut: a "continued" final
            evs.append(UserText(round(t + 0.01, 3), " ".join(words[-40:]), final=True))
            words_in_finals = len(words)
        t += 0.4
    evs += ticks(0.0, minutes * 60, 0.1)
    t0 = time.perf_counter()
    s, acts = play(evs)
    elapsed = time.perf_counter() - t0
    assert names(acts) == [] and s.mode is Mode.LISTEN
    assert len(s.done_words) == words_in_finals and s.vad_speech
    assert elapsed < 5.0, f"{len(evs)} events took {elapsed:.1f} s"
    # and when the user finally stops, the whole monologue is answered
    s, acts2 = after(s, [UserSpeechEnded(minutes * 60 + 0.5, end=minutes * 60 + 0.1),
                         EotProbability(minutes * 60 + 0.6, 0.9), Tick(minutes * 60 + 0.7)])
    assert names(acts2) == ["StartReply"] and first(acts2, StartReply)[1].text.startswith("word0 word1")


# ------------------------------------------------------------------------- barge-in latency table

BARGE_CASES = [
    # (case, voice seconds, partials as (delay from onset, stable, unstable), final text, should stop)
    ("stop phrase", 0.4, [(0.55, "", "Stop.")], "Stop.", True),
    ("stop phrase, slower ASR", 0.4, [(0.85, "", "Stop please.")], "Stop, please.", True),
    ("real words", 1.5, [(0.55, "", "Actually I"), (0.95, "Actually I", "want")], "Actually I want Greece.", True),
    ("speech, words late", 2.0, [(1.3, "", "So what")], "So what about it?", True),
    ("backchannel", 0.4, [(0.55, "", "Uh-huh.")], "Uh-huh.", False),
    ("backchannel x2", 0.8, [(0.55, "", "Yeah,"), (0.95, "Yeah,", "yeah.")], "Yeah, yeah.", False),
    ("cough (no words)", 0.25, [], None, False),
    ("exclamation 'oh'", 0.3, [(0.55, "", "Oh.")], "Oh.", False),
    ("one real word", 0.3, [(0.55, "", "Nice.")], "Nice.", False),
]


def barge_outcome(case, hops: bool):
    name, dur, partials, final, should_stop = case
    onset = 3.0
    evs = utterance(onset, onset + dur, [(round(onset + d, 4), st, un) for d, st, un in partials], final, hops=hops)
    evs += ticks(onset, onset + 4.0, 0.01)
    s, acts = after(speaking_state(), evs)
    t_pause, _ = first(acts, PauseSpeaking)
    t_stop, _ = first(acts, StopSpeaking)
    t_resume, _ = first(acts, ResumeSpeaking)
    return dict(case=name, path="VAD + hops" if hops else "VAD only", should_stop=should_stop,
                pause_ms=None if t_pause is None else round((t_pause - onset) * 1000),
                stop_ms=None if t_stop is None else round((t_stop - onset) * 1000),
                resume_ms=None if t_resume is None else round((t_resume - onset) * 1000),
                silent_from_ms=None if t_stop is None else round((min(t_pause or t_stop, t_stop) - onset) * 1000))


def test_barge_in_latency_table(capsys):
    """How each case is handled, in ms from the voice onset. With pause-at-onset the agent goes
    silent at the pause, so for a real interruption the audible stop time is the pause time."""
    rows = [barge_outcome(c, hops) for hops in (False, True) for c in BARGE_CASES]
    with capsys.disabled():
        print("\n| case | onset signal | pause | stop decided | resumed | agent silent from |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            cell = lambda v: "-" if v is None else f"{v} ms"
            print(f"| {r['case']} | {r['path']} | {cell(r['pause_ms'])} | {cell(r['stop_ms'])} | {cell(r['resume_ms'])} | {cell(r['silent_from_ms'])} |")
    for r in rows:
        if r["should_stop"]:
            assert r["stop_ms"] is not None, r
            limit = 100 if r["path"] == "VAD + hops" else VAD_START_DELAY * 1000 + 1
            assert r["silent_from_ms"] <= limit, r
        else:
            assert r["stop_ms"] is None and r["resume_ms"] is not None, r
            assert r["resume_ms"] <= 1200, r  # a false alarm pauses the agent for at most ~1 s


# ------------------------------------------------------------------------------ words and config


@pytest.mark.parametrize(
    "text,stop,other",
    [
        ("Uh-huh.", None, 0), ("uh huh", None, 0), ("Mm-hmm.", None, 0), ("Yeah, yeah, right.", None, 0),
        ("I see.", None, 0), ("OK.", None, 0), ("Okay, sure.", None, 0), ("Stop!", "stop", 1),
        ("No, no, no.", "no no", 3), ("Hold on a second", "hold on", 3), ("What about Tuesday", "what", 3),
        ("Actually I prefer Greece", None, 4), ("yeah but", None, 1), ("", None, 0),
        # what Whisper tiny.en wrote for synthesised "uh-huh" and "mm-hmm"
        ("Uh-uh.", None, 0), ("M-M-M.", None, 0), ("MMMMMMM", None, 0), ("AHHH", None, 0), ("Mm.", None, 0),
        ("Ugh.", None, 0), ("Haha.", None, 0),
    ],
)
def test_classify_words(text, stop, other):
    assert classify_words(normalize_words(text), TurnConfig()) == (stop, other)


def test_normalize_words():
    assert normalize_words("Uh-huh. I’m  OK!") == ("uh", "huh", "i'm", "ok")
    assert normalize_words("...") == ()
    assert normalize_words("MMMM, Ahhhh! Soooo good") == ("mm", "ahh", "soo", "good")


def test_config_validation_and_toml_section():
    with pytest.raises(ValueError, match="long_gap_ms"):
        TurnConfig(respond_gap_ms=900, long_gap_ms=800)
    with pytest.raises(ValueError, match="unfinished_eot"):
        TurnConfig(unfinished_eot=0.6, respond_eot=0.5)
    with pytest.raises(ValueError, match="at least one word"):
        TurnConfig(backchannels=("yeah", "..."))
    from agent.config import load_config
    from streaming.errors import ConfigError

    cfg = load_config(overrides={"turns.respond_gap_ms": 150, "turns.backchannels": ["yeah", "uh-huh"]},
                      use_user_default=False, environ={})
    assert cfg.turns.respond_gap_ms == 150 and cfg.turns.backchannels == ("yeah", "uh-huh")
    with pytest.raises(ConfigError, match="turns.respond_eot"):
        load_config(overrides={"turns.respond_eot": 1.5}, use_user_default=False, environ={})
    with pytest.raises(ConfigError, match="unfinished_eot"):
        load_config(overrides={"turns.unfinished_eot": 0.9}, use_user_default=False, environ={})


def test_step_contract():
    with pytest.raises(TypeError):
        step(None, Tick(0.0))
    with pytest.raises(TypeError):
        step(initial_state(), object())
    s0 = initial_state()
    s1, acts = step(s0, UserSpeechStarted(1.0))
    assert s0.vad_speech is False and s1.vad_speech is True and acts == []  # the old state is untouched
    s2, _ = step(s1, Tick(0.5))  # a late event never moves time backwards
    assert s2.now == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s2.mode = Mode.SPEAK


def test_replay_is_deterministic():
    evs = sorted(SPEAKING + utterance(3.0, 4.5, [(3.55, "", "What about")], "What about it?"), key=lambda e: e.t)
    assert run(evs)[1] == run(evs)[1]
    assert run(evs)[0] == run(evs)[0]


def test_an_early_onset_pauses_the_agent_but_does_not_break_a_listening_silence():
    """WebRTC-only onsets (VoiceActivity early=True): over the agent's voice they pause it at once;
    in the user's turn-end silence they are ignored, so a breath does not restart the gap."""
    # SPEAK: an early onset is an onset
    state = speaking_state(onset_ms=30.0)
    s, acts = after(state, [VoiceActivity(3.0, True, early=True)] + ticks(3.0, 3.1, 0.02))
    assert names(acts)[:1] == ["PauseSpeaking"] and first(acts, PauseSpeaking)[0] <= 3.04
    # LISTEN: 100 ms into the silence after "What time is it", a click; the turn is still taken
    # 200 ms after the voice ended, as without it
    evs = utterance(0.0, 1.2, [(0.55, "", "What time"), (1.0, "What time", "is it")], "What time is it?", hops=True)
    evs += [EotProbability(1.05, 0.6), VoiceActivity(1.33, True, early=True), VoiceActivity(1.45, False)]
    _, acts = play(evs + ticks(1.0, 3.0, 0.02), respond_eot=0.5)
    assert first(acts, StartReply)[0] == pytest.approx(1.42, abs=0.021), acts
