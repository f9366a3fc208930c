"""Conversation scenarios: the simulated user's side of a dialogue (format version 1).

A scenario is a JSON file listing user audio clips, when each is played and what the agent is
expected to do about it; ``duplex converse --script`` plays it into the pipeline and scores the
agent. The format is documented in docs/scenarios.md; in short::

    {"version": 1,
     "events": [
      {"audio": "q1.wav", "at": 0.5, "expect": "respond"},
      {"audio": "part1.wav", "after": "agent_end", "offset": 0.6, "expect": "wait"},
      {"audio": "part2.wav", "after": "previous_end", "offset": 0.9, "expect": "respond"},
      {"audio": "stop_please.wav", "after": "agent_start", "offset": 1.2, "expect": "stop"}]}

Paths are relative to the scenario file. Unknown fields are allowed and kept (``extra``), so the
format can grow without breaking old readers. ``load_scenario`` checks everything that can be
checked before playing (JSON, version, scheduling rules, that each audio file exists and is audio)
and fails with one line naming the file, the event and the problem. ``clip_start`` is the
scheduling rule itself, so the simulator and the tests share one definition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streaming.errors import DuplexError

__all__ = [
    "SCENARIO_VERSION",
    "ANCHORS",
    "EXPECTS",
    "ScenarioError",
    "UserClip",
    "Expectation",
    "Scenario",
    "load_scenario",
    "load_scenarios",
    "scenario_paths",
    "clip_start",
]

SCENARIO_VERSION = 1
Anchor = Literal["agent_start", "agent_end", "previous_end"]
Expect = Literal["respond", "wait", "stop", "continue"]
ANCHORS: tuple[str, ...] = ("agent_start", "agent_end", "previous_end")
EXPECTS: tuple[str, ...] = ("respond", "wait", "stop", "continue")
#: the script that generates a folder's audio, if it sits next to the scenarios (the shipped set)
GENERATOR = "make_scenarios.py"


class ScenarioError(DuplexError):
    """A scenario file that cannot be used; the message is one line naming the file and the problem."""


# ------------------------------------------------------------------------------------ the schema


class _EventModel(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    audio: str = Field(min_length=1)
    at: float | None = Field(default=None, ge=0)
    after: Anchor | None = None
    offset: float = Field(default=0.0, ge=0)
    expect: Expect | None = None
    text: str = ""
    note: str = ""
    timeout: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _one_rule(self) -> "_EventModel":
        if (self.at is None) == (self.after is None):
            raise ValueError("give exactly one of 'at' (seconds) or 'after' (agent_start, agent_end, previous_end)")
        if self.at is not None and "offset" in self.model_fields_set:
            raise ValueError("'offset' goes with 'after', not with 'at'")
        return self


class _ScenarioModel(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    version: int
    name: str = ""
    description: str = ""
    events: list[_EventModel] = Field(min_length=1)


# ------------------------------------------------------------------------------- resolved form


@dataclass(frozen=True)
class UserClip:
    """One user clip with its scheduling rule, resolved against the scenario's folder."""

    #: position in the scenario's event list (0-based)
    index: int
    #: the audio file, absolute
    audio: Path
    #: absolute conversation-clock time to start at (None when ``after`` is used)
    at: float | None
    #: what the start is relative to: agent_start, agent_end or previous_end (None when ``at`` is used)
    after: str | None
    #: seconds after the ``after`` anchor
    offset: float
    #: respond, wait, stop, continue, or None (nothing is checked about this clip)
    expect: str | None
    #: the words the clip says ("" if not given)
    text: str
    #: free-form comment
    note: str
    #: seconds to wait for an ``after`` anchor that does not come before playing the clip anyway
    timeout: float
    #: length of the audio, seconds
    duration: float
    sample_rate: int
    channels: int
    #: fields of the event that this version does not know, as given
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        """The scheduling rule in words, for logs: "at 0.50 s", "0.90 s after previous_end"."""
        return f"at {self.at:.2f} s" if self.at is not None else f"{self.offset:.2f} s after {self.after}"


@dataclass(frozen=True)
class Expectation:
    """What the agent must do about clip ``clip`` (an index into ``Scenario.clips``)."""

    clip: int
    kind: str
    text: str = ""


@dataclass(frozen=True)
class Scenario:
    path: Path
    version: int
    name: str
    description: str
    clips: tuple[UserClip, ...]
    #: top-level fields that this version does not know, as given
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expectations(self) -> tuple[Expectation, ...]:
        return tuple(Expectation(c.index, c.expect, c.text) for c in self.clips if c.expect is not None)

    def count(self, kind: str) -> int:
        return sum(1 for e in self.expectations if e.kind == kind)


