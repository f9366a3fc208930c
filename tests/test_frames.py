import dataclasses

import numpy as np
import pytest

from streaming.frames import AudioFrame, Cancel, EndOfStream, Flush, Interrupt, SpeechEnded


def test_audio_frame_helpers_and_immutability():
    f = AudioFrame(samples=np.zeros(320, dtype=np.float32), pts=1.5)
    assert f.num_samples == 320 and f.seconds == pytest.approx(0.02) and f.end_pts == pytest.approx(1.52)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.pts = 2.0
    with pytest.raises(ValueError):
        f.samples[0] = 1.0  # the buffer is read-only: no stage can mutate another's audio
    assert not hasattr(f, "__dict__")  # slotted


def test_audio_frame_validates_its_payload():
    with pytest.raises(TypeError):
        AudioFrame(samples=np.zeros(10, dtype=np.int16))
    with pytest.raises(ValueError):
        AudioFrame(samples=np.zeros((10, 2), dtype=np.float32), channels=1)
    stereo = AudioFrame(samples=np.ones((4, 2), dtype=np.float32), channels=2, sample_rate=48000)
    assert stereo.mono.shape == (4,) and stereo.seconds == pytest.approx(4 / 48000)


def test_pcm16_is_clipped_little_endian():
    f = AudioFrame(samples=np.array([0.0, 2.0, -2.0], dtype=np.float32))
    assert np.frombuffer(f.pcm16(), "<i2").tolist() == [0, 32767, -32767]


def test_stamps_record_stage_exit_times():
    f = SpeechEnded(pts=2.0, start=1.0).stamped("vad", 2.1).stamped("asr", 2.3)
    assert f.stamp("vad") == 2.1 and f.stamp("asr") == 2.3 and f.stamp("tts") is None
    assert f.duration == pytest.approx(1.0)


def test_control_tiers():
    assert Interrupt.urgent and Cancel.urgent
    assert not Flush.urgent and not EndOfStream.urgent
