"""``duplex bench models``: what each model costs to load and run, and what int8 does to it.

* load time and memory, each load in a fresh process so RSS is the model's own: cold (conversion
  from the offline package into an empty cache) and warm (from that cache);
* LLM prefill and decode speed; Whisper encoder time for 1, 5 and 30 s and decoder time per token;
  Piper time to first audio and real-time factor;
* fp32 against int8 (dynamic quantisation of the linear layers): speed, Whisper WER on the English
  ``exact`` rows of the speech manifest, and agreement of greedy LLM replies.

Every timing is repeated after one untimed warm-up and reported as median and p90, because the
machine is shared and noisy; fp32 and int8 runs alternate, so a busy spell hits both alike. The CPU
time other processes took during each step is recorded, to tell which numbers a busy machine spoiled.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from streaming.audio_file import read_audio
from streaming.errors import DuplexError
from streaming.models.cache import ModelCache
from streaming.models.whisper import SAMPLE_RATE, log_mel
from streaming.asr.decoder import greedy

from .models import KNOWN, ModelResolver

WHISPERS = ("whisper:tiny.en", "whisper:base")
LLM = "llm:smollm2-135m"
TTS = "tts:piper-joe"
PRECISIONS = ("fp32", "int8")
#: the LLM also runs with int8 weights and bf16 activations (the shipped default)
LLM_PRECISIONS = ("fp32", "w8", "int8")
ENCODE_SECONDS = (1, 5, 30)
WINDOW = 30 * SAMPLE_RATE  # Whisper's 30 s window, what the WER decoding pads to
PREFILL_TOKENS = 200
DECODE_TOKENS = 64
#: int8 WER may exceed fp32 WER by this much (absolute) and still count as "quality holds"
WER_TOLERANCE = 0.02
#: share of identical greedy LLM replies for "quality holds"
AGREEMENT_NEEDED = 0.8
#: share of the CPUs other processes may take during a step before its numbers are flagged
BUSY_SHARE = 0.1

T = TypeVar("T")

TTS_TEXT = "Sure, I can help with that. The next train to the city leaves at a quarter past nine."
# the decoder is timed on a fixed sentence fed token by token (teacher forcing), so the count and
# the tokens are the same for every model and precision
DECODER_TEXT = " And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "How many days are there in a leap year?",
    "Say hello to my friend Anna.",
    "What should I cook tonight with rice and eggs?",
    "Explain in one sentence what a battery does.",
    "Remind me why the sky is blue.",
    "Suggest a name for a small grey cat.",
    "What is two plus three?",
    "Tell me a short joke about computers.",
)
NOTES = (
    "The team meeting moved from Tuesday to Thursday at ten in the small room.",
    "Anna will bring the budget figures for the second quarter and the hiring plan.",
    "The new printer on the third floor still jams when it prints on both sides.",
    "We agreed to test the voice assistant with ten volunteers before the end of the month.",
    "Marco asked whether the office could stay open later during the winter holidays.",
)


@dataclass(frozen=True)
class Plan:
    repeat: int
    #: Whisper WER files (English, exact transcripts), at most
    wer_files: int
    #: LLM prompts compared between fp32 and int8
    prompts: int
    #: new tokens per compared LLM reply
    reply_tokens: int


def plan(repeat: int | None, quick: bool) -> Plan:
    if quick:
        return Plan(repeat=repeat or 1, wer_files=5, prompts=3, reply_tokens=16)
    return Plan(repeat=repeat or 5, wer_files=30, prompts=len(PROMPTS), reply_tokens=32)


# ------------------------------------------------------------------------------------- helpers


def _stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "runs": values}


def _interleaved(measures: dict[str, Callable[[], T]], repeat: int) -> dict[str, list[T]]:
    """``repeat`` results of each measure, taking turns. Each measure's first call is discarded:
    it pays one-time costs (allocation, kernel selection) that a running agent has already paid."""
    for measure in measures.values():
        measure()
    runs: dict[str, list[T]] = {key: [] for key in measures}
    for _ in range(repeat):
        for key, measure in measures.items():
            runs[key].append(measure())
    return runs


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise DuplexError(f"/proc/self/status has no {field}")


# -------------------------------------------------------------------------------- load in a child

# imported before the "before" RSS reading, so the difference is the weights and what loading
# them builds, not the libraries every model of that kind shares
_RUNTIME = {
    "asr": ("streaming.models.whisper_load", "safetensors.torch"),
    "llm": ("orchestration.llm", "safetensors.torch", "transformers.models.auto.modeling_auto",
            "transformers.models.auto.tokenization_auto"),
    "tts": ("orchestration.tts", "piper", "onnxruntime"),
    "vad": ("streaming.vad",),
}

_CHILD = "import json, sys; from agent.bench_models import child_load; print(json.dumps(child_load(*sys.argv[1:])))"


def _load(resolver: ModelResolver, name: str):
    role = KNOWN[name].role
    if role == "asr":
        return resolver.whisper(name)
    if role == "llm":
        return resolver.llm(name)
    if role == "tts":
        return resolver.tts(name)
    return resolver.vad()


def child_load(name: str, cache_dir: str) -> dict:
    """Runs in a fresh interpreter: load ``name`` once with the cache at ``cache_dir``."""
    for module in _RUNTIME[KNOWN[name].role]:
        importlib.import_module(module)
    resolver = ModelResolver(ModelCache(Path(cache_dir)))
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    model = _load(resolver, name)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rss_mb": _status_mb("VmRSS") - before,
        # the high-water mark includes the import phase; it rarely beats the load, so this is the
        # load's peak or, at worst, an upper bound of it
        "peak_mb": _status_mb("VmHWM") - before,
        "source": getattr(model, "source", name),
    }


def _load_in_fresh_process(name: str, cache_dir: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, name, cache_dir], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DuplexError(f"loading {name} in a fresh process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(loads: list[dict]) -> dict:
    return {key: _stats([x[key] for x in loads]) for key in ("seconds", "rss_mb", "peak_mb")} | {
        "source": loads[-1]["source"]
    }


def bench_load(name: str, repeat: int) -> dict:
    """Whisper and the LLM are converted into the cache on first use: cold converts into an empty
    temporary cache, warm loads from it. TTS and VAD load their files as they are (cold = warm)."""
    converts = KNOWN[name].role in ("asr", "llm")
    cold, warm = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="duplex-bench-cache-") as tmp:
            if converts:
                cold.append(_load_in_fresh_process(name, tmp))
            warm.append(_load_in_fresh_process(name, tmp))
    if converts and "converted" in warm[-1]["source"]:
        raise DuplexError(f"the warm load of {name} converted again instead of using the cache: {warm[-1]['source']}")
    return {"cold": _summary(cold) if cold else None, "warm": _summary(warm)}


# ----------------------------------------------------------------------------------------- LLM


def _long_prompt(llm, tokens: int = PREFILL_TOKENS) -> list[int]:
    """A chat prompt of at least ``tokens`` tokens, grown sentence by sentence from NOTES."""
    notes: list[str] = []
    while True:
        notes.append(NOTES[len(notes) % len(NOTES)])
        content = "Here are my notes:\n" + " ".join(notes) + "\nWrite a long, detailed summary of them."
        ids = llm.encode_chat([{"role": "user", "content": content}])
        if len(ids) >= tokens:
            return ids


def _generate(llm, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode ms per token, new tokens) of one greedy generation."""
    for _ in llm.stream(ids, new_tokens):
        pass
    s = llm.stats
    return s.prefill_seconds, 1000 * s.decode_seconds / max(s.new_tokens, 1), s.new_tokens


