"""The full-duplex conversation: playback bookkeeping, clause cutting, and real conversations
through `duplex converse` with the real models (Whisper, SmolLM2, Piper) at real-time pace."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestration.coordinator import split_clause
from orchestration.playback import Playback
from test_cli import assert_one_line_error, duplex

SCENARIOS = Path(__file__).resolve().parent.parent / "agent" / "data" / "scenarios"


def test_playback_knows_what_was_heard():
    pb = Playback()
    pb.enqueue(1, "Hello there.", np.ones(1600, np.float32))
    pb.enqueue(1, "one two three four", np.ones(3200, np.float32))
    pb.finish(1)
    assert pb.pull(320, 0.0).any()  # audio flows at once
    pb.pull(1280, 0.02)  # the first clause is played out
    assert pb.heard(1) == "Hello there."
    pb.pull(1600, 0.1)  # half of the second
    assert pb.heard(1) == "Hello there. one two"
    pb.pause()
    assert not pb.pull(320, 0.2).any()  # held: silence, nothing lost
    pb.resume()
    heard = pb.clear(0.3)
    assert heard == "Hello there. one two"
    assert not pb.pull(320, 0.32).any()
    kinds = [e.kind for e in pb.events()]
    assert kinds[0] == "start" and kinds[-1] == "stopped" and "end" not in kinds


def test_playback_reports_the_end_of_a_reply():
    pb = Playback()
    pb.enqueue(7, "Short.", np.ones(640, np.float32))
    pb.finish(7)
    pb.pull(320, 1.0)
    pb.pull(320, 1.02)
    pb.pull(320, 1.04)
    ev = pb.events()
    assert [e.kind for e in ev] == ["start", "words", "end"]
    assert ev[0].t == 1.0 and abs(ev[-1].t - 1.04) < 1e-9 and ev[-1].text == "Short."


@pytest.mark.parametrize(
    "buffer, first, cut",
    [
        ("Sure, I can help", True, ("Sure,", "I can help")),
        ("The weather today is sunny and", True, ("The weather today", " is sunny and")),
        ("It is", True, None),
        ("It is sunny today. Take a", False, ("It is sunny today.", "Take a")),
        ("Ok. More", False, None),  # later clauses need two words before a cut
    ],
)
def test_split_clause(buffer, first, cut):
    assert split_clause(buffer, first, 12) == cut


def _events(stdout: str) -> tuple[list[dict], list[dict], dict]:
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    events = [x for x in lines if "kind" in x]
    outcomes = [x["outcome"] for x in lines if "outcome" in x]
    return events, outcomes, lines[-1]


def test_converse_answers_then_yields_to_a_barge_in(duplex_bin, tmp_path):
    """A question, the agent answers with speech; "Stop, please." over it stops it, and the agent's
    turn in the LLM is cut to what was heard."""
    out = tmp_path / "conv.wav"
    r = duplex(duplex_bin, "converse", "--script", SCENARIOS / "stop_please.json", "--json", "--no-echo",
               "--out", out, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    events, outcomes, last = _events(r.stdout)
    assert set(last["summary"]) >= {"response_latency_ms", "premature_response_rate", "bargein_stop_ms",
                                    "missed_stop_rate", "false_stop_rate", "cpu_percent"}
    kinds = [e["kind"] for e in events]
    assert "final" in kinds and "agent_text" in kinds and "agent_audio_start" in kinds
    respond, stop = outcomes
    assert respond["ok"] and respond["latency_ms"] > 0, respond
    assert stop["ok"] and stop["agent_was_speaking"], stop
    stopped = next(e for e in events if e["kind"] == "agent_stopped")
    assert stopped["t"] > stop["start"]
    # the stereo log: the user on the left, the agent on the right, and the agent silent soon after the stop
    audio, rate = sf.read(out)
    assert rate == 16000 and audio.shape[1] == 2
    agent = audio[:, 1]
    assert np.abs(agent).max() > 0.05
    # it yielded: silence from the stop until the agent's next reply, if any (it may answer the
    # interruption itself, as a new turn)
    nxt = next((e["t"] for e in events if e["kind"] == "agent_audio_start" and e["t"] > stopped["t"]), stopped["t"] + 2.0)
    assert nxt - stopped["t"] > 0.1
    after = agent[int((stopped["t"] + 0.04) * rate) : int((nxt - 0.04) * rate)]
    assert np.abs(after).max() < 1e-6


def test_talk_names_a_missing_device(duplex_bin):
    r = duplex(duplex_bin, "talk", "--input", "no-such-microphone")
    assert_one_line_error(r, "no-such-microphone", "converse")


def test_converse_rejects_a_bad_scenario(duplex_bin, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "events": []}')
    r = duplex(duplex_bin, "converse", "--script", bad)
    assert_one_line_error(r, "bad.json")


def test_a_stop_belongs_to_the_clip_that_caused_it():
    """An 'uh-huh' then 'hold on, stop' over one agent turn: the stop that came after the second
    clip began is the second clip's (a met stop), not a false stop of the backchannel."""
    from agent.conversation import ClipRun, judge

    class User:  # what judge reads of a SimulatedUser
        runs = [ClipRun(0, "respond", "q", 0.5, 3.4), ClipRun(1, "continue", "uh-huh", 4.8, 5.5, True),
                ClipRun(2, "stop", "hold on, stop", 7.3, 9.7, True)]
        agent_track = [np.ones(int(3.8 * 16000), np.float32) * 0, np.ones(int(4.5 * 16000), np.float32)]

    events = [{"t": 3.8, "kind": "agent_audio_start", "reply": 1},
              {"t": 7.45, "kind": "decision", "action": "PauseSpeaking"},
              {"t": 8.2, "kind": "agent_stopped", "reply": 1}]
    out = judge(User(), events)
    assert [o["ok"] for o in out] == [True, True, True], out
    assert out[1]["false_stop"] is False and out[2]["missed"] is False
    assert out[2]["stop_ms"] == pytest.approx(920, abs=1)  # the last sample heard up to the stop (8.2 s) + 20 ms


