"""``duplex bench asr``: streaming recognition against faster-whisper on the same weights.

Our streaming path is replayed with *measured compute on a virtual clock*: audio arrives at its
real-time position; each piece of work (VAD, partial hypothesis, final pass) takes the wall time it
really took, during which later audio queues up exactly as it would live with one worker. So
latencies are those of a live run, while silence costs nothing and the set runs faster than real
time. faster-whisper runs offline on each whole utterance (its normal use), greedy and with its
``hotwords=`` option, on the same CTranslate2 files.
"""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.frames import FinalText, PartialText, SpeechEnded, SpeechEnding, SpeechStarted
from streaming.vad import TwoStageVAD, VADConfig

BLOCK = 320  # 20 ms frames, as the live pipeline
DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------------ data


@dataclass
class Row:
    path: Path
    duration: float
    reference: str


def load_rows(manifest: Path, language: str = "en", limit: int | None = None) -> list[Row]:
    if not manifest.exists():
        raise DuplexError(f"no such manifest: {manifest}")
    rows = []
    with open(manifest, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["language"] == language and r["transcript_quality"] in ("exact", "exact_script"):
                rows.append(Row(manifest.parent / r["file"], float(r["duration_s"]), r["transcript"]))
    if not rows:
        raise DuplexError(f"{manifest} has no {language} rows with exact transcripts")
    return rows[:limit] if limit else rows


def load_hotwords(path: Path) -> tuple[list[str], list[str]]:
    targets, distractors = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("kind\t"):
            continue
        kind, word = line.split("\t", 1)
        (targets if kind == "target" else distractors).append(word.strip())
    return targets, distractors


_NORMALIZER = None


def normalize(text: str) -> str:
    """Whisper's English normaliser (case, punctuation, spelled-out numbers -> digits), after
    spelling out the IVR scripts' keypad symbols and opening parentheses."""
    global _NORMALIZER
    if _NORMALIZER is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer({})
    text = text.replace("#", " pound ").replace("*", " star ").replace("-", " ")
    # Whisper's normaliser deletes whatever stands in parentheses or brackets (meant for sound
    # tags such as "(laughs)"); in a reference that is spoken text (LJ001-0024: "(which also was
    # printed at Maintz by Peter Schoeffer ...)"), so keep the words and drop the marks
    text = re.sub(r"[()\[\]<>]", " ", text)
    return " ".join(_NORMALIZER(text).split())


def _phrase(word: str) -> str:
    return normalize(word)


def count_phrase_exact(text: str, phrase: str) -> int:
    """The first definition: the normalised phrase as whole words, spelled exactly so."""
    return len(re.findall(rf"(?<!\S){re.escape(phrase)}(?!\S)", text)) if phrase else 0


def _spans(words: list[str], phrase: str) -> list[tuple[int, int]]:
    """Runs of up to four whole words whose letters, joined, spell ``phrase`` joined;
    non-overlapping, left to right, as (first, last + 1)."""
    key = phrase.replace(" ", "")
    out: list[tuple[int, int]] = []
    i = 0
    while key and i < len(words):
        joined = ""
        for j in range(i, min(i + 4, len(words))):
            joined += words[j]
            if joined == key:
                out.append((i, j + 1))
                i = j
                break
            if not key.startswith(joined):
                break
        i += 1
    return out


def count_phrase(text: str, phrase: str) -> int:
    """How often ``phrase`` occurs in ``text`` (both normalised), blind to how a compound is split:
    "touchtone", "touch tone" and "touch-tone" are one word to a listener, and the references
    and Whisper each write them both ways."""
    return len(_spans(text.split(), phrase))


def strip_phrases(text: str, phrases: list[str]) -> str:
    """``text`` without the words of any occurrence of ``phrases`` (for WER on the other words)."""
    words = text.split()
    drop: set[int] = set()
    for p in phrases:
        for a, b in _spans(words, p):
            drop.update(range(a, b))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


# --------------------------------------------------------------------------------- our path


@dataclass
class StreamRun:
    text: str
    final_latency_s: float | None  # after the last sample (EOF flush) or the VAD end decision
    stable_delays_s: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    audio_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


def replay(recognizer: StreamingRecognizer, vad: TwoStageVAD, audio: np.ndarray) -> StreamRun:
    """One file through VAD + recogniser on the compute-accounting virtual clock."""
    rs, vs = recognizer.init_state(), vad.init_state()
    busy = 0.0  # virtual time at which the worker is free
    # finals with the (utterance, segment) their words were committed in; a long utterance is cut
    # into segments, and the committed-word count restarts with each
    finals: list[tuple[float, FinalText, tuple[int, int]]] = []
    stable_count: list[tuple[float, int, tuple[int, int]]] = []
    committed, segment = 0, 0
    latencies: list[float] = []
    compute = 0.0
    steps: list[float] = []

    def run(fn, *args):
        nonlocal compute
        t = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t
        compute += dt
        return out, dt

    def take(frames, now: float, dt: float) -> None:
        nonlocal committed, segment
        for f in frames:
            if isinstance(f, PartialText):
                steps.append(dt)
                committed += len(f.new_stable_words)
                stable_count.append((now, committed, (f.utterance, segment)))
            elif isinstance(f, FinalText):
                finals.append((now, f, (f.utterance, segment)))
                if f.continued:
                    segment += 1
                    committed = 0

    for i in range(0, len(audio), BLOCK):
        chunk = audio[i : i + BLOCK]
        t_avail = (i + len(chunk)) / 16000  # the frame exists once its last sample is captured
        now = max(t_avail, busy)
        behind = busy > t_avail
        events, dt = run(vad.step, vs, chunk, i / 16000)
        now += dt
        for e in events:
            if isinstance(e, SpeechStarted):
                recognizer.start(rs, e.pts)
                committed, segment = 0, 0
            elif isinstance(e, SpeechEnding):
                now += run(recognizer.ending, rs, e)[1]
            elif isinstance(e, SpeechEnded):
                out, dt = run(recognizer.end, rs, e.pts)
                now += dt
                take(out, now, dt)
                if out:
                    latencies.append(now - max(e.detected_at, e.pts))
        out, dt = run(recognizer.push, rs, chunk, i / 16000, not behind)
        now += dt
        take(out, now, dt)
        busy = now
    end = len(audio) / 16000
    now = max(end, busy)
    out, dt = run(recognizer.finish, rs)
    take(out, now + dt, dt)
    if out:
        latencies.append(now + dt - end)
    # when did each final word first become stable?
    delays = []
    for t_final, f, key in finals:
        counts = [(t, n) for t, n, k in stable_count if k == key]
        for k, w in enumerate(f.words):
            first = next((t for t, n in counts if n > k), t_final)
            delays.append(first - w.end)
    text = " ".join(f.text for _, f, _ in finals)
    return StreamRun(text, latencies[-1] if latencies else None, delays, compute, end, steps)


# ----------------------------------------------------------------------------- faster-whisper


def faster_whisper_model(ct2_dir: Path):
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise DuplexError("faster-whisper is the benchmark peer: pip install 'duplex[bench]'") from None
    return WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=2)