def bench_llm(resolver: ModelResolver, p: Plan) -> dict:
    llms = {q: resolver.llm(LLM, q) for q in LLM_PRECISIONS}
    ids = _long_prompt(llms["fp32"])  # one tokenizer: quantisation leaves it alone
    runs = _interleaved({q: partial(_generate, llm, ids, DECODE_TOKENS) for q, llm in llms.items()}, p.repeat)
    out = {}
    for q, llm in llms.items():
        prefill, decode, new_tokens = zip(*runs[q])
        out[q] = {
            "prompt_tokens": len(ids),
            "new_tokens": list(new_tokens),
            "prefill_seconds": _stats(list(prefill)),
            "decode_ms_per_token": _stats(list(decode)),
            "replies": [llm.reply([{"role": "user", "content": prompt}], p.reply_tokens) for prompt in PROMPTS[: p.prompts]],
        }
    return out


# ------------------------------------------------------------------------------------- Whisper


@dataclass
class Clip:
    file: str
    transcript: str
    audio: np.ndarray


def load_clips(manifest: Path, limit: int) -> list[Clip]:
    """English rows with exact transcripts that fit one 30 s window, sorted by file and thinned
    evenly to ``limit`` (deterministic, and it keeps both the short commands and the long reads)."""
    if not manifest.is_file():
        raise DuplexError(f"no such manifest: {manifest}")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [
            r for r in csv.DictReader(f, delimiter="\t")
            if r["language"] == "en" and r["transcript_quality"] == "exact" and float(r["duration_s"]) <= 30
        ]
    if not rows:
        raise DuplexError(f"{manifest} has no English rows with transcript_quality 'exact'")
    rows.sort(key=lambda r: r["file"])
    picked = [rows[i * len(rows) // limit] for i in range(limit)] if len(rows) > limit else rows
    return [Clip(r["file"], r["transcript"], read_audio(manifest.parent / r["file"])) for r in picked]


def _encode_ms(bundle, mel: torch.Tensor) -> float:
    t0 = time.perf_counter()
    bundle.model.encode(mel)
    return 1000 * (time.perf_counter() - t0)


@torch.inference_mode()
def _decoder_ms_per_token(bundle, features: torch.Tensor) -> float:
    tok, decoder = bundle.tokenizer, bundle.model.decoder
    cache = decoder.cross_cache(features)
    decoder(torch.tensor([tok.prompt(language="en")]), cache)
    text = tok.encode(DECODER_TEXT)
    t0 = time.perf_counter()
    for i in text:
        decoder(torch.tensor([[i]]), cache)
    return 1000 * (time.perf_counter() - t0) / len(text)


def _transcribe(bundle, clip: Clip) -> tuple[str, float]:
    """Whole utterance in one padded 30 s window, greedy; (text, seconds for features + decoding)."""
    t0 = time.perf_counter()
    features = bundle.model.encode(log_mel(clip.audio, pad_to=WINDOW))
    result = greedy(bundle.model, bundle.tokenizer, bundle.rules, features, bundle.tokenizer.prompt(language="en"))
    return result.text, time.perf_counter() - t0


def bench_whisper(resolver: ModelResolver, name: str, p: Plan, clips: list[Clip]) -> dict:
    bundles = {q: resolver.whisper(name, q) for q in PRECISIONS}
    out: dict = {q: {"encode_ms": {}} for q in PRECISIONS}
    # the encoder's cost does not depend on what the audio says: seeded noise needs no data
    noise = (np.random.default_rng(0).standard_normal(WINDOW) * 0.05).astype(np.float32)
    for seconds in ENCODE_SECONDS:
        mel = log_mel(noise[: seconds * SAMPLE_RATE])  # the real length, as streaming encodes it
        runs = _interleaved({q: partial(_encode_ms, b, mel) for q, b in bundles.items()}, p.repeat)
        for q in PRECISIONS:
            out[q]["encode_ms"][f"{seconds}s"] = _stats(runs[q])
    # a full window: cross-attention over 1500 positions
    features = {q: b.model.encode(log_mel(noise)) for q, b in bundles.items()}
    runs = _interleaved({q: partial(_decoder_ms_per_token, b, features[q]) for q, b in bundles.items()}, p.repeat)
    for q in PRECISIONS:
        out[q]["decoder_ms_per_token"] = _stats(runs[q])
    if clips:
        done = [{q: _transcribe(b, c) for q, b in bundles.items()} for c in clips]
        for q in PRECISIONS:
            texts = [d[q][0] for d in done]
            out[q] |= {
                "wer": word_error_rate([c.transcript for c in clips], texts),
                "utterance_seconds": _stats([d[q][1] for d in done]),
                "hypotheses": texts,
            }
    return out


# --------------------------------------------------------------------------- WER normalisation

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_100(n: int) -> str:
    return _ONES[n] if n < 20 else _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])


