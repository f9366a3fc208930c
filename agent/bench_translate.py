"""``duplex bench translate``: speech translation quality and latency, simultaneous vs offline.

Data: the asterisk prompts of the shared speech manifest are parallel across languages, so a
Spanish (French, Italian) prompt's reference is the English script of the same prompt id (only
ids whose English script the manifest has are used).

Systems, all on the same Whisper weights:

* ``streaming``: our recogniser with Whisper's ``translate`` task, the simultaneous policy on its
  stable words, replayed on a virtual clock that charges every step its measured compute time
  (live latencies without idle waiting; see ``bench_asr``); the output is the emitted segments,
  never revised;
* ``streaming-steps``: the same, but every step runs and takes no time on the clock: the
  hypotheses no longer depend on how busy the machine is (a timed run's step grid follows the
  load, and its BLEU moves by about a point between runs), so variants compare on quality alone;
  its latencies are the policy's own, without compute;
* ``offline``: our whole-file decoding (30 s windows) with the ``translate`` task, by beam search
  (``asr.offline_beam_size``, 5 as Whisper's default; 1: greedy); ``offline-greedy``: the same,
  greedy, as the streaming recogniser decodes (the streaming/offline ratio with the same decoding);
* ``fw``: faster-whisper ``task="translate"`` on the same CTranslate2 files, offline, with the same
  beam size as ours (``fw-int8``: in CTranslate2's int8);
* ``cascade`` (optional): our streaming recogniser transcribing the source, each emitted segment
  translated by Apertium (pivoting through Spanish where there is no direct pair).

Scores: BLEU and chrF (sacrebleu, corpus level) on normalised text (Whisper's English normaliser:
case, punctuation, numbers as digits; the scripts write digits, Whisper often words). Latency:
average lagging (AL, Ma et al. 2020 for speech, with the reference length) on emission times that
include compute (computation-aware) and on the audio time read (non-computation-aware), and the
ending offset: emission of the last word minus the end of the audio. RTF = compute / audio. Ours
offline against faster-whisper: the p-value of the BLEU difference by paired bootstrap over the files;
streaming against ours offline: the BLEU ratio with its paired-bootstrap interval over the files.

``--lead-ms 0,20,60,100`` runs every system on each file once per lead, the file delayed by that
much silence, and scores all the runs as one corpus (each with the file's reference; the bootstrap
resamples files, all of a file's runs together). A lead of tens of ms is nothing a listener hears,
but it moves Whisper's near ties ("press" or "click"): offline beam search's BLEU spanned 1.3 (es) and
1.0 (fr) points over leads of 0-100 ms. Scoring over several leads measures a system, not one draw of its
near ties. Latencies are taken from the end of the lead.

``--monologue`` joins each language's files into one long utterance (``monologue``): a speaker who
does not pause for minutes, which VAD cannot segment. Streaming then depends on the recogniser's
window cuts (``asr.clause_max_window_s``), offline on its 30 s windows with the previous one's text
as context. The report adds how many utterances VAD heard and the longest wait between emissions.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from orchestration.simultaneous import SimultaneousConfig, SimultaneousPolicy
from orchestration.translate import Apertium
from streaming.asr.recognizer import ASRConfig, StreamingRecognizer
from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.frames import FinalText, PartialText, SpeechEnded, SpeechEnding, SpeechStarted
from streaming.vad import TwoStageVAD, VADConfig

BLOCK = 320  # 20 ms frames, as the live pipeline
SYSTEMS = {
    "streaming": "ours, streaming (simultaneous)",
    "streaming-steps": "ours, streaming, every step, compute not charged",
    "offline": "ours, offline (whole file)",
    "offline-greedy": "ours, offline (whole file), greedy",
    "fw": "faster-whisper, offline",
    "fw-int8": "faster-whisper, offline, int8 (CTranslate2's per-row int8, as our int8-row)",
    "cascade": "ours streaming ASR + Apertium",
}
DEFAULT_SYSTEMS = ("streaming", "offline", "fw")
RESAMPLES = 1000  # paired bootstrap resamples (the p-value against faster-whisper, the streaming ratio's interval)
#: the silence between pieces of ``--monologue`` speech, s (VAD ends an utterance at 0.4 s)
MONOLOGUE_GAP_S = 0.15
INTERVAL = 0.9  # coverage of the streaming/offline BLEU ratio's bootstrap interval


@dataclass
class Row:
    path: Path
    duration: float
    prompt: str
    source_text: str
    reference: str


def prompt_id(file: str) -> str | None:
    name = Path(file).name
    if not name.startswith("asterisk_"):
        return None
    return name[len("asterisk_"):].split("_", 1)[1].rsplit(".", 1)[0]


def load_rows(manifest: Path, source: str, target: str = "en", limit: int | None = None) -> list[Row]:
    if not manifest.exists():
        raise DuplexError(f"no such manifest: {manifest}")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    refs = {prompt_id(r["file"]): r["transcript"] for r in rows
            if r["language"] == target and prompt_id(r["file"]) and r["transcript_quality"].startswith("exact")}
    out = [Row(manifest.parent / r["file"], float(r["duration_s"]), prompt_id(r["file"]), r["transcript"], refs[prompt_id(r["file"])])
           for r in rows if r["language"] == source and prompt_id(r["file"]) in refs
           and r["transcript_quality"].startswith("exact")]
    if not out:
        raise DuplexError(f"{manifest} has no {source} asterisk prompts with a {target} script of the same id")
    if limit:
        out = sorted(out, key=lambda r: r.duration)[:limit]
    return out


_NORMALIZER = None


def normalize(text: str) -> str:
    global _NORMALIZER
    if _NORMALIZER is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer({})
    text = text.replace("#", " pound ").replace("*", " star ").replace("-", " ")
    return " ".join(_NORMALIZER(text).split())


# ------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    text: str
    #: (emission time on the virtual clock, audio time read) per emitted target word, in order
    word_times: list[tuple[float, float]]
    compute_s: float
    audio_s: float
    #: utterances VAD heard (streaming runs; a monologue is meant to be one)
    utterances: int | None = None


def replay(recognizer: StreamingRecognizer, vad: TwoStageVAD, audio: np.ndarray, policy: SimultaneousPolicy,
           translate=None, charge: bool = True) -> Run:
    """One file through VAD + recogniser + policy (+ a text translator) on the virtual clock:
    audio arrives at its real-time position, each piece of work takes the wall time it took
    (``charge=False``: no time at all, so the recogniser is never behind and runs every step)."""
    rs, vs, ps = recognizer.init_state(), vad.init_state(), policy.init_state()
    busy = 0.0  # when the recogniser's worker is free
    tr_busy = 0.0  # when the translator's worker is free (a thread of its own, as in the Interpreter)
    compute = 0.0
    words: list[tuple[float, float]] = []
    texts: list[str] = []
    utterances = 0

    def run(fn, *args, **kw):
        nonlocal compute
        t = time.perf_counter()
        out = fn(*args, **kw)
        dt = time.perf_counter() - t
        compute += dt
        return out, (dt if charge else 0.0)

    def take(frames, now: float, read: float) -> None:
        nonlocal tr_busy
        for f in frames:
            if isinstance(f, PartialText):
                segs, dt = run(policy.partial, ps, f)
            elif isinstance(f, FinalText):
                segs, dt = run(policy.final, ps, f)
            else:
                continue
            t = now + dt
            for s in segs:
                text = s.text
                if translate is not None:
                    text, dt2 = run(translate, text)
                    tr_busy = max(tr_busy, t) + dt2
                    t_emit = tr_busy
                else:
                    t_emit = t
                texts.append(text)
                words.extend((t_emit, read) for _ in text.split())

    for i in range(0, len(audio), BLOCK):
        chunk = audio[i : i + BLOCK]
        t_avail = (i + len(chunk)) / 16000
        now = max(t_avail, busy)
        behind = busy > t_avail
        events, dt = run(vad.step, vs, chunk, i / 16000)
        now += dt
        for e in events:
            if isinstance(e, SpeechStarted):
                utterances += 1
                recognizer.start(rs, e.pts)
            elif isinstance(e, SpeechEnding):
                now += run(recognizer.ending, rs, e)[1]
            elif isinstance(e, SpeechEnded):
                out, dt = run(recognizer.end, rs, e.pts)
                now += dt
                take(out, now, t_avail)
        out, dt = run(recognizer.push, rs, chunk, i / 16000, not behind)
        now += dt
        take(out, now, t_avail)
        busy = now
    end = len(audio) / 16000
    now = max(end, busy)
    out, dt = run(recognizer.finish, rs)
    take(out, now + dt, end)
    return Run(" ".join(texts), words, compute, end, utterances)


def faster_whisper(ct2_dir: Path, compute_type: str = "float32"):
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise DuplexError("faster-whisper is the benchmark peer: pip install 'duplex[bench]'") from None
    # one thread, as our recogniser's worker: the real-time factors compare like with like
    return WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type, cpu_threads=1)


def run_fw(model, audio: np.ndarray, language: str, beam_size: int = 1) -> Run:
    import ctranslate2

    # faster-whisper's temperature fallback samples with CTranslate2's generator: seeded for each
    # file, as our fallback's, so that a rerun gives the same text
    ctranslate2.set_random_seed(0)
    t = time.perf_counter()
    segs, _ = model.transcribe(audio, language=language, task="translate", beam_size=beam_size, vad_filter=False,
                               without_timestamps=True)
    text = " ".join(s.text.strip() for s in segs)
    dt = time.perf_counter() - t
    end = len(audio) / 16000
    return Run(text, [(end + dt, end)] * len(text.split()), dt, end)


def run_offline(bundle, audio_path: Path, asr: ASRConfig, audio: np.ndarray | None = None) -> Run:
    from .transcribe import transcribe_offline

    tr = transcribe_offline(audio_path, bundle, asr, audio=audio)
    end = tr.audio_seconds
    return Run(tr.text, [(end + tr.processing_seconds, end)] * len(tr.text.split()), tr.processing_seconds, end)


# ----------------------------------------------------------------------------------- scores


def average_lagging(delays: list[float], source_s: float, ref_words: int) -> float | None:
    """AL = mean over i <= tau of d_i - (i - 1) * |X| / |Y*|, tau the first word emitted after the
    whole source was read (Ma et al. 2020, with the reference length |Y*|)."""
    if not delays or ref_words == 0:
        return None
    rate = source_s / ref_words
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i * rate
        tau += 1
        if d >= source_s:
            break
    return total / tau


def score(runs: list[Run], refs: list[str]) -> dict:
    import sacrebleu

    hyps = [normalize(r.text) for r in runs]
    nrefs = [normalize(r) for r in refs]
    al_ca = [average_lagging([w[0] for w in r.word_times], r.audio_s, len(ref.split())) for r, ref in zip(runs, nrefs)]
    al = [average_lagging([w[1] for w in r.word_times], r.audio_s, len(ref.split())) for r, ref in zip(runs, nrefs)]
    eo = [r.word_times[-1][0] - r.audio_s for r in runs if r.word_times]
    # how long a listener waits for the next words: the longest time between two emissions
    # (the first from the start of the audio)
    waits = [float(np.max(np.diff([0.0, *sorted({t for t, _ in r.word_times})]))) for r in runs if r.word_times]
    audio = sum(r.audio_s for r in runs)

    def stats(v):
        v = [x for x in v if x is not None]
        return {"p50": float(np.median(v)), "mean": float(np.mean(v)), "p90": float(np.percentile(v, 90))} if v else None

    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [nrefs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [nrefs]).score,
        "al_ca_s": stats(al_ca), "al_s": stats(al), "ending_offset_s": stats(eo), "longest_wait_s": stats(waits),
        "rtf": sum(r.compute_s for r in runs) / audio if audio else None,
        "files": len(runs), "audio_s": audio, "empty": sum(1 for h in hyps if not h),
        **({"utterances": sum(r.utterances for r in runs)} if runs and runs[0].utterances is not None else {}),
    }


# ------------------------------------------------------------------------------------ bench


def parse_leads(spec: str | None) -> tuple[float, ...]:
    """``--lead-ms``: milliseconds of silence before each file, one run per value."""
    if not spec:
        return (0.0,)
    try:
        leads = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise DuplexError(f"--lead-ms takes milliseconds separated by commas (e.g. 0,20,60,100), not {spec!r}") from None
    if not leads or any(not 0 <= x <= 5000 for x in leads) or len(set(leads)) < len(leads):
        raise DuplexError(f"--lead-ms needs distinct values from 0 to 5000 ms, got {spec!r}")
    return leads


def parse_systems(spec: str | None) -> list[str]:
    if not spec:
        return list(DEFAULT_SYSTEMS)
    out = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in out if s not in SYSTEMS]
    if bad or not out:
        raise DuplexError(f"unknown system {', '.join(bad) or '(none)'}; choose from {', '.join(SYSTEMS)}")
    return out


def unlead(run: Run, lead: float) -> Run:
    """A run on a file delayed by ``lead`` s of silence, on the file's own clock."""
    if not lead:
        return run
    return Run(run.text, [(t - lead, a - lead) for t, a in run.word_times], run.compute_s, run.audio_s - lead,
               run.utterances)


