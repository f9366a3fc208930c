"""Echo cancellation: the agent must not hear itself.

The agent's voice is LibriVox read speech, the user's an Asterisk prompt (both Debian test-sound
fixtures), heard through simulated rooms (``streaming.room``). Figures are measured on the echo
component (``EchoCanceller.process_parts``), so double talk can be judged exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fixtures import asterisk, librivox
from streaming import aec_dsp
from streaming.aec import AECConfig, AECStage, EchoCanceller, EchoReference, cancel
from streaming.audio_file import read_audio
from streaming.frames import AudioFrame, EndOfStream, ErrorFrame, Flush, SpeechEnded, SpeechStarted
from streaming.room import Room, RoomConfig, impulse_response, measured_rt60
from streaming.testing import run_frames
from streaming.vad import TwoStageVAD

RATE = 16000
OFFICE = RoomConfig(rt60_s=0.35, delay_ms=60.0, echo_gain_db=-6.0, seed=5)


def level(x: np.ndarray, rms: float) -> np.ndarray:
    active = x[np.abs(x) > 1e-3]
    return (x * (rms / np.sqrt(np.mean(active.astype(np.float64) ** 2)))).astype(np.float32)


def db(num: np.ndarray, den: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(num.astype(np.float64) ** 2) / max(np.sum(den.astype(np.float64) ** 2), 1e-20)))


@pytest.fixture(scope="module")
def agent() -> np.ndarray:
    clips = [read_audio(librivox(u)) for u in ("0870", "0890", "0920")]
    gap = np.zeros(RATE // 4, np.float32)
    return level(np.concatenate([np.concatenate([c, gap]) for c in clips]), 0.1)  # 19 s


@pytest.fixture(scope="module")
def user() -> np.ndarray:
    return read_audio(asterisk("demo-congrats"))


def run_parts(mic, ref, parts, config=None, chunk=160):
    """The canceller fed 10 ms at a time, as live; outputs aligned with the input."""
    ec = EchoCanceller(config)
    outs, pouts = [], []
    for i in range(0, len(mic), chunk):
        o, p = ec.process_parts(mic[i : i + chunk], ref[i : i + chunk], parts[:, i : i + chunk])
        outs.append(o)
        pouts.append(p)
    o, p = ec.flush_parts()
    return np.concatenate(outs + [o])[ec.latency :], np.concatenate(pouts + [p], axis=1)[:, ec.latency :], ec


def speech_segments(audio: np.ndarray) -> list[tuple[float, float]]:
    vad = TwoStageVAD()
    state = vad.init_state()
    events = vad.step(state, audio, 0.0) + vad.finish(state)
    return [(e.start, e.pts) for e in events if isinstance(e, SpeechEnded)]


@pytest.fixture(scope="module")
def echo_only(agent):
    """The office, agent talking alone: (mix, output, processed parts, canceller)."""
    mix = Room(OFFICE).render(np.zeros(len(agent), np.float32), agent)
    out, parts, ec = run_parts(mix.mic, agent, np.stack([mix.echo, mix.noise]))
    return mix, out, parts, ec


# ---------------------------------------------------------------------------------- the core


@pytest.mark.parametrize("m", [4, 8, 64, 256, 1024])
def test_numba_fft_matches_numpy(m):
    bitrev, tw, rtw = aec_dsp.fft_tables(m)
    x = np.random.default_rng(m).standard_normal(m)
    spec = np.empty(m // 2 + 1, np.complex128)
    z = np.empty(m // 2, np.complex128)
    aec_dsp.rfft(x, spec, z, bitrev, tw, rtw)
    assert np.allclose(spec, np.fft.rfft(x), atol=1e-10)
    back = np.empty(m)
    aec_dsp.irfft(spec, back, z, bitrev, tw, rtw)
    assert np.allclose(back, x, atol=1e-12)


def test_erle_after_convergence_is_at_least_25_db(echo_only):
    mix, out, parts, ec = echo_only
    after = slice(2 * RATE, None)
    erle = db(mix.echo[after], parts[0][after])
    assert erle >= 25.0, f"ERLE {erle:.1f} dB"
    # the whole output (residual echo and the processed mic noise) against the whole mic signal
    assert db(mix.mic[after], out[after]) >= 25.0
    assert ec.stats.converged and not ec.stats.double_talk
    assert ec.stats.erle_db > 20.0  # the canceller's own running estimate agrees roughly


def test_components_add_up_to_the_output(echo_only):
    mix, out, parts, _ = echo_only
    assert np.max(np.abs(parts.sum(axis=0) - out)) < 1e-5


def test_streaming_equals_batch(agent):
    n = 4 * RATE
    ref = agent[:n]
    mic = Room(OFFICE).mix(np.zeros(n, np.float32), ref)[0]
    whole = cancel(mic, ref)
    ec = EchoCanceller()
    rng = np.random.default_rng(3)
    outs, i = [], 0
    while i < n:
        k = int(rng.integers(1, 700))
        outs.append(ec.process(mic[i : i + k], ref[i : i + k]))
        i += k
    pieces = np.concatenate(outs + [ec.flush()])[ec.latency :]
    assert len(pieces) == n == len(whole)
    assert np.array_equal(pieces, whole)


def test_vad_hears_the_raw_echo_but_not_the_cancelled_echo(echo_only):
    mix, out, _, _ = echo_only
    assert len(speech_segments(mix.mic)) >= 2  # the agent's voice is plainly speech at the mic
    assert speech_segments(out) == []  # ...and after cancellation there is nothing to barge in


def test_user_speech_survives_double_talk(agent, user):
    n = len(agent)
    room = Room(OFFICE)
    echo = room.echo(agent)
    t0 = 6 * RATE
    u = np.zeros(n, np.float32)
    clip = user[: n - t0 - 3 * RATE]
    t1 = t0 + len(clip)
    u[t0:t1] = level(clip, float(np.sqrt(np.mean(echo[t0:t1].astype(np.float64) ** 2))))  # 0 dB echo-to-user
    mix = room.render(u, agent)
    out, parts, ec = run_parts(mix.mic, agent, np.stack([mix.echo, mix.user, mix.noise]))
    dt = slice(t0, t1)
    assert np.corrcoef(mix.mic[dt], mix.user[dt])[0, 1] < 0.8  # the raw mic is far from the user alone
    assert np.corrcoef(parts[1][dt], mix.user[dt])[0, 1] > 0.95  # the user's speech is kept
    assert np.corrcoef(out[dt], mix.user[dt])[0, 1] > 0.95  # and the echo is gone from around it
    assert db(mix.user[dt], parts[1][dt]) < 2.0  # attenuated by less than 2 dB
    assert db(mix.echo[dt], parts[0][dt]) > 20.0  # echo still cancelled while the user talks
    assert db(mix.echo[t1:], parts[0][t1:]) > 25.0  # the filter did not diverge
    user_segs = speech_segments(out[t0 - RATE : t1 + RATE])
    assert user_segs and sum(b - a for a, b in user_segs) > 0.6 * (t1 - t0) / RATE
    assert speech_segments(out[RATE:t0]) == []  # before the user spoke: silence


@pytest.mark.parametrize("lead_ms", [50, 100, 150])
def test_reference_leading_the_echo_by_50_to_150_ms(agent, lead_ms):
    n = 12 * RATE
    room = Room(RoomConfig(rt60_s=0.3, delay_ms=lead_ms, echo_gain_db=-3.0, seed=lead_ms))
    mix = room.render(np.zeros(n, np.float32), agent[:n])
    out, parts, ec = run_parts(mix.mic, agent[:n], np.stack([mix.echo, mix.noise]))
    assert db(mix.echo[2 * RATE :], parts[0][2 * RATE :]) >= 25.0
    block_ms = 1000 * ec.block / RATE
    assert abs(ec.stats.delay_estimate_ms - lead_ms) <= 2 * block_ms
    assert ec.stats.bulk_delay_ms <= lead_ms  # the filter window starts before the echo


@pytest.mark.parametrize("jump_ms", [-12, 4, 12])
def test_an_echo_path_that_jumps_is_cancelled_again_within_half_a_second(agent, jump_ms):
    """A device whose latency jumps (PulseAudio's moved by 12 ms under load) leaves a converged
    filter subtracting an echo that is no longer there. It used to pass the echo at 0 dB for two
    seconds while the double-talk detector froze what the filter learned."""
    x = agent[: 8 * RATE]
    d0, at = int(0.030 * RATE), 3 * RATE
    d1 = d0 + jump_ms * RATE // 1000
    mic = np.zeros_like(x)
    mic[d0:at] = x[: at - d0]
    mic[at:] = x[at - d1 : len(x) - d1]
    ec = EchoCanceller()
    out = ec.process(mic, x)[ec.latency :]
    mic = mic[: len(out)]
    assert db(mic[2 * RATE : at], out[2 * RATE : at]) > 30.0  # converged before the jump
    assert db(mic[at + RATE // 2 : at + 2 * RATE], out[at + RATE // 2 : at + 2 * RATE]) > 30.0
    assert ec.stats.path_changes >= 1


def test_without_delay_search_a_long_enough_tail_covers_the_delay(agent):
    n = 10 * RATE
    room = Room(RoomConfig(rt60_s=0.25, delay_ms=100, echo_gain_db=-3.0, seed=2))
    mix = room.render(np.zeros(n, np.float32), agent[:n])
    cfg = AECConfig(max_delay_ms=0, tail_ms=400)
    out, parts, ec = run_parts(mix.mic, agent[:n], np.stack([mix.echo, mix.noise]), cfg)
    assert ec.stats.delay_estimate_ms is None and ec.stats.bulk_delay_ms == 0
    assert db(mix.echo[2 * RATE :], parts[0][2 * RATE :]) >= 25.0


def test_silent_reference_is_an_exact_cheap_pass_through(agent, user):
    ec = EchoCanceller()
    mic = np.concatenate([np.zeros(RATE, np.float32), user[: 3 * RATE]])
    zeros = np.zeros(len(mic), np.float32)
    out = np.concatenate([ec.process(mic[i : i + 320], zeros[i : i + 320]) for i in range(0, len(mic), 320)])
    assert ec.stats.idle
    lat = ec.latency
    assert np.allclose(out[lat:], mic[: len(mic) - lat], atol=1e-6)
    # after playback stops, the canceller goes idle once the filter span has passed
    ec2 = EchoCanceller()
    ec2.process(agent[: 2 * RATE], agent[: 2 * RATE])
    assert not ec2.stats.idle
    ec2.process(user[: RATE], np.zeros(RATE, np.float32))
    assert ec2.stats.idle


def test_cost_per_10_ms_is_well_under_a_millisecond(agent):
    mic = Room(OFFICE).mix(np.zeros(6 * RATE, np.float32), agent[: 6 * RATE])[0]
    ec = EchoCanceller()
    ec.process(mic[:1600], agent[:1600])
    times = []
    for i in range(1600, len(mic) - 160, 160):
        t = time.perf_counter()
        ec.process(mic[i : i + 160], agent[i : i + 160])
        times.append(time.perf_counter() - t)
    assert np.percentile(times, 50) < 0.5e-3  # measured about 40 us on one core


def test_flush_returns_the_tail_and_keeps_what_was_learned(agent):
    n = 6 * RATE
    mic = Room(OFFICE).mix(np.zeros(n, np.float32), agent[:n])[0]
    ec = EchoCanceller()
    out = ec.process(mic, agent[:n])
    tail = ec.flush()
    assert len(out) == n and len(tail) == ec.latency
    learned = ec.stats.erle_linear_db
    assert learned > 10
    # a second stream starts converged
    out2 = cancel(mic, agent[:n], canceller=ec)
    assert db(mic[: RATE], out2[: RATE]) > 15.0


def test_bad_input_is_refused():
    ec = EchoCanceller()
    with pytest.raises(ValueError):
        ec.process(np.zeros(10, np.float32), np.zeros(11, np.float32))
    with pytest.raises(ValueError):
        aec_dsp.fft_tables(12)


# ------------------------------------------------------------------------------- the room


def test_room_impulse_response_has_the_asked_rt60_gain_and_delay():
    for rt60 in (0.2, 0.4, 0.6):
        h = impulse_response(RoomConfig(rt60_s=rt60, echo_gain_db=-6.0, seed=1))
        assert abs(measured_rt60(h) - rt60) < 0.15 * rt60
        assert abs(10 * np.log10(np.sum(h**2)) + 6.0) < 1e-6
    c = RoomConfig(rt60_s=0.3, delay_ms=50.0, speaker_highpass_hz=0, noise_dbfs=None, seed=4)
    room = Room(c)
    click = np.zeros(RATE, np.float32)
    click[100] = 1.0
    mic, echo = room.mix(np.zeros(RATE, np.float32), click)
    assert int(np.argmax(np.abs(echo))) == 100 + 800  # 50 ms later
    assert np.array_equal(mic, echo)
    assert np.array_equal(Room(c).rir, room.rir)  # seeded: the same room every time
    assert not np.array_equal(Room(RoomConfig(seed=5)).rir, room.rir)


def test_room_mix_adds_user_echo_and_noise(agent, user):
    r = Room(OFFICE).render(user[:RATE], agent[: 2 * RATE])
    assert len(r.mic) == 2 * RATE
    assert np.allclose(r.mic, r.echo + r.user + r.noise, atol=1e-6)
    assert abs(20 * np.log10(np.std(r.noise)) - OFFICE.noise_dbfs) < 0.5


# --------------------------------------------------------------------------- the reference


def test_reference_reads_back_what_was_played_at_its_time():
    ref = EchoReference(seconds=2.0)
    x = np.arange(1, 1601, dtype=np.float32) / 2000
    ref.push(x[:800], 10.0)
    ref.push(x[800:], 10.05 + 0.001)  # within the tolerance: continuous, jitter ignored
    assert np.array_equal(ref.read(10.0, 1600), x)
    assert np.array_equal(ref.read(10.025, 100), x[400:500])
    before = ref.read(9.99, 320)
    assert np.all(before[:160] == 0) and np.array_equal(before[160:], x[:160])
    assert np.all(ref.read(10.2, 100) == 0)  # not played yet
    ref.push(x[:160], 11.0)  # a gap: re-anchored, silence in between
    assert ref.reanchors == 1
    assert np.all(ref.read(10.5, 160) == 0)
    assert np.array_equal(ref.read(11.0, 160), x[:160])
    assert ref.last_sound == pytest.approx(11.01)
    assert np.all(ref.read(7.0, 10) == 0)  # older than the ring buffer


def test_reference_resamples_device_rate_pushes_continuously():
    ref = EchoReference()
    t = np.arange(48000) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for i in range(0, 48000, 960):  # 20 ms callbacks at 48 kHz
        ref.push(tone[i : i + 960], 5.0 + i / 48000, rate=48000)
    got = ref.read(5.2, 1600)
    want = (0.3 * np.sin(2 * np.pi * 440 * (0.2 + np.arange(1600) / RATE))).astype(np.float32)
    assert np.max(np.abs(got - want)) < 0.01  # aligned to the sample
    assert ref.reanchors == 0


def test_reference_is_safe_across_threads():
    ref = EchoReference(seconds=1.0)
    stop = threading.Event()
    errors = []

    def writer():
        k = 0
        while not stop.is_set():
            ref.push(np.full(160, (k % 100 + 1) / 1000, np.float32), k * 0.01)
            k += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            block = ref.read(max(0.0, ref.last_sound - 0.05), 160)
            vals = set(np.unique(block).tolist()) - {0.0}
            if len(vals) > 2:  # a block read must never be torn into many writes
                errors.append(vals)
    finally:
        stop.set()
        th.join()
    assert not errors


# --------------------------------------------------------------------------------- the stage


async def test_aec_stage_cancels_echo_in_a_pipeline_and_keeps_times_and_order(agent):
    n = 8 * RATE
    room = Room(OFFICE)
    mix = room.render(np.zeros(n, np.float32), agent[:n])
    ref = EchoReference(seconds=10.0)  # everything is pushed before the pipeline runs
    t_start = 100.0
    for i in range(0, n, 320):  # what the speaker played, stamped on the pipeline clock
        ref.push(agent[i : i + 320], t_start + i / RATE)
    frames = [AudioFrame(samples=mix.mic[i : i + 320].copy(), pts=t_start + i / RATE) for i in range(0, n, 320)]
    marker = ErrorFrame(stage="test", message="in order", pts=frames[100].pts)
    stream = frames[:101] + [marker] + frames[101:] + [Flush(pts=t_start + n / RATE)]
    stage = AECStage(AECConfig(ref_margin_ms=0.0), ref)
    out = await run_frames([stage], stream)
    audio = [f for f in out if isinstance(f, AudioFrame)]
    assert [f.pts for f in audio] == [f.pts for f in frames]
    assert all(f.num_samples == 320 for f in audio)
    assert all(f.stamp("aec") is not None for f in audio)
    kinds = [type(f) for f in out]
    assert kinds.index(ErrorFrame) == 101  # behind the 101 audio frames sent before it
    assert kinds[-2:] == [Flush, EndOfStream]
    cleaned = np.concatenate([f.samples for f in audio])
    assert db(mix.mic[2 * RATE :], cleaned[2 * RATE :]) >= 25.0
    assert stage.canceller.stats.delay_estimate_ms == pytest.approx(OFFICE.delay_ms, abs=16)


async def test_aec_stage_without_playback_passes_audio_through(user):
    frames = [AudioFrame(samples=user[i : i + 480].copy(), pts=i / RATE) for i in range(0, 3 * RATE, 480)]
    out = await run_frames([AECStage(AECConfig(), EchoReference())], frames)
    audio = [f for f in out if isinstance(f, AudioFrame)]
    assert [f.pts for f in audio] == [f.pts for f in frames]
    got = np.concatenate([f.samples for f in audio])
    assert np.allclose(got, user[: 3 * RATE], atol=1e-6)


async def test_aec_stage_refuses_other_rates():
    with pytest.raises(ExceptionGroup) as info:
        await run_frames([AECStage()], [AudioFrame(samples=np.zeros(441, np.float32), sample_rate=44100)])
    assert info.group_contains(ValueError, match="16000")


# ------------------------------------------------------------------------- config and speaker


def test_aec_config_section(tmp_path):
    from agent.config import load_config
    from streaming.errors import ConfigError

    cfg = load_config(None, {"aec.block": 256, "aec.suppression_db": 30}, environ={}, use_user_default=False)
    assert cfg.aec.block == 256 and cfg.aec.suppression_db == 30
    assert EchoCanceller(cfg.aec).latency == 511
    with pytest.raises(ConfigError, match="aec.block"):
        load_config(None, {"aec.block": 100}, environ={}, use_user_default=False)
    with pytest.raises(ConfigError, match="aec.tial_ms"):
        load_config(None, {"aec.tial_ms": 100}, environ={}, use_user_default=False)


@pytest.mark.audio_device
async def test_speaker_sink_feeds_the_reference_and_the_loop_cancels(pulse_null_sink, agent):
    """The real path: SpeakerSink plays into a PulseAudio null sink and pushes what it writes to
    the reference; MicSource records the sink's monitor (the 'echo'); AECStage removes it."""
    from streaming.audio_device import MicSource, SpeakerSink
    from streaming.clock import RealClock
    from streaming.pipeline import Pipeline
    from streaming.stages import Callback, IterableSource

    clock = RealClock()
    ref = EchoReference()
    seconds = 4.0
    play = agent[: int(seconds * RATE)]
    got_in, got_out = [], []
    first = asyncio.Event()

    def on_raw(f):
        got_in.append(f)
        first.set()

    stage = AECStage(AECConfig(), ref)
    mic = MicSource("pulse", max_seconds=seconds + 1.5)
    speaker = SpeakerSink("pulse", reference=ref)
    listener = Pipeline(mic,
                        [Callback(on_raw, (AudioFrame,), name="raw"), stage,
                         Callback(got_out.append, (AudioFrame,), name="out")], clock=clock)
    capture = asyncio.create_task(listener.run())
    await asyncio.wait_for(first.wait(), timeout=10)
    await asyncio.sleep(0.2)
    frames = [AudioFrame(samples=play[i : i + 320].copy(), pts=i / RATE) for i in range(0, len(play), 320)]
    await Pipeline(IterableSource(frames), [speaker], clock=clock).run()
    await asyncio.wait_for(capture, timeout=seconds + 10)
    assert ref.last_sound > 0  # the sink pushed what it played
    raw = np.concatenate([f.samples for f in got_in])
    out = np.concatenate([f.samples for f in got_out])
    assert len(out) == len(raw)
    start = 2 * RATE  # give the canceller time to find the device latency and converge
    assert np.sqrt(np.mean(raw[start:] ** 2)) > 0.01  # the loop really carried the speech
    # judged per half second of echo: on a shared machine the device's timing can jump once (the
    # echo path moves) and the canceller takes up to half a second to follow it (that recovery is
    # tested on its own: test_an_echo_path_that_jumps_...)
    half = RATE // 2
    spans = [slice(i, i + half) for i in range(start, len(raw) - half + 1, half)]
    wins = [db(raw[s], out[s]) for s in spans if np.sqrt(np.mean(raw[s] ** 2)) > 0.01]
    stats = stage.canceller.stats
    why = (f"dB per half second {np.round(wins, 1).tolist()}; reference re-anchors {ref.reanchors}, "
           f"path changes {stats.path_changes}, mic overflows {mic.overflows} / dropped blocks "
           f"{mic.dropped_blocks}, speaker underflows {speaker.underflows}")
    assert len(wins) >= 3, why
    assert np.median(wins) > 20.0, why
    assert sum(w < 20.0 for w in wins) <= 1, why
    # the linear filter did its share: the reference was stamped no later than the echo came back
    # (with the reported DAC time it was 20-30 ms late here, and only the post-filter worked)
    assert stats.erle_linear_db > 6.0, why


def test_bench_aec_command_reports_the_rooms(duplex_bin, tmp_path):
    import json
    import subprocess

    # a small manifest in the shared format; the user's voice is taken from "ljspeech" rows
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "ljspeech_fixture.wav").symlink_to(asterisk("demo-congrats"))
    (tmp_path / "manifest.tsv").write_text(
        "file\tduration_s\ttranscript\tlanguage\tsource\tlicense\ttranscript_quality\tnotes\n"
        "en/ljspeech_fixture.wav\t30\tx\ten\tdeb\tCC-BY-SA-3.0\texact_script\t\n"
    )
    out = tmp_path / "aec.json"
    r = subprocess.run([str(duplex_bin), "bench", "aec", "--seconds", "10", "--rooms", "2", "--manifest",
                        str(tmp_path / "manifest.tsv"), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| room |" in r.stdout and "Cost per 10 ms" in r.stdout
    res = json.loads(out.read_text())
    assert [x["room"] for x in res["rooms"]] == ["laptop, small room", "office"]
    for room in res["rooms"]:
        assert room["vad_raw_echo_segments"] >= 1 and room["vad_aec_echo_segments"] == 0
        assert room["erle_single_db"] > 20 and room["vad_user_recall"] > 0.8
    assert res["cost"]["active_p50_us"] < 1000
    bad = subprocess.run([str(duplex_bin), "bench", "aec", "--manifest", str(tmp_path / "none.tsv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("duplex: error: no such manifest")