def number_words(digits: str) -> str:
    """Digits as spoken: below 1000 in full, four digits as a year ("1465" -> "fourteen sixty
    five", the way the LJSpeech transcripts spell them; "2005" -> "two thousand five"), anything
    else (leading zeros, longer numbers) digit by digit."""
    n = int(digits)
    if len(digits) == 1 or (digits[0] != "0" and n < 100):
        return _below_100(n)
    if digits[0] != "0" and n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" {_below_100(n % 100)}" if n % 100 else "")
    if len(digits) == 4 and digits[0] != "0":
        if digits[1] == "0":
            return f"{_ONES[n // 1000]} thousand" + (f" {number_words(str(n % 1000))}" if n % 1000 else "")
        if n % 100 == 0:
            return f"{_below_100(n // 100)} hundred"
        return f"{_below_100(n // 100)} {'oh ' if n % 100 < 10 else ''}{_below_100(n % 100)}"
    return " ".join(_ONES[int(d)] for d in digits)


def _normaliser():
    import jiwer

    class SpellNumbers(jiwer.AbstractTransform):
        def process_string(self, s: str) -> str:
            return re.sub(r"\d+", lambda m: f" {number_words(m.group())} ", s)

    return jiwer.Compose([
        jiwer.ToLowerCase(),
        jiwer.SubstituteRegexes({r"(?<=\d),(?=\d{3})": "", r"-": " "}),  # "1,000" -> "1000", "forty-two" -> "forty two"
        SpellNumbers(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ])


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (all errors over all reference words) after the same normalisation of both."""
    import jiwer

    norm = _normaliser()
    return float(jiwer.wer(references, hypotheses, reference_transform=norm, hypothesis_transform=norm))


# ----------------------------------------------------------------------------------------- TTS


def _speak(tts) -> tuple[float, float]:
    """(seconds until the first audio chunk, real-time factor) for TTS_TEXT."""
    t0 = time.perf_counter()
    first = None
    samples = 0
    for chunk in tts.stream(TTS_TEXT):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(chunk)
    if first is None:
        raise DuplexError("Piper produced no audio")
    return first, (time.perf_counter() - t0) / (samples / tts.sample_rate)


def bench_tts(resolver: ModelResolver, p: Plan) -> dict:
    tts = resolver.tts(TTS)
    _speak(tts)  # warm-up: onnxruntime plans the graph on the first run
    runs = [_speak(tts) for _ in range(p.repeat)]
    return {"first_audio_ms": _stats([1000 * a for a, _ in runs]), "rtf": _stats([b for _, b in runs])}


# ------------------------------------------------------------------------------------ the bench

Step = tuple[tuple[str, ...], Callable[[], dict]]


def steps(resolver: ModelResolver, p: Plan, clips: list[Clip]) -> list[Step]:
    """Every measurement, each stored at its path in the results."""
    todo: list[Step] = [(("load", name), partial(bench_load, name, p.repeat)) for name in KNOWN]
    todo += [(("whisper", w), partial(bench_whisper, resolver, w, p, clips)) for w in WHISPERS]
    todo.append((("llm",), partial(bench_llm, resolver, p)))
    todo.append((("tts",), partial(bench_tts, resolver, p)))
    return todo


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has spent busy, stolen by the hypervisor included; CPU seconds of
    this process and its finished children)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def _measured(measure: Callable[[], dict]) -> tuple[dict, dict]:
    """The step's results, and its wall time with the share of all CPUs other processes took."""
    wall0, (busy0, ours0) = time.perf_counter(), _cpu_seconds()
    result = measure()
    wall, (busy, ours) = time.perf_counter() - wall0, _cpu_seconds()
    others = max(0.0, (busy - busy0) - (ours - ours0)) / (wall * (os.cpu_count() or 1))
    return result, {"seconds": wall, "others_cpu_share": others}


def run(todo: list[Step], p: Plan, manifest: Path | None, progress: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {**p.__dict__, "manifest": str(manifest) if manifest else None},
        "steps": {},
    }
    for path, measure in todo:
        label = " ".join(path)
        progress(label)
        node = results
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]], results["steps"][label] = _measured(measure)
    results["int8_vs_fp32"] = compare(results)
    results["wall_seconds"] = time.perf_counter() - t0
    return results


