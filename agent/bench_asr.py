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
from streaming.frames import FinalText, PartialText, SpeechEnded, SpeechStarted
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
    spelling out the IVR scripts' keypad symbols."""
    global _NORMALIZER
    if _NORMALIZER is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer({})
    text = text.replace("#", " pound ").replace("*", " star ").replace("-", " ")
    return " ".join(_NORMALIZER(text).split())


def _phrase(word: str) -> str:
    return normalize(word)


def count_phrase(text: str, phrase: str) -> int:
    return len(re.findall(rf"(?<!\S){re.escape(phrase)}(?!\S)", text)) if phrase else 0


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
    t_phr = [p for p in (_phrase(w) for w in targets) if p]
    d_phr = [p for p in (_phrase(w) for w in distractors) if p]
    found = total = 0
    leaked = 0
    for r, h in zip(refs, hyps):
        for p in t_phr:
            n = count_phrase(r, p)
            total += n
            found += min(n, count_phrase(h, p))
        if any(count_phrase(h, p) > count_phrase(r, p) for p in d_phr + t_phr):
            leaked += 1
    strip = lambda s: " ".join(w for w in s.split() if not any(w in p.split() for p in t_phr))  # noqa: E731
    return {
        "hotword_recall": found / total if total else None,
        "hotword_occurrences": total,
        "non_hotword_wer": wer([strip(r) for r in refs], [strip(h) for h in hyps]),
        "leakage_rate": leaked / len(refs) if refs else 0.0,
    }


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "n": 0}
    v = np.array(values)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "n": len(values)}


# ------------------------------------------------------------------------------------ bench


def bench_model(name: str, bundle, ct2_dir: Path, rows: list[Row], asr: ASRConfig, vad_cfg: VADConfig,
                targets: list[str], distractors: list[str], progress=None) -> dict:
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

    res["ours_streaming"] = ours(asr)
    res["ours_streaming_hotwords"] = ours(ASRConfig(**{**asr.__dict__, "hotwords": tuple(targets + distractors)}))
    res["faster_whisper_greedy"] = peer(None, 1)
    res["faster_whisper_beam5"] = peer(None, 5)
    res["faster_whisper_hotwords"] = peer(hot, 5)
    for key in ("ours_streaming", "ours_streaming_hotwords", "faster_whisper_greedy", "faster_whisper_beam5", "faster_whisper_hotwords"):
        res[key].update(hotword_scores(refs, res[key]["hyps"], targets, distractors))
    return res


def markdown(results: list[dict]) -> str:
    def f(x, nd=3):
        return "–" if x is None else f"{x:.{nd}f}"

    lines = [
        "| model | system | WER | final latency p50 / p90 ms | stable-word delay p50 / p90 ms | RTF | hotword recall | non-hotword WER | leakage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "ours_streaming": "duplex streaming",
        "ours_streaming_hotwords": "duplex streaming + hotwords",
        "faster_whisper_greedy": "faster-whisper offline, greedy",
        "faster_whisper_beam5": "faster-whisper offline, beam 5",
        "faster_whisper_hotwords": "faster-whisper offline, beam 5 + hotwords=",
    }
    for r in results:
        for key, label in names.items():
            s = r[key]
            lat = s["final_latency_ms"]
            st = s.get("stable_word_delay_ms", {"p50": None, "p90": None})
            lines.append(
                f"| {r['model']} | {label} | {f(s['wer'])} | {f(lat['p50'], 0)} / {f(lat['p90'], 0)} | "
                f"{f(st['p50'], 0)} / {f(st['p90'], 0)} | {f(s['rtf'])} | {f(s['hotword_recall'])} | "
                f"{f(s['non_hotword_wer'])} | {s['leakage_rate']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for key, style in (("ours_streaming", "-"), ("faster_whisper_greedy", "--")):
            lat = sorted(r[key]["_latencies"])
            if lat:
                axes[0].plot(lat, np.linspace(0, 1, len(lat)), style, label=f"{r['model']} {key.replace('_', ' ')}")
        st = sorted(r["ours_streaming"]["_stable"])
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



def monologue(bundle, rows: list[Row], asr: ASRConfig, minutes: float = 10.0) -> dict:
    """A long monologue (the manifest's speech joined with 150 ms gaps, too short for VAD to end
    the utterance) streamed with one open utterance: step time and memory per minute."""
    import resource

    import torch

    torch.set_num_threads(1)
    pieces, total = [], 0
    gap = np.zeros(2400, dtype=np.float32)
    while total < minutes * 60 * 16000:
        for r in rows:
            a = read_audio(r.path)
            pieces += [a, gap]
            total += len(a) + len(gap)
            if total >= minutes * 60 * 16000:
                break
    audio = np.concatenate(pieces)
    rec = StreamingRecognizer(bundle, asr)
    state = rec.init_state()
    rec.start(state, 0.0)
    per_minute: dict[int, list[float]] = {}
    rss: dict[int, float] = {}
    finals = 0
    for i in range(0, len(audio), BLOCK):
        t = time.perf_counter()
        out = rec.push(state, audio[i : i + BLOCK], i / 16000)
        dt = time.perf_counter() - t
        minute = int(i / 16000 // 60)
        if any(isinstance(f, PartialText) for f in out):
            per_minute.setdefault(minute, []).append(dt * 1000)
        finals += sum(isinstance(f, FinalText) for f in out)
        rss[minute] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finals += len(rec.finish(state))
    return {
        "minutes": round(len(audio) / 16000 / 60, 2),
        "step_ms_by_minute": {m: pct(v) for m, v in sorted(per_minute.items())},
        "peak_rss_mb_by_minute": rss,
        "buffer_seconds_at_end": round(len(state.buf) / 16000, 2),
        "final_segments": finals,
    }
