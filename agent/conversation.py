"""The full-duplex conversation: one composition for ``duplex talk`` (microphone and speaker) and
``duplex converse`` (a scripted user in a simulated room, at real-time pace).

    source -> AEC -> VAD (+ voice activity) -> ASR -> Coordinator
                                                         |  clauses -> Piper -> Playback
    speaker / simulated room  <---- pulled block by block --+   (and the AEC's reference)

In ``converse`` the simulated user *is* the clock of the room: every 20 ms block it pulls what the
agent plays, passes it through the room's impulse response and delay (the echo), adds the user's
scripted audio and hands the sum to the pipeline as the microphone. Scenario rules that wait for
the agent ("after": "agent_start") see exactly what a listener in the room would hear.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from orchestration.coordinator import Coordinator
from orchestration.dialogue import DialogueLLM
from orchestration.playback import Playback, PlaybackEvent
from orchestration.scenario import Scenario, clip_start, load_scenario
from streaming.aec import AECStage, EchoReference
from streaming.asr.recognizer import StreamingRecognizer
from streaming.asr.stage import ASRStage
from streaming.audio_file import read_audio
from streaming.clock import Clock, RealClock
from streaming.frames import INTERNAL_RATE, AudioFrame, Frame
from streaming.pipeline import Pipeline, Source, Stage
from streaming.room import Room, RoomConfig

from .config import DuplexConfig
from .models import resolver_for

log = logging.getLogger(__name__)

BLOCK = 320  # 20 ms


@dataclass
class AgentModels:
    whisper: object
    llm: object
    tts: object

    @classmethod
    def load(cls, cfg: DuplexConfig) -> "AgentModels":
        r = resolver_for(cfg.models.cache_dir)
        return cls(r.whisper(cfg.models.asr, cfg.models.conversation_asr_precision), r.llm(cfg.models.llm, cfg.models.llm_precision),
                   r.tts(cfg.models.tts))


def echo_until(cfg: DuplexConfig, reference: EchoReference | None) -> Callable[[], float]:
    """For an agent with a voice: the pipeline time up to which the microphone may still hear it,
    the end of its last sound plus the longest acoustic delay and echo tail the canceller models.
    The recogniser's pre-roll never reaches back over it. Without a reference (a voice whose
    playback is not recorded) that time is unknown: never any pre-roll."""
    if reference is None:
        return lambda: math.inf
    tail = (cfg.aec.max_delay_ms + cfg.aec.residual_tail_ms) / 1000
    return lambda: reference.last_sound + tail


def build_stages(cfg: DuplexConfig, models: AgentModels, playback: Playback, on_event: Callable[[dict], None] | None,
                 reference: EchoReference | None, canceller=None) -> tuple[list[Stage], Coordinator]:
    """``canceller``: an ``EchoCanceller`` to keep (its converged filter) across conversations in
    the same room; None starts a fresh one."""
    stages: list[Stage] = []
    if cfg.aec.enabled and reference is not None:
        stages.append(AECStage(cfg.aec, reference, canceller=canceller))
    from streaming.vad import VADStage

    mode = cfg.translate.mode
    dialogue = DialogueLLM(models.llm, cfg.dialogue, hotwords=cfg.asr.hotwords)
    coord = Coordinator(dialogue, models.tts, playback, cfg.turns, on_event=on_event, answer=mode == "dialogue")
    stages.append(VADStage(replace(cfg.vad, activity_events=True)))
    stages.append(coord.tap())  # voice onsets reach the turn core without waiting for ASR
    heard = echo_until(cfg, reference) if mode != "captions" else None
    asr = cfg.asr.in_conversation()
    if mode == "dialogue":
        stages.append(ASRStage(StreamingRecognizer(models.whisper, asr), echo_until=heard))
    else:
        # interpreter (translate each utterance and speak it) or captions (text only): the
        # coordinator answers no one and reports what the player does
        from orchestration.interpreter import Interpreter

        from .translate_cmd import plan, translators_for

        t = cfg.translate
        translators = translators_for(t, models.whisper)
        stages.append(ASRStage(StreamingRecognizer(models.whisper, plan(translators, asr, t.source, t.target)),
                               echo_until=heard))
        stages.append(Interpreter(translators, t, tts=models.tts, playback=playback, on_segment=lambda seg: coord.log_event(
            "translation", text=seg.text, source_text=seg.source_text, utterance=seg.reply, engine=seg.engine,
            source_end=seg.pts)))
    stages.append(coord)
    return stages, coord


# ------------------------------------------------------------------------------ the simulated room


class RoomStream:
    """The room's echo, block by block (overlap-add with the FFT of the impulse response)."""

    def __init__(self, room: Room, block: int = BLOCK) -> None:
        h = room.rir.astype(np.float64)
        if room._highpass is not None:
            h = np.convolve(h, room._highpass)
        h = np.concatenate([np.zeros(room.delay), h])
        self.block = block
        self.n = 1 << int(np.ceil(np.log2(block + len(h) - 1)))
        self.H = np.fft.rfft(h, self.n)
        self.tail = np.zeros(self.n - block)

    def process(self, x: np.ndarray) -> np.ndarray:
        y = np.fft.irfft(np.fft.rfft(x.astype(np.float64), self.n) * self.H, self.n)
        y[: len(self.tail)] += self.tail
        out = y[: self.block]
        self.tail = y[self.block :].copy()
        return out.astype(np.float32)