def _speedup(fp32: dict, int8: dict) -> float:
    """> 1: int8 is faster (ratio of median times)."""
    return fp32["median"] / int8["median"]


def compare(r: dict) -> dict:
    out: dict = {}
    for name, by in r["whisper"].items():
        fp, q = by["fp32"], by["int8"]
        row = {
            "encode_30s_speedup": _speedup(fp["encode_ms"]["30s"], q["encode_ms"]["30s"]),
            "decoder_speedup": _speedup(fp["decoder_ms_per_token"], q["decoder_ms_per_token"]),
        }
        if "wer" in fp:
            row |= {
                "utterance_speedup": _speedup(fp["utterance_seconds"], q["utterance_seconds"]),
                "wer_fp32": fp["wer"], "wer_int8": q["wer"], "quality_holds": q["wer"] <= fp["wer"] + WER_TOLERANCE,
            }
        out[name] = row
    fp = r["llm"]["fp32"]
    for prec in (q for q in LLM_PRECISIONS if q != "fp32" and q in r["llm"]):
        q = r["llm"][prec]
        same = sum(a == b for a, b in zip(fp["replies"], q["replies"])) / len(fp["replies"])
        out[LLM if prec == "int8" else f"{LLM} {prec}"] = {
            "prefill_speedup": _speedup(fp["prefill_seconds"], q["prefill_seconds"]),
            "decode_speedup": _speedup(fp["decode_ms_per_token"], q["decode_ms_per_token"]),
            "identical_replies": same, "quality_holds": same >= AGREEMENT_NEEDED,
        }
    return out


