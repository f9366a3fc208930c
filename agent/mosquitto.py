"""A private Mosquitto broker on a free loopback port, for the tests and ``duplex bench mqtt``.

It runs Debian's ``mosquitto`` (installed by scripts/setup) with a config written into its own
folder: one listener on 127.0.0.1 (plain, or TLS with a given certificate), persistence on (so a
restart keeps persistent sessions and queued QoS 1 messages), and either anonymous access or a
password file.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from streaming.errors import DuplexError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        raise DuplexError(f"{name} is not installed: run scripts/setup (it installs Debian's mosquitto and mosquitto-clients)")
    return path


class Mosquitto:
    """``with Mosquitto() as broker:`` … ``broker.port``; ``restart()`` keeps the port and the data."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, *, users: dict[str, str] | None = None,
                 port: int | None = None, tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None) -> None:
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="duplex-mosquitto-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = dict(users or {})
        #: (certificate, key) of a TLS listener; None = plain TCP
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        self._write_config()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            *([f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"] if self.tls else []),
            # stay the user we are (as root, mosquitto would otherwise switch to 'mosquitto' and
            # lose access to this folder)
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {data}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
            # small messages go out at once instead of waiting for the previous one's ACK (up to 40 ms)
            "set_tcp_nodelay true",
        ]
        if self.users:
            pw = self.folder / "passwords"
            pw.write_text("")
            tool = _find("mosquitto_passwd")
            for user, password in self.users.items():
                subprocess.run([tool, "-b", str(pw), user, password], check=True, capture_output=True, timeout=30)
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> float:
        """Start and wait until the port accepts connections; returns that (monotonic) time."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        self.proc = subprocess.Popen([_find("mosquitto"), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace").strip()
                raise DuplexError(f"mosquitto exited at start ({self.proc.returncode}): {err or self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return time.monotonic()
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise DuplexError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout} s: {self.tail()}")
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file on the way out), then wait."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.stderr:
            p.stderr.close()

    def restart(self, down_s: float = 0.0) -> float:
        self.stop()
        if down_s:
            time.sleep(down_s)
        return self.start()

    def tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Mosquitto":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
