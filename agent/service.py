"""``duplex serve``: the agent as a headless service over MQTT (see docs/mqtt.md).

One process serves many satellites. Each site gets a ``Session`` (its own detector, recogniser and
dialogue state: one KV cache per site) created on its first message; all sessions share one set of
loaded models. By default each site is a full-duplex conversation whose agent voice goes out on
``audio/out`` in real time; ``dialogue=False`` (``duplex serve --transcripts-only``) serves
transcripts only. The MQTT side is a thin shell around the sessions:

* the **connection loop** connects with a fixed client id and a persistent session
  (``clean_session=False``), subscribes, publishes a retained ``online`` status (the last will says
  ``offline``), and reconnects with exponential backoff (``mqtt.backoff_initial_s`` doubling up to
  ``mqtt.backoff_max_s``) when the broker goes away. Sessions keep running while it is away;
* ``dispatch`` (synchronous, never raises) validates every inbound message with
  ``agent.mqtt_protocol`` and hands audio and commands to the site's inbox, or answers with an
  error event on ``<prefix>/<site>/error``;
* per site, an **ingest** task feeds the inbox into the session and a **pump** task turns the
  session's events into MQTT messages;
* **final transcripts** go through the ``Outbox``: they are kept, in order, until the broker has
  acknowledged them (QoS 1 PUBACK), and sent again after a reconnect. A final whose PUBACK was lost
  with the connection can therefore arrive twice; each carries ``(site, run, seq)`` so consumers
  drop the repeat, and nothing is lost. Everything else is live data and is dropped while offline.

Model work never runs on the event loop: the stages of each session run it on their own threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from streaming.errors import DuplexError
from streaming.frames import AgentText, ErrorFrame, FinalText, PartialText, SpeechEnded, SpeechStarted, TurnEvent

from .config import DuplexConfig
from .mqtt_protocol import (
    FLAG_END,
    FLAG_START,
    AckEvent,
    AgentTextEvent,
    ErrorEvent,
    FinalEvent,
    InterruptCommand,
    MetricsEvent,
    MqttConfig,
    PartialEvent,
    ProtocolError,
    RateLimiter,
    ResetCommand,
    SayCommand,
    SequenceTracker,
    SetHotwordsCommand,
    SetLanguageCommand,
    SetModeCommand,
    StatusEvent,
    Topics,
    TurnEventOut,
    WordOut,
    build_audio_frame,
    encode,
    parse_audio_frame,
    parse_command,
    valid_site,
)
from .session import AgentAudio, Metrics, Session, SharedModels

log = logging.getLogger(__name__)

#: CONNACK codes that mean the credentials are wrong (MQTT 3.1.1 and their v5 equivalents)
_AUTH_CODES = {4, 5, 134, 135}
#: say commands a site may have waiting; more are rejected (each holds up to 2000 characters)
MAX_QUEUED_TURNS = 32


# ----------------------------------------------------------------------------------- broker URL


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    #: CA bundle to verify the broker with (TLS); None = the system's
    tls_ca: str | None = None
    #: client certificate and key, for brokers that require them
    tls_cert: str | None = None
    tls_key: str | None = None
    #: skip hostname verification (self-signed test brokers only)
    tls_insecure: bool = False

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> "BrokerSettings":
        """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883, TLS)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise DuplexError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise DuplexError(f"broker URL {url!r} must be mqtt://host:port, without a path")
        if parts.username or parts.password:
            raise DuplexError("put credentials in --username/--password(-file), not in the broker URL")
        try:
            port = parts.port
        except ValueError:
            raise DuplexError(f"broker URL {url!r} has an invalid port") from None
        if not parts.hostname:
            raise DuplexError(f"broker URL {url!r} has no host")
        tls = parts.scheme in ("mqtts", "ssl") or bool(kw.get("tls_ca") or kw.get("tls_cert"))
        for key in ("tls_ca", "tls_cert", "tls_key"):
            if kw.get(key) and not os.path.isfile(kw[key]):
                raise DuplexError(f"no such file for --{key.replace('_', '-')}: {kw[key]}")
        if bool(kw.get("tls_cert")) != bool(kw.get("tls_key")):
            raise DuplexError("--tls-cert and --tls-key go together")
        if kw.get("password") and not kw.get("username"):
            raise DuplexError("a password needs a --username")
        return cls(parts.hostname, port or (8883 if tls else 1883), tls, **kw)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def default_client_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"duplex-{host}"[:64]


