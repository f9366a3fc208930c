"""The MQTT protocol of ``duplex serve``: topics, binary audio frames, JSON messages. Pure, no I/O.

Everything a satellite and the service exchange is defined here, so both ends (and the tests)
share one implementation, and every parser can be fuzzed in-process.

* **Topics** are keyed by site ID under a prefix (``duplex`` by default): one service serves many
  satellites, each with its own session. See ``Topics``.
* **Audio** travels as binary frames: a 28-byte little-endian header, then interleaved signed
  16-bit PCM (``AudioHeader``, ``build_audio_frame``, ``parse_audio_frame``). A per-direction
  sequence number lets the receiver detect gaps, reordering and duplicates (``SequenceTracker``).
* **JSON** messages carry ``"v": 1`` and are validated by pydantic models that forbid unknown
  fields. Commands come in (``parse_command``); events, errors and the status go out.

Every parser takes untrusted bytes and either returns a validated value or raises
``ProtocolError`` with a machine-readable ``code`` and a one-line message. Nothing from a payload
is ever executed, evaluated or used as a file path: text goes to the recogniser (hotwords) and the
synthesiser (``say``) as plain strings.
"""

from __future__ import annotations

import json
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

# ----------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MqttConfig:
    #: topic prefix; every topic is <prefix>/<site>/... (several services can share a broker)
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=100)] = "duplex"
    #: MQTT client id; "" = duplex-<hostname>. Fixed, so the broker keeps our persistent session
    client_id: Annotated[str, Field(max_length=64)] = ""
    #: keepalive interval, s (a dead connection is noticed after 1.5x this)
    keepalive_s: Annotated[int, Field(ge=2, le=3600)] = 10
    #: first reconnect delay, s; doubles on each failure
    backoff_initial_s: Annotated[float, Field(gt=0, le=10)] = 0.1
    #: reconnect delay cap, s (the service is back at most this long after the broker is)
    backoff_max_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    #: most sessions one service runs when no --site list is given
    max_sites: Annotated[int, Field(ge=1, le=1000)] = 16
    #: largest audio payload, bytes, after the header (1 s of 48 kHz stereo)
    max_audio_bytes: Annotated[int, Field(ge=1024, le=4_000_000)] = 192_000
    #: largest JSON command, bytes
    max_json_bytes: Annotated[int, Field(ge=256, le=1_000_000)] = 16_384
    #: out-of-order audio frames held back while waiting for a missing one
    reorder_window: Annotated[int, Field(ge=0, le=64)] = 4
    #: how long a held frame waits for the missing one, ms
    reorder_hold_ms: Annotated[float, Field(ge=0, le=5000)] = 200.0
    #: missing audio up to this long is replaced by silence, so the timeline stays true, ms
    max_gap_fill_ms: Annotated[float, Field(ge=0, le=10000)] = 1000.0
    #: incoming audio frames queued per site before frames are dropped (500 x 20 ms = 10 s)
    inbox_frames: Annotated[int, Field(ge=10, le=100_000)] = 500
    #: final transcripts kept for publishing while the broker is unreachable (oldest dropped beyond)
    outbox_max: Annotated[int, Field(ge=10, le=1_000_000)] = 10_000
    #: error events per site per second before they are counted instead of sent
    error_rate_per_s: Annotated[float, Field(gt=0, le=10_000)] = 20.0
    #: agent audio is sent in frames of this length, ms
    audio_out_ms: Annotated[float, Field(ge=10, le=1000)] = 100.0
    #: a metrics event per active site at most this often, s (and one after every final)
    metrics_interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 5.0


