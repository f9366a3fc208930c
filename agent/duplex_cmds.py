"""``duplex talk``, ``duplex converse`` and ``duplex bench duplex``: the conversation commands."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from orchestration.playback import Playback
from streaming.aec import EchoCanceller, EchoReference, ShiftedReference
from streaming.audio_device import REFERENCE_LEAD, MicSource, StreamClock, resolve_device
from streaming.clock import Clock, RealClock
from streaming.errors import DeviceError, DuplexError
from streaming.frames import INTERNAL_RATE, AudioFrame, Frame
from streaming.pipeline import Pipeline, Source

from .config import DuplexConfig
from .conversation import AgentModels, build_stages, converse, summarize

SCENARIOS = Path(__file__).parent / "data" / "scenarios"


# ------------------------------------------------------------------------------------- converse


def run_converse(args, cfg: DuplexConfig) -> int:
    script = Path(args.script)
    from orchestration.scenario import load_scenario

    sc = load_scenario(script)  # errors are one line (ScenarioError)
    models = AgentModels.load(cfg)

    def show(e: dict) -> None:
        if args.json:
            print(json.dumps(e, default=str), flush=True)
        elif e["kind"] in ("final", "agent_text", "translation", "decision", "agent_audio_start", "agent_stopped", "error"):
            detail = e.get("text") or e.get("reason") or e.get("heard") or e.get("message") or e.get("action") or ""
            print(f"{e['t']:7.2f}s {e['kind']:<18} {detail}", flush=True)

    res = asyncio.run(converse(sc, cfg, models, echo=not args.no_echo, on_event=show))
    if args.out:
        import soundfile as sf

        sf.write(str(args.out), res.audio, INTERNAL_RATE)
    summary = summarize([res])
    if args.json:
        for o in res.outcomes:
            print(json.dumps({"outcome": o}, default=str))
        print(json.dumps(summary, default=str))
    else:
        for o in res.outcomes:
            print(f"clip {o['clip']} expect {o['expect']}: {'ok' if o.get('ok') else 'FAILED'} "
                  f"{ {k: v for k, v in o.items() if k not in ('clip', 'expect', 'ok', 'text')} }")
        print(json.dumps(summary, default=str))
    return 0


# ------------------------------------------------------------------------------------------ talk


class DeviceSpeaker:
    """Plays ``Playback`` on a PortAudio output: the callback pulls the agent's audio, stamped
    with the time the device will play it (``StreamClock``)."""

    def __init__(self, playback: Playback, device, clock: Clock) -> None:
        import sounddevice as sd

        self.playback = playback
        info = resolve_device(device, "output")
        self.stream = sd.OutputStream(device=info.index, samplerate=INTERNAL_RATE, channels=1, dtype="float32",
                                      blocksize=320, callback=self._callback)
        self.times = StreamClock(clock, self.stream)

    def _callback(self, outdata, frames, time_info, status) -> None:
        outdata[:, 0] = self.playback.pull(frames, self.times.dac_time(time_info))

    def __enter__(self):
        self.stream.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stream.stop()
        self.stream.close()


def run_talk(args, cfg: DuplexConfig) -> int:
    try:
        mic = MicSource(args.input or cfg.audio.input_device, block_ms=cfg.audio.block_ms,
                        sample_rate=cfg.audio.device_sample_rate or None, max_seconds=args.seconds)
    except DeviceError as exc:
        demo = SCENARIOS / "respond_two_questions.json"
        if args.input is not None or str(cfg.audio.input_device).strip().lower() not in ("", "default"):
            raise DuplexError(f"{exc}; without a microphone and speaker, try `duplex converse --script {demo}`") from None
        print(f"no microphone ({exc}): running the simulated conversation instead, "
              f"as `duplex converse --script {demo}` does", flush=True)
        args.script, args.json, args.out, args.no_echo = demo, False, None, False
        return run_converse(args, cfg)
    print(f"loading models ({cfg.models.asr}, {cfg.models.llm}, {cfg.models.tts}) ...", flush=True)
    models = AgentModels.load(cfg)
    clock = RealClock()
    reference = EchoReference(cfg.aec.reference_seconds)
    # stamped a little before the device's DAC time, which can be late (see SpeakerSink)
    playback = Playback(ShiftedReference(reference, -REFERENCE_LEAD))
    view = TalkView()
    stages, _ = build_stages(cfg, models, playback, view.show, reference)
    try:
        speaker = DeviceSpeaker(playback, args.output or cfg.audio.output_device, clock)
    except DeviceError as exc:
        raise DuplexError(f"{exc}; without a speaker, try `duplex converse`") from None
    print(f"talking on {mic.device.name}: speak now (Ctrl-C to stop)", flush=True)
    try:
        with speaker:
            asyncio.run(Pipeline(mic, stages, clock=clock, queue_size=cfg.pipeline.queue_size).run())
    except KeyboardInterrupt:
        pass
    view.close()
    return 0


class TalkView:
    """The terminal view: state, partial and final text, the agent's words, per-turn latency."""

    def __init__(self) -> None:
        self.speech_end: float | None = None
        self.tty = sys.stdout.isatty()
        self.partial = False

    def _line(self, text: str) -> None:
        if self.partial and self.tty:
            sys.stdout.write("\r\033[K")
        self.partial = False
        print(text, flush=True)

    def show(self, e: dict) -> None:
        k = e["kind"]
        if k == "partial":
            if self.tty:
                sys.stdout.write(f"\r\033[K  you: {e['stable']} \033[2m{e['unstable']}\033[0m")
                sys.stdout.flush()
                self.partial = True
        elif k == "final":
            self.speech_end = e.get("end")
            self._line(f"  you: {e['text']}")
        elif k == "agent_text":
            self._line(f"agent: {e['text']}")
        elif k == "agent_audio_start":
            lat = f" ({(e['t'] - self.speech_end) * 1000:.0f} ms after you stopped)" if self.speech_end else ""
            self._line(f"[SPEAK]{lat}")
        elif k == "agent_audio_end":
            self._line("[LISTEN]")
        elif k == "agent_stopped":
            self._line(f"[LISTEN] interrupted: {e.get('reason', '')}")
        elif k == "error":
            self._line(f"! {e['message']}")

    def close(self) -> None:
        if self.partial:
            print()