# ------------------------------------------------------------------------------------ outbox


@dataclass
class Outbox:
    """Final transcripts waiting for the broker's acknowledgement, oldest first."""

    limit: int = 10_000
    items: deque[tuple[str, bytes]] = field(default_factory=deque)
    #: dropped because the outbox was full (the broker was away for very long)
    dropped: int = 0
    sent: int = 0

    def __post_init__(self) -> None:
        self._ready = asyncio.Event()

    def put(self, topic: str, payload: bytes) -> None:
        if len(self.items) >= self.limit:
            self.items.popleft()
            self.dropped += 1
        self.items.append((topic, payload))
        self._ready.set()

    async def wait(self) -> tuple[str, bytes]:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        return self.items[0]

    def acked(self) -> None:
        self.items.popleft()
        self.sent += 1

    def __len__(self) -> int:
        return len(self.items)


# -------------------------------------------------------------------------------------- sites


class _Site:
    def __init__(self, site_id: str, session: Session, mc: MqttConfig) -> None:
        self.id = site_id
        self.session = session
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.audio_queued = 0
        self.tracker = SequenceTracker(mc.reorder_window, mc.reorder_hold_ms / 1000, mc.max_gap_fill_ms / 1000)
        self.limiter = RateLimiter(mc.error_rate_per_s, burst=2 * mc.error_rate_per_s)
        self.final_seq = 0
        self.out_seq = 0
        self.new_turn = True
        #: the agent turn whose agent_started went out and whose agent_stopped has not
        self.agent_turn: int | None = None
        self.out_rate = 22050
        self.counts = {"frames_in": 0, "dropped": 0, "errors": 0, "commands": 0}
        self.active_since_metrics = False
        self.last_metrics = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()