def test_a_clip_after_agent_start_is_anchored_to_the_turn_in_progress():
    """The second clip of a turn ('after': 'agent_start', offset 3.5) starts 3.5 s into the agent
    turn that was playing when the first clip ended, not at the next agent turn."""
    from agent.conversation import SimulatedUser
    from orchestration.scenario import clip_start

    u = SimulatedUser.__new__(SimulatedUser)
    u.agent_starts, u.agent_ends = [3.8], []
    clip = type("C", (), {"at": None, "after": "agent_start", "offset": 3.5, "timeout": 15.0})()
    assert clip_start(clip, 5.5, u.agent_turns(), now=6.0) == pytest.approx(7.3)
    u.agent_ends = [18.0]
    assert u.agent_turns() == [(3.8, 18.0)]


def test_converse_in_interpreter_mode_speaks_the_translation_of_each_utterance(duplex_bin, tmp_path):
    """--mode interpreter: the English question is not answered but translated into Spanish
    (Apertium) and spoken after it ends; nothing comes from the dialogue LLM."""
    out = tmp_path / "interp.wav"
    r = duplex(duplex_bin, "converse", "--script", SCENARIOS / "respond_museum.json", "--json", "--no-echo",
               "--mode", "interpreter", "--target", "es", "--source", "en", "--out", out, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    events, outcomes, last = _events(r.stdout)
    translations = [e for e in events if e["kind"] == "translation"]
    assert translations and any("museo" in e["text"].lower() for e in translations), translations
    assert not [e for e in events if e["kind"] in ("agent_text", "decision")]  # no dialogue
    (clip,) = outcomes
    assert clip["ok"] and 0 < clip["latency_ms"] < 5000, clip
    start = next(e["t"] for e in events if e["kind"] == "agent_audio_start")
    audio, rate = sf.read(out)
    assert np.abs(audio[int(start * rate):, 1]).max() > 0.05  # the translation is heard
    # an unsupported pair is one line
    r = duplex(duplex_bin, "converse", "--script", SCENARIOS / "respond_museum.json", "--mode", "interpreter",
               "--target", "ja", "--source", "en", timeout=120)
    assert_one_line_error(r, "ja")