# -------------------------------------------------------------------------------- bench duplex


class _Silence(Source):
    name = "silence"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        t0 = clock.now()
        for k in range(int(self.seconds * 50)):
            await clock.sleep_until(t0 + (k + 1) * 0.02)
            yield AudioFrame(pts=t0 + k * 0.02, samples=np.zeros(320, np.float32))


def idle_cpu(cfg: DuplexConfig, models: AgentModels, seconds: float = 15.0) -> float:
    """CPU (percent of 2 cores) of the whole agent listening to silence in real time."""
    reference = EchoReference()
    playback = Playback(reference)
    stages, _ = build_stages(cfg, models, playback, None, reference)
    wall, cpu = time.perf_counter(), time.process_time()
    asyncio.run(Pipeline(_Silence(seconds), stages, clock=RealClock(), queue_size=cfg.pipeline.queue_size).run())
    return 100 * (time.process_time() - cpu) / (time.perf_counter() - wall) / 2


def run_bench_duplex(args, cfg: DuplexConfig) -> int:
    from orchestration.scenario import load_scenario

    folder = Path(args.scenarios) if args.scenarios else SCENARIOS
    paths = sorted(folder.glob("*.json"))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise DuplexError(f"no scenarios (*.json) in {folder}")
    scenarios = [load_scenario(p) for p in paths]
    models = AgentModels.load(cfg)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    # one room, one running agent: the echo canceller keeps what it learnt between scenarios,
    # as it does in a conversation that goes on (a cold start is the first scenario)
    canceller = EchoCanceller(cfg.aec)
    for i, sc in enumerate(scenarios):
        t = time.perf_counter()
        r = asyncio.run(converse(sc, cfg, models, echo=not args.no_echo, canceller=canceller))
        results.append(r)
        ok = sum(bool(o.get("ok")) for o in r.outcomes)
        print(f"[{i + 1}/{len(scenarios)}] {r.scenario}: {ok}/{len(r.outcomes)} expectations met "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    with open(out / "events.jsonl", "w") as f:
        for r in results:
            for e in r.events:
                if e["kind"] != "partial":
                    f.write(json.dumps({"scenario": r.scenario, **e}, default=str) + "\n")
    summary = summarize(results)
    summary["summary"]["idle_cpu_percent"] = round(idle_cpu(cfg, models), 1)
    summary["summary"]["echo"] = not args.no_echo
    summary["outcomes"] = {r.scenario: r.outcomes for r in results}
    s = summary["summary"]
    text = "\n".join([
        f"# duplex bench duplex ({len(results)} scenarios, echo {'on' if s['echo'] else 'off'})", "",
        "| metric | value | target |", "|---|---|---|",
        f"| response latency p50 / p90 | {s['response_latency_ms']['p50']} / {s['response_latency_ms']['p90']} ms | ≤ 300 / ≤ 500 ms |",
        f"| barge-in stop p50 / p90 | {s['bargein_stop_ms']['p50']} / {s['bargein_stop_ms']['p90']} ms | p90 ≤ 150 ms |",
        f"| missed stops | {s['missed_stop_rate']} | ≤ 0.05 |",
        f"| false stops on backchannels | {s['false_stop_rate']} | ≤ 0.10 |",
        f"| premature responses | {s['premature_response_rate']} | ≤ 0.10 |",
        f"| missed responses | {s['missed_response_rate']} | – |",
        f"| CPU during the scenarios (2 cores) | {s['cpu_percent']} % | – |",
        f"| CPU listening to silence (2 cores) | {s['idle_cpu_percent']} % | ≤ 20 % |",
        f"| expectations met | {s['passed']} / {s['expectations']} | – |",
    ])
    (out / "report.md").write_text(text + "\n")
    _plot(results, out / "latency.png")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'latency.png'}, {out / 'events.jsonl'}")
    return 0


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resp = sorted(o["latency_ms"] for r in results for o in r.outcomes if o.get("latency_ms") is not None)
    stop = sorted(o["stop_ms"] for r in results for o in r.outcomes if o.get("stop_ms") is not None)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for a, v, title, target in ((ax[0], resp, "response latency", 300), (ax[1], stop, "barge-in stop", 150)):
        if v:
            a.plot(v, np.linspace(0, 1, len(v)), marker=".")
        a.axvline(target, color="grey", ls="--")
        a.set(title=f"{title} (CDF)", xlabel="ms", ylabel="fraction")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