def monologue(rows: list[Row], source: str, gap_s: float = MONOLOGUE_GAP_S) -> tuple[Row, np.ndarray]:
    """The prompts as one speaker who never pauses: each prompt's speech (as VAD marks it, its
    own pauses included) joined by ``gap_s`` of silence, shorter than VAD's ``min_silence_ms``,
    so the stream holds one utterance of minutes (the recogniser cuts its window every
    ``asr.clause_max_window_s``). Its reference is the prompts' references joined."""
    vad = TwoStageVAD(VADConfig(min_silence_ms=gap_s * 1000, speech_pad_ms=0.0))
    gap = np.zeros(int(gap_s * 16000), np.float32)
    pieces = []
    for r in rows:
        a = read_audio(r.path)
        for lo, hi in vad.segments(a):
            pieces += [a[int(lo * 16000) : int(hi * 16000)], gap]
    audio = np.concatenate(pieces[:-1]) if pieces else np.zeros(0, np.float32)
    row = Row(Path(f"{source}-monologue.wav"), len(audio) / 16000, "monologue",
              " ".join(r.source_text for r in rows), " ".join(r.reference for r in rows))
    return row, audio


def by_file(texts: list[str], n: int) -> list[str]:
    """Each file's ``n`` runs (consecutive) as one text: a file's runs resampled together."""
    return [" ".join(texts[i : i + n]) for i in range(0, len(texts), n)]


