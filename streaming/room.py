"""A simulated room: what the microphone hears when the agent talks on open speakers.

The room impulse response is synthetic (Polack's statistical model): a direct path, a few sparse
early reflections, and a late tail of Gaussian noise under an exponential envelope that falls by
60 dB in ``rt60_s``, seeded, so a test gets the same room every time. The loudspeaker is a
high-pass (small speakers have no bass) with optional soft clipping (their distortion, which no
linear filter can undo). ``mix(user, agent)`` returns the microphone signal and the echo alone.

Why not pyroomacoustics' image method: it needs a compiled extension and a shoebox geometry to
give what an echo canceller cares about -- a delay, a sparse early part and an exponential diffuse
tail with a given RT60 -- which this model gives in thirty lines with no dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .frames import INTERNAL_RATE


@dataclass(frozen=True)
class RoomConfig:
    #: reverberation time: the late tail decays by 60 dB in this many seconds
    rt60_s: float = 0.3
    #: length of the impulse response; None = as long as the tail takes to fall by 60 dB
    rir_s: float | None = None
    #: playback delay: from the reference's timestamp to the direct sound at the microphone, ms
    delay_ms: float = 40.0
    #: echo gain: energy of the whole impulse response, dB (the echo's level relative to the playback)
    echo_gain_db: float = -6.0
    #: direct-to-reverberant energy ratio, dB
    drr_db: float = 3.0
    #: number of discrete early reflections (in the first 30 ms after the direct sound)
    early_reflections: int = 6
    #: loudspeaker high-pass corner, Hz (0: flat)
    speaker_highpass_hz: float = 150.0
    #: loudspeaker soft clipping: 0 is linear; 0.2 distorts loud passages noticeably
    nonlinearity: float = 0.0
    #: microphone self-noise (white), dBFS RMS; None for none
    noise_dbfs: float | None = -70.0
    #: seed of the impulse response and of the noise
    seed: int = 0
    #: sample rate
    rate: int = INTERNAL_RATE


class RoomMix(NamedTuple):
    mic: np.ndarray  # echo + user + noise
    echo: np.ndarray  # the agent's voice as the microphone hears it
    user: np.ndarray
    noise: np.ndarray


class Room:
    def __init__(self, config: RoomConfig | None = None) -> None:
        self.config = c = config or RoomConfig()
        self.rir = impulse_response(c)
        self.delay = int(round(c.delay_ms / 1000 * c.rate))
        self._highpass = _highpass_ir(c.speaker_highpass_hz, c.rate) if c.speaker_highpass_hz > 0 else None

    def speaker(self, agent: np.ndarray) -> np.ndarray:
        """What the loudspeaker radiates when fed ``agent``."""
        c = self.config
        y = np.asarray(agent, dtype=np.float64)
        if c.speaker_highpass_hz > 0:
            y = _fft_convolve(y, self._highpass)[: len(y)]
        if c.nonlinearity > 0:
            k = 1 + 10 * c.nonlinearity
            y = np.tanh(k * y) / k
        return y

    def echo(self, agent: np.ndarray) -> np.ndarray:
        """The agent's playback as it arrives at the microphone (same length as ``agent``)."""
        n = len(agent)
        radiated = self.speaker(agent)
        wet = _fft_convolve(radiated, self.rir)[: max(0, n - self.delay)]
        out = np.zeros(n)
        out[self.delay : self.delay + len(wet)] = wet
        return out.astype(np.float32)

    def noise(self, n: int) -> np.ndarray:
        c = self.config
        if c.noise_dbfs is None:
            return np.zeros(n, np.float32)
        rng = np.random.default_rng(c.seed + 7919)
        return (rng.standard_normal(n) * 10 ** (c.noise_dbfs / 20)).astype(np.float32)

    def render(self, user: np.ndarray, agent: np.ndarray) -> RoomMix:
        """Every component; the two signals are zero-padded to the longer one."""
        n = max(len(user), len(agent))
        user = _pad(user, n)
        echo = self.echo(_pad(agent, n))
        noise = self.noise(n)
        mic = (echo.astype(np.float64) + user + noise).astype(np.float32)
        return RoomMix(mic, echo, user, noise)

    def mix(self, user: np.ndarray, agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(microphone signal, echo alone)."""
        r = self.render(user, agent)
        return r.mic, r.echo


def impulse_response(c: RoomConfig) -> np.ndarray:
    """Direct path at index 0, sparse early reflections, exponential diffuse tail; energy set by
    ``echo_gain_db``."""
    rng = np.random.default_rng(c.seed)
    length = c.rir_s if c.rir_s is not None else c.rt60_s
    n = max(8, int(length * c.rate))
    t = np.arange(n) / c.rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / c.rt60_s)  # 60 dB in rt60 (amplitude: 3 ln 10 / rt60)
    onset = int(0.002 * c.rate)  # the diffuse field builds up after the direct sound
    tail[:onset] *= np.linspace(0, 1, onset, endpoint=False)
    early = np.zeros(n)
    for _ in range(c.early_reflections):
        i = int(rng.integers(int(0.003 * c.rate), min(n, int(0.03 * c.rate))))
        early[i] += rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.6)
    reverb = tail + early * np.sqrt(np.sum(tail**2) / max(np.sum(early**2), 1e-12)) * 0.5
    direct = np.zeros(n)
    direct[0] = 1.0
    reverb *= np.sqrt(10 ** (-c.drr_db / 10) / np.sum(reverb**2))
    h = direct + reverb
    h *= np.sqrt(10 ** (c.echo_gain_db / 10) / np.sum(h**2))
    return h


def measured_rt60(h: np.ndarray, rate: int = INTERNAL_RATE) -> float:
    """RT60 from Schroeder's backward integration (a -5 to -25 dB line fit, extrapolated)."""
    edc = np.cumsum((h**2)[::-1])[::-1]
    db = 10 * np.log10(edc / edc[0] + 1e-30)
    i5, i25 = int(np.argmax(db <= -5)), int(np.argmax(db <= -25))
    t = np.arange(len(h)) / rate
    slope = np.polyfit(t[i5:i25], db[i5:i25], 1)[0]
    return float(-60 / slope)


def _highpass_ir(corner_hz: float, rate: int) -> np.ndarray:
    """Impulse response of two cascaded first-order high-passes, y[n] = a (y[n-1] + x[n] - x[n-1]),
    truncated where it has decayed below 1e-9."""
    a = float(np.exp(-2 * np.pi * corner_hz / rate))
    n = int(np.ceil(np.log(1e-9) / np.log(a))) + 2
    k = np.arange(n)
    one = np.where(k == 0, a, a**k * (a - 1))  # a^(k+1) - a^k for k >= 1
    return np.convolve(one, one)[:n]


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    return x if len(x) == n else np.concatenate([x, np.zeros(n - len(x), np.float32)])