@dataclass
class ClipRun:
    index: int
    expect: str | None
    text: str
    start: float | None = None  # conversation time the clip began
    end: float | None = None
    agent_active_at_start: bool = False


class SimulatedUser(Source):
    """Plays a scenario's user clips into the pipeline at real-time pace, with the agent's voice
    coming back through the room (unless ``room`` is None)."""

    name = "simulated-user"

    def __init__(self, scenario: Scenario, playback: Playback, room: Room | None, *, tail_s: float = 6.0,
                 max_s: float = 180.0) -> None:
        self.scenario = scenario
        self.playback = playback
        self.room = RoomStream(room) if room is not None else None
        self.noise = room.noise if room is not None else None
        self.clips = [read_audio(c.audio) for c in scenario.clips]
        self.runs = [ClipRun(c.index, c.expect, c.text) for c in scenario.clips]
        self.tail_s, self.max_s = tail_s, max_s
        self.user_track: list[np.ndarray] = []
        self.agent_track: list[np.ndarray] = []
        self.agent_starts: list[float] = []
        self.agent_ends: list[float] = []  # last sample of each stretch of agent audio
        self.t0 = 0.0
        self._active = False
        self._silent_since: float | None = None

    async def frames(self, clock: Clock) -> AsyncIterator[Frame]:
        self.t0 = clock.now()
        k = 0
        nxt = 0  # next clip to schedule
        playing: tuple[int, int] | None = None  # (clip, sample position)
        prev_end = 0.0
        done_at: float | None = None
        while True:
            t = k * BLOCK / INTERNAL_RATE  # conversation time of this block
            # pace: wait for the block's real time
            await clock.sleep_until(self.t0 + t + BLOCK / INTERNAL_RATE)
            pts = self.t0 + t
            agent = self.playback.pull(BLOCK, pts)
            self._observe(agent, t)
            # schedule the next clip
            if playing is None and nxt < len(self.clips):
                c = self.scenario.clips[nxt]
                turns = self.agent_turns()
                start = clip_start(c, prev_end, turns, now=t)
                if start is not None and t >= start:
                    if clip_start(c, prev_end, turns) is None:
                        log.warning("clip %d: %s never came; playing it anyway", nxt, c.after)
                    playing = (nxt, 0)
                    self.runs[nxt].start = t
                    self.runs[nxt].agent_active_at_start = self._active
            user = np.zeros(BLOCK, np.float32)
            if playing is not None:
                i, pos = playing
                seg = self.clips[i][pos : pos + BLOCK]
                user[: len(seg)] = seg
                pos += BLOCK
                if pos >= len(self.clips[i]):
                    self.runs[i].end = t + len(seg) / INTERNAL_RATE
                    prev_end = self.runs[i].end
                    playing = None
                    nxt = i + 1
                else:
                    playing = (i, pos)
            mic = user.copy()
            if self.room is not None:
                mic += self.room.process(agent)
            self.user_track.append(user)
            self.agent_track.append(agent)
            yield AudioFrame(pts=pts, samples=mic)
            k += 1
            if nxt >= len(self.clips) and playing is None:
                if done_at is None:
                    done_at = t
                quiet = not self._active and not self.playback.busy()
                if (quiet and t - done_at >= self.tail_s / 2 and (self._silent_since or 0) <= t - 1.0) or t - done_at >= self.tail_s * 4:
                    return
            if t > self.max_s:
                return

    def _observe(self, agent: np.ndarray, t: float) -> None:
        """Stretches of agent audio as a listener hears them (gaps under 300 ms are one stretch)."""
        if np.any(agent != 0):
            if not self._active:
                self._active = True
                self.agent_starts.append(t)
            self._silent_since = None
        elif self._active:
            if self._silent_since is None:
                self._silent_since = t
            elif t - self._silent_since >= 0.3:
                self._active = False
                self.agent_ends.append(self._silent_since)

    def agent_turns(self) -> list[tuple[float, float | None]]:
        """The agent's stretches of audio so far as (start, end), end None while it is speaking."""
        return [(s, self.agent_ends[i] if i < len(self.agent_ends) else None) for i, s in enumerate(self.agent_starts)]

    def stereo(self) -> np.ndarray:
        return np.stack([np.concatenate(self.user_track), np.concatenate(self.agent_track)], axis=1)