def bench_language(source: str, target: str, rows: list[Row], bundle, fw_models: dict, asr: ASRConfig, vad_cfg: VADConfig,
                   policy_cfg: SimultaneousConfig, systems: list[str], progress=None,
                   leads_ms: tuple[float, ...] = (0.0,), joined: bool = False) -> dict:
    leads = [ms / 1000 for ms in leads_ms]
    n = len(leads)
    if joined:  # --monologue: the files as one long utterance
        row, speech = monologue(rows, source)
        rows, originals = [row], [speech]
    else:
        originals = [read_audio(r.path) for r in rows]
    # every file once per lead, a file's runs consecutive: (file 0, lead 0), (file 0, lead 1), ...
    runs_of = [(r, lead) for r in rows for lead in leads]
    audio = [np.concatenate([np.zeros(int(round(lead * 16000)), np.float32), a]) if lead else a
             for a in originals for lead in leads]
    refs = [r.reference for r, _ in runs_of]
    out: dict = {"source": source, "target": target, "systems": {}, "files": [r.prompt for r in rows],
                 "lead_ms": list(leads_ms), "audio_s": sum(len(a) for a in originals) / 16000}
    samples: dict[str, list[str]] = {}
    tasks = {"streaming": replace(asr, task="translate", language=source),
             "cascade": replace(asr, task="transcribe", language=source)}
    tasks["streaming-steps"] = tasks["streaming"]
    for name in systems:
        runs: list[Run] = []
        if name in ("streaming", "streaming-steps", "cascade"):
            rec = StreamingRecognizer(bundle, tasks[name])
            vad = TwoStageVAD(vad_cfg)
            policy = SimultaneousPolicy(policy_cfg)
            tr = None
            if name == "cascade":
                ap = Apertium()
                if not ap.route(source, target):
                    raise DuplexError(f"Apertium has no {source}->{target} route for the cascade; installed: "
                                      + ", ".join(f"{s}->{t}" for s, t in sorted(ap.pairs())))
                tr = lambda text: ap.translate(text, source, target)  # noqa: E731
            for a, (_, lead) in zip(audio, runs_of):
                runs.append(unlead(replay(rec, vad, a, policy, tr, charge=name != "streaming-steps"), lead))
                progress and progress()
        elif name in ("offline", "offline-greedy"):
            beam = 1 if name == "offline-greedy" else asr.offline_beam_size
            for a, (r, lead) in zip(audio, runs_of):
                runs.append(unlead(run_offline(bundle, r.path, replace(asr, task="translate", language=source,
                                                                       offline_beam_size=beam), a), lead))
                progress and progress()
        elif name in ("fw", "fw-int8"):
            for a, (_, lead) in zip(audio, runs_of):
                runs.append(unlead(run_fw(fw_models[name], a, source, asr.offline_beam_size), lead))
                progress and progress()
        out["systems"][name] = {**score(runs, refs), "files": len(rows), "runs": len(runs)}
        samples[name] = [r.text for r in runs]
        if n > 1:  # each lead's corpus alone: how far one draw of the near ties moves the score
            out["systems"][name]["bleu_by_lead"] = [score(runs[j::n], refs[j::n])["bleu"] for j in range(n)]
    # (one monologue is one sample: nothing to resample)
    for name in ("streaming", "streaming-steps"):
        if name in samples and "offline" in samples and len(rows) > 1:
            out["systems"][name]["ratio_interval"] = ratio_interval(refs, samples["offline"], samples[name], runs=n)
    for peer in ("fw", "fw-int8"):
        if peer in samples and "offline" in samples and len(rows) > 1:
            # (sacrebleu resamples sentences: with several leads a file's runs go in as one text)
            out["systems"]["offline"][f"p_vs_{peer}"] = paired_p(by_file(refs, n), by_file(samples[peer], n),
                                                                 by_file(samples["offline"], n))
    out["samples"] = [{"prompt": r.prompt, "lead_ms": round(lead * 1000, 3), "source": r.source_text,
                       "reference": r.reference, **{k: samples[k][i] for k in samples}}
                      for i, (r, lead) in enumerate(runs_of)]
    return out