# -------------------------------------------------------------------------------------- report


def _mp(s: dict, fmt: str = ".0f") -> str:
    return f"{s['median']:{fmt}} / {s['p90']:{fmt}}"


def _load_rows(r: dict) -> list[str]:
    rows = [
        "### Load (fresh process each; cold = conversion into an empty cache, warm = from that cache)",
        "",
        "| model | cold s | warm s | RSS added MB, cold / warm | peak MB during cold |",
        "|---|---|---|---|---|",
    ]
    for name, x in r["load"].items():
        c, w = x["cold"], x["warm"]
        if c is None:  # nothing to convert: the one load is both
            rows.append(f"| {name} | = warm | {_mp(w['seconds'], '.2f')} | {w['rss_mb']['median']:.0f} | {w['peak_mb']['median']:.0f} |")
        else:
            rows.append(
                f"| {name} | {_mp(c['seconds'], '.2f')} | {_mp(w['seconds'], '.2f')} | "
                f"{c['rss_mb']['median']:.0f} / {w['rss_mb']['median']:.0f} | {c['peak_mb']['median']:.0f} |"
            )
    return rows


def _tok_s(ms_per_token: dict) -> str:
    """Throughput at the median and at the p90 (slow) time."""
    return f"{1000 / ms_per_token['median']:.1f} / {1000 / ms_per_token['p90']:.1f}"


def _llm_rows(r: dict) -> list[str]:
    c = r["int8_vs_fp32"][LLM]
    rows = [
        f"### LLM {LLM} (prompt {r['llm']['fp32']['prompt_tokens']} tokens, {DECODE_TOKENS} new tokens, greedy, "
        f"{r['machine']['torch_threads']} threads); tok/s at median / p90 time",
        "",
        "| precision | prefill tok/s | decode tok/s | new tokens | identical replies to fp32 |",
        "|---|---|---|---|---|",
    ]
    for q in (q for q in LLM_PRECISIONS if q in r["llm"]):
        x = r["llm"][q]
        prefill_ms = {k: 1000 * x["prefill_seconds"][k] / x["prompt_tokens"] for k in ("median", "p90")}
        cq = r["int8_vs_fp32"].get(LLM if q == "int8" else f"{LLM} {q}", c)
        same = "-" if q == "fp32" else f"{cq['identical_replies']:.0%} of {len(x['replies'])}"
        rows.append(f"| {q} | {_tok_s(prefill_ms)} | {_tok_s(x['decode_ms_per_token'])} | {min(x['new_tokens'])} | {same} |")
    return rows