def run_faster_whisper(model, audio: np.ndarray, hotwords: str | None, beam: int) -> tuple[str, float]:
    t = time.perf_counter()
    segs, _ = model.transcribe(audio, language="en", beam_size=beam, hotwords=hotwords, condition_on_previous_text=False,
                               vad_filter=False, without_timestamps=True)
    text = " ".join(s.text.strip() for s in segs)
    return text, time.perf_counter() - t


# ---------------------------------------------------------------------------------- scoring


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    return jiwer.wer([r for r, _ in pairs], [h if h else "<empty>" for _, h in pairs])


def hotword_scores(refs: list[str], hyps: list[str], targets: list[str], distractors: list[str]) -> dict:
    """Recall of the targets, WER on the other words (every occurrence of a target phrase taken
    out of reference and hypothesis alike), and four views of leakage, as shares of utterances:

    * ``leakage_rate`` (the issue's "a hotword that is not spoken must not appear"): the
      hypothesis holds a listed phrase, target or distractor, that the reference does not hold at
      all;
    * ``distractor_leakage_rate``: the same for the distractors alone;
    * ``over_production_rate``: a listed phrase appears more often in the hypothesis than in the
      reference (a spoken target written once too often is an insertion: WER counts it too);
    * ``leakage_rate_v1``: the first definition, over-production with exact spelling
      (``count_phrase_exact``), which also counted "touchtone" against a reference that
      writes "touch tone".
    """
    t_phr = [p for p in (_phrase(w) for w in targets) if p]
    d_phr = [p for p in (_phrase(w) for w in distractors) if p]
    found = total = 0
    absent = distracted = over = v1 = 0
    for r, h in zip(refs, hyps):
        for p in t_phr:
            n = count_phrase(r, p)
            total += n
            found += min(n, count_phrase(h, p))
        counts = [(count_phrase(h, p), count_phrase(r, p)) for p in d_phr + t_phr]
        absent += any(nh > 0 and nr == 0 for nh, nr in counts)
        distracted += any(nh > 0 and nr == 0 for nh, nr in counts[: len(d_phr)])
        over += any(nh > nr for nh, nr in counts)
        v1 += any(count_phrase_exact(h, p) > count_phrase_exact(r, p) for p in d_phr + t_phr)
    n = len(refs) or 1
    return {
        "hotword_recall": found / total if total else None,
        "hotword_occurrences": total,
        "non_hotword_wer": wer([strip_phrases(r, t_phr) for r in refs], [strip_phrases(h, t_phr) for h in hyps]),
        "leakage_rate": absent / n,
        "distractor_leakage_rate": distracted / n,
        "over_production_rate": over / n,
        "leakage_rate_v1": v1 / n,
    }