def paired_p(refs: list[str], base: list[str], other: list[str], resamples: int = RESAMPLES) -> float:
    """The p-value of the BLEU difference between two systems on the same files, by paired
    bootstrap resampling of the files (Koehn 2004; sacrebleu's test, its fixed seed): on two dozen
    prompts a point of BLEU is often one word ("hear" for "listen"), and the test tells such a
    difference from one the files agree on."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    norm = lambda texts: [normalize(t) for t in texts]  # noqa: E731
    test = PairedTest([("base", norm(base)), ("other", norm(other))], {"BLEU": BLEU()}, [norm(refs)],
                      test_type="bs", n_samples=resamples)
    _, scores = test()
    return float(scores["BLEU"][1].p_value)


def ratio_interval(refs: list[str], base: list[str], other: list[str], resamples: int = RESAMPLES,
                   coverage: float = INTERVAL, seed: int = 12345, runs: int = 1) -> list[float] | None:
    """The bootstrap percentile interval of BLEU(other) / BLEU(base) over the files, both systems
    scored on the same resample (paired). With two dozen prompts the streaming/offline ratio moves
    by several points with one file's word choices; the interval says how far from 0.9 a
    measured ratio really is. ``runs``: each file's consecutive texts (one per lead), resampled
    together. None where the base scores 0 on most resamples."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    refs, base, other = ([normalize(t) for t in texts] for texts in (refs, base, other))
    rng = np.random.default_rng(seed)
    ratios = []
    files = len(refs) // runs
    for _ in range(resamples):
        idx = (rng.integers(0, files, files)[:, None] * runs + np.arange(runs)).ravel()
        pick = lambda texts: [texts[i] for i in idx]  # noqa: E731
        b = bleu.corpus_score(pick(base), [pick(refs)]).score
        if b > 0:
            ratios.append(bleu.corpus_score(pick(other), [pick(refs)]).score / b)
    if len(ratios) < resamples / 2:
        return None
    tail = (1 - coverage) / 2 * 100
    return [float(x) for x in np.percentile(ratios, [tail, 100 - tail])]


