from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tone(freq: float, seconds: float, rate: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spec))])


@pytest.fixture(scope="session")
def duplex_bin() -> Path:
    exe = Path(sys.executable).parent / "duplex"
    assert exe.exists(), f"{exe} missing: run scripts/setup"
    return exe


@pytest.fixture(scope="session")
def pulse_null_sink(tmp_path_factory):
    """A private PulseAudio server with a null sink as default sink and its monitor as default
    source: what PortAudio plays into 'pulse' comes back from it. Yields the sink name."""
    if shutil.which("pulseaudio") is None:
        pytest.fail("pulseaudio is not installed: run scripts/setup")
    runtime = tmp_path_factory.mktemp("xdg")
    runtime.chmod(0o700)
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    env = dict(os.environ)
    subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1", "--disallow-exit", "--log-target=stderr"],
                   env=env, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("PulseAudio did not come up")
        time.sleep(0.1)
    sink = "duplex_test"
    subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={sink}"], env=env, check=True, capture_output=True)
    subprocess.run(["pactl", "set-default-sink", sink], env=env, check=True)
    subprocess.run(["pactl", "set-default-source", f"{sink}.monitor"], env=env, check=True)
    import sounddevice as sd

    # PortAudio enumerates devices at initialisation: re-enumerate now that the server exists
    sd._terminate()
    sd._initialize()
    try:
        yield sink
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True)
        sd._terminate()
        sd._initialize()
        if old is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
