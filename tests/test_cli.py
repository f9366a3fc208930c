"""The installed `duplex` command, run as a user would: real files, real errors, exit codes."""

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from fixtures import asterisk, librivox
from streaming.audio_file import read_audio


def duplex(duplex_bin, *args, env=None, timeout=120):
    import os

    e = dict(os.environ)
    e.pop("XDG_RUNTIME_DIR", None)  # no PulseAudio unless a test asks for it
    e.update(env or {})
    return subprocess.run([str(duplex_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("duplex: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_vad_json_on_real_recordings(duplex_bin, tmp_path):
    speech = np.concatenate(
        [np.zeros(16000, np.float32), read_audio(librivox("0880")), np.zeros(24000, np.float32), read_audio(librivox("0920"))]
    )
    path = tmp_path / "two.wav"
    sf.write(path, speech, 16000)
    silence = tmp_path / "silence.flac"
    sf.write(silence, np.zeros(32000, np.float32), 16000)
    r = duplex(duplex_bin, "vad", "--json", path, silence, asterisk("demo-thanks"))
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["file"] for o in objs] == [str(path), str(silence), str(asterisk("demo-thanks"))]
    two = objs[0]["segments"]
    assert len(two) == 2 and 0.9 < two[0]["start"] < 1.3 and two[1]["start"] > 4.5
    assert objs[1]["segments"] == []
    assert len(objs[2]["segments"]) >= 1


def test_vad_text_output_and_mode_flag(duplex_bin):
    r = duplex(duplex_bin, "vad", "--mode", "webrtc", asterisk("demo-thanks"))
    assert r.returncode == 0 and "speech segment" in r.stdout


@pytest.mark.parametrize("rate,subtype,channels", [(8000, "PCM_U8", 1), (44100, "PCM_24", 2)])
def test_vad_converts_odd_formats(duplex_bin, tmp_path, rate, subtype, channels):
    import soxr

    x = soxr.resample(read_audio(librivox("0880")), 16000, rate)
    data = np.stack([x] * channels, 1) if channels > 1 else x
    path = tmp_path / "odd.wav"
    sf.write(path, np.concatenate([np.zeros((rate,) + data.shape[1:]), data]), rate, subtype=subtype)
    r = duplex(duplex_bin, "vad", "--json", path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["segments"]) == 1


def test_bad_inputs_give_one_line_errors(duplex_bin, tmp_path):
    assert_one_line_error(duplex(duplex_bin, "vad", tmp_path / "missing.wav"), "no such audio file", "missing.wav")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(1000))
    assert_one_line_error(duplex(duplex_bin, "vad", corrupt), "cannot decode", "corrupt.flac")
    assert_one_line_error(duplex(duplex_bin, "vad", "--set", "vad.threshold=7", asterisk("demo-thanks")), "vad.threshold")
    assert_one_line_error(duplex(duplex_bin, "vad", "--set", "vad.nope=1", asterisk("demo-thanks")), "unknown key 'vad.nope'")
    assert_one_line_error(
        duplex(duplex_bin, "vad", asterisk("demo-thanks"), env={"DUPLEX_VAD__MIN_SPEECH_MS": "-5"}), "vad.min_speech_ms"
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text("[audio]\nblock_ms = 0\n")
    assert_one_line_error(duplex(duplex_bin, "vad", "--config", cfg, asterisk("demo-thanks")), "audio.block_ms")
    assert_one_line_error(duplex(duplex_bin, "listen", "--input", "no-such-mic", "--seconds", "1"), "no-such-mic")
    assert_one_line_error(duplex(duplex_bin, "bench", "vad", "--manifest", tmp_path / "none.tsv"), "no such manifest")


def test_listen_without_a_device_falls_back_to_the_bundled_recording(duplex_bin, tmp_path):
    short = tmp_path / "short.wav"
    x = np.concatenate([np.zeros(8000, np.float32), read_audio(librivox("0880")), np.zeros(8000, np.float32)])
    sf.write(short, x, 16000)
    r = duplex(duplex_bin, "listen", "--json", "--set", f"audio.demo_file='{short}'")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["speech_started", "speech_ended"]
    assert "no microphone" in r.stderr or "no microphone" in r.stdout or events


def test_bench_vad_reports_all_three_detectors(duplex_bin, tmp_path):
    # a small manifest in the shared format: a file with marked regions and a non-speech file
    a = read_audio(librivox("0880"))
    x = np.concatenate([np.zeros(16000, np.float32), a, np.zeros(16000, np.float32)])
    sf.write(tmp_path / "marked.flac", x, 16000)
    sf.write(tmp_path / "noise.flac", (np.random.default_rng(0).standard_normal(32000) * 0.01).astype(np.float32), 16000)
    (tmp_path / "manifest.tsv").write_text(
        "file\tduration_s\ttranscript\tlanguage\tsource\tlicense\ttranscript_quality\tnotes\n"
        f"marked.flac\t{len(x) / 16000}\tUNKNOWN\ten\tt\tt\tunknown\tspeech segments (s): 1.25-3.9\n"
        "noise.flac\t2.0\tUNKNOWN\tnone\tt\tt\tnonspeech\tnoise\n"
    )
    out = tmp_path / "vad.json"
    r = duplex(duplex_bin, "bench", "vad", "--manifest", tmp_path / "manifest.tsv", "--repeat", "1", "--json-out", out)
    assert r.returncode == 0, r.stderr
    assert all(m in r.stdout for m in ("| webrtc |", "| silero |", "| two-stage |"))
    res = json.loads(out.read_text())
    two = res["modes"]["two-stage"]["marked"]
    assert two["recall"] > 0.9 and two["precision"] > 0.8 and two["nonspeech_false_segments"] == 0
    assert two["start_delay_ms"]["n"] == 1 and two["end_delay_ms"]["n"] == 1