def _leads_note(meta: dict) -> str:
    leads = meta["lead_ms"]
    if leads == [0]:
        return ""
    return (" Each file ran once per lead of silence (" + ", ".join(f"{x:g}" for x in leads) + " ms), all runs scored as one "
            "corpus; bootstrap over the files, a file's runs together.")


def _fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# bench translate: {meta['model']} ({meta['precision']}), policy {meta['policy']}", "",
             "BLEU and chrF on normalised text; AL (computation-aware, and on audio read) and ending offset in s, p50; "
             f"RTF = compute / audio (one thread). Offline systems (ours and faster-whisper): beam {meta['beam']} "
             "(asr.offline_beam_size; 1 = greedy)." + _leads_note(meta), "",
             "| pair | system | files | BLEU | chrF | AL CA p50 | AL p50 | ending offset p50 | EO p90 | RTF |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, s in res["systems"].items():
            p = lambda k, q="p50": s[k][q] if s[k] else None  # noqa: E731
            lines.append(f"| {res['source']}->{res['target']} | {SYSTEMS[name]} | {s['files']} | {s['bleu']:.1f} | "
                         f"{s['chrf']:.1f} | {_fmt(p('al_ca_s'))} | {_fmt(p('al_s'))} | {_fmt(p('ending_offset_s'))} | "
                         f"{_fmt(p('ending_offset_s', 'p90'))} | {_fmt(s['rtf'], 3)} |")
    lines.append("")
    for res in results:
        for name, s in res["systems"].items():
            if "bleu_by_lead" in s:
                each = ", ".join(f"{b:.1f}" for b in s["bleu_by_lead"])
                lines.append(f"* {res['source']}->{res['target']}, {SYSTEMS[name]}: BLEU at each lead alone {each} "
                             f"(all leads together {s['bleu']:.1f})")
    for res in results:
        st = res["systems"]
        for name in ("streaming", "streaming-steps"):
            if name not in st:
                continue
            span = st[name].get("ratio_interval")
            span = f" ({INTERVAL:.0%} bootstrap interval over the files {span[0]:.2f}-{span[1]:.2f})" if span else ""
            ratios = [f"{st[name]['bleu'] / st[o]['bleu']:.2f} against offline {how}" + (span if o == "offline" else "")
                      for o, how in (("offline", f"beam {meta['beam']}"), ("offline-greedy", "greedy"))
                      if o in st and st[o]["bleu"]]
            if not ratios:
                continue
            if name == "streaming":
                eo = st[name]["ending_offset_s"]
                label, tail = "streaming", (f"(target >= 0.9), ending offset p50 {_fmt(eo['p50'] if eo else None)} s "
                                            "(target <= 2.0)")
            else:  # (its latencies leave compute out: no target applies to them)
                label, tail = "streaming every step", "(quality alone, no compute charged)"
            lines.append(f"* {res['source']}->{res['target']}: {label}/offline BLEU = {'; '.join(ratios)} {tail}")
    for res in results if meta.get("monologue") else []:
        heard = [f"{SYSTEMS[k]}: VAD heard {v['utterances']} utterance(s), the longest wait between emissions "
                 f"{_fmt(v['longest_wait_s']['p50'] if v['longest_wait_s'] else None)} s"
                 for k, v in res["systems"].items() if "utterances" in v]
        lines.append(f"* {res['source']}->{res['target']} as one monologue of {res['audio_s']:.0f} s (the prompts' speech "
                     f"joined by {MONOLOGUE_GAP_S * 1000:.0f} ms gaps)" + ("; " + "; ".join(heard) if heard else ""))
    for res in results:
        st = res["systems"]
        if "offline" not in st:
            continue
        p = {f: st["offline"].get(f"p_vs_{f}") for f in ("fw", "fw-int8")}
        peers = [f"{kind} {st[f]['bleu']:.1f}" + (f" (p = {p[f]:.2f})" if p[f] is not None else "")
                 for f, kind in (("fw", "fp32"), ("fw-int8", "int8")) if f in st]
        if peers:
            test = (f"; p: paired bootstrap of the BLEU difference over the files, sacrebleu, {RESAMPLES} resamples"
                    if any(v is not None for v in p.values()) else "")
            lines.append(f"* {res['source']}->{res['target']}: offline {st['offline']['bleu']:.1f} vs faster-whisper "
                         + ", ".join(peers) + f" (beam {meta['beam']}; target: ours >= faster-whisper{test})")
    return "\n".join(lines) + "\n"


