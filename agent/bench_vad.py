"""``duplex bench vad``: frame-level precision/recall and detection delays of the three detectors.

Data: the shared speech manifest. ``vad/`` rows carry marked speech regions in their notes
("speech segments (s): 0.52-0.85 ..."); ``nonspeech`` rows must yield no speech; a ``*.words.json``
next to a ``turns/`` recording gives approximate regions from word times (reported separately).
Each detector runs through the same streaming core as the product, fed 30 ms blocks.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.frames import INTERNAL_RATE, SpeechEnded, SpeechStarted
from streaming.vad import TwoStageVAD, VADConfig

MODES = ("webrtc", "silero", "two-stage")
BLOCK = 480  # 30 ms
RES = 0.01  # frame-level scoring resolution, s
_SEG = re.compile(r"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)")


@dataclass
class Item:
    path: Path
    kind: str  # "marked", "approx" or "nonspeech"
    regions: list[tuple[float, float]] = field(default_factory=list)


def load_items(manifest: Path) -> list[Item]:
    if not manifest.exists():
        raise DuplexError(f"no such manifest: {manifest}")
    root = manifest.parent
    items: list[Item] = []
    with open(manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            path = root / row["file"]
            notes = row.get("notes") or ""
            if row.get("transcript_quality") == "nonspeech":
                items.append(Item(path, "nonspeech"))
            elif "speech segments" in notes:
                regions = [(float(a), float(b)) for a, b in _SEG.findall(notes.split("speech segments", 1)[1])]
                items.append(Item(path, "marked", merge(regions, 0.0)))
            else:
                words = path.with_suffix(".words.json")
                regions = words_to_regions(words) if words.exists() else None
                if regions:
                    items.append(Item(path, "approx", regions))
    if not items:
        raise DuplexError(f"{manifest} lists no VAD-labelled or non-speech files")
    return items


def merge(regions: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(regions):
        if out and a - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def words_to_regions(path: Path, gap: float = 0.3) -> list[tuple[float, float]] | None:
    """Regions from word times, or None where the file has no times (some carry only words)."""
    data = json.loads(path.read_text())
    words = data if isinstance(data, list) else data.get("words", [])
    spans = []
    for w in words:
        start, end = w.get("start_sec", w.get("start")), w.get("end_sec", w.get("end"))
        if start is None or end is None:
            return None
        spans.append((float(start), float(end)))
    return merge(spans, gap) or None


@dataclass
class Run:
    segments: list[tuple[float, float]]
    starts: list[tuple[float, float]]  # (onset estimate, detected_at)
    ends: list[tuple[float, float]]  # (end estimate, detected_at)
    step_ms: list[float]
    duration: float


def run_detector(vad: TwoStageVAD, audio: np.ndarray) -> Run:
    state = vad.init_state()
    starts, ends, segs, step_ms = [], [], [], []
    events = []
    for i in range(0, len(audio), BLOCK):
        t = time.perf_counter()
        events.extend(vad.step(state, audio[i : i + BLOCK], i / INTERNAL_RATE))
        step_ms.append((time.perf_counter() - t) * 1000)
    events.extend(vad.finish(state))
    for e in events:
        if isinstance(e, SpeechStarted):
            starts.append((e.pts, e.detected_at))
        elif isinstance(e, SpeechEnded):
            ends.append((e.pts, e.detected_at))
            segs.append((e.start, e.pts))
    return Run(segs, starts, ends, step_ms, len(audio) / INTERNAL_RATE)


def _mask(regions: list[tuple[float, float]], duration: float) -> np.ndarray:
    m = np.zeros(int(np.ceil(duration / RES)), dtype=bool)
    for a, b in regions:
        m[int(a / RES) : int(np.ceil(b / RES))] = True
    return m


def score(items: list[Item], runs: list[Run]) -> dict:
    tp = fp = fn = 0
    start_delays: list[float] = []
    end_delays: list[float] = []
    missed = 0
    false_alarm_s = 0.0
    false_segments = 0
    nonspeech_s = 0.0
    for item, run in zip(items, runs):
        hyp = _mask(run.segments, run.duration)
        if item.kind == "nonspeech":
            false_alarm_s += hyp.sum() * RES
            false_segments += len(run.segments)
            nonspeech_s += run.duration
            continue
        ref = _mask(item.regions, run.duration)
        tp += int((hyp & ref).sum())
        fp += int((hyp & ~ref).sum())
        fn += int((~hyp & ref).sum())
        for a, b in item.regions:
            overlapping = [j for j, (sa, sb) in enumerate(run.segments) if sa <= b and sb >= a]
            if not overlapping:
                missed += 1
                continue
            j = overlapping[0]
            if run.starts[j][0] >= a - 0.3:  # this segment began at this region, not an earlier one
                start_delays.append(run.starts[j][1] - a)
            k = overlapping[-1]
            if b - 0.3 <= run.segments[k][1] <= b + 1.0 and run.ends[k][1] < run.duration:  # closed by silence
                end_delays.append(run.ends[k][1] - b)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    steps = [s for r in runs for s in r.step_ms]
    audio_s = sum(r.duration for r in runs)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "start_delay_ms": _pcts(start_delays),
        "end_delay_ms": _pcts(end_delays),
        "missed_segments": missed,
        "nonspeech_false_alarm_s": round(false_alarm_s, 3),
        "nonspeech_false_segments": false_segments,
        "nonspeech_seconds": round(nonspeech_s, 3),
        "cost_ms_per_30ms": sum(steps) / max(1, len(steps)),
        "cost_p99_ms": float(np.percentile(steps, 99)) if steps else 0.0,
        "audio_seconds": round(audio_s, 3),
    }


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "n": 0}
    v = np.array(values) * 1000
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "n": len(values)}


def bench(manifest: Path, items: list[Item], config: VADConfig, repeat: int = 3, progress=None) -> dict:
    audio = [read_audio(i.path) for i in items]
    results: dict = {"manifest": str(manifest), "repeat": repeat, "files": [str(i.path.name) for i in items], "modes": {}}
    for mode in MODES:
        vad = TwoStageVAD(VADConfig(**{**config.__dict__, "mode": mode}))
        run_detector(vad, audio[0][: INTERNAL_RATE])  # warm-up (JIT, caches)
        per_set: dict = {}
        costs = []
        for rep in range(repeat):
            runs = [run_detector(vad, a) for a in audio]
            costs.append(sum(s for r in runs for s in r.step_ms) / sum(len(r.step_ms) for r in runs))
            if progress:
                progress(mode, rep)
        for kind in ("marked", "approx"):
            sel = [(i, r) for i, r in zip(items, runs) if i.kind in (kind, "nonspeech")]
            if any(i.kind == kind for i, _ in sel):
                per_set[kind] = score([i for i, _ in sel], [r for _, r in sel])
        per_set["cost_ms_per_30ms_runs"] = {"median": statistics.median(costs), "p90": float(np.percentile(costs, 90)), "runs": costs}
        results["modes"][mode] = per_set
    return results


def markdown(results: dict) -> str:
    def f(x, nd=3):
        return "–" if x is None else f"{x:.{nd}f}"

    lines = []
    for kind, title in (("marked", "marked regions (vad/) + non-speech"), ("approx", "approximate regions from word times (turns/)")):
        if not any(kind in m for m in results["modes"].values()):
            continue
        lines += [f"### {title}", "",
                  "| detector | precision | recall | F1 | start delay p50/p90 ms | end delay p50/p90 ms | missed | non-speech false alarm s | cost ms / 30 ms (median of runs) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode, m in results["modes"].items():
            s = m.get(kind)
            if not s:
                continue
            c = m["cost_ms_per_30ms_runs"]
            lines.append(
                f"| {mode} | {f(s['precision'])} | {f(s['recall'])} | {f(s['f1'])} | "
                f"{f(s['start_delay_ms']['p50'], 0)} / {f(s['start_delay_ms']['p90'], 0)} | "
                f"{f(s['end_delay_ms']['p50'], 0)} / {f(s['end_delay_ms']['p90'], 0)} | {s['missed_segments']} | "
                f"{s['nonspeech_false_alarm_s']:.2f} ({s['nonspeech_false_segments']} segs) | {c['median']:.3f} (p90 {c['p90']:.3f}) |"
            )
        lines.append("")
    return "\n".join(lines)