class ProtocolError(ValueError):
    """An untrusted payload was rejected. ``code`` names the kind, the message is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(_one_line(message))
        self.code = code


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ topics

SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: event kinds published under <prefix>/<site>/events/<kind>
EVENT_KINDS = ("partial", "final", "turn", "agent_text", "metrics", "ack")


@dataclass(frozen=True)
class Topics:
    """The topic tree. ``<p>`` is the prefix, ``<site>`` a site ID (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``).

    ======================================  =========  =====  =====================================
    topic                                   direction  QoS    payload
    ======================================  =========  =====  =====================================
    ``<p>/<site>/audio/in``                 in         0 / 1  binary audio frame (1: kept while the service reconnects)
    ``<p>/<site>/command``                  in         1      JSON command
    ``<p>/<site>/audio/out``                out        0      binary audio frame (agent speech)
    ``<p>/<site>/events/partial``           out        0      JSON
    ``<p>/<site>/events/final``             out        1      JSON, kept and re-sent across outages
    ``<p>/<site>/events/turn``              out        1      JSON
    ``<p>/<site>/events/agent_text``        out        1      JSON
    ``<p>/<site>/events/metrics``           out        0      JSON
    ``<p>/<site>/events/ack``               out        1      JSON (commands that carried an id)
    ``<p>/<site>/error``                    out        1      JSON
    ``<p>/status``                          out        1      JSON, retained; the last will says offline
    ======================================  =========  =====  =====================================
    """

    prefix: str = "duplex"

    def audio_in(self, site: str) -> str:
        return f"{self.prefix}/{site}/audio/in"

    def audio_out(self, site: str) -> str:
        return f"{self.prefix}/{site}/audio/out"

    def command(self, site: str) -> str:
        return f"{self.prefix}/{site}/command"

    def event(self, site: str, kind: str) -> str:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        return f"{self.prefix}/{site}/events/{kind}"

    def error(self, site: str) -> str:
        return f"{self.prefix}/{site}/error"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the service subscribes to: (filter, QoS). Audio too at QoS 1, so that a satellite
        that publishes its audio at QoS 1 loses none while the service reconnects (the broker
        queues it in the service's persistent session); audio published at QoS 0 stays QoS 0."""
        return [(f"{self.prefix}/+/audio/in", 1), (f"{self.prefix}/+/command", 1)]

    def parse_inbound(self, topic: str) -> tuple[str, Literal["audio_in", "command"]]:
        """(site, kind) of a topic the service received on; ``ProtocolError`` if it is not one.

        The site level is returned even when it is not a valid site ID (code ``bad_site``), so
        that the error can be reported on that site's error topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError("unknown_topic", f"topic {topic[:120]!r} is outside {self.prefix}/")
        parts = topic[len(head) :].split("/")
        if len(parts) == 3 and parts[1:] == ["audio", "in"]:
            kind: Literal["audio_in", "command"] = "audio_in"
        elif len(parts) == 2 and parts[1] == "command":
            kind = "command"
        else:
            raise ProtocolError("unknown_topic", f"topic {topic[:120]!r} is not an inbound duplex topic")
        return parts[0], kind


    def parse_outbound(self, topic: str) -> tuple[str, str]:
        """(site, kind) of a topic the service publishes: kind is an event kind (``final``, ...),
        ``error``, ``audio_out``, or ``status`` (site ``""``). For satellites and consumers."""
        if topic == self.status:
            return "", "status"
        head = self.prefix + "/"
        parts = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(parts) == 3 and parts[1] == "events" and parts[2] in EVENT_KINDS:
            return parts[0], parts[2]
        if len(parts) == 2 and parts[1] == "error":
            return parts[0], "error"
        if len(parts) == 3 and parts[1:] == ["audio", "out"]:
            return parts[0], "audio_out"
        raise ProtocolError("unknown_topic", f"topic {topic[:120]!r} is not an outbound duplex topic")


def valid_site(site: str) -> bool:
    return bool(SITE_RE.match(site))


# ------------------------------------------------------------------------------------- audio frames

AUDIO_MAGIC = b"DPXA"
FORMAT_S16LE = 1
#: first frame of a stream: sequence tracking restarts here
FLAG_START = 0x01
#: last frame of a stream: the receiver closes the open utterance after it (payload may be empty)
FLAG_END = 0x02
_KNOWN_FLAGS = FLAG_START | FLAG_END

#: magic, version, flags, channels, format, sequence, sample rate, timestamp (µs), payload length
HEADER = struct.Struct("<4sBBBBIIQI")
HEADER_SIZE = HEADER.size  # 28
SEQ_MOD = 1 << 32
MIN_RATE, MAX_RATE = 8000, 48000
MAX_CHANNELS = 8


@dataclass(frozen=True, slots=True)
class AudioHeader:
    """The 28-byte header of an audio frame (all fields little-endian).

    ====== ==== ========== ===================================================================
    offset size type       field
    ====== ==== ========== ===================================================================
    0      4    bytes      magic ``DPXA``
    4      1    u8         version, 1
    5      1    u8         flags: 0x01 start of stream, 0x02 end of stream
    6      1    u8         channels, 1..8 (interleaved)
    7      1    u8         sample format, 1 = signed 16-bit little-endian PCM
    8      4    u32        sequence number, +1 per frame, wraps at 2^32
    12     4    u32        sample rate, Hz, 8000..48000
    16     8    u64        timestamp of the first sample, µs, sender's clock (0 = unknown)
    24     4    u32        payload length, bytes; the payload follows the header exactly
    ====== ==== ========== ===================================================================
    """

    seq: int
    sample_rate: int
    channels: int = 1
    timestamp_us: int = 0
    payload_len: int = 0
    flags: int = 0
    version: int = PROTOCOL_VERSION
    sample_format: int = FORMAT_S16LE

    @property
    def num_samples(self) -> int:
        """Samples per channel."""
        return self.payload_len // (2 * self.channels)

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def pack(self) -> bytes:
        return HEADER.pack(AUDIO_MAGIC, self.version, self.flags, self.channels, self.sample_format,
                           self.seq % SEQ_MOD, self.sample_rate, self.timestamp_us, self.payload_len)


@dataclass(frozen=True, slots=True)
class AudioPacket:
    header: AudioHeader
    payload: bytes

    def samples(self) -> np.ndarray:
        """float32 in [-1, 1), shape (n,) for mono or (n, channels)."""
        pcm = np.frombuffer(self.payload, dtype="<i2").astype(np.float32) / 32768.0
        return pcm if self.header.channels == 1 else pcm.reshape(-1, self.header.channels)


def pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] (any shape, interleaved if 2-D) to signed 16-bit little-endian bytes."""
    return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def build_audio_frame(
    seq: int, audio: np.ndarray | bytes, sample_rate: int, *, channels: int = 1, timestamp_us: int = 0, flags: int = 0
) -> bytes:
    """Header + payload. ``audio`` is float32 samples (shape (n,) or (n, channels)) or s16le bytes."""
    payload = audio if isinstance(audio, (bytes, bytearray, memoryview)) else pcm16(audio)
    payload = bytes(payload)
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(f"sample rate {sample_rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
    if not 1 <= channels <= MAX_CHANNELS or len(payload) % (2 * channels):
        raise ValueError(f"{len(payload)} payload bytes do not hold whole {channels}-channel s16 samples")
    hdr = AudioHeader(seq=seq % SEQ_MOD, sample_rate=sample_rate, channels=channels, timestamp_us=timestamp_us,
                      payload_len=len(payload), flags=flags)
    return hdr.pack() + payload


def parse_audio_frame(data: bytes, max_payload: int = MqttConfig.max_audio_bytes) -> AudioPacket:
    """Validate one binary frame. Codes: ``truncated``, ``oversized``, ``bad_header``, ``bad_version``."""
    n = len(data)
    if n > HEADER_SIZE + max_payload:
        raise ProtocolError("oversized", f"audio frame of {n} bytes exceeds the limit of {HEADER_SIZE + max_payload}")
    if n < HEADER_SIZE:
        raise ProtocolError("truncated", f"audio frame of {n} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, flags, channels, fmt, seq, rate, ts, length = HEADER.unpack_from(data)
    if magic != AUDIO_MAGIC:
        raise ProtocolError("bad_header", f"audio frame does not start with {AUDIO_MAGIC!r} (got {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"audio frame version {version} is not supported (this service speaks {PROTOCOL_VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError("bad_header", f"audio frame has unknown flags 0x{flags:02x}")
    if fmt != FORMAT_S16LE:
        raise ProtocolError("bad_header", f"audio sample format {fmt} is not supported (1 = s16le)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError("bad_header", f"audio frame has {channels} channels (1..{MAX_CHANNELS} allowed)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError("bad_header", f"audio sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
    if length > max_payload:
        raise ProtocolError("oversized", f"audio payload of {length} bytes exceeds the limit of {max_payload}")
    got = n - HEADER_SIZE
    if got < length:
        raise ProtocolError("truncated", f"audio frame {seq} carries {got} of its {length} payload bytes")
    if got > length:
        raise ProtocolError("bad_header", f"audio frame {seq} has {got - length} bytes after its {length}-byte payload")
    if length % (2 * channels):
        raise ProtocolError("bad_header", f"audio payload of {length} bytes is not whole {channels}-channel s16 samples")
    hdr = AudioHeader(seq=seq, sample_rate=rate, channels=channels, timestamp_us=ts, payload_len=length,
                      flags=flags, version=version, sample_format=fmt)
    return AudioPacket(hdr, bytes(data[HEADER_SIZE:]))


# --------------------------------------------------------------------------- sequence tracking


@dataclass(frozen=True, slots=True)
class Delivery:
    """A frame to consume, in order, after ``gap_s`` seconds of silence for frames that never came."""

    packet: AudioPacket
    gap_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Issue:
    """Something noteworthy about the stream: ``gap``, ``reordered``, ``duplicate``, ``late``, ``restart``."""

    code: str
    message: str


@dataclass
class StreamStats:
    delivered: int = 0
    gaps: int = 0
    missing: int = 0
    reordered: int = 0
    duplicates: int = 0
    late: int = 0
    restarts: int = 0


class SequenceTracker:
    """Puts one direction's frames back in order. Synchronous and I/O-free; the caller passes ``now``.

    * the expected frame: delivered at once, with any held successors;
    * a frame ahead of the expected one: held (up to ``window`` frames, ``max_hold_s`` each) in case
      the missing one is only late; when the window fills or the hold expires (``poll``), the
      missing frames are declared lost (``gap``) and replaced by silence of their duration (from the
      timestamps, else from the frame length), at most ``max_gap_fill_s``;
    * a frame behind: a ``duplicate`` if it was seen (QoS 1 redelivery), else ``late`` (its place
      was already given up) and dropped; far behind (``restart_after`` frames) means the sender
      restarted without the start flag, and tracking restarts there;
    * a frame with ``FLAG_START`` restarts tracking (a new stream).
    """

    def __init__(self, window: int = 4, max_hold_s: float = 0.2, max_gap_fill_s: float = 1.0,
                 history: int = 512, restart_after: int = 1000) -> None:
        self.window = window
        self.max_hold_s = max_hold_s
        self.max_gap_fill_s = max_gap_fill_s
        self.restart_after = restart_after
        self.expected: int | None = None
        self.stats = StreamStats()
        self._held: dict[int, tuple[AudioPacket, float]] = {}
        self._seen: deque[int] = deque(maxlen=history)
        self._seen_set: set[int] = set()
        self._last: AudioHeader | None = None

    @property
    def held(self) -> int:
        return len(self._held)

    def accept(self, pkt: AudioPacket, now: float) -> tuple[list[Delivery], list[Issue]]:
        out: list[Delivery] = []
        issues: list[Issue] = []
        seq = pkt.header.seq
        if self.expected is None or pkt.header.flags & FLAG_START:
            if self.expected is not None:
                self._release_all(out, issues)
                self._forget()
            self.expected = seq
        ahead = (seq - self.expected) % SEQ_MOD
        if ahead == 0:
            if self._held:
                self.stats.reordered += 1
                issues.append(Issue("reordered", f"audio frame {seq} arrived after {len(self._held)} later frame(s); put back in order"))
            self._deliver(pkt, 0.0, out)
            self._drain(out)
        elif ahead < SEQ_MOD // 2:
            if seq in self._held:
                self.stats.duplicates += 1
            else:
                self._held[seq] = (pkt, now)
                if len(self._held) > self.window:
                    self._skip_to_first_held(out, issues)
        else:
            behind = (self.expected - seq) % SEQ_MOD
            if seq in self._seen_set:
                self.stats.duplicates += 1
            elif behind > self.restart_after:
                self.stats.restarts += 1
                issues.append(Issue("restart", f"audio sequence jumped back by {behind} to {seq}: sender restarted, tracking restarts"))
                self._release_all(out, issues)
                self._forget()
                self.expected = seq
                self._deliver(pkt, 0.0, out)
            else:
                self.stats.late += 1
                issues.append(Issue("late", f"audio frame {seq} arrived after its place was given up; dropped"))
        return out, issues

    def poll(self, now: float) -> tuple[list[Delivery], list[Issue]]:
        """Give up on missing frames whose successors have waited ``max_hold_s``."""
        out: list[Delivery] = []
        issues: list[Issue] = []
        while self._held and min(t for _, t in self._held.values()) + self.max_hold_s <= now:
            self._skip_to_first_held(out, issues)
        return out, issues

    # -- internals --------------------------------------------------------------------------

    def _forget(self) -> None:
        self._held.clear()
        self._seen.clear()
        self._seen_set.clear()
        self._last = None

    def _deliver(self, pkt: AudioPacket, gap_s: float, out: list[Delivery]) -> None:
        seq = pkt.header.seq
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(seq)
        self._seen_set.add(seq)
        self._last = pkt.header
        self.expected = (seq + 1) % SEQ_MOD
        self.stats.delivered += 1
        out.append(Delivery(pkt, gap_s))

    def _drain(self, out: list[Delivery]) -> None:
        while self.expected in self._held:
            pkt, _ = self._held.pop(self.expected)
            self._deliver(pkt, 0.0, out)

    def _skip_to_first_held(self, out: list[Delivery], issues: list[Issue]) -> None:
        assert self.expected is not None
        first = min(self._held, key=lambda s: (s - self.expected) % SEQ_MOD)
        missing = (first - self.expected) % SEQ_MOD
        pkt, _ = self._held.pop(first)
        gap = self._gap_seconds(pkt.header, missing)
        self.stats.gaps += 1
        self.stats.missing += missing
        issues.append(Issue("gap", f"{missing} audio frame(s) before {first} never arrived; {gap * 1000:.0f} ms of silence put in their place"))
        self._deliver(pkt, gap, out)
        self._drain(out)

    def _release_all(self, out: list[Delivery], issues: list[Issue]) -> None:
        while self._held:
            self._skip_to_first_held(out, issues)

    def _gap_seconds(self, nxt: AudioHeader, missing: int) -> float:
        last = self._last
        if last is None:
            return 0.0
        expected_ts = last.timestamp_us + round(last.seconds * 1e6)
        if last.timestamp_us and nxt.timestamp_us > expected_ts:
            est = (nxt.timestamp_us - expected_ts) / 1e6
        else:
            est = missing * last.seconds
        return min(est, self.max_gap_fill_s)


# ------------------------------------------------------------------------------ JSON: commands

_NO_CONTROL = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
_LANG = r"^[a-z]{2,3}$"
SayText = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=_NO_CONTROL)]
Hotword = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]
CommandId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
Language = Annotated[str, StringConstraints(pattern=_LANG)]
Mode = Literal["dialogue", "interpreter", "captions"]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: protocol version
    v: Literal[1]
    #: optional client-chosen id; when present the service answers on events/ack
    id: CommandId | None = None


class SayCommand(_Command):
    """Speak ``text`` (Piper TTS); the audio comes back on audio/out."""

    type: Literal["say"]
    text: SayText


class InterruptCommand(_Command):
    """Stop speaking now (and drop queued speech)."""

    type: Literal["interrupt"]


class SetHotwordsCommand(_Command):
    """Replace the recogniser's hotword list (an empty list clears it)."""

    type: Literal["set_hotwords"]
    hotwords: Annotated[list[Hotword], Field(max_length=100)]


class SetModeCommand(_Command):
    """dialogue, interpreter (with ``target`` language) or captions; the coordinator acts on it."""

    type: Literal["set_mode"]
    mode: Mode
    target: Language | None = None


class SetLanguageCommand(_Command):
    """The language spoken to the recogniser, or "auto" (multilingual models only)."""

    type: Literal["set_language"]
    language: Annotated[str, StringConstraints(pattern=r"^([a-z]{2,3}|auto)$")]


class ResetCommand(_Command):
    """Forget the conversation: recogniser and detector state, queued audio, speech in progress."""

    type: Literal["reset"]


Command = Annotated[
    Union[SayCommand, InterruptCommand, SetHotwordsCommand, SetModeCommand, SetLanguageCommand, ResetCommand],
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Any] = TypeAdapter(Command)


def _describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def parse_json_object(payload: bytes, max_bytes: int) -> dict:
    """Bytes to a JSON object, within ``max_bytes``. Codes: ``oversized``, ``malformed_json``, ``schema``."""
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"JSON payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        # decoded here: json.loads would also guess UTF-16/32 from bytes, and the protocol is UTF-8
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed_json", f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError("malformed_json", f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting deeper than the parser allows
        raise ProtocolError("malformed_json", f"payload is not usable JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_command(payload: bytes, max_bytes: int = MqttConfig.max_json_bytes) -> _Command:
    """Validate one command. Codes: ``oversized``, ``malformed_json``, ``bad_version``, ``schema``."""
    obj = parse_json_object(payload, max_bytes)
    v = obj.get("v")
    if v is None:
        raise ProtocolError("schema", 'command has no protocol version "v" (this service speaks 1)')
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError("bad_version", f"command protocol version {repr(v)[:20]} is not supported (this service speaks 1)")
    try:
        return COMMAND_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        kind = obj.get("type")
        what = f"{kind!r} command" if isinstance(kind, str) and len(kind) <= 32 else "command"
        raise ProtocolError("schema", f"invalid {what}: {_describe(exc)}") from None


# -------------------------------------------------------------------------------- JSON: events


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    #: the site this is about
    site: str
    #: random id of this service run: (site, run, seq) identifies a final transcript for ever
    run: str


class PartialEvent(_Out):
    utterance: int
    #: committed words; they will not change
    stable: str
    #: the rest of the current hypothesis; it may still change
    unstable: str
    text: str
    #: audio time the hypothesis reaches, s since the session's first sample
    t: float


class WordOut(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    word: str
    start: float
    end: float
    probability: float


class FinalEvent(_Out):
    #: per-site, per-run final number from 1 without holes; deduplicate on (site, run, seq)
    seq: int
    utterance: int
    text: str
    #: audio times, s since the session's first sample
    start: float
    end: float
    language: str
    #: True when the utterance goes on (a long monologue cut at a committed word)
    continued: bool
    words: list[WordOut]


class TurnEventOut(_Out):
    type: Literal["speech_started", "speech_ended", "agent_started", "agent_stopped"]
    #: audio time (speech_*) or agent audio time (agent_*), s
    t: float
    #: the agent turn (agent_*), as numbered by the session
    turn: int | None = None
    #: agent_stopped only: True when it was cut short (a barge-in, interrupt, reset)
    interrupted: bool | None = None
    #: agent_stopped with interrupted: why (the turn-taking decision, or "interrupt")
    reason: str | None = None
    #: agent_stopped with interrupted: the words of the turn the user heard
    heard: str | None = None


class AgentTextEvent(_Out):
    turn: int
    text: str


class MetricsEvent(_Out):
    values: dict[str, float]


class AckEvent(_Out):
    id: str
    command: str
    ok: bool
    message: str = ""


class ErrorEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    site: str
    #: machine-readable kind: malformed_json, schema, bad_version, unknown_site, bad_site, truncated,
    #: oversized, bad_header, gap, late, reordered, restart, overloaded, rejected, retained, internal
    code: str
    message: str
    severity: Literal["error", "warning"] = "error"
    #: error events for this site not sent since the last one (rate limit)
    suppressed: int = 0


class StatusEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    state: Literal["online", "offline"]
    #: the service's MQTT client id
    service: str
    run: str | None = None
    #: sites served; null means any valid site ID (up to max_sites)
    sites: list[str] | None = None


def encode(model: BaseModel) -> bytes:
    """Compact JSON; optional fields that are unset (None) are left out."""
    return model.model_dump_json(exclude_none=True).encode()


@dataclass
class RateLimiter:
    """Token bucket: ``allow()`` is True at most ``rate`` times a second on average (bursts of
    ``burst``); refusals are counted so the next allowed event can say how many were dropped."""

    rate: float
    burst: float = 0.0
    tokens: float = field(default=-1.0)
    last: float = 0.0
    suppressed: int = 0

    def allow(self, now: float) -> bool:
        cap = self.burst or max(1.0, self.rate)
        if self.tokens < 0:
            self.tokens, self.last = cap, now
        self.tokens = min(cap, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


OUTBOUND_MODELS: dict[str, type[BaseModel]] = {
    "partial": PartialEvent, "final": FinalEvent, "turn": TurnEventOut, "agent_text": AgentTextEvent,
    "metrics": MetricsEvent, "ack": AckEvent, "error": ErrorEvent, "status": StatusEvent,
}


def decode_outbound(kind: str, payload: bytes) -> BaseModel | AudioPacket:
    """A published message, as its model (or ``AudioPacket`` for ``audio_out``)."""
    if kind == "audio_out":
        return parse_audio_frame(payload)
    model = OUTBOUND_MODELS.get(kind)
    if model is None:
        raise ProtocolError("unknown_topic", f"unknown message kind {kind!r}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError("schema", f"invalid {kind} message: {_describe(exc)}") from None
