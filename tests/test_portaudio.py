"""The real audio path: PortAudio on a PulseAudio null sink. What our SpeakerSink plays comes back
through the sink's monitor into our MicSource, sample for sample (up to resampling)."""

import asyncio
import subprocess
import time

import numpy as np
import pytest

from fixtures import librivox
from streaming.audio_device import MicSource, SpeakerSink, list_devices, resolve_device
from streaming.audio_file import FileSource, read_audio
from streaming.clock import RealClock
from streaming.errors import DeviceError
from streaming.frames import AudioFrame, SpeechEnded, SpeechStarted
from streaming.pipeline import Pipeline
from streaming.stages import Callback
from streaming.vad import VADStage

pytestmark = pytest.mark.audio_device


def xcorr_lag(rec: np.ndarray, ref: np.ndarray) -> int:
    n = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    c = np.fft.irfft(np.fft.rfft(rec, n) * np.conj(np.fft.rfft(ref, n)), n)
    return int(np.argmax(c[: len(rec)]))


async def play_and_capture(path, stages_after_mic, seconds):
    """Start capturing, then play ``path`` into the null sink; returns captured AudioFrames."""
    got: list[AudioFrame] = []
    first = asyncio.Event()

    def on_audio(f):
        got.append(f)
        first.set()

    clock = RealClock()
    mic = Pipeline(MicSource("pulse", max_seconds=seconds), [*stages_after_mic, Callback(on_audio, (AudioFrame,), name="grab")], clock=clock)
    capture = asyncio.create_task(mic.run())
    await asyncio.wait_for(first.wait(), timeout=10)
    await asyncio.sleep(0.2)
    speaker = SpeakerSink("pulse")
    await Pipeline(FileSource(path, pace="fast"), [speaker], clock=clock).run()
    await asyncio.wait_for(capture, timeout=seconds + 10)
    return got, speaker


async def test_samples_played_come_back_through_the_microphone_source(pulse_null_sink):
    import soxr

    ref = read_audio(librivox("0880"))
    got, speaker = await play_and_capture(librivox("0880"), [], seconds=5.0)
    rec = np.concatenate([f.samples for f in got])
    # timestamps are contiguous on the pipeline clock
    pts = np.array([f.pts for f in got])
    assert np.allclose(np.diff(pts), 0.02, atol=1e-6)
    # 16 k -> device rate -> 16 k leaves an arbitrary fractional-sample delay, which alone costs a
    # few points of correlation at 16 kHz: align at 4x the rate to compare the signals themselves
    up_rec, up_ref = soxr.resample(rec, 16000, 64000), soxr.resample(ref, 16000, 64000)
    lag = xcorr_lag(up_rec, up_ref)
    seg = up_rec[lag : lag + len(up_ref)]
    assert len(seg) == len(up_ref), "the whole file must come back"
    assert np.corrcoef(seg, up_ref)[0, 1] > 0.99
    assert np.max(np.abs(seg)) == pytest.approx(np.max(np.abs(ref)), rel=0.05)
    assert speaker.played_seconds == pytest.approx(len(ref) / 16000, abs=0.05)


async def test_audio_dropped_for_a_slow_consumer_is_replaced_by_silence_on_time(pulse_null_sink):
    """A consumer that stalls longer than the microphone's buffer loses audio; the frames after
    it must still carry the time they were captured (the echo canceller pairs them with what was
    played then), not fall behind by what was dropped."""
    clock = RealClock()
    seen: list[tuple[float, float]] = []

    def on_audio(f):
        seen.append((f.pts, clock.now()))
        if len(seen) == 25:
            time.sleep(0.8)  # the event loop stalls: the 0.2 s buffer overflows

    mic = MicSource("pulse", max_seconds=3.0, buffer_seconds=0.2)
    await asyncio.wait_for(Pipeline(mic, [Callback(on_audio, (AudioFrame,), name="slow")], clock=clock).run(), timeout=20)
    assert mic.dropped_blocks >= 10
    pts = np.array([p for p, _ in seen])
    assert np.allclose(np.diff(pts), 0.02, atol=1e-6)  # one contiguous stream
    behind = [now - p for p, now in seen[-20:]]  # arrival minus capture time, well after the stall
    assert max(behind) < 0.3, behind


async def test_microphone_to_vad_pipeline_detects_the_played_speech(pulse_null_sink):
    vad_events = []
    got, _ = await play_and_capture(
        librivox("0880"), [VADStage(), Callback(vad_events.append, (SpeechStarted, SpeechEnded), name="events")], seconds=5.0
    )
    assert [type(e) for e in vad_events] == [SpeechStarted, SpeechEnded]
    assert 1.5 < vad_events[1].duration < 3.5


def test_device_listing_and_resolution(pulse_null_sink):
    names = [d.name for d in list_devices()]
    assert "pulse" in names
    assert resolve_device("pulse", "input").name == "pulse"
    assert resolve_device(None, "output").max_output_channels > 0
    with pytest.raises(DeviceError, match="unknown input device 'nonexistent-mic'; available: "):
        resolve_device("nonexistent-mic", "input")
    with pytest.raises(DeviceError, match="unknown output device index 99"):
        resolve_device(99, "output")


async def test_interrupt_clears_unplayed_audio(pulse_null_sink):
    from streaming.frames import Interrupt

    long = np.zeros(16000 * 3, np.float32) + 0.01
    frames = [AudioFrame(samples=long[i : i + 1600].copy(), pts=i / 16000) for i in range(0, len(long), 1600)]
    sink = SpeakerSink("pulse", max_buffer_seconds=5.0)
    sink.bind(lambda f: asyncio.sleep(0), RealClock())
    for f in frames:
        await sink.process(f)
    assert sink.buffered_seconds > 2.0
    await sink.process(Interrupt())
    assert sink.buffered_seconds == 0.0
    await sink.aclose()


async def test_duplex_listen_hears_speech_on_the_default_microphone(pulse_null_sink, duplex_bin):
    """The README's main job, end to end through PortAudio."""
    import json
    import os

    proc = await asyncio.create_subprocess_exec(
        str(duplex_bin), "listen", "--seconds", "5", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )
    # play only once it records (a fixed sleep lost the race on a loaded machine)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        r = subprocess.run(["pactl", "list", "short", "source-outputs"], capture_output=True, text=True)
        if r.stdout.strip():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    await Pipeline(FileSource(librivox("0880"), pace="fast"), [SpeakerSink("pulse")], clock=RealClock()).run()
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["event"] for e in events] == ["speech_started", "speech_ended"], (events, err.decode())