def leaks(ref: str, hyp: str, targets: list[str], distractors: list[str]) -> list[tuple[str, int, int]]:
    """(phrase, in hypothesis, in reference) for every listed phrase the hypothesis over-produces."""
    out = []
    for p in [_phrase(w) for w in distractors + targets]:
        nh, nr = count_phrase(hyp, p), count_phrase(ref, p)
        if p and nh > nr:
            out.append((p, nh, nr))
    return out


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "n": 0}
    v = np.array(values)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "n": len(values)}


# ------------------------------------------------------------------------------------ bench


SYSTEMS = {
    "ours_streaming": "duplex streaming",
    "ours_streaming_hotwords": "duplex streaming + hotwords",
    "faster_whisper_greedy": "faster-whisper offline, greedy",
    "faster_whisper_beam5": "faster-whisper offline, beam 5",
    "faster_whisper_hotwords": "faster-whisper offline, beam 5 + hotwords=",
}
#: short names for ``--systems``
SYSTEM_ALIASES = {"ours": "ours_streaming", "ours+hot": "ours_streaming_hotwords", "fw-greedy": "faster_whisper_greedy",
                  "fw-beam5": "faster_whisper_beam5", "fw-hot": "faster_whisper_hotwords"}


def parse_systems(spec: str | None) -> list[str]:
    """``--systems``: comma-separated keys of ``SYSTEMS`` or their aliases; all five by default."""
    if not spec:
        return list(SYSTEMS)
    out = []
    for item in (x.strip() for x in spec.split(",")):
        key = SYSTEM_ALIASES.get(item, item)
        if key not in SYSTEMS:
            raise DuplexError(f"unknown system {item!r}; choose from {', '.join([*SYSTEM_ALIASES, *SYSTEMS])}")
        if key not in out:
            out.append(key)
    if not out:
        raise DuplexError("--systems names no system")
    return out