# ------------------------------------------------------------------------------------- loading


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    where = f"scenario {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{where}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: the top level must be an object with 'version' and 'events'")
    version = raw.get("version")
    if version is None:
        raise ScenarioError(f"{where}: 'version' is missing (this duplex reads version {SCENARIO_VERSION})")
    if version != SCENARIO_VERSION or isinstance(version, bool):
        raise ScenarioError(f"{where}: unknown scenario version {version!r} (this duplex reads version {SCENARIO_VERSION})")
    try:
        model = _ScenarioModel.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{where}: {_describe(exc)}") from None
    first = model.events[0]
    if first.after == "previous_end":
        raise ScenarioError(f"{where}: event 1: after = 'previous_end' but there is no previous event")
    clips = tuple(_resolve(path, i, ev) for i, ev in enumerate(model.events))
    return Scenario(path=path.resolve(), version=model.version, name=model.name or path.stem,
                    description=model.description, clips=clips, extra=dict(model.model_extra or {}))


def _resolve(path: Path, i: int, ev: _EventModel) -> UserClip:
    audio = Path(ev.audio).expanduser()
    if not audio.is_absolute():
        audio = path.resolve().parent / audio
    if not audio.is_file():
        hint = ""
        gen = next((d / GENERATOR for d in (path.resolve().parent, audio.parent.parent) if (d / GENERATOR).is_file()), None)
        if gen is not None:
            hint = f" (generate the audio with: python {gen})"
        raise ScenarioError(f"scenario {path}: event {i + 1}: audio file not found: {audio}{hint}")
    try:
        info = sf.info(str(audio))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ScenarioError(f"scenario {path}: event {i + 1}: {audio} is not audio libsndfile can read: {exc}") from None
    if info.frames == 0 or info.samplerate <= 0:
        raise ScenarioError(f"scenario {path}: event {i + 1}: {audio} holds no audio")
    return UserClip(
        index=i, audio=audio, at=ev.at, after=ev.after, offset=ev.offset, expect=ev.expect, text=ev.text,
        note=ev.note, timeout=ev.timeout, duration=info.frames / info.samplerate, sample_rate=info.samplerate,
        channels=info.channels, extra=dict(ev.model_extra or {}),
    )


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
        prefix = f"event {loc[1] + 1}: "
        loc = loc[2:]
    else:
        prefix = ""
    key = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{prefix}'{key}' is missing"
    if not key:
        return f"{prefix}{msg}"
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" = {value!r}"
    return f"{prefix}{key}{shown}: {msg}"


def scenario_paths(folder: str | Path) -> list[Path]:
    """The scenario files in ``folder`` (``*.json``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScenarioError(f"scenario folder not found: {folder}")
    return sorted(folder.glob("*.json"))


def load_scenarios(folder: str | Path) -> list[Scenario]:
    paths = scenario_paths(folder)
    if not paths:
        raise ScenarioError(f"no scenario files (*.json) in {folder}")
    return [load_scenario(p) for p in paths]


# ---------------------------------------------------------------------------- the schedule rule


def clip_start(
    clip: UserClip,
    previous_end: float,
    agent_turns: Sequence[tuple[float, float | None]],
    now: float | None = None,
) -> float | None:
    """When ``clip`` starts on the conversation clock, or None while that is not known yet.

    ``previous_end``: when the previous clip's audio ended (0 for the first clip).
    ``agent_turns``: the agent's turns so far as (start, end), end None while it is speaking.
    ``now``: the current time; when the anchor has not come ``clip.timeout`` seconds after
    ``previous_end``, the clip starts then anyway (the conversation goes on; the simulator
    records that the anchor was missed).

    An ``agent_start`` anchor is the start of the agent turn in progress when the previous clip
    ended, or else of the next one; ``agent_end`` is the end of that same turn. A user never
    talks over themself: a clip never starts before ``previous_end``.
    """
    if clip.at is not None:
        return max(clip.at, previous_end)
    anchor: float | None = None
    if clip.after == "previous_end":
        anchor = previous_end
    else:
        # the turn in progress at previous_end, or the first to start after it
        turn = next((t for t in sorted(agent_turns) if t[1] is None or t[1] > previous_end), None)
        if turn is not None:
            anchor = turn[0] if clip.after == "agent_start" else turn[1]
    if anchor is not None:
        return max(anchor + clip.offset, previous_end)
    if now is not None and now >= previous_end + clip.timeout:
        return previous_end + clip.timeout
    return None