class MqttService:
    """Serves sites over one broker connection. ``await run()`` until ``stop()``."""

    def __init__(
        self,
        cfg: DuplexConfig,
        broker: BrokerSettings,
        *,
        sites: Iterable[str] | None = None,
        models: SharedModels | None = None,
        mqtt: MqttConfig | None = None,
        client_id: str | None = None,
        dialogue: bool | None = None,
    ) -> None:
        """``dialogue``: every site a conversation (True) or transcripts only (False); None, the
        default: a conversation when the models have the LLM (``run()`` loads it, unless False)."""
        self.cfg = cfg
        self.dialogue = dialogue
        self.mc = mqtt or getattr(cfg, "mqtt", None) or MqttConfig()
        self.broker = broker
        self.allowed = None if sites is None else tuple(dict.fromkeys(sites))
        for s in self.allowed or ():
            if not valid_site(s):
                raise DuplexError(f"invalid site ID {s!r}: use 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
        self.models = models
        self.client_id = client_id or self.mc.client_id or default_client_id()
        self.topics = Topics(self.mc.topic_prefix)
        #: random id of this run; with the per-site seq it identifies a final transcript for ever
        self.run_id = secrets.token_hex(6)
        self.sites: dict[str, _Site] = {}
        self.outbox = Outbox(self.mc.outbox_max)
        self.connected = asyncio.Event()
        #: monotonic times of every successful connection and of every loss (for tests and benchmarks)
        self.connects: list[float] = []
        self.disconnects: list[float] = []
        #: (site, seq, text, monotonic time) of the last finals produced
        self.finals_log: deque[tuple[str, int, str, float]] = deque(maxlen=10_000)
        self.counts = {"messages_in": 0, "dropped_offline": 0, "publish_failed": 0, "unknown_site": 0}
        self._client: Any = None
        self._stopping = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._unknown_limiter = RateLimiter(self.mc.error_rate_per_s, burst=2 * self.mc.error_rate_per_s)
        self._inflight: set[asyncio.Task[Any]] = set()
        self._ever_connected = False

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to publish ``offline``, disconnect cleanly and return."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        if self.models is None:
            self.models = await asyncio.to_thread(SharedModels.load, self.cfg, tts=True, llm=self.dialogue is not False)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        fatal: DuplexError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                ticker = tg.create_task(self._tick(), name="duplex:mqtt:tick")
                try:
                    await self._connection_loop()
                except DuplexError as exc:
                    fatal = exc
                ticker.cancel()
                for site in self.sites.values():
                    for t in list(site.tasks):
                        t.cancel()
        finally:
            self._tg = None
            for t in list(self._inflight):
                t.cancel()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if fatal is not None:
            raise fatal

    async def _connection_loop(self) -> None:
        import aiomqtt

        delay = self.mc.backoff_initial_s
        while not self._stopping.is_set():
            connected_before = len(self.connects)
            try:
                await self._connect_once()
                return
            except aiomqtt.MqttCodeError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                if code in _AUTH_CODES and not self._ever_connected:
                    raise DuplexError(
                        f"MQTT broker {self.broker.url} refused the connection: {exc.rc} (check --username/--password)"
                    ) from None
                log.warning("MQTT %s: %s; reconnecting", self.broker.url, exc)
            except aiomqtt.MqttError as exc:
                text = str(exc)
                if not self._ever_connected and ("SSL" in text or "certificate" in text):
                    raise DuplexError(f"TLS connection to {self.broker.url} failed: {text}") from None
                log.warning("MQTT %s: %s; reconnecting", self.broker.url, text or type(exc).__name__)
            except OSError as exc:  # name resolution and similar, before aiomqtt wraps them
                log.warning("MQTT %s: %s; reconnecting", self.broker.url, exc)
            except Exception:  # noqa: BLE001 - a client bug must not end the service: a fresh connection
                log.exception("MQTT %s: the connection failed unexpectedly; reconnecting", self.broker.url)
            if len(self.connects) > connected_before:
                delay = self.mc.backoff_initial_s  # it was up: start the backoff over
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, self.mc.backoff_max_s)

    def _client_for(self):
        import aiomqtt

        b = self.broker
        offline = encode(StatusEvent(state="offline", service=self.client_id, run=self.run_id))
        tls = None
        if b.tls:
            tls = aiomqtt.TLSParameters(ca_certs=b.tls_ca, certfile=b.tls_cert, keyfile=b.tls_key)
        client = aiomqtt.Client(
            b.host, b.port,
            identifier=self.client_id,
            clean_session=False,  # the broker keeps our subscriptions and queued commands
            protocol=aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.status, offline, qos=1, retain=True),
            username=b.username, password=b.password,
            tls_params=tls, tls_insecure=b.tls_insecure if b.tls else None,
            keepalive=self.mc.keepalive_s,
            timeout=5,
            max_queued_incoming_messages=self.mc.inbox_frames * 8,
            # Nagle's algorithm against the peer's delayed ACK holds small messages up to 40 ms
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # live data is published without waiting for each other; aiomqtt warns above 10 in flight
        client.pending_calls_threshold = 100_000
        return client

    async def _connect_once(self) -> None:
        import aiomqtt

        client = self._client_for()
        async with client:
            self._ever_connected = True
            self.connects.append(time.monotonic())
            log.info("MQTT connected to %s as %s", self.broker.url, self.client_id)
            await client.subscribe(self.topics.subscriptions())
            online = StatusEvent(state="online", service=self.client_id, run=self.run_id,
                                 sites=list(self.allowed) if self.allowed is not None else None)
            await client.publish(self.topics.status, encode(online), qos=1, retain=True)
            self._client = client
            self.connected.set()
            tasks = {
                asyncio.create_task(self._receive(client), name="duplex:mqtt:receive"),
                asyncio.create_task(self._send_finals(client), name="duplex:mqtt:finals"),
            }
            stop = asyncio.create_task(self._stopping.wait())
            try:
                done, _ = await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.connected.clear()
                self._client = None
                for t in (*tasks, stop):
                    t.cancel()
                await asyncio.gather(*tasks, stop, return_exceptions=True)
            if stop in done:
                offline = StatusEvent(state="offline", service=self.client_id, run=self.run_id)
                try:
                    await client.publish(self.topics.status, encode(offline), qos=1, retain=True, timeout=2)
                except aiomqtt.MqttError:
                    pass
                return
            self.disconnects.append(time.monotonic())
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            raise aiomqtt.MqttError("connection ended")

    async def _receive(self, client: Any) -> None:
        async for msg in client.messages:
            payload = msg.payload
            if not isinstance(payload, (bytes, bytearray)):
                payload = b"" if payload is None else str(payload).encode()
            self.dispatch(str(msg.topic), bytes(payload), retained=bool(msg.retain))

    async def _send_finals(self, client: Any) -> None:
        """Publish queued finals in order; each leaves the outbox only once the broker has it."""
        while True:
            topic, payload = await self.outbox.wait()
            await client.publish(topic, payload, qos=1, timeout=self.mc.keepalive_s)
            self.outbox.acked()

    # -- inbound ------------------------------------------------------------------------

    def dispatch(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Handle one inbound message. Synchronous and total: whatever the bytes, it returns
        normally, and problems become error events."""
        self.counts["messages_in"] += 1
        try:
            site_id, kind = self.topics.parse_inbound(topic)
        except ProtocolError as exc:
            log.debug("ignored message: %s", exc)
            return
        try:
            if not valid_site(site_id):
                self._error_unknown(site_id, "bad_site", f"{site_id[:80]!r} is not a valid site ID (1-64 of A-Z a-z 0-9 _ . -)")
                return
            site = self._site(site_id)
            if site is None:
                return
            if retained:  # it would be replayed on every reconnect
                what = "audio frames" if kind == "audio_in" else "commands"
                self._error(site, "retained", f"retained {what} are ignored: publish them without the retain flag")
            elif kind == "audio_in":
                self._on_audio(site, payload)
            else:
                self._on_command(site, payload)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the service
            log.exception("failed to handle a message on %s", topic[:200])
            self._error_unknown(site_id, "internal", f"internal error: {type(exc).__name__}")

    def _site(self, site_id: str) -> _Site | None:
        site = self.sites.get(site_id)
        if site is not None:
            return site
        if self.allowed is not None and site_id not in self.allowed:
            self.counts["unknown_site"] += 1
            self._error_unknown(site_id, "unknown_site", f"site {site_id!r} is not served here (served: {', '.join(self.allowed)})")
            return None
        if self.allowed is None and len(self.sites) >= self.mc.max_sites:
            self.counts["unknown_site"] += 1
            self._error_unknown(site_id, "unknown_site", f"site {site_id!r} refused: this service already serves {self.mc.max_sites} sites")
            return None
        if self._tg is None or self.models is None:
            return None
        site = _Site(site_id, Session(self.models, self.cfg, name=site_id, dialogue=self.dialogue), self.mc)
        self.sites[site_id] = site
        site.tasks.add(self._tg.create_task(self._run_site(site), name=f"duplex:site:{site_id}"))
        log.info("site %s: new session", site_id)
        return site

    def _on_audio(self, site: _Site, payload: bytes) -> None:
        try:
            pkt = parse_audio_frame(payload, self.mc.max_audio_bytes)
        except ProtocolError as exc:
            self._error(site, exc.code, str(exc))
            return
        site.counts["frames_in"] += 1
        site.active_since_metrics = True
        deliveries, issues = site.tracker.accept(pkt, time.monotonic())
        for issue in issues:
            self._error(site, issue.code, issue.message, severity="warning")
        self._enqueue_audio(site, deliveries)

    def _enqueue_audio(self, site: _Site, deliveries: list) -> None:
        for d in deliveries:
            if site.audio_queued >= self.mc.inbox_frames:
                site.counts["dropped"] += 1
                self._error(site, "overloaded", f"site {site.id} is behind real time: audio frame {d.packet.header.seq} dropped",
                            severity="warning")
                continue
            site.audio_queued += 1
            site.inbox.put_nowait(("audio", d))

    def _on_command(self, site: _Site, payload: bytes) -> None:
        try:
            cmd = parse_command(payload, self.mc.max_json_bytes)
        except ProtocolError as exc:
            self._error(site, exc.code, str(exc))
            return
        site.counts["commands"] += 1
        if isinstance(cmd, InterruptCommand):  # urgent: overtakes queued audio and commands
            self._spawn(site, self._command(site, cmd))
            return
        if isinstance(cmd, ResetCommand):  # audio queued before a reset is dropped with it
            kept = [item for item in _drain(site.inbox) if item[0] != "audio"]
            site.audio_queued = 0
            for item in kept:
                site.inbox.put_nowait(item)
        site.inbox.put_nowait(("command", cmd))

    # -- per site -------------------------------------------------------------------------

    async def _run_site(self, site: _Site) -> None:
        try:
            try:
                await site.session.start()
            except DuplexError as exc:  # the site's dialogue could not start: report, forget the site
                self._error(site, "dialogue", str(exc))
                self.sites.pop(site.id, None)
                return
            async with site.session:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._ingest(site), name=f"duplex:site:{site.id}:ingest")
                    tg.create_task(self._pump(site), name=f"duplex:site:{site.id}:pump")
        finally:
            for t in list(site.tasks):
                t.cancel()

    async def _ingest(self, site: _Site) -> None:
        s = site.session
        while True:
            kind, item = await site.inbox.get()
            try:
                if kind == "audio":
                    site.audio_queued -= 1
                    hdr = item.packet.header
                    if item.gap_s > 0:  # the missing frames' duration in silence keeps the timeline true
                        await s.push_audio(np.zeros(int(item.gap_s * hdr.sample_rate), np.float32), hdr.sample_rate)
                    if item.packet.payload:
                        await s.push_audio(item.packet.payload, hdr.sample_rate, hdr.channels)
                    if hdr.flags & FLAG_END:
                        await s.flush()
                else:
                    await self._command(site, item)
            except Exception as exc:  # noqa: BLE001
                log.exception("site %s: failed to handle %s", site.id, kind)
                self._error(site, "internal", f"internal error handling {kind}: {type(exc).__name__}: {exc}")

    async def _command(self, site: _Site, cmd: Any) -> None:
        s = site.session
        ok, message = True, ""
        try:
            if isinstance(cmd, SayCommand):
                if len(site.tasks) > MAX_QUEUED_TURNS:
                    raise ValueError(f"{MAX_QUEUED_TURNS} turns are already waiting to be spoken")
                self._spawn(site, self._say(site, cmd))
                return
            if isinstance(cmd, InterruptCommand):
                message = "interrupted" if await s.interrupt() else "nothing to interrupt"
            elif isinstance(cmd, SetHotwordsCommand):
                message = f"{len(await s.set_hotwords(cmd.hotwords))} hotword(s)"
            elif isinstance(cmd, SetModeCommand):
                await s.set_mode(cmd.mode, cmd.target)
            elif isinstance(cmd, SetLanguageCommand):
                await s.set_language(cmd.language)
            elif isinstance(cmd, ResetCommand):
                await s.reset()
        except (ValueError, DuplexError) as exc:
            ok, message = False, str(exc)
            self._error(site, "rejected", f"{cmd.type}: {exc}")
        self._ack(site, cmd, ok, message)

    async def _say(self, site: _Site, cmd: SayCommand) -> None:
        try:
            turn = await site.session.say(cmd.text)
            self._ack(site, cmd, True, f"turn {turn}")
        except (ValueError, DuplexError, RuntimeError) as exc:
            self._error(site, "rejected", f"say: {exc}")
            self._ack(site, cmd, False, str(exc))

    def _ack(self, site: _Site, cmd: Any, ok: bool, message: str) -> None:
        if cmd.id is not None:
            ev = AckEvent(site=site.id, run=self.run_id, id=cmd.id, command=cmd.type, ok=ok, message=message[:300])
            self._publish(self.topics.event(site.id, "ack"), encode(ev), qos=1)

    def _spawn(self, site: _Site, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        site.tasks.add(task)
        task.add_done_callback(site.tasks.discard)

    async def _pump(self, site: _Site) -> None:
        async for ev in site.session.events():
            try:
                self._publish_event(site, ev)
            except Exception:  # noqa: BLE001
                log.exception("site %s: failed to publish %s", site.id, type(ev).__name__)

    def _publish_event(self, site: _Site, ev: Any) -> None:
        t, run, sid = self.topics, self.run_id, site.id
        if isinstance(ev, FinalText):
            site.final_seq += 1
            words = [WordOut(word=w.word, start=round(w.start, 3), end=round(w.end, 3), probability=round(w.probability, 4))
                     for w in ev.words]
            final = FinalEvent(site=sid, run=run, seq=site.final_seq, utterance=ev.utterance, text=ev.text,
                               start=round(ev.start, 3), end=round(ev.pts, 3), language=ev.language,
                               continued=ev.continued, words=words)
            self.outbox.put(t.event(sid, "final"), encode(final))
            self.finals_log.append((sid, site.final_seq, ev.text, time.monotonic()))
        elif isinstance(ev, PartialText):
            p = PartialEvent(site=sid, run=run, utterance=ev.utterance, stable=ev.stable, unstable=ev.unstable,
                             text=ev.text, t=round(ev.pts, 3))
            self._publish(t.event(sid, "partial"), encode(p), qos=0)
        elif isinstance(ev, (SpeechStarted, SpeechEnded)):
            kind = "speech_started" if isinstance(ev, SpeechStarted) else "speech_ended"
            self._publish(t.event(sid, "turn"), encode(TurnEventOut(site=sid, run=run, type=kind, t=round(ev.pts, 3))), qos=1)
        elif isinstance(ev, TurnEvent):
            self._publish_turn(site, ev)
        elif isinstance(ev, AgentText):
            self._publish(t.event(sid, "agent_text"), encode(AgentTextEvent(site=sid, run=run, turn=ev.reply, text=ev.text)), qos=1)
        elif isinstance(ev, AgentAudio):
            self._publish_agent_audio(site, ev)
        elif isinstance(ev, Metrics):
            self._publish_metrics(site, dict(ev.values))
        elif isinstance(ev, ErrorFrame):
            self._error(site, "dialogue" if ev.stage == "coordinator" else "recognition", ev.message)

    def _publish_turn(self, site: _Site, ev: TurnEvent) -> None:
        """The agent's turn events on the wire: ``agent_start`` → ``agent_started``; ``agent_end``
        and ``barge_in`` → ``agent_stopped`` (``interrupted``, with ``reason`` and ``heard``), each
        followed by an empty end-of-stream frame on ``audio/out``. A barge-in on a reply that never
        started playing is not a turn the satellite saw: nothing is sent."""
        t, sid = self.topics, site.id
        if ev.kind == "agent_start":
            site.agent_turn, site.new_turn = ev.reply, True
            out = TurnEventOut(site=sid, run=self.run_id, type="agent_started", t=round(ev.pts, 3), turn=ev.reply)
        elif ev.kind in ("agent_end", "barge_in") and site.agent_turn == ev.reply:
            site.agent_turn = None
            cut = ev.kind == "barge_in"
            out = TurnEventOut(site=sid, run=self.run_id, type="agent_stopped", t=round(ev.pts, 3), turn=ev.reply,
                               interrupted=cut, reason=ev.reason[:300] if cut else None,
                               heard=ev.text[:2000] if cut else None)
        else:
            return
        self._publish(t.event(sid, "turn"), encode(out), qos=1)
        if out.type == "agent_stopped":  # an empty end-of-stream frame closes the turn's audio
            site.out_seq += 1
            self._publish(t.audio_out(sid), build_audio_frame(site.out_seq, b"", site.out_rate, flags=FLAG_END,
                                                              timestamp_us=int(ev.pts * 1e6)), qos=0)

    def _publish_agent_audio(self, site: _Site, ev: AgentAudio) -> None:
        n = max(1, int(ev.sample_rate * self.mc.audio_out_ms / 1000))
        site.out_rate = ev.sample_rate
        samples = ev.samples
        for i in range(0, len(samples), n):
            site.out_seq += 1
            flags = FLAG_START if site.new_turn else 0
            site.new_turn = False
            ts = int((ev.pts + i / ev.sample_rate) * 1e6)
            frame = build_audio_frame(site.out_seq, samples[i : i + n], ev.sample_rate, timestamp_us=ts, flags=flags)
            self._publish(self.topics.audio_out(site.id), frame, qos=0)

    def _publish_metrics(self, site: _Site, values: dict[str, float]) -> None:
        st = site.tracker.stats
        values.update(
            frames_in=site.counts["frames_in"], gaps=st.gaps, missing_frames=st.missing, reordered=st.reordered,
            duplicates=st.duplicates, late=st.late, dropped=site.counts["dropped"], errors=site.counts["errors"],
            inbox_frames=site.audio_queued, outbox=len(self.outbox),
        )
        site.last_metrics = time.monotonic()
        site.active_since_metrics = False
        ev = MetricsEvent(site=site.id, run=self.run_id, values={k: float(v) for k, v in values.items()})
        self._publish(self.topics.event(site.id, "metrics"), encode(ev), qos=0)

    async def _tick(self) -> None:
        """Give up on late audio frames in time, and publish metrics of active sites."""
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for site in list(self.sites.values()):
                if site.tracker.held:
                    deliveries, issues = site.tracker.poll(now)
                    for issue in issues:
                        self._error(site, issue.code, issue.message, severity="warning")
                    self._enqueue_audio(site, deliveries)
                if site.active_since_metrics and now - site.last_metrics >= self.mc.metrics_interval_s:
                    self._publish_metrics(site, site.session.stats())

    # -- outbound ---------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Live data: sent now if connected, else dropped (and counted). Never waits."""
        import aiomqtt

        client = self._client
        if client is None or len(self._inflight) > 4096:
            self.counts["dropped_offline"] += 1
            return

        async def send() -> None:
            try:
                await client.publish(topic, payload, qos=qos)
            except aiomqtt.MqttError:
                self.counts["publish_failed"] += 1

        task = asyncio.get_running_loop().create_task(send())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _error(self, site: _Site, code: str, message: str, *, severity: str = "error") -> None:
        site.counts["errors"] += 1
        log.debug("site %s: %s: %s", site.id, code, message)
        if not site.limiter.allow(time.monotonic()):
            return
        ev = ErrorEvent(site=site.id, code=code, message=message[:300], severity=severity,  # type: ignore[arg-type]
                        suppressed=site.limiter.take_suppressed())
        self._publish(self.topics.error(site.id), encode(ev), qos=1)

    def _error_unknown(self, site_id: str, code: str, message: str) -> None:
        if not self._unknown_limiter.allow(time.monotonic()):
            return
        ev = ErrorEvent(site=site_id[:64], code=code, message=message[:300], suppressed=self._unknown_limiter.take_suppressed())
        self._publish(self.topics.error(site_id), encode(ev), qos=1)


def _drain(q: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items