def bench_model(name: str, bundle, ct2_dir: Path, rows: list[Row], asr: ASRConfig, vad_cfg: VADConfig,
                targets: list[str], distractors: list[str], progress=None, systems: list[str] | None = None) -> dict:
    import torch

    torch.set_num_threads(1)  # as the ASR stage's worker thread runs it
    audio = [read_audio(r.path) for r in rows]
    refs = [normalize(r.reference) for r in rows]
    hot = ", ".join(targets + distractors)
    res: dict = {"model": name, "files": len(rows), "audio_seconds": sum(len(a) for a in audio) / 16000}

    def ours(cfg: ASRConfig) -> dict:
        rec = StreamingRecognizer(bundle, cfg)
        vad = TwoStageVAD(vad_cfg)
        runs = []
        for a in audio:
            runs.append(replay(rec, vad, a))
            if progress:
                progress()
        hyps = [normalize(r.text) for r in runs]
        return {
            "wer": wer(refs, hyps),
            "final_latency_ms": pct([r.final_latency_s * 1000 for r in runs if r.final_latency_s is not None]),
            "stable_word_delay_ms": pct([d * 1000 for r in runs for d in r.stable_delays_s]),
            "partial_step_ms": pct([s * 1000 for r in runs for s in r.step_s]),
            "rtf": sum(r.compute_s for r in runs) / sum(r.audio_s for r in runs),
            "hyps": hyps,
            "_latencies": [r.final_latency_s * 1000 for r in runs if r.final_latency_s is not None],
            "_stable": [d * 1000 for r in runs for d in r.stable_delays_s],
        }

    def peer(hotwords: str | None, beam: int) -> dict:
        fw = faster_whisper_model(ct2_dir)
        run_faster_whisper(fw, audio[0][:16000], None, beam)  # warm-up
        texts, times = [], []
        for a in audio:
            t, dt = run_faster_whisper(fw, a, hotwords, beam)
            texts.append(normalize(t))
            times.append(dt)
            if progress:
                progress()
        return {"wer": wer(refs, texts), "final_latency_ms": pct([t * 1000 for t in times]),
                "rtf": sum(times) / res["audio_seconds"], "hyps": texts, "_latencies": [t * 1000 for t in times]}

    res["files_list"] = [r.path.name for r in rows]
    res["refs"] = refs
    runners = {
        "ours_streaming": lambda: ours(asr),
        "ours_streaming_hotwords": lambda: ours(ASRConfig(**{**asr.__dict__, "hotwords": tuple(targets + distractors)})),
        "faster_whisper_greedy": lambda: peer(None, 1),
        "faster_whisper_beam5": lambda: peer(None, 5),
        "faster_whisper_hotwords": lambda: peer(hot, 5),
    }
    for key in systems or list(SYSTEMS):
        res[key] = runners[key]()
        res[key].update(hotword_scores(refs, res[key]["hyps"], targets, distractors))
        res[key]["leaks"] = {i: leaks(r, h, targets, distractors) for i, (r, h) in enumerate(zip(refs, res[key]["hyps"]))
                             if leaks(r, h, targets, distractors)}
    return res


