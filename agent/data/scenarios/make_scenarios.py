"""Generate the shipped conversation scenarios (format version 1, docs/scenarios.md).

The user's side is synthesised with espeak-ng in female voices, so it never sounds like the agent's
Piper voice (a male US voice), slowly (110-145 words per minute: over these texts Whisper tiny.en misheard
25-47 % of espeak's words at 150 and 16-22 % at 120), plus two synthetic noises (a cough, a knock). Every clip is written
as 16 kHz mono 16-bit WAV to ``audio/``, trimmed to its sound (a clip's start is its speech onset
and its end is its speech end, which is what response latency and barge-in times are measured
from), with its peak at -6 dBFS. Each scenario is written as ``<name>.json`` next to this script.

Deterministic and idempotent: a file is rewritten only when its bytes would change. The committed
WAVs were made with the espeak-ng version in ``ESPEAK_VERSION``; another version may differ slightly.

    python agent/data/scenarios/make_scenarios.py           # (re)generate
    python agent/data/scenarios/make_scenarios.py --check   # exit 1 if anything would change
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

HERE = Path(__file__).resolve().parent
AUDIO = HERE / "audio"
RATE = 16000
PEAK = 0.5  # -6 dBFS
ESPEAK_VERSION = "1.51"


@dataclass(frozen=True)
class Say:
    """Words spoken by espeak-ng. ``speak`` overrides what espeak is given (phonemes in [[...]])
    where its reading of the spelling is not what a person says ("Mm-hmm" is read "em em")."""

    text: str
    voice: str = "en-us+f3"
    speed: int = 160
    speak: str = ""


@dataclass(frozen=True)
class Noise:
    """A synthetic non-speech sound."""

    kind: str  # "cough" or "knock"
    seed: int = 0
    text: str = ""


# every clip, by file name; the texts are what the clip says (what a perfect recogniser would write).
# Voices and speeds were chosen per clip, among female en-us variants at 110-145 words per minute,
# so that Whisper tiny.en recognises the clip: the set measures turn-taking, not recognition.
F2, F3 = "en-us+f2", "en-us+f3"
CLIPS: dict[str, Say | Noise] = {
    # questions
    "q_weather": Say("What's the weather usually like in Spain in the spring?", F2, 135),
    "q_museum": Say("What time does the museum open on Sundays?", F3, 145),
    "q_spider": Say("How many legs does a spider have?", F2, 145),
    "q_ant": Say("And how many legs does an ant have?", F2, 120),
    "q_dragon": Say("Tell me a long story about a dragon who lives in a castle.", F3, 145),
    "q_engine": Say("Can you explain how a car engine works, step by step?", F2, 135),
    "q_rome": Say("Tell me about the history of ancient Rome.", F2, 145),
    "q_book": Say("Describe your favorite book in a lot of detail.", F2, 145),
    "q_planets": Say("Tell me about the planets in our solar system.", F2, 120),
    "q_coffee": Say("How do I make a really good cup of coffee?", F3, 145),
    "q_hiking": Say("What should I pack for a week of hiking in the mountains?", F2, 110),
    "q_climate": Say("What are the main causes of climate change?", F2, 145),
    "q_ocean": Say("Tell me some interesting facts about the ocean.", F2, 120),
    "q_sleep": Say("Give me a few tips for sleeping better.", F3, 145),
    "q_painters": Say("Tell me about the famous painters of the Renaissance.", F3, 145),
    # turns with a mid-sentence pause: a first part that cannot be a whole turn, then the rest
    "p_table_1": Say("I'd like to book a table for", F3, 120),
    "p_table_2": Say("two people tomorrow evening.", F3, 145),
    "p_flight_1": Say("Can you find me a flight to", F3, 145),
    "p_flight_2": Say("Chicago next Monday morning?", F2, 120),
    "p_recipe_1": Say("I need a recipe that uses", F3, 125),
    "p_recipe_2": Say("chicken, rice and some vegetables.", F3, 145),
    "p_remind_1": Say("Please remind me to", F3, 145),
    "p_remind_2": Say("call my sister at six tonight.", F2, 110),
    # interruptions
    "i_stop_please": Say("Stop, please.", F3, 145),
    "i_wait_hold_on": Say("Wait, hold on.", F3, 145),
    "i_greece": Say("Actually, I'd rather hear about Greece.", F2, 120),
    "i_no_no": Say("No no, that is not what I meant.", F3, 135),
    "i_hold_on_stop": Say("Hold on, stop for a second.", F3, 145),
    # backchannels (each checked to come out of Whisper tiny.en as a backchannel)
    "b_uh_huh": Say("Uh-huh.", F3, 130, speak="Uh huh"),
    "b_yeah": Say("Yeah.", F2, 120),
    "b_right": Say("Right.", F2, 120),
    "b_okay": Say("Okay.", F2, 120),
    "b_mm_hmm": Say("Mm-hmm.", F2, 130, speak="[[m,m'h@m]]"),
    "b_i_see": Say("I see.", F2, 120),
    # noises
    "n_cough": Noise("cough", seed=7),
    "n_knock": Noise("knock", seed=11),
}


def respond(clip, **rule):
    return dict(clip=clip, expect="respond", **rule)


SCENARIOS: list[dict] = [
    dict(name="respond_weather", description="A single question: answer it.",
         events=[respond("q_weather", at=0.5)]),
    dict(name="respond_museum", description="A single question: answer it.",
         events=[respond("q_museum", at=0.5)]),
    dict(name="respond_two_questions", description="A question, and a follow-up after the agent has finished.",
         events=[respond("q_spider", at=0.5), respond("q_ant", after="agent_end", offset=0.8)]),
    dict(name="wait_table", description="A mid-sentence pause of 0.9 s must not be taken as the end of the turn.",
         events=[dict(clip="p_table_1", at=0.5, expect="wait"),
                 respond("p_table_2", after="previous_end", offset=0.9)]),
    dict(name="wait_flight", description="A mid-sentence pause of 0.9 s after 'to'.",
         events=[dict(clip="p_flight_1", at=0.5, expect="wait"),
                 respond("p_flight_2", after="previous_end", offset=0.9)]),
    dict(name="wait_recipe", description="A mid-sentence pause of 1.0 s after 'uses'.",
         events=[dict(clip="p_recipe_1", at=0.5, expect="wait"),
                 respond("p_recipe_2", after="previous_end", offset=1.0)]),
    dict(name="wait_reminder", description="A mid-sentence pause of 0.8 s after 'remind me to'.",
         events=[dict(clip="p_remind_1", at=0.5, expect="wait"),
                 respond("p_remind_2", after="previous_end", offset=0.8)]),
    dict(name="stop_please", description="The user stops a long story.",
         events=[respond("q_dragon", at=0.5),
                 dict(clip="i_stop_please", after="agent_start", offset=1.5, expect="stop")]),
    dict(name="stop_hold_on", description="'Wait, hold on.' over an explanation.",
         events=[respond("q_engine", at=0.5),
                 dict(clip="i_wait_hold_on", after="agent_start", offset=1.5, expect="stop")]),
    dict(name="stop_change_topic", description="A real interruption without a stop phrase: the user changes the topic.",
         events=[respond("q_rome", at=0.5),
                 dict(clip="i_greece", after="agent_start", offset=2.0, expect="stop")]),
    dict(name="stop_no_no", description="'No no' and a correction.",
         events=[respond("q_book", at=0.5),
                 dict(clip="i_no_no", after="agent_start", offset=1.2, expect="stop")]),
    dict(name="continue_uh_huh", description="'Uh-huh' while the agent talks: keep talking.",
         events=[respond("q_planets", at=0.5),
                 dict(clip="b_uh_huh", after="agent_start", offset=1.2, expect="continue")]),
    dict(name="continue_yeah_right", description="Two backchannels in one agent turn.",
         events=[respond("q_coffee", at=0.5),
                 dict(clip="b_yeah", after="agent_start", offset=1.0, expect="continue"),
                 dict(clip="b_right", after="agent_start", offset=3.0, expect="continue")]),
    dict(name="continue_okay", description="'Okay' while the agent talks: keep talking.",
         events=[respond("q_hiking", at=0.5),
                 dict(clip="b_okay", after="agent_start", offset=1.5, expect="continue")]),
    dict(name="continue_mm_hmm_i_see", description="'Mm-hmm' and 'I see' in one agent turn.",
         events=[respond("q_climate", at=0.5),
                 dict(clip="b_mm_hmm", after="agent_start", offset=1.0, expect="continue"),
                 dict(clip="b_i_see", after="agent_start", offset=3.0, expect="continue")]),
    dict(name="continue_cough", description="A cough is not an interruption.",
         events=[respond("q_ocean", at=0.5),
                 dict(clip="n_cough", after="agent_start", offset=1.2, expect="continue",
                      note="synthetic cough: shaped noise bursts with a short voiced onset")]),
    dict(name="continue_knock", description="A knock on the table is not an interruption.",
         events=[respond("q_sleep", at=0.5),
                 dict(clip="n_knock", after="agent_start", offset=1.5, expect="continue",
                      note="synthetic knocks: three damped resonances")]),
    dict(name="continue_then_stop", description="A backchannel, then a real stop in the same agent turn.",
         events=[respond("q_painters", at=0.5),
                 dict(clip="b_uh_huh", after="agent_start", offset=1.0, expect="continue"),
                 dict(clip="i_hold_on_stop", after="agent_start", offset=3.5, expect="stop")]),
]


# ------------------------------------------------------------------------------------ synthesis


def espeak(say: Say) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng; scripts/setup does it)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "say.wav"
        subprocess.run([exe, "-v", say.voice, "-s", str(say.speed), "-w", str(out), say.speak or say.text],
                       check=True, capture_output=True)
        audio, rate = sf.read(out, dtype="float64", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, RATE, quality="HQ")


def _shaped_noise(rng: np.random.Generator, n: int, formants) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    shape = 0.03 + sum(a * np.exp(-0.5 * ((f - fc) / bw) ** 2) for fc, bw, a in formants)
    x = np.fft.irfft(spec * shape, n)
    return x / np.abs(x).max()


def cough(seed: int) -> np.ndarray:
    """Two cough bursts: an explosive onset with a brief voiced part, then turbulent noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for length, gap, pitch in ((0.26, 0.14, 190.0), (0.20, 0.0, 170.0)):
        n = int(length * RATE)
        t = np.arange(n) / RATE
        noise = _shaped_noise(rng, n, [(500, 180, 1.0), (1400, 300, 0.7), (2700, 500, 0.35)])
        buzz = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 12))
        env = np.minimum(t / 0.008, 1.0) * np.exp(-t / 0.07)
        parts.append(env * (noise + 0.5 * buzz * np.exp(-t / 0.035)))
        parts.append(np.zeros(int(gap * RATE)))
    return np.concatenate(parts)


