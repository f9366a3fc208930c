"""The ``duplex`` command. Every subcommand is a thin shell over ``agent.app``.

User errors (bad files, devices, config) print one line, ``duplex: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from streaming.errors import DuplexError

from . import app
from .config import DuplexConfig, load_config, parse_override

log = logging.getLogger("duplex")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="user config file (TOML) layered over configs/default.toml")
    p.add_argument(
        "--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
        help="override one config value, e.g. --set vad.threshold=0.6 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level, with tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duplex", description="Local, real-time, full-duplex spoken dialogue agent.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("listen", help="live voice activity on the microphone (or the bundled recording)")
    _common(p)
    p.add_argument("--input", metavar="DEVICE", help="input device index or name (see `duplex devices`)")
    p.add_argument("--file", metavar="FILE", help="listen to a file in real time instead of a device")
    p.add_argument("--seconds", type=float, help="stop after this many seconds of microphone audio")
    p.add_argument("--json", action="store_true", help="one JSON object per event")

    p = sub.add_parser("talk", help="the live conversation on the microphone and speaker (see converse without them)")
    _common(p)
    p.add_argument("--input", metavar="DEVICE", help="input device index or name (see `duplex devices`)")
    p.add_argument("--output", metavar="DEVICE", help="output device index or name")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")

    p = sub.add_parser("converse", help="a scripted user talks to the agent in a simulated room, in real time")
    _common(p)
    p.add_argument("--script", required=True, metavar="SCENARIO.json", help="scenario file (docs/scenarios.md)")
    p.add_argument("--json", action="store_true", help="one JSON object per event; the summary is the last line")
    p.add_argument("--out", type=Path, metavar="WAV", help="write the conversation as stereo WAV (user left, agent right)")
    p.add_argument("--no-echo", action="store_true", help="the agent's voice does not reach the microphone")
    _mode_args(p)

    p = sub.add_parser("devices", help="list audio input and output devices")
    _common(p)
    p.add_argument("--json", action="store_true", help="JSON array instead of a table")

    p = sub.add_parser("vad", help="print the speech segments of audio files")
    _common(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help='one {"file", "segments"} object per line')
    p.add_argument("--mode", choices=["two-stage", "webrtc", "silero"], help="detector (default: config vad.mode)")
    p.add_argument("--pace", choices=["fast", "realtime"], default="fast", help="simulated clock (fast) or wall clock")

    p = sub.add_parser("transcribe", help="speech to text, streaming (default) or whole-file")
    _common(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", help="whisper:tiny.en, whisper:base or a hub id (default: config models.asr)")
    p.add_argument("--language", help="language code, or auto (multilingual models)")
    p.add_argument("--task", choices=["transcribe", "translate"], help="translate = into English (multilingual models)")
    hw = p.add_mutually_exclusive_group()
    hw.add_argument("--hotwords", metavar="W1,W2", help="comma-separated words to favour")
    hw.add_argument("--hotwords-file", type=Path, metavar="F", help="one hotword or phrase per line")
    p.add_argument("--offline", action="store_true", help="plain whole-file decoding, for comparison")
    p.add_argument("--pace", choices=["realtime", "fast"], default="realtime", help="stream at real-time pace (default) or as fast as possible")
    p.add_argument("--json", action="store_true", help="one JSON object per file")

    p = sub.add_parser("translate", help="speech translation of files, streaming (simultaneous) or whole-file")
    _common(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--target", help="target language code (default: config translate.target)")
    p.add_argument("--source", help="source language code, or auto (default: config translate.source)")
    tm = p.add_mutually_exclusive_group()
    tm.add_argument("--streaming", action="store_true", help="simultaneous: segments as the source commits (default)")
    tm.add_argument("--offline", action="store_true", help="whole-file decoding, then translation")
    p.add_argument("--model", help="Whisper model (default: config models.asr, or whisper:base if that is English-only)")
    p.add_argument("--pace", choices=["realtime", "fast"], default="realtime", help="stream at real-time pace (default) or as fast as possible")
    p.add_argument("--json", action="store_true", help="one JSON object per file")

    p = sub.add_parser("models", help="list known models and where they come from; `models prepare` converts them")
    _common(p)
    p.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")

    p = sub.add_parser("serve", help="headless service over MQTT: one session per site (see docs/mqtt.md)")
    _common(p)
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="mqtt://host:port or mqtts://host:port (TLS)")
    p.add_argument("--site", action="append", metavar="ID", help="serve only these site IDs (repeatable); default: any, up to mqtt.max_sites")
    p.add_argument("--username", help="broker user name")
    pw = p.add_mutually_exclusive_group()
    pw.add_argument("--password", help="broker password (visible to other local users; prefer --password-file or $DUPLEX_MQTT_PASSWORD)")
    pw.add_argument("--password-file", type=Path, metavar="F", help="read the broker password from the first line of F")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify the broker (implies TLS)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate, for brokers that ask for one")
    p.add_argument("--tls-key", metavar="FILE", help="the client certificate's key")
    p.add_argument("--tls-insecure", action="store_true", help="do not check the broker's host name (test brokers only)")
    p.add_argument("--client-id", help="MQTT client id (default: config mqtt.client_id, or duplex-<hostname>)")
    p.add_argument("--transcripts-only", action="store_true",
                   help="no conversation: transcribe and speak only what `say` commands give (the LLM is not loaded)")

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    b = bench.add_parser("vad", help="VAD precision/recall, detection delay and cost on a speech manifest")
    _common(b)
    b.add_argument("--manifest", required=True, type=Path, metavar="PATH", help="manifest.tsv of the speech data")
    b.add_argument("--repeat", type=int, default=3, help="runs per detector, for median and p90 cost")
    b.add_argument("--json-out", type=Path, metavar="FILE", help="also write the results as JSON")
    b = bench.add_parser("asr", help="streaming recognition vs faster-whisper: WER, latency, hotwords")
    _common(b)
    b.add_argument("--manifest", required=True, type=Path, metavar="PATH", help="manifest.tsv of the speech data")
    b.add_argument("--models", default="whisper:tiny.en,whisper:base", help="comma-separated Whisper models")
    b.add_argument("--hotwords-file", type=Path, metavar="F",
                   help="TSV of kind (target|distractor) and hotword (default: the bundled English list)")
    b.add_argument("--limit", type=int, help="only the first N files (a quick look)")
    b.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="where report.md, asr.json and the plot go")
    b.add_argument("--systems", metavar="S1,S2",
                   help="only these of ours, ours+hot, fw-greedy, fw-beam5, fw-hot (default: all five)")
    b.add_argument("--monologue-minutes", type=float, default=0.0,
                   help="instead: stream one unbroken monologue this long and report step time and memory per minute")

    b = bench.add_parser("pipeline", help="frame overhead per stage, VAD cost in the pipeline, idle CPU and memory")
    _common(b)
    b.add_argument("--repeat", type=int, default=5, help="runs, for median and p90")
    b.add_argument("--idle-seconds", type=float, default=10.0, help="real-time silence for the idle measurement")
    b.add_argument("--json-out", type=Path, metavar="FILE", help="also write the results as JSON")
    b = bench.add_parser("models", help="load time and memory, speed, and fp32 against int8 quality of every model")
    _common(b)
    b.add_argument("--repeat", type=int, help="runs per measurement, for median and p90 (default 5, 1 with --quick)")
    b.add_argument("--quick", action="store_true", help="a smoke test: one run each, fewer WER files and LLM prompts")
    b.add_argument("--manifest", type=Path, metavar="PATH", help="manifest.tsv of the speech data, for Whisper WER (skipped without it)")
    b.add_argument("--json-out", type=Path, metavar="FILE", help="also write the results as JSON")
    b = bench.add_parser("aec", help="echo cancellation on simulated rooms with real speech: ERLE, double talk, VAD, cost")
    _common(b)
    b.add_argument("--seconds", type=float, default=30.0, help="length of each room's run (default 30)")
    b.add_argument("--manifest", type=Path, metavar="PATH",
                   help="manifest.tsv of the speech data, for the user's voice (default: ../shared/data/speech)")
    b.add_argument("--rooms", type=int, help="only the first N of the four rooms (a quick look)")
    b.add_argument("--json", "--json-out", dest="json_out", type=Path, metavar="PATH", help="also write the results as JSON")
    b = bench.add_parser("duplex", help="the shipped conversation scenarios: response latency, barge-in, CPU")
    _common(b)
    b.add_argument("--scenarios", metavar="DIR", help="folder of scenario files (default: the shipped set)")
    b.add_argument("--limit", type=int, help="only the first N scenarios")
    b.add_argument("--no-echo", action="store_true", help="no echo path in the simulated room")
    b.add_argument("--out-dir", default="bench-duplex", help="where report.md and latency.png go")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _mode_args(b)
    b = bench.add_parser("translate", help="speech translation: BLEU, chrF, lagging, RTF; streaming vs offline vs faster-whisper")
    _common(b)
    b.add_argument("--manifest", required=True, type=Path, metavar="PATH", help="manifest.tsv of the speech data")
    b.add_argument("--source", default="es,fr,it", help="source language(s), comma-separated (default es,fr,it)")
    b.add_argument("--target", default="en", help="target language (default en; references exist for en only)")
    b.add_argument("--model", default="whisper:base", help="multilingual Whisper model (default whisper:base)")
    b.add_argument("--systems", metavar="S1,S2", help="only these of streaming, streaming-steps, offline, offline-greedy, fw, fw-int8, cascade (default: streaming, offline, fw)")
    b.add_argument("--limit", type=int, help="only the N shortest files per language (a quick look)")
    b.add_argument("--lead-ms", metavar="MS,MS", help="run each file once per lead of this much silence before it, "
                   "all runs scored together (e.g. 0,20,60,100: Whisper's near ties move with the lead; default 0)")
    b.add_argument("--monologue", action="store_true", help="each language's files as one long utterance (their speech "
                   "joined by 150 ms gaps): a speaker who does not pause for minutes, scored against the joined references")
    b.add_argument("--out-dir", type=Path, default=Path("bench-translate"), help="where translate.md and translate.json go")
    b = bench.add_parser("mqtt", help="final-transcript latency in-process vs over MQTT, and concurrent sites in real time")
    _common(b)
    b.add_argument("--manifest", type=Path, metavar="PATH", help="manifest.tsv of the speech data (default: ../shared/data/speech)")
    b.add_argument("--files", type=int, default=6, help="English recordings of 2.5-9 s from the manifest (default 6)")
    b.add_argument("--repeat", type=int, default=2, help="latency runs per file and path (default 2)")
    b.add_argument("--max-sites", type=int, default=8, help="stop the site count there at the latest (default 8)")
    b.add_argument("--site-seconds", type=float, default=30.0, help="audio each site streams per capacity run (default 30)")
    b.add_argument("--broker", metavar="URL", help="use this broker instead of starting a private Mosquitto")
    b.add_argument("--conversation", action="store_true",
                   help="sites hold conversations (LLM and Piper answer every utterance): capacity only, with reply latency")
    b.add_argument("--json", "--json-out", dest="json_out", type=Path, metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        overrides = dict(parse_override(o) for o in getattr(args, "overrides", []))
        cfg = load_config(getattr(args, "config", None), overrides)
        logging.basicConfig(
            level=logging.DEBUG if verbose else getattr(logging, cfg.log.level.upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        handler = _COMMANDS[args.command if args.command != "bench" else f"bench-{args.bench}"]
        return handler(args, cfg) or 0
    except DuplexError as exc:
        print(f"duplex: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: keep it to one line unless asked for the traceback
        if verbose:
            raise
        print(f"duplex: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------- commands


def cmd_devices(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from streaming.audio_device import list_devices

    devices = list_devices()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in devices]))
        return 0
    if not devices:
        print("no audio devices found")
        return 0
    print(f"{'idx':>3}  {'in':>3} {'out':>3}  {'rate':>6}  {'host API':<12} name")
    for d in devices:
        mark = ("<" if d.is_default_input else " ") + (">" if d.is_default_output else " ")
        print(f"{d.index:>3}{mark}{d.max_input_channels:>3} {d.max_output_channels:>3}  {d.default_samplerate:>6.0f}  {d.hostapi:<12} {d.name}")
    print("(< default input, > default output)")
    return 0


def cmd_vad(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from dataclasses import replace

    from streaming.audio_file import open_audio

    vad_cfg = replace(cfg.vad, mode=args.mode) if args.mode else cfg.vad
    for f in args.files:  # check every file first: a bad one fails before any work
        open_audio(f).close()
    for f in args.files:
        segments = asyncio.run(app.vad_segments(f, cfg, pace=args.pace, vad=vad_cfg))
        if args.json:
            print(json.dumps({"file": f, "segments": [s.as_dict() for s in segments]}), flush=True)
        else:
            print(f"{f}: {len(segments)} speech segment(s)")
            for s in segments:
                print(f"  {s.start:8.2f} - {s.end:8.2f} s  ({s.end - s.start:.2f} s)")
    return 0


def cmd_listen(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from streaming.frames import SpeechEnded, SpeechStarted

    source, what = app.open_listen_source(cfg, args.input, args.file, args.seconds)
    if not args.json:
        print(f"listening: {what}", flush=True)
        print("press Ctrl-C to stop", flush=True)
    t_start = time.monotonic()
    count = 0

    def on_event(frame) -> None:
        nonlocal count
        if args.json:
            kind = "speech_started" if isinstance(frame, SpeechStarted) else "speech_ended"
            obj = {"event": kind, "t": round(frame.pts, 3), "detected_at": round(frame.detected_at, 3)}
            if isinstance(frame, SpeechEnded):
                obj["start"] = round(frame.start, 3)
            print(json.dumps(obj), flush=True)
        elif isinstance(frame, SpeechStarted):
            print(f"{frame.pts:8.2f} s  ▶ speech", flush=True)
        else:
            count += 1
            print(f"{frame.pts:8.2f} s  ■ end of speech ({frame.duration:.2f} s)", flush=True)

    try:
        asyncio.run(app.listen(cfg, source, on_event))
    except KeyboardInterrupt:
        pass
    if not args.json:
        print(f"done: {count} utterance(s) in {time.monotonic() - t_start:.1f} s")
    return 0


def _report(text: str, results: dict, json_out: Path | None) -> int:
    """Print a benchmark's markdown and, if asked, write its results as JSON."""
    print(text)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
        print(f"wrote {json_out}")
    return 0


