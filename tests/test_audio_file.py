"""File sources and sinks: every format, rate and channel layout converted; bad files named."""

import numpy as np
import pytest
import soundfile as sf

from conftest import dominant_freq, tone
from fixtures import asterisk
from streaming.audio_file import FileSink, FileSource, read_audio
from streaming.clock import RealClock, SimulatedClock
from streaming.errors import AudioInputError
from streaming.frames import AudioFrame, EndOfStream
from streaming.testing import run_pipeline


@pytest.mark.parametrize(
    "rate,channels,subtype,ext",
    [
        (16000, 1, "PCM_16", "wav"),
        (8000, 1, "PCM_U8", "wav"),  # 8-bit unsigned telephone audio
        (44100, 2, "PCM_24", "wav"),  # 24-bit stereo
        (48000, 2, "FLOAT", "wav"),
        (22050, 1, "PCM_16", "flac"),
        (11025, 6, "PCM_16", "flac"),  # odd rate, 5.1
    ],
)
def test_any_rate_depth_and_layout_becomes_16k_mono(tmp_path, rate, channels, subtype, ext):
    x = tone(440, 1.0, rate)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    path = tmp_path / f"t.{ext}"
    sf.write(path, data, rate, subtype=subtype)
    y = read_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == pytest.approx(16000, abs=2)
    assert dominant_freq(y, 16000) == pytest.approx(440, abs=3)
    assert np.sqrt(np.mean(y[2000:-2000] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)


def test_streamed_blocks_equal_whole_file_resampling(tmp_path):
    from streaming.resample import resample

    path = asterisk("demo-thanks")
    whole = resample(sf.read(path, dtype="float32")[0], 8000)
    streamed = read_audio(path)
    n = min(len(whole), len(streamed))
    assert abs(len(whole) - len(streamed)) <= 2
    assert np.max(np.abs(whole[:n] - streamed[:n])) < 1e-3


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "cannot decode"),
        (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk", "cannot decode"),
        (bytes(range(256)) * 40, "cannot decode"),
    ],
)
def test_corrupt_files_get_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioInputError, match=message) as info:
        read_audio(path)
    assert "bad.wav" in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioInputError, match="no such audio file"):
        FileSource(tmp_path / "nope.wav")
    with pytest.raises(AudioInputError, match="is a directory"):
        FileSource(tmp_path)


def test_truncated_file_yields_what_is_there(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(full, tone(300, 2.0), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    raw = full.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])  # header still claims 2 s
    y = read_audio(cut)
    assert 0.9 < len(y) / 16000 < 1.1


async def test_file_source_paces_on_the_clock(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(200, 3.0), 16000)
    clock = SimulatedClock()
    out = await run_pipeline(FileSource(path, block_ms=20, start_pts=0.0), [], clock=clock)
    frames = [f for f in out if isinstance(f, AudioFrame)]
    assert len(frames) == 150 and all(f.num_samples == 320 for f in frames)
    assert [f.pts for f in frames[:3]] == pytest.approx([0.0, 0.02, 0.04])
    # each block is released when its last sample would have been captured, like a microphone
    assert all(f.stamp("file") == pytest.approx(f.end_pts) for f in frames)
    assert isinstance(out[-1], EndOfStream) and out[-1].pts == pytest.approx(3.0)
    assert clock.now() == pytest.approx(3.0)


async def test_realtime_pace_takes_real_time(tmp_path):
    import time

    path = tmp_path / "a.wav"
    sf.write(path, tone(200, 0.5), 16000)
    t = time.perf_counter()
    await run_pipeline(FileSource(path, pace="realtime"), [], clock=RealClock())
    assert time.perf_counter() - t >= 0.45
    t = time.perf_counter()
    await run_pipeline(FileSource(path, pace="fast"), [], clock=RealClock())
    assert time.perf_counter() - t < 0.45


async def test_file_sink_round_trip(tmp_path):
    src = asterisk("demo-thanks")
    dst = tmp_path / "copy.flac"
    await run_pipeline(FileSource(src, pace="fast"), [FileSink(dst)], clock=SimulatedClock())
    a, b = read_audio(src), read_audio(dst)
    assert len(a) == len(b) and np.max(np.abs(a - b)) < 1e-3  # FLAC is 16-bit: quantisation only


def test_file_sink_rejects_bad_targets(tmp_path):
    with pytest.raises(AudioInputError, match="output folder does not exist"):
        FileSink(tmp_path / "no" / "x.wav")
    with pytest.raises(AudioInputError, match="unsupported output format"):
        FileSink(tmp_path / "x.xyz")
