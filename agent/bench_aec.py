"""``duplex bench aec``: echo cancellation on simulated rooms with real speech.

The agent talks (Piper, the voice the agent really speaks with) for the whole run; the user (a
different speaker: LJSpeech recordings from the shared speech manifest) talks over it in the
middle, from 40 % to 75 % of the run. Each room (``streaming.room``) turns the agent's playback
into echo; the microphone hears echo + user + noise.

How the figures are measured. The canceller adapts on the microphone signal only. Because it is
linear for a given echo estimate and a given sequence of post-filter gains, the same run also
pushes each component of the microphone signal through exactly that processing
(``EchoCanceller.process_parts``): the echo component minus the echo estimate, then the gains,
is the residual echo; the user component through the gains is what became of the user's speech.
So during double talk the residual echo and the user's distortion are separated exactly, without
guessing which part of the output is which.

* ERLE = 10 log10(echo power / residual-echo power) over a window: single talk from 2 s to the
  start of double talk in an echo-only run, during double talk, and after double talk (did the
  filter survive the user talking over it?). "linear" is the adaptive filter alone (the same run
  without the post-filter: the post-filter does not feed back into adaptation).
* User speech during double talk: attenuation (power in / power out) and SNR of the processed
  user component against the clean one (distortion), and the correlation of the whole output with
  the clean user speech.
* VAD (the project's two-stage detector): speech on the raw echo-only microphone signal; speech on
  the cancelled echo-only signal (false barge-ins: must be none); and, in the double-talk run,
  recall of the user's speech (hops the detector marks as speech on the clean user signal) and
  seconds of speech reported outside it.
* Cost: wall time of ``process`` per 10 ms call while the agent talks, and while it is silent
  (bypass).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import numpy as np

from streaming.aec import AECConfig, EchoCanceller
from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.frames import INTERNAL_RATE
from streaming.resample import resample
from streaming.room import Room, RoomConfig
from streaming.vad import TwoStageVAD, VADConfig

RATE = INTERNAL_RATE
CALL = 160  # 10 ms per process() call, as a microphone delivers
AGENT_RMS = 0.1  # -20 dBFS while talking
CONVERGE_S = 2.0

AGENT_TEXT = (
    "Good morning. I have looked at your calendar, and you have three meetings today. "
    "The first one starts at half past nine with the design team, and it should take about an hour. "
    "After lunch there is a call with the supplier about the delayed shipment. "
    "Would you like me to move the last meeting to tomorrow, or shall I leave it where it is? "
    "By the way, the weather looks good this afternoon, so you could walk to the office. "
    "I can also read your new messages: two are from your team and one is from the bank. "
    "The team wants to know whether the review can wait until Thursday. "
    "Let me know if there is anything else I can help you with before you leave."
)

ROOMS: tuple[tuple[str, RoomConfig], ...] = (
    ("laptop, small room", RoomConfig(rt60_s=0.2, delay_ms=20.0, echo_gain_db=-3.0, drr_db=6.0, seed=11)),
    ("office", RoomConfig(rt60_s=0.35, delay_ms=60.0, echo_gain_db=-6.0, drr_db=3.0, seed=12)),
    ("living room, slow playback", RoomConfig(rt60_s=0.5, delay_ms=120.0, echo_gain_db=-8.0, drr_db=0.0, seed=13)),
    ("office, distorting speaker", RoomConfig(rt60_s=0.35, delay_ms=60.0, echo_gain_db=-6.0, drr_db=3.0,
                                              nonlinearity=0.15, seed=12)),
)


def default_manifest() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "manifest.tsv"


def agent_speech(seconds: float, tts) -> np.ndarray:
    """The agent's monologue, at least ``seconds`` long, at AGENT_RMS while talking."""
    chunks = []
    for audio in _deterministic(tts, AGENT_TEXT):
        chunks.append(resample(audio, tts.sample_rate))
        chunks.append(np.zeros(int(0.25 * RATE), np.float32))
    one = np.concatenate(chunks)
    reps = int(np.ceil(seconds * RATE / len(one)))
    out = np.tile(one, reps)[: int(seconds * RATE)]
    return _level(out, AGENT_RMS)


