#!/usr/bin/env python3
"""Meeting captions with the embedding API: stream a recording in and print live captions.

    .venv/bin/python examples/meeting_captions.py [FILE] [--fast] [--hotwords W1,W2] [--json]

FILE is any audio file libsndfile reads (WAV, FLAC, ...; any rate, any channel count). Without one
it takes a two-speaker recording from the shared speech data (../shared/data/speech, see its
README). The file is fed at real-time pace, as a meeting tool would feed a microphone or a call;
``--fast`` feeds it as fast as recognition keeps up. The agent is transcripts-only
(``dialogue=False``): it does not load the LLM and never answers.

On a terminal the caption being spoken is rewritten in place — committed words, then the part that
may still change in brackets — and every finished sentence is printed with its time. ``--json``
prints one JSON object per final caption instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from agent.api import DuplexAgent  # noqa: E402
from streaming.frames import FinalText, PartialText  # noqa: E402

DEFAULT = ROOT.parent / "shared" / "data" / "speech" / "turns" / "leopard_diarization_test.flac"


async def feed(agent: DuplexAgent, path: Path, fast: bool) -> None:
    """Push the file in 20 ms blocks, paced like a live source, then say that no more audio comes."""
    with sf.SoundFile(str(path)) as f:
        rate, block = f.samplerate, max(1, f.samplerate // 50)
        t0, sent = time.monotonic(), 0
        for chunk in f.blocks(blocksize=block, dtype="float32", always_2d=True):
            await agent.push_audio(chunk, sample_rate=rate)  # channels are averaged, the rate converted
            sent += len(chunk)
            if not fast:
                await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    await agent.finish()  # closes the last sentence; events() ends after its caption


async def show(agent: DuplexAgent, live: bool, as_json: bool) -> int:
    finals = 0
    async for ev in agent.events():
        if isinstance(ev, PartialText) and live and not as_json:
            unstable = f" [{ev.unstable.strip()}]" if ev.unstable.strip() else ""
            print(f"\r\033[K  … {ev.stable.strip()}{unstable}"[-200:], end="", flush=True)
        elif isinstance(ev, FinalText):
            finals += 1
            if as_json:
                print(json.dumps({"start": round(ev.start, 2), "end": round(ev.pts, 2), "text": ev.text,
                                  "words": [w.as_dict() for w in ev.words]}), flush=True)
            else:
                m, s = divmod(ev.start, 60)
                clear = "\r\033[K" if live else ""  # wipe the partial caption on a terminal
                print(f"{clear}[{int(m):02d}:{s:05.2f}] {ev.text}", flush=True)
    return finals


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", type=Path, default=DEFAULT, help=f"audio file (default: {DEFAULT})")
    ap.add_argument("--fast", action="store_true", help="feed as fast as recognition keeps up")
    ap.add_argument("--hotwords", default="", help="comma-separated names and terms to favour")
    ap.add_argument("--json", action="store_true", help="one JSON object per final caption")
    args = ap.parse_args()
    if not args.file.exists():
        print(f"meeting_captions: no such file: {args.file} (give one, e.g. "
              "/usr/share/asterisk/sounds/en_US_f_Allison/demo-congrats.wav)", file=sys.stderr)
        return 2
    config = {"asr": {"hotwords": [w for w in args.hotwords.split(",") if w.strip()]}}
    async with DuplexAgent.from_config(config, dialogue=False) as agent:  # captions: transcribe, never answer
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed(agent, args.file, args.fast))
            shown = tg.create_task(show(agent, sys.stdout.isatty(), args.json))
    if not shown.result():
        print("(no speech heard)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
