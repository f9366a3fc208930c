"""Fixtures for the MQTT tests: a private Mosquitto on a free loopback port (persistence on, in the
test's temp folder), anonymous or with a password file, and helpers to run the service and watch
what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.mosquitto import Mosquitto
from agent.mqtt_client import MqttPeer
from agent.mqtt_protocol import ProtocolError, Topics, decode_outbound
from agent.service import BrokerSettings, MqttService

USERS = {"alice": "s3cret-pw"}
_ids = itertools.count(1)


@pytest.fixture
def broker(tmp_path):
    """Anonymous broker; ``broker.restart()``/``stop()``/``start()`` keep port and persisted sessions."""
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def auth_broker(tmp_path):
    """Broker that only lets ``USERS`` in."""
    with Mosquitto(tmp_path / "mosquitto", users=USERS) as b:
        yield b


def make_certificates(folder: Path, name: str = "test") -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost, signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / f"{name}-{n}" for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / f"{name}-san.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} test CA", "-keyout", str(ca_key), "-out", str(ca))
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture
def tls_broker(tmp_path):
    """Broker with a TLS listener; ``tls_broker.certs["ca"]`` verifies it."""
    certs = make_certificates(tmp_path / "certs")
    with Mosquitto(tmp_path / "mosquitto", tls=(certs["cert"], certs["key"])) as b:
        b.certs = certs
        yield b


@contextlib.asynccontextmanager
async def serving(cfg, broker: Mosquitto, models, **kw: Any) -> AsyncIterator[MqttService]:
    """The service, in this process, connected to ``broker``; stopped cleanly afterwards."""
    creds = {k: kw.pop(k) for k in ("username", "password", "tls_ca") if k in kw}
    svc = MqttService(cfg, BrokerSettings.from_url(broker.url, **creds), models=models,
                      client_id=kw.pop("client_id", f"duplex-test-{next(_ids)}"), **kw)
    task = asyncio.create_task(svc.run())
    try:
        done, _ = await asyncio.wait({task, asyncio.ensure_future(svc.connected.wait())}, timeout=15,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert svc.connected.is_set(), "the service did not connect"
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 20)


@dataclass
class Seen:
    topic: str
    site: str
    kind: str
    msg: Any
    t: float


@dataclass
class Watcher:
    """Decodes everything a peer receives into ``seen`` (in arrival order)."""

    peer: MqttPeer
    topics: Topics = field(default_factory=Topics)
    seen: list[Seen] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            r = await self.peer.inbox.get()
            if r.topic.endswith(("/audio/in", "/command")):
                continue  # what satellites send, seen through a wide subscription
            try:
                site, kind = self.topics.parse_outbound(r.topic)
                msg = decode_outbound(kind, r.payload)
            except ProtocolError as exc:
                self.undecodable.append(f"{r.topic}: {exc}")
                continue
            self.seen.append(Seen(r.topic, site, kind, msg, r.t))

    def of(self, kind: str, site: str | None = None) -> list[Any]:
        return [s.msg for s in self.seen if s.kind == kind and (site is None or s.site == site)]

    async def until(self, cond: Callable[[], bool], timeout: float, what: str, diag: Callable[[], Any] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                kinds: dict[str, int] = {}
                for s in self.seen:
                    kinds[s.kind] = kinds.get(s.kind, 0) + 1
                more = f"; {diag()}" if diag else ""
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; seen {kinds}{more}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(broker: Mosquitto, subscriptions: list[tuple[str, int]], *, client_id: str | None = None,
                   **kw: Any) -> AsyncIterator[Watcher]:
    peer = MqttPeer("127.0.0.1", broker.port, client_id=client_id or f"watcher-{next(_ids)}", subscriptions=subscriptions, **kw)
    async with peer:
        w = Watcher(peer)
        task = asyncio.create_task(w.run())
        try:
            yield w
        finally:
            task.cancel()
