"""Conversation scenarios: the loader's errors, the scheduling rule, and the shipped set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestration.scenario import (
    SCENARIO_VERSION,
    ScenarioError,
    UserClip,
    clip_start,
    load_scenario,
    load_scenarios,
    scenario_paths,
)
from orchestration.turns import normalize_words

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "agent" / "data" / "scenarios"


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "clips").mkdir()
    write_wav(tmp_path / "clips" / "q.wav", 1.0)
    write_wav(tmp_path / "clips" / "b.wav", 0.4)
    return tmp_path


def scenario(folder: Path, doc, name: str = "s.json") -> Path:
    p = folder / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


GOOD = {"version": 1, "events": [
    {"audio": "clips/q.wav", "at": 0.5, "expect": "respond"},
    {"audio": "clips/q.wav", "after": "agent_end", "offset": 0.6, "expect": "wait"},
    {"audio": "clips/q.wav", "after": "previous_end", "offset": 0.9, "expect": "respond"},
    {"audio": "clips/b.wav", "after": "agent_start", "offset": 1.2, "expect": "stop"},
    {"audio": "clips/b.wav", "after": "agent_start", "offset": 0.8, "expect": "continue"}]}


def test_the_issue_example_loads(folder, monkeypatch):
    monkeypatch.chdir("/")  # paths are relative to the scenario file, not to the working directory
    s = load_scenario(scenario(folder, GOOD))
    assert s.version == SCENARIO_VERSION and s.name == "s" and len(s.clips) == 5
    assert [c.expect for c in s.clips] == ["respond", "wait", "respond", "stop", "continue"]
    assert s.clips[0].audio == folder / "clips" / "q.wav" and s.clips[0].audio.is_absolute()
    assert s.clips[0].at == 0.5 and s.clips[0].after is None and s.clips[0].rule == "at 0.50 s"
    assert s.clips[2].after == "previous_end" and s.clips[2].rule == "0.90 s after previous_end"
    assert s.clips[0].duration == pytest.approx(1.0) and s.clips[3].duration == pytest.approx(0.4)
    assert (s.clips[0].sample_rate, s.clips[0].channels) == (16000, 1)
    assert [(e.clip, e.kind) for e in s.expectations] == [(0, "respond"), (1, "wait"), (2, "respond"), (3, "stop"), (4, "continue")]
    assert s.count("respond") == 2


def test_extra_fields_are_kept(folder):
    doc = {"version": 1, "name": "named", "description": "d", "author": "me", "events": [
        {"audio": "clips/q.wav", "at": 0, "text": "What time is it?", "note": "n", "speaker": "f3", "loud": True}]}
    s = load_scenario(scenario(folder, doc))
    assert s.name == "named" and s.description == "d" and s.extra == {"author": "me"}
    c = s.clips[0]
    assert c.text == "What time is it?" and c.note == "n" and c.extra == {"speaker": "f3", "loud": True}
    assert c.expect is None and s.expectations == ()  # a clip without an expectation is only played


def test_absolute_paths_and_other_formats(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    stereo = other / "st.flac"
    sf.write(stereo, np.zeros((8000, 2), dtype=np.float32), 8000, format="FLAC")
    s = load_scenario(scenario(folder, {"version": 1, "events": [{"audio": str(stereo), "at": 1}]}))
    assert s.clips[0].audio == stereo and (s.clips[0].sample_rate, s.clips[0].channels) == (8000, 2)


def _event(**kw):
    return {"version": 1, "events": [{"audio": "clips/q.wav", "at": 0.5}, {"audio": "clips/b.wav", **kw}]}


ERRORS = [
    ("not json", "{version: 1", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ("top level a list", "[1, 2]", "the top level must be an object"),
    ("no version", {"events": []}, "'version' is missing"),
    ("version 2", {"version": 2, "events": []}, "unknown scenario version 2 (this duplex reads version 1)"),
    ("version as text", {"version": "1", "events": []}, "unknown scenario version '1'"),
    ("version true", {"version": True, "events": []}, "unknown scenario version True"),
    ("no events", {"version": 1}, "'events' is missing"),
    ("empty events", {"version": 1, "events": []}, "events: List should have at least 1 item"),
    ("no audio", {"version": 1, "events": [{"at": 1.0}]}, "event 1: 'audio' is missing"),
    ("at and after", _event(at=2.0, after="agent_end"), "event 2: give exactly one of 'at' (seconds) or 'after'"),
    ("neither at nor after", _event(expect="respond"), "event 2: give exactly one of 'at'"),
    ("bad after", _event(after="agent_stop", offset=1), "event 2: after = 'agent_stop': Input should be 'agent_start', 'agent_end' or 'previous_end'"),
    ("negative offset", _event(after="agent_start", offset=-0.5), "event 2: offset = -0.5: Input should be greater than or equal to 0"),
    ("negative at", _event(at=-1), "event 2: at = -1: Input should be greater than or equal to 0"),
    ("offset with at", _event(at=1.0, offset=0.5), "event 2: 'offset' goes with 'after', not with 'at'"),
    ("offset as text", _event(after="agent_start", offset="soon"), "event 2: offset = 'soon': Input should be a valid number"),
    ("bad expect", _event(after="agent_start", expect="interrupt"), "event 2: expect = 'interrupt': Input should be 'respond', 'wait', 'stop' or 'continue'"),
    ("bad timeout", _event(after="agent_end", timeout=0), "event 2: timeout = 0: Input should be greater than 0"),
    ("first after previous_end", {"version": 1, "events": [{"audio": "clips/q.wav", "after": "previous_end"}]},
     "event 1: after = 'previous_end' but there is no previous event"),
    ("missing audio", _event(after="agent_start", audio="clips/nope.wav"), "event 2: audio file not found: "),
]


@pytest.mark.parametrize("doc,needle", [(d, n) for _, d, n in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_errors_are_one_line_and_name_the_problem(folder, doc, needle):
    path = scenario(folder, doc)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert msg.startswith(f"scenario {path}: ") and needle in msg and "\n" not in msg, msg


def test_missing_and_unreadable_files(folder):
    with pytest.raises(ScenarioError, match=r"scenario .*nope\.json: file not found"):
        load_scenario(folder / "nope.json")
    (folder / "clips" / "fake.wav").write_text("not audio at all")
    with pytest.raises(ScenarioError, match=r"event 1: .*fake\.wav is not audio libsndfile can read"):
        load_scenario(scenario(folder, {"version": 1, "events": [{"audio": "clips/fake.wav", "at": 0}]}))
    with pytest.raises(ScenarioError, match="scenario folder not found"):
        scenario_paths(folder / "none")
    with pytest.raises(ScenarioError, match="no scenario files"):
        load_scenarios(folder / "clips")


def test_missing_audio_says_how_to_generate_it(tmp_path):
    # a copy of a shipped scenario without its audio: the error names the generator
    (tmp_path / "make_scenarios.py").write_text("# generator\n")
    shutil.copy(SHIPPED / "stop_please.json", tmp_path)
    with pytest.raises(ScenarioError) as info:
        load_scenario(tmp_path / "stop_please.json")
    assert "audio file not found" in str(info.value)
    assert f"(generate the audio with: python {tmp_path / 'make_scenarios.py'})" in str(info.value)


# ------------------------------------------------------------------------------- scheduling rule


def clip(**kw) -> UserClip:
    base = dict(index=1, audio=Path("/x.wav"), at=None, after=None, offset=0.0, expect=None, text="", note="",
                timeout=15.0, duration=1.0, sample_rate=16000, channels=1)
    return UserClip(**(base | kw))


@pytest.mark.parametrize(
    "rule,previous_end,turns,now,start",
    [
        (dict(at=0.5), 0.0, [], None, 0.5),
        (dict(at=0.5), 2.0, [], None, 2.0),  # never over the previous clip
        (dict(after="previous_end", offset=0.9), 3.2, [], None, 4.1),
        # the agent answers the previous clip: 1.2 s after it starts
        (dict(after="agent_start", offset=1.2), 3.0, [], None, None),
        (dict(after="agent_start", offset=1.2), 3.0, [(3.3, None)], None, 4.5),
        # an earlier, finished turn is not the anchor
        (dict(after="agent_start", offset=1.2), 3.0, [(0.5, 2.0), (3.3, None)], None, 4.5),
        # a turn in progress when the previous clip ended (a second backchannel in one turn)
        (dict(after="agent_start", offset=3.0), 4.5, [(3.3, None)], None, 6.3),
        (dict(after="agent_start", offset=0.5), 4.5, [(3.3, None)], None, 4.5),
        (dict(after="agent_end", offset=0.8), 3.0, [(3.3, None)], None, None),
        (dict(after="agent_end", offset=0.8), 3.0, [(3.3, 7.0)], None, 7.8),
        # the anchor never comes: played after the timeout
        (dict(after="agent_end", offset=0.8, timeout=5.0), 3.0, [], 7.9, None),
        (dict(after="agent_end", offset=0.8, timeout=5.0), 3.0, [], 8.0, 8.0),
    ],
)
def test_clip_start(rule, previous_end, turns, now, start):
    got = clip_start(clip(**rule), previous_end, turns, now=now)
    assert got == (None if start is None else pytest.approx(start))


# ---------------------------------------------------------------------------------- shipped set


@pytest.fixture(scope="module")
def shipped():
    return load_scenarios(SHIPPED)


def test_the_shipped_set_covers_every_expectation(shipped):
    assert 12 <= len(shipped) <= 20
    counts = {k: sum(s.count(k) for s in shipped) for k in ("respond", "wait", "stop", "continue")}
    assert counts["respond"] >= 12 and counts["wait"] >= 3 and counts["stop"] >= 3 and counts["continue"] >= 3, counts
    names = [s.name for s in shipped]
    assert len(set(names)) == len(names) and all(s.name == s.path.stem for s in shipped)
    said = {" ".join(normalize_words(c.text)) for s in shipped for c in s.clips if c.expect == "continue"}
    assert {"uh huh", "yeah", "right", "okay"} <= said, said  # the backchannels the issue names
    assert any(not c.text for s in shipped for c in s.clips if c.expect == "continue")  # and a noise


def test_shipped_rules_make_sense(shipped):
    for s in shipped:
        clips = s.clips
        assert clips[0].at is not None and clips[0].expect in ("respond", "wait"), s.name
        for i, c in enumerate(clips):
            if c.expect in ("stop", "continue"):  # said over the agent's answer
                assert c.after == "agent_start" and c.offset >= 0.8, (s.name, i)
            if c.expect == "wait":
                # an unfinished first part, then the rest after a real pause
                assert not re.search(r"[.?!]$", c.text), (s.name, c.text)
                nxt = clips[i + 1]
                assert nxt.after == "previous_end" and 0.5 <= nxt.offset <= 1.5 and nxt.expect == "respond", s.name


def _frames_db(x: np.ndarray, rate: int) -> np.ndarray:
    hop = rate // 100
    n = len(x) // hop
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)
    return 20 * np.log10(rms / rms.max())


def test_shipped_audio_is_16k_mono_speech_of_the_right_length(shipped):
    from streaming.vad import TwoStageVAD, VADConfig

    vad = TwoStageVAD(VADConfig())
    seen = set()
    for s in shipped:
        for c in s.clips:
            assert c.audio.is_file() and c.audio.is_relative_to(SHIPPED), c.audio
            info = sf.info(str(c.audio))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), c.audio
            assert abs(c.extra["duration"] - c.duration) < 0.001, c.audio  # the JSON says how long it is
            if c.audio in seen:
                continue
            seen.add(c.audio)
            x, rate = sf.read(str(c.audio), dtype="float32")
            assert 0.2 < c.duration < 6.0 and 0.4 < np.abs(x).max() <= 0.51, c.audio
            db = _frames_db(x, rate)
            # the clip starts with its sound and ends with it: that is what latencies are measured from
            assert db[:2].max() > -40 and db[-4:].max() > -40, c.audio
            if not c.text:
                continue  # a noise
            words = len(normalize_words(c.text))
            assert 1.0 <= words / c.duration <= 4.5, (c.audio, words, c.duration)
            state = vad.init_state()
            segs = vad.step(state, x, 0.0) + vad.finish(state)
            starts = [f.pts for f in segs if type(f).__name__ == "SpeechStarted"]
            ends = [f.pts for f in segs if type(f).__name__ == "SpeechEnded"]
            assert starts and starts[0] < 0.25, (c.audio, starts)  # speech from the start
            voiced = sum(e - b for b, e in zip(starts, ends))
            assert voiced >= 0.6 * c.duration, (c.audio, voiced, c.duration)
    assert len(seen) >= 20


def test_shipped_set_is_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "agent" in cfg["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    files = sorted(SHIPPED.glob("*.json")) + sorted((SHIPPED / "audio").glob("*.wav"))
    ignored = subprocess.run(["git", "check-ignore", *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == "", f"hatch leaves git-ignored files out of the wheel: {ignored.stdout}"
    assert sum(f.stat().st_size for f in files) < 3_000_000


def test_the_generator_reproduces_the_shipped_files():
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: run scripts/setup")
    sys.path.insert(0, str(SHIPPED))
    try:
        import make_scenarios
    finally:
        sys.path.remove(str(SHIPPED))
    found = re.search(r"text-to-speech: (\S+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
    if found is None or found.group(1) != make_scenarios.ESPEAK_VERSION:
        pytest.skip(f"espeak-ng {found and found.group(1)} is not {make_scenarios.ESPEAK_VERSION}, which made the set")
    out = subprocess.run([sys.executable, str(SHIPPED / "make_scenarios.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