def markdown(results: list[dict]) -> str:
    def f(x, nd=3):
        return "–" if x is None else f"{x:.{nd}f}"

    lines = [
        "| model | system | WER | final latency p50 / p90 ms | stable-word delay p50 / p90 ms | RTF | hotword recall | "
        "non-hotword WER | leakage | distractor leakage | over-production | leakage (v1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for key, label in SYSTEMS.items():
            if key not in r:
                continue
            s = r[key]
            lat = s["final_latency_ms"]
            st = s.get("stable_word_delay_ms", {"p50": None, "p90": None})
            lines.append(
                f"| {r['model']} | {label} | {f(s['wer'])} | {f(lat['p50'], 0)} / {f(lat['p90'], 0)} | "
                f"{f(st['p50'], 0)} / {f(st['p90'], 0)} | {f(s['rtf'])} | {f(s['hotword_recall'])} | "
                f"{f(s['non_hotword_wer'])} | {s['leakage_rate']:.3f} | {s['distractor_leakage_rate']:.3f} | "
                f"{s['over_production_rate']:.3f} | {s['leakage_rate_v1']:.3f} |"
            )
    lines += [
        "",
        "leakage: utterances whose transcript holds a listed hotword (target or distractor) that the reference does not "
        "hold; distractor leakage: the same for distractors; over-production: a listed phrase more often than in the "
        "reference; leakage (v1): the first definition, over-production with exact spelling. Compounds count however "
        "they are split (touchtone = touch tone), except in v1.",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for key, style in (("ours_streaming", "-"), ("faster_whisper_greedy", "--")):
            if key not in r:
                continue
            lat = sorted(r[key]["_latencies"])
            if lat:
                axes[0].plot(lat, np.linspace(0, 1, len(lat)), style, label=f"{r['model']} {key.replace('_', ' ')}")
        st = sorted(r.get("ours_streaming", r.get("ours_streaming_hotwords", {})).get("_stable", []))
        if st:
            axes[1].plot(st, np.linspace(0, 1, len(st)), label=r["model"])
    axes[0].set(title="final transcript latency (CDF)", xlabel="ms after end of speech", ylabel="fraction")
    axes[1].set(title="word end -> first stable appearance (CDF)", xlabel="ms", ylabel="fraction")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def strip_private(results: list[dict]) -> list[dict]:
    return [{k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
             for k, v in r.items()} for r in results]



def current_rss_mb() -> float:
    """Resident memory now (not the peak that ``ru_maxrss`` gives), from /proc; the peak where
    /proc is missing."""
    import os
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def monologue(bundle, rows: list[Row], asr: ASRConfig, minutes: float = 10.0) -> dict:
    """A long monologue (the manifest's speech joined with 150 ms gaps, too short for VAD to end
    the utterance) streamed with one open utterance: step time, resident memory per minute (at
    its end, lowest and highest, sampled every second of audio; and the process's peak), the
    recogniser state's size, and the WER of its finals against the joined references (the
    window cuts every ``max_window_s``: words lost or doubled at a cut show here)."""
    import resource

    import torch

    torch.set_num_threads(1)
    pieces, refs, total = [], [], 0
    gap = np.zeros(2400, dtype=np.float32)
    while total < minutes * 60 * 16000:
        for r in rows:
            a = read_audio(r.path)
            pieces += [a, gap]
            refs.append(r.reference)
            total += len(a) + len(gap)
            if total >= minutes * 60 * 16000:
                break
    audio = np.concatenate(pieces)
    del pieces
    rec = StreamingRecognizer(bundle, asr)
    state = rec.init_state()
    rec.start(state, 0.0)
    per_minute: dict[int, list[float]] = {}
    rss: dict[int, float] = {}
    rss_range: dict[int, tuple[float, float]] = {}
    peak: dict[int, float] = {}
    sizes: dict[int, dict] = {}
    finals: list[str] = []
    for i in range(0, len(audio), BLOCK):
        t = time.perf_counter()
        out = rec.push(state, audio[i : i + BLOCK], i / 16000)
        dt = time.perf_counter() - t
        minute = int(i / 16000 // 60)
        if any(isinstance(f, PartialText) for f in out):
            per_minute.setdefault(minute, []).append(dt * 1000)
        finals += [f.text for f in out if isinstance(f, FinalText)]
        if (i // BLOCK) % 50 == 0 or int((i + BLOCK) / 16000 // 60) != minute or i + BLOCK >= len(audio):
            # every second and at the minute's last block: memory as it stands
            now = current_rss_mb()
            lo, hi = rss_range.get(minute, (now, now))
            rss_range[minute] = (min(lo, now), max(hi, now))
            rss[minute] = now
            peak[minute] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            sizes[minute] = {"buffer_s": round(len(state.buf) / 16000, 2), "context_tokens": len(state.context),
                             "step_seconds_kept": len(state.step_seconds)}
    finals += [f.text for f in rec.finish(state) if isinstance(f, FinalText)]
    return {
        "minutes": round(len(audio) / 16000 / 60, 2),
        "wer": wer([normalize(" ".join(refs))], [normalize(" ".join(finals))]),
        "step_ms_by_minute": {m: pct(v) for m, v in sorted(per_minute.items())},
        "rss_mb_by_minute": rss,
        "rss_mb_range_by_minute": rss_range,
        "peak_rss_mb_by_minute": peak,
        "state_by_minute": sizes,
        "buffer_seconds_at_end": round(len(state.buf) / 16000, 2),
        "final_segments": len(finals),
    }