def knock(seed: int) -> np.ndarray:
    """Three knocks on a wooden table: a click and two damped resonances each."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, gap in enumerate((0.17, 0.19, 0.0)):
        n = int(0.12 * RATE)
        t = np.arange(n) / RATE
        f0 = 210.0 + 15 * i
        body = np.sin(2 * np.pi * f0 * t) * np.exp(-t / 0.025) + 0.5 * np.sin(2 * np.pi * 3.1 * f0 * t) * np.exp(-t / 0.012)
        click = np.zeros(n)
        click[:32] = rng.standard_normal(32) * np.linspace(1, 0, 32)
        parts.append(body + click)
        parts.append(np.zeros(int(gap * RATE)))
    return np.concatenate(parts)


def trim(x: np.ndarray, lead_ms: float = 5.0, tail_ms: float = 30.0, floor_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing silence: the clip starts and ends with its sound."""
    hop = RATE // 100
    frames = len(x) // hop
    rms = np.sqrt(np.mean(x[: frames * hop].reshape(frames, hop) ** 2, axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > floor_db)
    start = max(0, loud[0] * hop - int(lead_ms * RATE / 1000))
    end = min(len(x), (loud[-1] + 1) * hop + int(tail_ms * RATE / 1000))
    return x[start:end]


def render(clip: Say | Noise) -> np.ndarray:
    if isinstance(clip, Say):
        x = espeak(clip)
    else:
        x = {"cough": cough, "knock": knock}[clip.kind](clip.seed)
    x = trim(x)
    fade = int(0.003 * RATE)  # no click at the cut
    x[:fade] *= np.linspace(0, 1, fade)
    x[-fade:] *= np.linspace(1, 0, fade)
    return (x * (PEAK / np.abs(x).max())).astype(np.float32)


def wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- scenarios


def scenario_json(spec: dict, durations: dict[str, float]) -> str:
    events = []
    for ev in spec["events"]:
        clip = CLIPS[ev["clip"]]
        out = {"audio": f"audio/{ev['clip']}.wav"}
        for key in ("at", "after", "offset", "expect"):
            if key in ev:
                out[key] = ev[key]
        out["text"] = clip.text
        out["duration"] = round(durations[ev["clip"]], 3)
        if "note" in ev:
            out["note"] = ev["note"]
        events.append(out)
    doc = {"version": 1, "name": spec["name"], "description": spec["description"], "events": events}
    return json.dumps(doc, indent=1) + "\n"


def build() -> dict[Path, bytes]:
    """Every file the scenario set consists of, with its content."""
    files: dict[Path, bytes] = {}
    durations: dict[str, float] = {}
    for name, clip in CLIPS.items():
        x = render(clip)
        files[AUDIO / f"{name}.wav"] = wav_bytes(x)
        durations[name] = len(x) / RATE
    for spec in SCENARIOS:
        files[HERE / f"{spec['name']}.json"] = scenario_json(spec, durations).encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is missing or differs")
    args = ap.parse_args(argv)
    files = build()
    changed = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    stale = sorted((set(AUDIO.glob("*.wav")) | set(HERE.glob("*.json"))) - set(files))
    if args.check:
        for p in changed + stale:
            print(f"{'differs' if p.exists() and p not in stale else 'missing' if not p.exists() else 'stale'}: {p.relative_to(HERE)}")
        return 1 if changed or stale else 0
    AUDIO.mkdir(exist_ok=True)
    for p in changed:
        p.write_bytes(files[p])
    for p in stale:
        p.unlink()
    total = sum(len(d) for p, d in files.items() if p.suffix == ".wav")
    print(f"{len(SCENARIOS)} scenarios, {len(CLIPS)} clips ({total / 1e6:.2f} MB): {len(changed)} written, {len(stale)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