# ------------------------------------------------------------------------------------ a conversation


@dataclass
class ConverseResult:
    scenario: str
    events: list[dict] = field(default_factory=list)
    outcomes: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    audio: np.ndarray | None = None


async def converse(scenario: Scenario | str | Path, cfg: DuplexConfig, models: AgentModels, *, echo: bool = True,
                   room: RoomConfig | None = None, on_event: Callable[[dict], None] | None = None,
                   canceller=None) -> ConverseResult:
    """Run one scenario at real-time pace; returns the event log and the judged expectations."""
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    reference = EchoReference() if echo else None
    playback = Playback(reference)
    result = ConverseResult(sc.name or Path(sc.path).stem)
    clock = RealClock()

    def collect(e: dict) -> None:
        e = {**e, "t": round(e["t"] - user.t0, 4)}
        for k in ("onset", "end", "start"):
            if isinstance(e.get(k), float):
                e[k] = round(e[k] - user.t0, 4)
        result.events.append(e)
        if on_event:
            on_event(e)

    user = SimulatedUser(sc, playback, Room(room or RoomConfig()) if echo else None)
    stages, coord = build_stages(cfg, models, playback, collect, reference, canceller)
    wall, cpu = time.perf_counter(), time.process_time()
    await Pipeline(user, stages, clock=clock, queue_size=cfg.pipeline.queue_size).run()
    result.wall_s, result.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    result.outcomes = judge(user, result.events, translate=cfg.translate.mode == "interpreter")
    result.audio = user.stereo()
    return result