def _whisper_rows(r: dict) -> list[str]:
    enc = " | ".join(f"encode {s} s ms" for s in ENCODE_SECONDS)
    rows = [
        "### Whisper encoder (real length, no padding) and decoder (30 s of context); ms, median / p90",
        "",
        f"| model | precision | {enc} | decoder ms/token |",
        "|---|---|" + "---|" * (len(ENCODE_SECONDS) + 1),
    ]
    for name, by in r["whisper"].items():
        for q, x in by.items():
            cells = " | ".join(_mp(x["encode_ms"][f"{s}s"]) for s in ENCODE_SECONDS)
            rows.append(f"| {name} | {q} | {cells} | {_mp(x['decoder_ms_per_token'], '.1f')} |")
    return rows


def _wer_rows(r: dict) -> list[str]:
    first = next(iter(r["whisper"].values()))["fp32"]
    if "wer" not in first:
        return ["### Whisper WER", "", "skipped: no --manifest given"]
    rows = [
        f"### Whisper WER ({len(first['hypotheses'])} English files with exact transcripts, padded 30 s window, greedy)",
        "",
        "| model | precision | WER | s per utterance, median / p90 |",
        "|---|---|---|---|",
    ]
    for name, by in r["whisper"].items():
        for q, x in by.items():
            rows.append(f"| {name} | {q} | {x['wer']:.1%} | {_mp(x['utterance_seconds'], '.2f')} |")
    return rows


def _verdicts(r: dict) -> list[str]:
    lines = ["### int8 against fp32", ""]
    for name, c in r["int8_vs_fp32"].items():
        if name == LLM:
            speed = f"decode {c['decode_speedup']:.2f}x, prefill {c['prefill_speedup']:.2f}x"
            quality = f"{c['identical_replies']:.0%} identical greedy replies (needed {AGREEMENT_NEEDED:.0%})"
        else:
            speed = f"encode 30 s {c['encode_30s_speedup']:.2f}x, decoder {c['decoder_speedup']:.2f}x"
            if "wer" not in r["whisper"][name]["fp32"]:
                lines.append(f"- {name}: {speed}; quality not measured (no --manifest)")
                continue
            speed += f", whole utterance {c['utterance_speedup']:.2f}x"
            quality = f"WER {c['wer_fp32']:.1%} -> {c['wer_int8']:.1%} (tolerance {WER_TOLERANCE:.0%} absolute)"
        verdict = "quality holds" if c["quality_holds"] else "quality does NOT hold"
        lines.append(f"- {name}: int8 speed-up {speed} (> 1 is faster); {quality}: {verdict}")
    return lines


def _footer(r: dict) -> list[str]:
    m = r["machine"]
    lines = [
        f"{m['cpus']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, {r['settings']['repeat']} run(s) "
        f"per measurement, fp32 and int8 alternating; took {r['wall_seconds']:.0f} s"
    ]
    busy = {k: v["others_cpu_share"] for k, v in r["steps"].items() if v["others_cpu_share"] > BUSY_SHARE}
    if busy:
        lines += [
            "",
            "WARNING: other processes took CPU during " + ", ".join(f"{k} ({v:.0%} of all CPUs)" for k, v in busy.items())
            + ". Torch runs its threads in lock-step, so a core taken away can slow it many times over: "
            "treat those numbers as upper bounds, and rerun on a quiet machine.",
        ]
    return lines


def report(r: dict) -> str:
    t = r["tts"]
    parts = [
        _load_rows(r), _llm_rows(r), _whisper_rows(r), _wer_rows(r),
        ["### Piper", "", "| time to first audio ms | real-time factor |", "|---|---|",
         f"| {_mp(t['first_audio_ms'])} | {_mp(t['rtf'], '.3f')} |", "", f"text: \"{TTS_TEXT}\""],
        _verdicts(r), _footer(r),
    ]
    return "\n\n".join("\n".join(p) for p in parts)