def _deterministic(tts, text: str):
    """Piper samples its prosody noise at random; without it every run hears the same voice."""
    try:
        from piper import SynthesisConfig
    except ImportError:  # another Piper: accept its randomness
        yield from tts.stream(text)
        return
    for chunk in tts.voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)):
        audio = np.asarray(chunk.audio_float_array, dtype=np.float32)
        if audio.size:
            yield audio


def user_speech(manifest: Path, seconds: float) -> tuple[np.ndarray, list[str]]:
    """LJSpeech recordings from the manifest, 0.3 s apart, at least ``seconds`` long."""
    if not manifest.exists():
        raise DuplexError(f"no such manifest: {manifest}")
    rows = []
    with open(manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if "ljspeech" in row["file"] and row.get("language", "en") == "en":
                rows.append(row["file"])
    if not rows:
        raise DuplexError(f"{manifest} lists no LJSpeech recordings (the user's voice in this benchmark)")
    out, used, total = [], [], 0
    for name in sorted(rows):
        audio = read_audio(manifest.parent / name)
        out += [audio, np.zeros(int(0.3 * RATE), np.float32)]
        used.append(name)
        total += len(audio) + int(0.3 * RATE)
        if total >= seconds * RATE:
            break
    return np.concatenate(out)[: int(seconds * RATE)], used


def _level(x: np.ndarray, rms: float) -> np.ndarray:
    active = x[np.abs(x) > 1e-3]
    cur = float(np.sqrt(np.mean(active.astype(np.float64) ** 2))) if len(active) else 1.0
    return (x * (rms / cur)).astype(np.float32)


def _db(num: np.ndarray, den: np.ndarray) -> float:
    a = float(np.sum(num.astype(np.float64) ** 2))
    b = float(np.sum(den.astype(np.float64) ** 2))
    return round(10 * np.log10(max(a, 1e-20) / max(b, 1e-20)), 1)


def run_canceller(config: AECConfig, mic: np.ndarray, ref: np.ndarray, parts: np.ndarray):
    """Output and processed components, aligned with the input."""
    ec = EchoCanceller(config)
    outs, pouts = [], []
    for i in range(0, len(mic), CALL):
        o, p = ec.process_parts(mic[i : i + CALL], ref[i : i + CALL], parts[:, i : i + CALL])
        outs.append(o)
        pouts.append(p)
    o, p = ec.flush_parts()
    out = np.concatenate(outs + [o])[ec.latency :]
    pout = np.concatenate(pouts + [p], axis=1)[:, ec.latency :]
    return out, pout, ec.stats


def time_canceller(config: AECConfig, mic: np.ndarray, ref: np.ndarray) -> dict:
    ec = EchoCanceller(config)
    ec.process(mic[: 10 * CALL], ref[: 10 * CALL])  # compiled (or loaded from numba's cache)
    ec.reset()
    active = []
    for i in range(0, len(mic) - CALL + 1, CALL):
        t = time.perf_counter()
        ec.process(mic[i : i + CALL], ref[i : i + CALL])
        active.append(time.perf_counter() - t)
    silence = np.zeros(CALL, np.float32)
    idle = []
    for i in range(0, min(len(mic), 10 * RATE) - CALL + 1, CALL):
        t = time.perf_counter()
        ec.process(mic[i : i + CALL], silence)
        idle.append(time.perf_counter() - t)
    idle = idle[len(idle) // 2 :]  # once the bypass has engaged
    us = lambda xs, q: round(float(np.percentile(xs, q)) * 1e6, 1)  # noqa: E731
    return {
        "active_p50_us": us(active, 50), "active_p90_us": us(active, 90), "active_max_us": us(active, 100),
        "idle_p50_us": us(idle, 50), "idle_p90_us": us(idle, 90), "idle_engaged": ec.stats.idle,
    }


def vad_hops(vad: TwoStageVAD, audio: np.ndarray) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Per-10-ms speech mask and the segments of the two-stage detector."""
    segs = vad.segments(audio)
    mask = np.zeros(int(np.ceil(len(audio) / CALL)), bool)
    for a, b in segs:
        mask[int(a * 100) : int(np.ceil(b * 100))] = True
    return mask, segs


def bench_room(name: str, room_cfg: RoomConfig, config: AECConfig, vad: TwoStageVAD,
               agent: np.ndarray, user_clip: np.ndarray, seconds: float) -> dict:
    n = len(agent)
    room = Room(room_cfg)
    dt0, dt1 = int(0.4 * seconds * RATE), int(0.75 * seconds * RATE)
    echo = room.echo(agent)
    user = np.zeros(n, np.float32)
    clip = user_clip[: dt1 - dt0]
    # the user as loud at the microphone as the agent's echo (0 dB signal-to-echo ratio)
    user[dt0 : dt0 + len(clip)] = _level(clip, float(np.sqrt(np.mean(echo[dt0:dt1].astype(np.float64) ** 2))))
    res: dict = {"room": name, "rt60_s": room_cfg.rt60_s, "delay_ms": room_cfg.delay_ms,
                 "echo_gain_db": room_cfg.echo_gain_db, "nonlinearity": room_cfg.nonlinearity,
                 "double_talk_s": [round(dt0 / RATE, 2), round(dt1 / RATE, 2)]}
    conv = int(CONVERGE_S * RATE)
    linear = dataclasses.replace(config, suppression_db=0.0)

    # echo only
    mix = room.render(np.zeros(n, np.float32), agent)
    parts = np.stack([mix.echo, mix.noise])
    out, pout, stats = run_canceller(config, mix.mic, agent, parts)
    _, lpout, _ = run_canceller(linear, mix.mic, agent, parts)
    res["erle_single_db"] = _db(mix.echo[conv:dt0], pout[0][conv:dt0])
    res["erle_single_linear_db"] = _db(mix.echo[conv:dt0], lpout[0][conv:dt0])
    res["erle_single_whole_run_db"] = _db(mix.echo[conv:], pout[0][conv:])
    res["erle_first_second_db"] = _db(mix.echo[:RATE], pout[0][:RATE])
    res["delay_estimate_ms"] = stats.delay_estimate_ms
    raw_mask, raw_segs = vad_hops(vad, mix.mic)
    aec_mask, aec_segs = vad_hops(vad, out)
    res["vad_raw_echo_segments"] = len(raw_segs)
    res["vad_raw_echo_speech_s"] = round(raw_mask.sum() / 100, 2)
    res["vad_aec_echo_segments"] = len(aec_segs)
    res["vad_aec_echo_speech_s"] = round(aec_mask.sum() / 100, 2)
    res["vad_aec_echo_segments_s"] = [[round(a, 2), round(b, 2)] for a, b in aec_segs]

    # double talk
    mix = room.render(user, agent)
    parts = np.stack([mix.echo, mix.user, mix.noise])
    out, pout, stats = run_canceller(config, mix.mic, agent, parts)
    _, lpout, _ = run_canceller(linear, mix.mic, agent, parts)
    w = slice(dt0, dt1)
    res["erle_double_talk_db"] = _db(mix.echo[w], pout[0][w])
    res["erle_double_talk_linear_db"] = _db(mix.echo[w], lpout[0][w])
    res["erle_after_double_talk_db"] = _db(mix.echo[dt1:], pout[0][dt1:])
    res["erle_after_double_talk_linear_db"] = _db(mix.echo[dt1:], lpout[0][dt1:])
    res["user_attenuation_db"] = _db(mix.user[w], pout[1][w])
    res["user_snr_db"] = _db(mix.user[w], pout[1][w] - mix.user[w])
    res["output_correlation_with_user"] = round(float(np.corrcoef(out[w], mix.user[w])[0, 1]), 3)
    res["mic_correlation_with_user"] = round(float(np.corrcoef(mix.mic[w], mix.user[w])[0, 1]), 3)
    ref_mask, _ = vad_hops(vad, mix.user + mix.noise)
    dt_mask, _ = vad_hops(vad, out)
    res["vad_user_recall"] = round(float((dt_mask & ref_mask).sum() / max(1, ref_mask.sum())), 3)
    res["vad_false_speech_s"] = round(float((dt_mask & ~ref_mask).sum()) / 100, 2)
    res["foreground_updates"] = stats.foreground_updates
    res["background_resets"] = stats.background_resets
    return res


def bench(config: AECConfig, vad_config: VADConfig, tts, manifest: Path, seconds: float,
          rooms=ROOMS, progress=None) -> dict:
    if seconds < 8:
        raise DuplexError("--seconds must be at least 8 (2 s to converge, then single talk, double talk, single talk)")
    import torch

    # Silero runs here in the main thread: one intra-op thread, as in the VAD stage's worker (on
    # 2 busy cores, more threads only spin; measured 7 s of CPU for a 10 s run with one, 42 s without)
    torch.set_num_threads(1)
    agent = agent_speech(seconds, tts)
    user_clip, used = user_speech(manifest, 0.35 * seconds + 1)
    vad = TwoStageVAD(vad_config)
    results = {"seconds": seconds, "config": dataclasses.asdict(config), "agent": f"Piper ({tts.source})",
               "user": used, "manifest": str(manifest), "rooms": []}
    for name, room_cfg in rooms:
        results["rooms"].append(bench_room(name, room_cfg, config, vad, agent, user_clip, seconds))
        if progress:
            progress(name)
    mic = Room(rooms[1][1]).mix(np.zeros(len(agent), np.float32), agent)[0]
    results["cost"] = time_canceller(config, mic, agent)
    results["cost"]["block"] = config.block
    results["latency_ms"] = round(1000 * EchoCanceller(config).latency / RATE, 2)
    return results


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"## Echo cancellation: {r['seconds']:.0f} s per room, agent = {r['agent']}, user = LJSpeech "
        f"({len(r['user'])} clips) at 0 dB signal-to-echo",
        "",
        f"block {c['block']} samples, tail {c['tail_ms']:.0f} ms, bulk delay search to {c['max_delay_ms']:.0f} ms, "
        f"post-filter up to {c['suppression_db']:.0f} dB; latency {r['latency_ms']} ms. ERLE in dB on the echo "
        "component (total / linear filter alone).",
        "",
        "| room | RT60 s | delay ms (est.) | ERLE single talk | ERLE double talk | ERLE after DT | "
        "user atten. dB | user SNR dB | corr(out, user) | VAD raw echo s | VAD AEC echo s | VAD user recall | "
        "VAD false s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rooms"]:
        est = "-" if x["delay_estimate_ms"] is None else f"{x['delay_estimate_ms']:.0f}"
        lines.append(
            f"| {x['room']} | {x['rt60_s']} | {x['delay_ms']:.0f} ({est}) | "
            f"{x['erle_single_db']} / {x['erle_single_linear_db']} | "
            f"{x['erle_double_talk_db']} / {x['erle_double_talk_linear_db']} | "
            f"{x['erle_after_double_talk_db']} / {x['erle_after_double_talk_linear_db']} | "
            f"{x['user_attenuation_db']} | {x['user_snr_db']} | {x['output_correlation_with_user']} "
            f"(mic {x['mic_correlation_with_user']}) | {x['vad_raw_echo_speech_s']} ({x['vad_raw_echo_segments']} seg) | "
            f"{x['vad_aec_echo_speech_s']} ({x['vad_aec_echo_segments']} seg) | {x['vad_user_recall']} | "
            f"{x['vad_false_speech_s']} |"
        )
    k = r["cost"]
    lines += [
        "",
        f"Cost per 10 ms of audio (one core): p50 {k['active_p50_us']} us, p90 {k['active_p90_us']} us, "
        f"max {k['active_max_us']} us while the agent talks; p50 {k['idle_p50_us']} us while it is silent "
        f"(bypass {'engaged' if k['idle_engaged'] else 'NOT engaged'}).",
    ]
    return "\n".join(lines)