def run_bench_translate(args, cfg) -> int:
    import torch
    from tqdm import tqdm

    from . import models

    torch.set_num_threads(1)
    systems = parse_systems(args.systems)
    sources = [s.strip() for s in args.source.split(",") if s.strip()]
    data = {s: load_rows(args.manifest, s, args.target, args.limit) for s in sources}
    if args.target != "en" and any(s != "cascade" for s in systems):  # all but the cascade are Whisper's translate
        raise DuplexError("Whisper translates into English only: use --target en, or --systems cascade")
    resolver = models.resolver_for(cfg.models.cache_dir)
    bundle = resolver.whisper(args.model, cfg.models.asr_precision, translating=True)
    if not bundle.multilingual:
        raise DuplexError(f"{args.model} is English-only; translation needs a multilingual model (whisper:base)")
    fw_models = {name: faster_whisper(models.ct2_folder(args.model, resolver.cache), kind)
                 for name, kind in (("fw", "float32"), ("fw-int8", "int8")) if name in systems}
    results = []
    leads = parse_leads(args.lead_ms)
    total = (len(data) if args.monologue else sum(len(r) for r in data.values())) * len(systems) * len(leads)
    with tqdm(total=total, desc="bench translate", file=sys.stderr, leave=False) as bar:
        for s, rows in data.items():
            results.append(bench_language(s, args.target, rows, bundle, fw_models, cfg.asr, cfg.vad,
                                          cfg.translate.policy_config(), systems, bar.update, leads, args.monologue))
    asked = cfg.models.asr_precision  # "auto" says what it resolved to
    precision = asked if asked == bundle.precision else f"{asked}: {bundle.precision}"
    meta = {"model": args.model, "precision": precision, "policy": cfg.translate.policy,
            "limit": args.limit, "systems": systems, "beam": cfg.asr.offline_beam_size, "lead_ms": list(leads),
            "monologue": args.monologue}
    report = markdown(results, meta)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "translate.md").write_text(report)
    (args.out_dir / "translate.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False))
    print(report)
    return 0
