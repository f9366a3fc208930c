"""Two-stage VAD on real recordings and on signals that must not count as speech."""

import numpy as np
import pytest

from fixtures import asterisk, librivox
from streaming.audio_file import read_audio
from streaming.frames import AudioFrame, SpeechEnded, SpeechEnding, SpeechStarted
from streaming.stages import IterableSource
from streaming.testing import run_pipeline
from streaming.vad import TwoStageVAD, VADConfig, VADStage

RATE = 16000
rng = np.random.default_rng(1234)


def run(vad: TwoStageVAD, x: np.ndarray, block: int = 480):
    state = vad.init_state()
    events = []
    for i in range(0, len(x), block):
        events += vad.step(state, x[i : i + block], i / RATE)
    events += vad.finish(state)
    return events, state


def segments(events):
    return [(e.start, e.pts) for e in events if isinstance(e, SpeechEnded)]


def energetic_span(x: np.ndarray) -> tuple[float, float]:
    """First and last 10 ms frame within 16 dB of the loudest: where speech clearly is."""
    rms = np.sqrt(np.mean(x[: len(x) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    loud = np.nonzero(rms > rms.max() * 0.15)[0]
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def noise_floor(n: int, level: float = 0.002) -> np.ndarray:
    return (rng.standard_normal(n) * level).astype(np.float32)


@pytest.mark.parametrize("mode", ["two-stage", "silero", "webrtc"])
def test_two_utterances_with_a_pause_give_two_segments_at_the_right_times(mode):
    a = read_audio(librivox("0880"))  # "he was not an ill disposed young man"
    b = read_audio(asterisk("demo-thanks"))
    gap = np.zeros(int(1.5 * RATE), np.float32)
    lead = np.zeros(RATE, np.float32)
    x = np.concatenate([lead, a, gap, b, lead])
    x = x + noise_floor(len(x))
    events, _ = run(TwoStageVAD(VADConfig(mode=mode)), x)
    segs = segments(events)
    assert len(segs) == 2, segs
    for (start, end), clip, offset in ((segs[0], a, 1.0), (segs[1], b, 1.0 + len(a) / RATE + 1.5)):
        s, e = energetic_span(clip)
        assert offset + s - 0.3 <= start <= offset + s + 0.05
        assert offset + e - 0.05 <= end <= offset + e + 0.5
    # events alternate start/end and every decision comes after the audio that proves it
    kinds = [type(e).__name__ for e in events if not isinstance(e, SpeechEnding)]
    assert kinds == ["SpeechStarted", "SpeechEnded"] * 2
    for e in events:
        if not isinstance(e, SpeechEnding):
            assert e.detected_at >= e.pts
    # each end was announced, at the same pts, before VAD decided it
    for i, e in enumerate(events):
        if isinstance(e, SpeechEnded):
            hints = [h for h in events[:i] if isinstance(h, SpeechEnding) and not h.resumed]
            assert hints and hints[-1].pts == e.pts and hints[-1].decide_at <= e.detected_at + 1e-9


def test_a_pause_inside_speech_is_announced_then_withdrawn():
    """Silence past ``end_hint_ms`` but short of ``min_silence_ms`` sends SpeechEnding and, when
    the voice comes back, SpeechEnding(resumed=True); the segment goes on."""
    a = read_audio(librivox("0880"))
    s, e = energetic_span(a)
    a = a[int(s * RATE) : int(e * RATE)]  # the speech alone: the pause is the gap between copies
    gap = np.zeros(int(0.25 * RATE), np.float32)
    lead = np.zeros(RATE, np.float32)
    x = np.concatenate([lead, a, gap, a, lead]) + noise_floor(2 * len(lead) + 2 * len(a) + len(gap))
    events, _ = run(TwoStageVAD(VADConfig(end_hint_ms=96)), x)
    assert len(segments(events)) == 1
    hints = [e for e in events if isinstance(e, SpeechEnding)]
    # announced and withdrawn in turn (a reader pauses between words too), the last one stands
    assert [h.resumed for h in hints] == [False, True] * (len(hints) // 2) + [False], hints
    gap_at = 1.0 + len(a) / RATE
    assert any(gap_at - 0.2 <= h.pts <= gap_at + 0.15 and not h.resumed for h in hints), hints
    assert hints[-1].pts == segments(events)[0][1]
    assert not any(isinstance(e, SpeechEnding) for e in run(TwoStageVAD(VADConfig(end_hint_ms=0)), x)[0])


@pytest.mark.parametrize(
    "name,signal",
    [
        ("silence", np.zeros(5 * RATE, np.float32)),
        ("noise floor", noise_floor(5 * RATE)),
        ("loud white noise", (rng.standard_normal(5 * RATE) * 0.1).astype(np.float32)),
        ("hum", (0.2 * np.sin(2 * np.pi * 50 * np.arange(5 * RATE) / RATE)).astype(np.float32)),
        ("clicks", np.where(np.arange(5 * RATE) % 8000 < 40, 0.8, 0.0).astype(np.float32)),
    ],
)
def test_nothing_that_is_not_speech_is_detected(name, signal):
    events, state = run(TwoStageVAD(VADConfig(mode="two-stage")), signal)
    assert events == [], f"{name}: {events}"


def test_gate_spares_silero_on_silence_and_reopens_for_speech():
    vad = TwoStageVAD(VADConfig(mode="two-stage"))
    quiet = noise_floor(10 * RATE, 0.0005)
    _, state = run(vad, quiet)
    assert state.silero_hops < state.hops * 0.1
    speech = read_audio(librivox("0880"))
    events, state = run(vad, np.concatenate([quiet, speech, np.zeros(RATE, np.float32)]))
    assert len(segments(events)) == 1
    assert 0 < state.silero_hops < state.hops


def test_block_size_does_not_change_the_decisions():
    x = read_audio(asterisk("demo-congrats"))[: 12 * RATE]
    ref, _ = run(TwoStageVAD(), x, block=512)
    for block in (160, 320, 333, 4096, len(x)):
        got, _ = run(TwoStageVAD(), x, block=block)
        assert [(type(e), round(e.pts, 4)) for e in got] == [(type(e), round(e.pts, 4)) for e in ref]


def test_step_without_state_is_an_error():
    with pytest.raises(ValueError, match="init_state"):
        TwoStageVAD().step(None, np.zeros(512, np.float32), 0.0)


def test_min_speech_rejects_a_short_blip():
    blip = read_audio(librivox("0880"))[int(0.5 * RATE) : int(0.6 * RATE)]  # 100 ms of a word
    x = np.concatenate([np.zeros(RATE, np.float32), blip, np.zeros(RATE, np.float32)])
    events, _ = run(TwoStageVAD(VADConfig(min_speech_ms=250)), x)
    assert events == []


def test_invalid_thresholds_are_refused():
    with pytest.raises(ValueError):
        VADConfig(threshold=0.3, neg_threshold=0.5)


async def test_vad_stage_forwards_all_audio_and_inserts_events_in_order():
    x = np.concatenate([np.zeros(RATE, np.float32), read_audio(librivox("0880")), np.zeros(RATE, np.float32)])
    frames = [AudioFrame(samples=x[i : i + 320].copy(), pts=i / RATE) for i in range(0, len(x), 320)]
    out = await run_pipeline(IterableSource(frames, paced=True), [VADStage()])
    audio = [f for f in out if isinstance(f, AudioFrame)]
    assert len(audio) == len(frames)
    events = [f for f in out if isinstance(f, (SpeechStarted, SpeechEnded))]
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    # an event is emitted right before the audio frame during which it was decided
    for e in events:
        nxt = out[out.index(e) + 1]
        assert isinstance(nxt, AudioFrame) and nxt.pts <= e.detected_at <= nxt.end_pts + 0.032


def _activity(x: np.ndarray, **cfg):
    from streaming.frames import VoiceActivity

    events, _ = run(TwoStageVAD(VADConfig(activity_events=True, **cfg)), x)
    return [(round(e.pts, 3), e.speech) for e in events if isinstance(e, VoiceActivity)], segments(events)


def test_webrtc_hears_the_unvoiced_start_of_stop_before_silero():
    """'Stop, please': Silero scores the s and t under 0.05 and turns the voice on only at the
    vowel; WebRTC's onset comes ~100 ms sooner (barge-in pauses the agent from it). Segments and
    the end of the voice are Silero's either way."""
    from pathlib import Path

    clip = read_audio(Path(__file__).parents[1] / "agent/data/scenarios/audio/i_stop_please.wav")
    x = np.concatenate([noise_floor(RATE // 2), clip, noise_floor(RATE)])
    silero, seg0 = _activity(x, activity_webrtc_ms=0.0)
    early, seg1 = _activity(x, activity_webrtc_ms=30.0)
    on0 = next(t for t, v in silero if v)
    on1 = next(t for t, v in early if v and t > 0.3)  # (WebRTC adapts to a stream's first 100 ms)
    assert 0.5 <= on1 <= 0.6 and on0 - on1 >= 0.06, (silero, early)
    assert seg0 == seg1
    off0 = [t for t, v in silero if not v][-1]
    off1 = [t for t, v in early if not v][-1]
    assert abs(off1 - off0) <= 0.033
    # the early onset is marked, and Silero's agreement follows as an ordinary voice frame
    from streaming.frames import VoiceActivity

    events, _ = run(TwoStageVAD(VADConfig(activity_events=True, activity_webrtc_ms=30.0)), x)
    acts = [(round(e.pts, 3), e.speech, e.early) for e in events if isinstance(e, VoiceActivity) and e.pts > 0.3]
    assert acts[0] == (on1, True, True) and acts[1][1:] == (True, False) and acts[1][0] <= on0 + 0.001, acts
    assert [t for t, v in early if not v and t > 0.3 and t < off1] == [t for t, v in silero if not v and t < off0]


def test_a_webrtc_onset_silero_never_confirms_ends_and_noise_does_not_flap():
    # a knock: WebRTC may turn the voice on, Silero never agrees: it is off within the confirm window
    from pathlib import Path

    knock = read_audio(Path(__file__).parents[1] / "agent/data/scenarios/audio/n_knock.wav")
    acts, segs = _activity(np.concatenate([noise_floor(RATE // 2), knock, noise_floor(RATE)]), activity_webrtc_ms=30.0)
    assert segs == []
    ons = [t for t, v in acts if v]
    offs = [t for t, v in acts if not v]
    assert len(ons) == len(offs) and all(off - on <= 0.16 + 0.064 for on, off in zip(ons, offs)), acts
    # two seconds of loud steady noise: at most one unconfirmed onset, not one every window
    hiss = (rng.standard_normal(2 * RATE) * 0.1).astype(np.float32)
    acts, _ = _activity(np.concatenate([noise_floor(RATE // 2), hiss, noise_floor(RATE // 2)]), activity_webrtc_ms=30.0)
    assert sum(v for t, v in acts if t > 0.3) <= 1, acts