def judge(user: SimulatedUser, events: list[dict], translate: bool = False) -> list[dict]:
    """Each clip's expectation against what happened (times on the conversation clock).
    ``translate`` (interpreter mode): every clip expects its translation spoken after it ends, and
    is judged as ``respond``."""
    starts = [e["t"] for e in events if e["kind"] == "agent_audio_start"]
    stops = [e for e in events if e["kind"] == "agent_stopped"]
    out = []
    runs = user.runs
    for i, r in enumerate(runs):
        if r.start is None or r.end is None or r.expect is None:
            out.append({"clip": r.index, "expect": r.expect, "ok": None, "why": "not played"})
            continue
        nxt = runs[i + 1].start if i + 1 < len(runs) and runs[i + 1].start is not None else float("inf")
        if translate and not r.text.strip():
            out.append({"clip": r.index, "expect": r.expect, "ok": None, "why": "not judged: no words to translate"})
            continue
        if translate:
            r = replace(r, expect="respond")
        o: dict = {"clip": r.index, "expect": r.expect, "text": r.text, "start": round(r.start, 3), "end": round(r.end, 3)}
        if r.expect in ("respond", "wait"):
            during = [s for s in starts if r.start < s < r.end]
            after = [s for s in starts if r.end <= s < nxt]
            if r.expect == "respond":
                o["latency_ms"] = round((after[0] - r.end) * 1000, 1) if after else None
                o["premature"] = bool(during) and not after
                o["ok"] = bool(after)
            else:
                o["premature"] = bool(after)
                o["ok"] = not after
        else:
            # agent audio around the clip: the stretch that was playing when it began
            # the agent's turn was on (its audio had started and not ended or been stopped), even
            # if its audio paused between two clauses that were still being written
            playing = r.agent_active_at_start or _agent_turn_on(events, r.start)
            # a stop belongs to this clip if it came before the next clip began (that one's own)
            stop = next((s for s in stops if r.start - 0.05 <= s["t"] <= min(r.end + 3.0, nxt)), None)
            o["agent_was_speaking"] = bool(playing)
            if not playing:
                # nothing to stop or to keep going: an earlier turn went otherwise than scripted
                o.update(ok=None, why="not judged: the agent was not speaking when the clip began")
                out.append(o)
                continue
            if r.expect == "stop":
                # a reply that merely ran out is not a stop: the agent must have yielded
                o["ok"] = stop is not None
                o["missed"] = not o["ok"]
                last = _last_agent_sample(user, r.start, stop["t"] + 0.02) if stop is not None else None
                o["stop_ms"] = round((last - r.start) * 1000, 1) if last is not None else None
            else:  # continue
                o["false_stop"] = stop is not None
                # kept speaking, but did it hold its breath? (pause-at-onset, resumed)
                o["paused"] = any(e["kind"] == "decision" and e.get("action") == "PauseSpeaking"
                                  and r.start - 0.05 <= e["t"] <= r.end + 1.0 for e in events)
                o["ok"] = stop is None
        out.append(o)
    return out


def _agent_turn_on(events: list[dict], t: float) -> bool:
    on: set = set()
    for e in events:
        if e["t"] > t:
            continue
        if e["kind"] == "agent_audio_start":
            on.add(e.get("reply"))
        elif e["kind"] in ("agent_audio_end", "agent_audio_stopped"):
            on.discard(e.get("reply"))
    return bool(on)


def _last_agent_sample(user: SimulatedUser, start: float, until: float) -> float | None:
    """Time just after the last agent sample heard between ``start`` and ``until`` (the stop):
    with pause-at-onset that is the pause, the moment the agent went quiet."""
    agent = np.concatenate(user.agent_track) if user.agent_track else np.zeros(0)
    i, j = int(start * INTERNAL_RATE), min(len(agent), int(until * INTERNAL_RATE))
    if i >= j:
        return None
    nz = np.flatnonzero(agent[i:j] != 0)
    return start if not len(nz) else (i + nz[-1] + 1) / INTERNAL_RATE


def summarize(results: list[ConverseResult], cores: int = 2) -> dict:
    outs = [o for r in results for o in r.outcomes if o.get("ok") is not None]

    def pct(v):
        if not v:
            return {"p50": None, "p90": None, "n": 0}
        a = np.array(v, dtype=float)
        return {"p50": round(float(np.percentile(a, 50)), 1), "p90": round(float(np.percentile(a, 90)), 1), "n": len(v)}

    resp = [o for o in outs if o["expect"] == "respond"]
    waits = [o for o in outs if o["expect"] == "wait"]
    stops = [o for o in outs if o["expect"] == "stop"]
    conts = [o for o in outs if o["expect"] == "continue"]
    rate = lambda xs, key: round(sum(bool(o.get(key)) for o in xs) / len(xs), 3) if xs else None  # noqa: E731
    wall = sum(r.wall_s for r in results) or 1.0
    return {"summary": {
        "response_latency_ms": pct([o["latency_ms"] for o in resp if o.get("latency_ms") is not None]),
        "premature_response_rate": rate(waits + resp, "premature"),
        "bargein_stop_ms": pct([o["stop_ms"] for o in stops if o.get("stop_ms") is not None]),
        "missed_stop_rate": rate(stops, "missed"),
        "false_stop_rate": rate(conts, "false_stop"),
        "missed_response_rate": round(sum(not o["ok"] for o in resp) / len(resp), 3) if resp else None,
        "cpu_percent": round(100 * sum(r.cpu_s for r in results) / wall / cores, 1),
        "scenarios": len(results),
        "expectations": len(outs),
        "passed": sum(bool(o["ok"]) for o in outs),
    }}