def cmd_bench_vad(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from tqdm import tqdm

    from . import bench_vad

    if args.repeat < 1:
        raise DuplexError("--repeat must be at least 1")
    items = bench_vad.load_items(args.manifest)
    with tqdm(total=len(bench_vad.MODES) * args.repeat, desc="bench vad", file=sys.stderr, leave=False) as bar:
        results = bench_vad.bench(args.manifest, items, cfg.vad, repeat=args.repeat, progress=lambda *_: bar.update())
    return _report(bench_vad.markdown(results), results, args.json_out)


def cmd_bench_pipeline(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from . import bench_pipeline

    if args.repeat < 1:
        raise DuplexError("--repeat must be at least 1")
    results = bench_pipeline.bench(cfg.vad, repeat=args.repeat, idle_seconds=args.idle_seconds)
    return _report(bench_pipeline.report(results), results, args.json_out)


def cmd_bench_models(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from tqdm import tqdm

    from . import bench_models, models

    if args.repeat is not None and args.repeat < 1:
        raise DuplexError("--repeat must be at least 1")
    plan = bench_models.plan(args.repeat, args.quick)
    resolver = models.resolver_for(cfg.models.cache_dir)
    clips = bench_models.load_clips(args.manifest, plan.wer_files) if args.manifest else []
    todo = bench_models.steps(resolver, plan, clips)
    with tqdm(total=len(todo), desc="bench models", file=sys.stderr, leave=False) as bar:
        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        results = bench_models.run(todo, plan, args.manifest, step)
    return _report(bench_models.report(results), results, args.json_out)


def cmd_bench_aec(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from tqdm import tqdm

    from . import bench_aec, models

    manifest = args.manifest or bench_aec.default_manifest()
    if not manifest.exists():
        raise DuplexError(f"no such manifest: {manifest} (give --manifest PATH)")
    if args.rooms is not None and not 1 <= args.rooms <= len(bench_aec.ROOMS):
        raise DuplexError(f"--rooms must be between 1 and {len(bench_aec.ROOMS)}")
    rooms = bench_aec.ROOMS[: args.rooms]
    tts = models.resolver_for(cfg.models.cache_dir).tts(cfg.models.tts)
    with tqdm(total=len(rooms), desc="bench aec", file=sys.stderr, leave=False) as bar:
        results = bench_aec.bench(cfg.aec, cfg.vad, tts, manifest, args.seconds, rooms=rooms, progress=lambda *_: bar.update())
    return _report(bench_aec.markdown(results), results, args.json_out)


def cmd_models(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from tqdm import tqdm

    from . import models

    resolver = models.resolver_for(cfg.models.cache_dir)
    if args.action == "prepare":
        with tqdm(total=len(models.KNOWN), desc="preparing models", file=sys.stderr, leave=False) as bar:
            def step(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update()

            rows = models.prepare(resolver, step)
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{'ok ' if r['ok'] else 'MISSING'} {r['name']:<18} {r['detail']}")
        return 0 if all(r["ok"] for r in rows) else 1
    rows = models.describe(resolver)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':<18} {'role':<4} {'available':<10} {'prepared':<9} {'size MB':>8}  license / source")
    for r in rows:
        size = f"{r['size_bytes'] / 2**20:8.0f}" if r["size_bytes"] else f"{'-':>8}"
        where = f"package {', '.join(r['packages'])}" if r["available"] else r["hint"]
        print(f"{r['name']:<18} {r['role']:<4} {'yes' if r['available'] else 'no':<10} {'yes' if r['prepared'] else 'no':<9} {size}  {r['license']} / {where}")
    print(f"cache: {resolver.cache.root}")
    return 0


def _read_hotwords(args: argparse.Namespace) -> tuple[str, ...]:
    if args.hotwords:
        return (args.hotwords,)
    if args.hotwords_file:
        try:
            return (args.hotwords_file.read_text(encoding="utf-8"),)
        except FileNotFoundError:
            raise DuplexError(f"no such hotwords file: {args.hotwords_file}") from None
        except UnicodeDecodeError:
            raise DuplexError(f"hotwords file {args.hotwords_file} is not UTF-8 text") from None
        except OSError as exc:
            raise DuplexError(f"cannot read hotwords file {args.hotwords_file}: {exc.strerror}") from None
    return ()


def cmd_transcribe(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from streaming.audio_file import open_audio

    from . import models, transcribe

    for f in args.files:
        open_audio(f).close()
    asr = transcribe.asr_config(cfg, args.language, args.task, _read_hotwords(args))
    resolver = models.resolver_for(cfg.models.cache_dir)
    bundle = resolver.whisper(args.model or cfg.models.asr, cfg.models.asr_precision, translating=asr.task == "translate")
    if asr.task == "translate" and not bundle.multilingual:
        raise DuplexError(f"{args.model or cfg.models.asr} is English-only and cannot translate; use --model whisper:base")
    if bundle.multilingual and asr.language not in ("auto", *bundle.tokenizer.languages):
        raise DuplexError(f"unknown language {asr.language!r}")
    for f in args.files:
        if args.offline:
            result = transcribe.transcribe_offline(f, bundle, asr)
        else:
            result = transcribe.run_streaming(f, bundle, cfg, asr, args.pace)
        if args.json:
            print(json.dumps(result.as_dict()), flush=True)
        else:
            print(f"{f}: {result.text}", flush=True)
    return 0


def cmd_bench_asr(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from tqdm import tqdm

    from . import bench_asr, models

    rows = bench_asr.load_rows(args.manifest, limit=args.limit)
    hot_path = args.hotwords_file or bench_asr.DATA / "hotwords_en.tsv"
    if not hot_path.exists():
        raise DuplexError(f"no such hotwords file: {hot_path}")
    targets, distractors = bench_asr.load_hotwords(hot_path)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    resolver = models.resolver_for(cfg.models.cache_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.monologue_minutes > 0:
        out = {n: bench_asr.monologue(resolver.whisper(n, cfg.models.asr_precision), rows, cfg.asr, args.monologue_minutes)
               for n in names}
        for n, r in out.items():
            print(f"{n}: {r['minutes']} min, {r['final_segments']} final segments, WER {r['wer']:.3f}, "
                  f"buffer at end {r['buffer_seconds_at_end']} s")
            print("| minute | partial step p50 ms | p90 ms | RSS at minute end MB | RSS lowest / highest MB | peak RSS MB |\n"
                  "|---|---|---|---|---|---|")
            for m, st in r["step_ms_by_minute"].items():
                lo, hi = r["rss_mb_range_by_minute"][m]
                print(f"| {m + 1} | {st['p50']:.0f} | {st['p90']:.0f} | {r['rss_mb_by_minute'][m]:.0f} | {lo:.0f} / {hi:.0f} | "
                      f"{r['peak_rss_mb_by_minute'][m]:.0f} |")
        (args.out_dir / "monologue.json").write_text(json.dumps(out, indent=1))
        return 0
    systems = bench_asr.parse_systems(args.systems)
    results = []
    with tqdm(total=len(names) * len(rows) * len(systems), desc="bench asr", file=sys.stderr, leave=False) as bar:
        for name in names:
            bundle = resolver.whisper(name, cfg.models.asr_precision)
            ct2 = models.ct2_folder(name, resolver.cache)
            results.append(bench_asr.bench_model(name, bundle, ct2, rows, cfg.asr, cfg.vad, targets, distractors, bar.update,
                                                   systems))
    report = bench_asr.markdown(results)
    bench_asr.plot(results, args.out_dir / "asr_latency.png")
    (args.out_dir / "asr.json").write_text(json.dumps(bench_asr.strip_private(results), indent=1))
    (args.out_dir / "asr.md").write_text(report + "\n")
    print(report)
    print(f"wrote {args.out_dir / 'asr.md'}, {args.out_dir / 'asr.json'}, {args.out_dir / 'asr_latency.png'}")
    return 0


def cmd_bench_mqtt(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from . import bench_mqtt

    if args.repeat < 1 or args.files < 1 or args.max_sites < 1:
        raise DuplexError("--files, --repeat and --max-sites must be at least 1")
    files = bench_mqtt.pick_files(args.manifest or bench_mqtt.default_manifest(), args.files)
    results = bench_mqtt.bench(cfg, files, args.broker, repeat=args.repeat, max_sites=args.max_sites,
                               site_seconds=args.site_seconds, conversation=args.conversation,
                               progress=lambda what: print(f"bench mqtt: {what}", file=sys.stderr, flush=True))
    return _report(bench_mqtt.markdown(results), results, args.json_out)


def _broker_password(args: argparse.Namespace) -> str | None:
    import os

    if args.password is not None:
        return args.password
    if args.password_file:
        try:
            lines = args.password_file.read_text(encoding="utf-8").splitlines()
            return lines[0] if lines else ""
        except FileNotFoundError:
            raise DuplexError(f"no such password file: {args.password_file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DuplexError(f"cannot read password file {args.password_file}: {exc}") from None
    return os.environ.get("DUPLEX_MQTT_PASSWORD")


def cmd_serve(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from . import service
    from .session import SharedModels

    broker = service.BrokerSettings.from_url(
        args.broker, username=args.username, password=_broker_password(args), tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_insecure=args.tls_insecure,
    )
    svc = service.MqttService(cfg, broker, sites=args.site, client_id=args.client_id,  # checks the site IDs
                              dialogue=not args.transcripts_only)
    models = SharedModels.load(cfg, tts=True, llm=not args.transcripts_only)
    svc.models = models
    sites = ", ".join(args.site) if args.site else f"any site (up to {cfg.mqtt.max_sites})"
    print(f"duplex serve: {sites} on {broker.url} as {svc.client_id} (topics {svc.topics.prefix}/<site>/..., run {svc.run_id})",
          file=sys.stderr, flush=True)
    try:
        asyncio.run(svc.run(handle_signals=True))
    finally:
        models.close()
    return 0


def cmd_translate(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from .translate_cmd import run_translate

    return run_translate(args, cfg)


def cmd_bench_translate(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from .bench_translate import run_bench_translate

    return run_bench_translate(args, cfg)


def cmd_talk(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from .duplex_cmds import run_talk

    return run_talk(args, cfg)


def _mode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("dialogue", "interpreter", "captions"),
                   help="dialogue (answer; the default), interpreter (translate each utterance and speak it) or captions")
    p.add_argument("--target", metavar="LANG", help="interpreter/captions: the language to translate into (translate.target)")
    p.add_argument("--source", metavar="LANG", help="interpreter/captions: the speech's language, or auto (translate.source)")


def _with_mode(args: argparse.Namespace, cfg: DuplexConfig) -> DuplexConfig:
    import dataclasses

    t = cfg.translate
    t = dataclasses.replace(t, mode=args.mode or t.mode, target=args.target or t.target, source=args.source or t.source)
    return dataclasses.replace(cfg, translate=t)


def cmd_converse(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from .duplex_cmds import run_converse

    return run_converse(args, _with_mode(args, cfg))


def cmd_bench_duplex(args: argparse.Namespace, cfg: DuplexConfig) -> int:
    from .duplex_cmds import run_bench_duplex

    return run_bench_duplex(args, _with_mode(args, cfg))


_COMMANDS = {
    "translate": cmd_translate,
    "bench-translate": cmd_bench_translate,
    "talk": cmd_talk,
    "converse": cmd_converse,
    "bench-duplex": cmd_bench_duplex,
    "serve": cmd_serve,
    "bench-mqtt": cmd_bench_mqtt,
    "bench-asr": cmd_bench_asr,
    "transcribe": cmd_transcribe,
    "models": cmd_models,
    "bench-pipeline": cmd_bench_pipeline,
    "devices": cmd_devices,
    "vad": cmd_vad,
    "listen": cmd_listen,
    "bench-vad": cmd_bench_vad,
    "bench-models": cmd_bench_models,
    "bench-aec": cmd_bench_aec,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
