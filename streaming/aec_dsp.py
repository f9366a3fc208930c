"""Numba kernels of the echo canceller: a radix-2 FFT and the per-block canceller.

Everything here runs inside one ``@njit`` call per batch of blocks, so a 10 ms frame costs no
Python work beyond the call itself. numba has no FFT of its own, hence the small real FFT below
(a half-size complex radix-2 transform plus the usual split; checked against numpy in the tests).

The canceller, per block of ``N`` samples (frame ``M = 2N``, ``K = N + 1`` bins):

1. **Linear filter**: a partitioned-block frequency-domain adaptive filter (MDF, Soo & Pang 1990)
   in its "alternately updated" form: ``P`` partitions of ``N`` taps, overlap-save, the gradient
   constraint applied to partition 0 and to one other partition per block in turn.
2. **Two filters** (foreground/background): the background adapts on every block; the foreground
   produces the output and is only replaced by the background when the background's error is
   *significantly* smaller, and the background is rolled back to the foreground when it is
   significantly worse. A burst of double talk that drives the background astray therefore never
   reaches the output.
3. **Learning rate robust to double talk** (Valin, IEEE TASLP 15(3), 2007): the optimal step is
   the ratio of residual echo to error power. Residual echo is estimated from a leakage
   coefficient (a running regression of error power on echo-estimate power) and the step drops
   by itself when the user talks, because the error power grows while the residual does not.
4. **Double-talk detector**: normalised cross-correlation of the echo estimate with the
   microphone (Benesty et al. 2000), with a 300 ms hangover. While it holds, the foreground is
   only replaced by a background that has halved the error (measured: letting the usual test run
   in the pauses of the user's speech let a degraded background through, 41 -> 9 dB ERLE over
   10 s of double talk), the delay estimator stops and the post-filter stays gentle.
5. **Bulk delay**: magnitude-squared coherence between the microphone frame and the reference
   frame at every whole-block lag up to ``max_delay``; once the same lag has won for about half a
   second, the filter window is moved so that it starts ``margin`` blocks before it. Moving it by
   whole blocks re-indexes the partitions, so the adapted filter is kept; a move that would drop
   partitions holding 5 % or more of the filter's energy is refused (a converged filter is better
   evidence of where the echo is than a coherence peak).
6. **Residual-echo suppression**: a spectral post-filter on a sqrt-Hann WOLA of the linear output.
   Until the linear filter reaches 6 dB of ERLE, everything heard while the reference plays is
   taken for echo (half duplex for the first 2-3 s of the agent's first words: measured 2.2-2.9 s
   on the benchmark rooms). After that the residual echo is the echo estimate times the larger of
   the global leakage and a per-bin residual/microphone power ratio learnt in single talk, times
   an over-estimation factor that grows (``echo_only``) as the double-talk statistic approaches
   pure echo; it is remembered with a decay to cover the reverberation beyond the filter.
   Decision-directed Wiener gain, floored at the configured suppression.

When the reference has been silent for the whole filter span (plus the post-filter's memory)
the block is *bypassed*: no FFT at all, the output is the input through the same overlap-add,
which is exact because the squared windows sum to one.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# -- parameter vector (float64) -------------------------------------------------------------
P_STEP = 0  # scale of the adaptive step
P_FLOOR = 1  # post-filter gain floor (amplitude); 1.0 disables the post-filter
P_OVERDRIVE = 2  # residual-echo over-estimation
P_RES_DECAY = 3  # per-block decay of the residual-echo memory (power)
P_DTD = 4  # NCC below this with the far end active is double talk
P_SILENCE = 5  # reference blocks with max |x| below this count as silent
P_DT_HANG = 6  # double-talk hangover, blocks
P_DE_LAMBDA = 7  # forgetting factor of the delay estimator's coherence
P_DE_MIN = 8  # minimum coherence peak to trust a delay
P_MARGIN = 9  # blocks kept in front of the estimated delay
P_HOLD = 10  # extra silent blocks before bypass (post-filter memory)
P_DT_STEP = 11  # step multiplier while double talk is flagged
P_DD = 12  # decision-directed smoothing of the post-filter
P_ECHO_ONLY_OD = 13  # extra residual over-estimation while the microphone hears only echo
N_PARAMS = 14

# -- float state ----------------------------------------------------------------------------
F_PEY = 0
F_PYY = 1
F_SUM_ADAPT = 2
F_DAVG1 = 3
F_DAVG2 = 4
F_DVAR1 = 5
F_DVAR2 = 6
F_NCC_YD = 7
F_NCC_DD = 8
F_ERLE_IN = 9  # smoothed mic power (far end active, no double talk)
F_ERLE_LIN = 10  # smoothed linear-output power, same blocks
F_ERLE_OUT = 11  # smoothed post-filter output power, same blocks
F_LEAK = 12
F_XI = 13
F_DE_PEAK = 14
F_SEE_AVG = 15  # smoothed background error power
F_SFF_AVG = 16  # smoothed foreground error power
F_NOISE = 17  # microphone noise floor (block energy): fast down, slow up
F_PX_W = 18  # weight the reference power average has gathered (bias correction at the start)
F_DIV_IN = 19  # fast-smoothed mic power while the far end is heard (double talk or not)
F_DIV_LIN = 20  # fast-smoothed linear-output power, same blocks
N_FSTATE = 21

# -- int state ------------------------------------------------------------------------------
I_HIDX = 0  # history slot of the newest reference spectrum
I_BULK = 1  # bulk delay, blocks
I_COUNT = 2  # blocks processed (drives the alternating constraint)
I_SILENT = 3  # consecutive silent reference blocks
I_BYPASS = 4  # 1 while bypassed
I_ADAPTED = 5  # 1 once the filter has had a minimal amount of adaptation
I_DT_HANG = 6
I_DT = 7
I_DE_COUNT = 8  # blocks accumulated by the delay estimator
I_DE_CAND = 9
I_DE_CAND_N = 10
I_DE_EST = 11  # estimated delay, blocks (-1: none yet)
I_FG_UPD = 12
I_BG_RESET = 13
I_STREAM = 14  # blocks since the stream (re)started
I_DELAY_MOVES = 15
I_CONVERGED = 16  # the linear filter removes enough echo for its estimate to guide the post-filter
I_PATH_CHANGES = 17  # times the foreground was found adding more than it removed
N_ISTATE = 18


# ------------------------------------------------------------------------------------ FFT


def fft_tables(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables for a real FFT of size ``m`` (a power of two >= 4): bit reversal and twiddles of
    the half-size complex FFT, and the split twiddles exp(-2 pi i k / m)."""
    if m < 4 or m & (m - 1):
        raise ValueError(f"FFT size must be a power of two >= 4, got {m}")
    h = m // 2
    bits = h.bit_length() - 1
    bitrev = np.array([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(h)], dtype=np.int64)
    tw = np.exp(-2j * np.pi * np.arange(h // 2) / h).astype(np.complex128)
    rtw = np.exp(-2j * np.pi * np.arange(h + 1) / m).astype(np.complex128)
    return bitrev, tw, rtw


@njit(cache=True, nogil=True)
def _cfft(a, bitrev, tw, inverse):
    n = a.shape[0]
    for i in range(n):
        j = bitrev[i]
        if j > i:
            t = a[i]
            a[i] = a[j]
            a[j] = t
    size = 2
    while size <= n:
        half = size // 2
        step = n // size
        for start in range(0, n, size):
            for k in range(half):
                w = tw[k * step]
                if inverse:
                    w = w.conjugate()
                u = a[start + k]
                v = a[start + k + half] * w
                a[start + k] = u + v
                a[start + k + half] = u - v
        size *= 2


@njit(cache=True, nogil=True)
def rfft(x, out, z, bitrev, tw, rtw):
    """Real FFT of ``x`` (length m) into ``out`` (m/2 + 1 bins); ``z`` is m/2 complex scratch."""
    h = z.shape[0]
    for n in range(h):
        z[n] = complex(x[2 * n], x[2 * n + 1])
    _cfft(z, bitrev, tw, False)
    for k in range(h + 1):
        zk = z[k % h]
        zc = z[(h - k) % h].conjugate()
        xe = 0.5 * (zk + zc)
        xo = -0.5j * (zk - zc)
        out[k] = xe + rtw[k] * xo


@njit(cache=True, nogil=True)
def irfft(spec, out, z, bitrev, tw, rtw):
    """Inverse of ``rfft``: m/2 + 1 bins into m real samples (scaled by 1/m)."""
    h = z.shape[0]
    for k in range(h):
        a = spec[k]
        b = spec[h - k].conjugate()
        xe = 0.5 * (a + b)
        xo = 0.5 * (a - b) * rtw[k].conjugate()
        z[k] = xe + 1j * xo
    _cfft(z, bitrev, tw, True)
    s = 1.0 / h
    for n in range(h):
        out[2 * n] = z[n].real * s
        out[2 * n + 1] = z[n].imag * s


# ----------------------------------------------------------------------------- the canceller


@njit(cache=True, nogil=True)
def _shift_partitions(w, delta):
    """w[p] <- w[p + delta]: the same impulse response seen from a window moved by delta blocks."""
    p_count = w.shape[0]
    if delta > 0:
        for p in range(p_count):
            if p + delta < p_count:
                w[p, :] = w[p + delta, :]
            else:
                w[p, :] = 0.0
    elif delta < 0:
        for p in range(p_count - 1, -1, -1):
            if p + delta >= 0:
                w[p, :] = w[p + delta, :]
            else:
                w[p, :] = 0.0


@njit(cache=True, nogil=True)
def _may_drop(w, delta):
    """Moving the window by ``delta`` blocks drops |delta| partitions at one end: allowed only if
    they hold under 5 % of the filter's energy (a converged filter that models the echo there is
    evidence against the new estimate, e.g. one made while the user was talking)."""
    p_count = w.shape[0]
    total = 0.0
    dropped = 0.0
    for p in range(p_count):
        acc = 0.0
        for k in range(w.shape[1]):
            acc += w[p, k].real * w[p, k].real + w[p, k].imag * w[p, k].imag
        total += acc
        if (delta > 0 and p < delta) or (delta < 0 and p >= p_count + delta):
            dropped += acc
    return total <= 0.0 or dropped < 0.05 * total


@njit(cache=True, nogil=True)
def process_blocks(
    d, x, parts, out, parts_out, adapt, prm, fs, ist,
    hist, hist_e, W, F, Px, Eh, Yh, prop,
    xprev, dprev, eprev, yprev, ola, rmem, a2prev, erle_d, erle_e,
    coh, pd, pxd, pprev, pola,
    bitrev, tw, rtw, win,
):
    """Cancel echo in ``d`` (mic) given ``x`` (reference), whole blocks only.

    ``out[b]`` receives the finished output of block b-1 (the overlap-add needs the next frame).
    ``parts`` are additive components of ``d`` (parts[0] the echo) that go through the same
    time-varying processing, for evaluation; it may have zero rows.
    """
    n = xprev.shape[0]
    m = 2 * n
    k_bins = n + 1
    p_count = W.shape[0]
    h_count = hist.shape[0]
    lags = coh.shape[0]
    n_parts = parts.shape[0]
    nblocks = d.shape[0] // n
    fsr = 16000.0

    # scratch
    z = np.empty(n, np.complex128)
    frame = np.empty(m, np.float64)
    tmp = np.empty(m, np.float64)
    x0 = np.empty(k_bins, np.complex128)
    yb_s = np.empty(k_bins, np.complex128)
    yf_s = np.empty(k_bins, np.complex128)
    e_s = np.empty(k_bins, np.complex128)
    y_s = np.empty(k_bins, np.complex128)
    ze = np.empty(k_bins, np.complex128)
    zy = np.empty(k_bins, np.complex128)
    dm = np.empty(k_bins, np.complex128)
    gain = np.empty(k_bins, np.float64)
    mu = np.empty(k_bins, np.float64)
    yb = np.empty(n, np.float64)
    yf = np.empty(n, np.float64)
    e = np.empty(n, np.float64)
    ef = np.empty(n, np.float64)
    yout = np.empty(n, np.float64)
    elin = np.empty(n, np.float64)
    xcur = np.empty(n, np.float64)

    step = prm[P_STEP]
    floor = prm[P_FLOOR]
    tiny_pow = m * m * 1e-10  # |X|^2 of a -100 dBFS signal
    ss = 0.35 / p_count  # smoothing of the reference power (about three filter lengths)
    spec_avg = n / fsr
    beta0 = 2.0 * n / fsr
    beta_max = 0.5 * n / fsr
    min_leak = 0.005
    k_lo = max(1, int(200.0 * m / fsr))
    k_hi = min(k_bins - 1, int(4000.0 * m / fsr))
    lam = prm[P_DE_LAMBDA]
    margin = int(prm[P_MARGIN])
    max_bulk = h_count - p_count - 1
    hang = int(prm[P_DT_HANG])

    for b in range(nblocks):
        o = b * n
        # ---------------------------------------------------------------- the reference
        xmax = 0.0
        for i in range(n):
            v = abs(x[o + i])
            if v > xmax:
                xmax = v
        silent = xmax < prm[P_SILENCE]
        sxx = 0.0
        for i in range(n):
            xcur[i] = 0.0 if silent else x[o + i]
            sxx += xcur[i] * xcur[i]
        if silent:
            ist[I_SILENT] += 1
        else:
            ist[I_SILENT] = 0
        bulk = ist[I_BULK]
        hidx = (ist[I_HIDX] + 1) % h_count
        ist[I_HIDX] = hidx
        prev_zero = True
        for i in range(n):
            if xprev[i] != 0.0:
                prev_zero = False
                break
        if silent and prev_zero:
            hist[hidx, :] = 0.0
            for k in range(k_bins):
                x0[k] = 0.0
        else:
            for i in range(n):
                frame[i] = xprev[i]
                frame[n + i] = xcur[i]
            rfft(frame, x0, z, bitrev, tw, rtw)
            hist[hidx, :] = x0
        hist_e[hidx] = sxx
        for i in range(n):
            xprev[i] = xcur[i]

        bypass = ist[I_SILENT] > bulk + p_count + 2 + int(prm[P_HOLD])
        first = ist[I_STREAM] == 0
        ist[I_STREAM] += 1
        ist[I_COUNT] += 1

        if bypass:
            # nothing can be echoed: the output is the input, through the same overlap-add
            if ist[I_BYPASS] == 0:
                ist[I_BYPASS] = 1
                rmem[:] = 0.0
                a2prev[:] = 0.0
                ist[I_DT_HANG] = 0
                ist[I_DT] = 0
                fs[F_NCC_YD] = 0.0
                fs[F_NCC_DD] = 0.0
            for i in range(n):
                w2a = win[i] * win[i]
                w2b = win[n + i] * win[n + i]
                out[o + i] = 0.0 if first else ola[i] + w2a * eprev[i]
                ola[i] = w2b * d[o + i]
                eprev[i] = d[o + i]
                yprev[i] = 0.0
                dprev[i] = d[o + i]
            for c in range(n_parts):
                for i in range(n):
                    w2a = win[i] * win[i]
                    w2b = win[n + i] * win[n + i]
                    parts_out[c, o + i] = 0.0 if first else pola[c, i] + w2a * pprev[c, i]
                    pola[c, i] = w2b * parts[c, o + i]
                    pprev[c, i] = parts[c, o + i]
            continue
        ist[I_BYPASS] = 0

        # energy of the reference inside the filter window: is the far end audible now?
        far = 0.0
        for p in range(p_count):
            far += hist_e[(hidx - bulk - p) % h_count]
        far_active = far > n * 1e-8  # about -80 dBFS over the window

        # ------------------------------------------------- background and foreground filters
        for k in range(k_bins):
            yb_s[k] = 0.0
            yf_s[k] = 0.0
        for p in range(p_count):
            slot = (hidx - bulk - p) % h_count
            for k in range(k_bins):
                xv = hist[slot, k]
                yb_s[k] += W[p, k] * xv
                yf_s[k] += F[p, k] * xv
        irfft(yb_s, tmp, z, bitrev, tw, rtw)
        for i in range(n):
            yb[i] = tmp[n + i]
        irfft(yf_s, tmp, z, bitrev, tw, rtw)
        for i in range(n):
            yf[i] = tmp[n + i]
        see = 0.0
        sff = 0.0
        sdd = 0.0
        syy = 0.0
        sey = 0.0
        dbf = 0.0
        syd = 0.0
        for i in range(n):
            dv = d[o + i]
            e[i] = dv - yb[i]
            ef[i] = dv - yf[i]
            see += e[i] * e[i]
            sff += ef[i] * ef[i]
            sdd += dv * dv
            syy += yb[i] * yb[i]
            sey += e[i] * yb[i]
            dbf += (yb[i] - yf[i]) * (yb[i] - yf[i])
            syd += yf[i] * dv
        noise_e = n * 3e-9  # about -85 dBFS
        see += noise_e
        sff += noise_e
        if sdd < fs[F_NOISE] or fs[F_NOISE] <= 0.0:
            fs[F_NOISE] = max(sdd, noise_e)
        else:
            fs[F_NOISE] *= 1.005  # +5 dB a second at 8 ms blocks: speech never sits long enough to lift it
        fs[F_SEE_AVG] = 0.85 * fs[F_SEE_AVG] + 0.15 * see
        fs[F_SFF_AVG] = 0.85 * fs[F_SFF_AVG] + 0.15 * sff

        # ------------------------------------------------------------ double-talk detector
        # normalised correlation of the better filter's echo estimate with the microphone: near 1
        # when the microphone is all echo, lower when someone else talks too
        syd_b = 0.0
        for i in range(n):
            syd_b += yb[i] * d[o + i]
        fs[F_NCC_YD] = 0.7 * fs[F_NCC_YD] + 0.3 * (syd if sff <= see else syd_b)
        fs[F_NCC_DD] = 0.7 * fs[F_NCC_DD] + 0.3 * sdd
        xi = 1.0
        if fs[F_NCC_DD] > 0.0:
            xi = max(fs[F_NCC_YD], 0.0) / fs[F_NCC_DD]
        fs[F_XI] = xi
        audible = sdd > 4.0 * fs[F_NOISE] and sdd > n * 1e-8
        if far_active and ist[I_ADAPTED] == 1 and audible and xi < prm[P_DTD]:
            ist[I_DT_HANG] = hang
        elif ist[I_DT_HANG] > 0:
            ist[I_DT_HANG] -= 1
        ist[I_DT] = 1 if ist[I_DT_HANG] > 0 else 0

        # ---------------------------------------- two-path: promote or roll back the background
        delta = sff - see
        fs[F_DAVG1] = 0.6 * fs[F_DAVG1] + 0.4 * delta
        fs[F_DAVG2] = 0.85 * fs[F_DAVG2] + 0.15 * delta
        fs[F_DVAR1] = 0.36 * fs[F_DVAR1] + 0.16 * sff * dbf
        fs[F_DVAR2] = 0.7225 * fs[F_DVAR2] + 0.0225 * sff * dbf
        promote = False
        if adapt and dbf > 0.0 and ist[I_DT] == 1:
            # someone is talking over the echo: the error difference is mostly their speech, so
            # only a background that has halved the error for a while may take over
            promote = fs[F_DAVG2] > 0.0 and fs[F_SEE_AVG] < 0.5 * fs[F_SFF_AVG]
        elif adapt and dbf > 0.0:
            if delta * abs(delta) > sff * dbf:
                promote = True
            elif fs[F_DAVG1] * abs(fs[F_DAVG1]) > 0.5 * fs[F_DVAR1]:
                promote = True
            elif fs[F_DAVG2] * abs(fs[F_DAVG2]) > 0.25 * fs[F_DVAR2]:
                promote = True
        if promote:
            F[:, :] = W
            ist[I_FG_UPD] += 1
            fs[F_DAVG1 : F_DVAR2 + 1] = 0.0  # the two-path error statistics
            # cross-fade the echo estimate over the block so the switch is inaudible
            for i in range(n):
                r = (i + 0.5) / n
                yout[i] = (1.0 - r) * yf[i] + r * yb[i]
        else:
            for i in range(n):
                yout[i] = yf[i]
            if adapt and -delta * abs(delta) > 4.0 * sff * dbf:
                # the background went astray (double talk): back to the foreground
                W[:, :] = F
                ist[I_BG_RESET] += 1
                fs[F_DAVG1 : F_DVAR2 + 1] = 0.0  # the two-path error statistics
                see = sff
                syy = 0.0
                sey = 0.0
                for i in range(n):
                    e[i] = ef[i]
                    yb[i] = yf[i]
                    syy += yb[i] * yb[i]
                    sey += e[i] * yb[i]
        slin = 0.0
        for i in range(n):
            elin[i] = d[o + i] - yout[i]
            slin += elin[i] * elin[i]

        # -------------------------------------------------------------- echo path change
        # A converged foreground whose output is louder than the microphone subtracts an echo that
        # is not there: the echo path moved (a device's latency jumped, the laptop was turned). Its
        # estimate no longer matches the microphone, which the double-talk detector would read
        # as someone talking, and freeze what it learns for seconds. Near-end speech cannot do
        # this (it adds to the microphone as much as to the output), so drop the foreground, and
        # let the post-filter treat all it hears as echo until the filter has converged again.
        if adapt and far_active and ist[I_CONVERGED] == 1 and audible:
            fs[F_DIV_IN] = 0.9 * fs[F_DIV_IN] + 0.1 * sdd
            fs[F_DIV_LIN] = 0.9 * fs[F_DIV_LIN] + 0.1 * slin
            if fs[F_DIV_LIN] > 1.26 * fs[F_DIV_IN]:
                F[:, :] = 0.0
                ist[I_PATH_CHANGES] += 1
                ist[I_CONVERGED] = 0
                ist[I_DT_HANG] = 0
                ist[I_DT] = 0
                fs[F_DIV_IN : F_DIV_LIN + 1] = 0.0
                fs[F_ERLE_IN : F_ERLE_OUT + 1] = 0.0  # convergence is earned again
                fs[F_DAVG1 : F_DVAR2 + 1] = 0.0  # the two-path error statistics
                for i in range(n):
                    yout[i] = 0.0
                    elin[i] = d[o + i]
                slin = sdd

        # ------------------------------------------------------- adapt the background filter
        if adapt:
            for i in range(n):
                frame[i] = 0.0
                frame[n + i] = e[i]
            rfft(frame, e_s, z, bitrev, tw, rtw)
            for i in range(n):
                frame[n + i] = yb[i]
            rfft(frame, y_s, z, bitrev, tw, rtw)
            for k in range(k_bins):
                xf = x0[k].real * x0[k].real + x0[k].imag * x0[k].imag
                Px[k] = (1.0 - ss) * Px[k] + ss * xf
            fs[F_PX_W] = (1.0 - ss) * fs[F_PX_W] + ss
            px_scale = 1.0 / fs[F_PX_W]  # an average of a few blocks is not a fraction of one
            # leakage: regression of error-power changes on echo-estimate-power changes
            pey_i = 0.0
            pyy_i = 0.0
            for k in range(k_bins):
                ef_k = e_s[k].real * e_s[k].real + e_s[k].imag * e_s[k].imag
                yf_k = y_s[k].real * y_s[k].real + y_s[k].imag * y_s[k].imag
                eh = ef_k - Eh[k]
                yh = yf_k - Yh[k]
                pey_i += eh * yh
                pyy_i += yh * yh
                Eh[k] = (1.0 - spec_avg) * Eh[k] + spec_avg * ef_k
                Yh[k] = (1.0 - spec_avg) * Yh[k] + spec_avg * yf_k
            pyy_i = np.sqrt(pyy_i)
            if pyy_i > 0.0:
                pey_i /= pyy_i
            alpha = min(beta0 * syy, beta_max * see) / see
            fs[F_PEY] = (1.0 - alpha) * fs[F_PEY] + alpha * pey_i
            fs[F_PYY] = (1.0 - alpha) * fs[F_PYY] + alpha * pyy_i
            if fs[F_PYY] < 1e-12:
                fs[F_PYY] = 1e-12
            if fs[F_PEY] < min_leak * fs[F_PYY]:
                fs[F_PEY] = min_leak * fs[F_PYY]
            if fs[F_PEY] > fs[F_PYY]:
                fs[F_PEY] = fs[F_PYY]
            leak = fs[F_PEY] / fs[F_PYY]
            fs[F_LEAK] = leak
            # residual-to-error ratio; a visible correlation of y with e bounds it from below
            rer = (1e-4 * sxx + 3.0 * leak * syy) / see
            bound = sey * sey / (1e-30 + see * syy)
            if rer < bound:
                rer = bound
            if rer > 0.5:
                rer = 0.5
            scale = step * (prm[P_DT_STEP] if ist[I_DT] == 1 else 1.0)
            if ist[I_ADAPTED] == 1:
                for k in range(k_bins):
                    ef_k = e_s[k].real * e_s[k].real + e_s[k].imag * e_s[k].imag
                    yf_k = y_s[k].real * y_s[k].real + y_s[k].imag * y_s[k].imag
                    r = leak * yf_k
                    if r > 0.5 * ef_k:
                        r = 0.5 * ef_k
                    r = 0.7 * r + 0.3 * rer * ef_k
                    mu[k] = scale * r / ((ef_k + tiny_pow) * (Px[k] * px_scale + tiny_pow))
            elif sxx > n * 3e-8:
                rate = 0.25 * min(sxx, see) / see
                for k in range(k_bins):
                    mu[k] = scale * 2.0 * rate / (Px[k] * px_scale + tiny_pow)
                fs[F_SUM_ADAPT] += rate
                if fs[F_SUM_ADAPT] > 1.0:
                    ist[I_ADAPTED] = 1
            else:
                for k in range(k_bins):
                    mu[k] = 0.0
            # proportionate split of the step over partitions (sparse, delayed echo paths)
            pmax = 0.0
            for p in range(p_count):
                acc = 0.0
                for k in range(k_bins):
                    acc += W[p, k].real * W[p, k].real + W[p, k].imag * W[p, k].imag
                prop[p] = np.sqrt(acc)
                if prop[p] > pmax:
                    pmax = prop[p]
            psum = 0.0
            for p in range(p_count):
                prop[p] += 0.1 * pmax + 1e-12
                psum += prop[p]
            for p in range(p_count):
                prop[p] = 0.99 * prop[p] / psum
            for p in range(p_count):
                slot = (hidx - bulk - p) % h_count
                g = prop[p]
                for k in range(k_bins):
                    W[p, k] += g * mu[k] * hist[slot, k].conjugate() * e_s[k]
            # gradient constraint (AUMDF): partition 0 and one other per block
            for p in range(p_count):
                if p == 0 or (p_count > 1 and ist[I_COUNT] % (p_count - 1) == p - 1):
                    for k in range(k_bins):
                        yb_s[k] = W[p, k]
                    irfft(yb_s, tmp, z, bitrev, tw, rtw)
                    for i in range(n, m):
                        tmp[i] = 0.0
                    rfft(tmp, yb_s, z, bitrev, tw, rtw)
                    for k in range(k_bins):
                        W[p, k] = yb_s[k]

        # ------------------------------------------------------------------- bulk delay
        if adapt and lags > 0 and far_active and sxx > n * 3e-8 and ist[I_DT] == 0:
            for i in range(n):
                frame[i] = dprev[i]
                frame[n + i] = d[o + i]
            rfft(frame, dm, z, bitrev, tw, rtw)
            for k in range(k_lo, k_hi):
                pd[k] = lam * pd[k] + (1.0 - lam) * (dm[k].real * dm[k].real + dm[k].imag * dm[k].imag)
                pxd[k] = lam * pxd[k] + (1.0 - lam) * (x0[k].real * x0[k].real + x0[k].imag * x0[k].imag)
            for lag in range(lags):
                slot = (hidx - lag) % h_count
                for k in range(k_lo, k_hi):
                    coh[lag, k] = lam * coh[lag, k] + (1.0 - lam) * dm[k] * hist[slot, k].conjugate()
            ist[I_DE_COUNT] += 1
            if ist[I_DE_COUNT] > int(1.0 / (1.0 - lam)) and ist[I_DE_COUNT] % 8 == 0:
                best = -1.0
                lbest = 0
                for lag in range(lags):
                    acc = 0.0
                    for k in range(k_lo, k_hi):
                        c2 = coh[lag, k].real * coh[lag, k].real + coh[lag, k].imag * coh[lag, k].imag
                        acc += c2 / (pd[k] * pxd[k] + 1e-30)
                    acc /= k_hi - k_lo
                    if acc > best:
                        best = acc
                        lbest = lag
                fs[F_DE_PEAK] = best
                if best > prm[P_DE_MIN]:
                    if lbest == ist[I_DE_CAND]:
                        ist[I_DE_CAND_N] += 1
                    else:
                        ist[I_DE_CAND] = lbest
                        ist[I_DE_CAND_N] = 1
                    if ist[I_DE_CAND_N] >= 6:  # the same lag for about half a second
                        est = ist[I_DE_CAND]
                        ist[I_DE_EST] = est
                        if est < bulk + 1 or est > bulk + margin + 2:
                            target = max(0, min(est - margin, max_bulk))
                            if target != bulk and _may_drop(F, target - bulk):
                                _shift_partitions(W, target - bulk)
                                _shift_partitions(F, target - bulk)
                                ist[I_BULK] = target
                                ist[I_DELAY_MOVES] += 1
                                fs[F_DAVG1 : F_DVAR2 + 1] = 0.0  # the two-path error statistics
        # ------------------------------------------------------ residual-echo post-filter
        for i in range(n):
            frame[i] = win[i] * eprev[i]
            frame[n + i] = win[n + i] * elin[i]
        rfft(frame, ze, z, bitrev, tw, rtw)
        if floor < 1.0:
            for i in range(n):
                frame[i] = win[i] * yprev[i]
                frame[n + i] = win[n + i] * yout[i]
            rfft(frame, zy, z, bitrev, tw, rtw)
            # per-bin echo attenuation of the linear filter, learnt while only the echo is heard:
            # the residual echo is the echo estimate divided by it
            learn = far_active and ist[I_DT] == 0 and ist[I_ADAPTED] == 1 and audible
            if learn:
                for i in range(n):
                    frame[i] = win[i] * dprev[i]
                    frame[n + i] = win[n + i] * d[o + i]
                rfft(frame, dm, z, bitrev, tw, rtw)
            decay = prm[P_RES_DECAY]
            od = prm[P_OVERDRIVE]
            if ist[I_DT] == 0 and xi > prm[P_DTD]:
                # the closer the microphone is to pure echo (NCC near 1), the harder we suppress:
                # per-bin estimates scatter by several dB, and with no one else talking there is
                # nothing to lose
                w = (xi - prm[P_DTD]) / (1.0 - prm[P_DTD])
                if w > 1.0:
                    w = 1.0
                od *= 1.0 + (prm[P_ECHO_ONLY_OD] - 1.0) * w
            dd = prm[P_DD]
            for k in range(k_bins):
                se = ze[k].real * ze[k].real + ze[k].imag * ze[k].imag
                if learn:
                    erle_d[k] = 0.95 * erle_d[k] + 0.05 * (dm[k].real * dm[k].real + dm[k].imag * dm[k].imag)
                    erle_e[k] = 0.95 * erle_e[k] + 0.05 * se
                if ist[I_CONVERGED] == 1:
                    sy = zy[k].real * zy[k].real + zy[k].imag * zy[k].imag
                    ratio = 1.0
                    if erle_d[k] > 0.0 and erle_e[k] < erle_d[k]:
                        ratio = erle_e[k] / erle_d[k]
                    r = od * max(ratio, fs[F_LEAK]) * sy
                elif far_active:
                    r = se  # the filter has not converged: whatever we hear may be echo
                else:
                    r = 0.0
                rm = decay * rmem[k]
                if r > rm:
                    rm = r
                rmem[k] = rm
                post = se / (rm + 1e-20)
                prio = dd * a2prev[k] / (rm + 1e-20) + (1.0 - dd) * max(post - 1.0, 0.0)
                g = prio / (1.0 + prio)
                if g < floor:
                    g = floor
                gain[k] = g
                a2prev[k] = g * g * se
        else:
            for k in range(k_bins):
                gain[k] = 1.0
        for k in range(k_bins):
            ze[k] *= gain[k]
        irfft(ze, tmp, z, bitrev, tw, rtw)
        sout = 0.0
        for i in range(n):
            v = ola[i] + win[i] * tmp[i]
            out[o + i] = 0.0 if first else v
            ola[i] = win[n + i] * tmp[n + i]
            sout += v * v
        for i in range(n):
            eprev[i] = elin[i]
            yprev[i] = yout[i]
            dprev[i] = d[o + i]
        # evaluation components: same echo estimate, same gains
        for c in range(n_parts):
            for i in range(n):
                lin = parts[c, o + i] - (yout[i] if c == 0 else 0.0)
                frame[i] = win[i] * pprev[c, i]
                frame[n + i] = win[n + i] * lin
                pprev[c, i] = lin
            rfft(frame, zy, z, bitrev, tw, rtw)
            for k in range(k_bins):
                zy[k] *= gain[k]
            irfft(zy, tmp, z, bitrev, tw, rtw)
            for i in range(n):
                v = pola[c, i] + win[i] * tmp[i]
                parts_out[c, o + i] = 0.0 if first else v
                pola[c, i] = win[n + i] * tmp[n + i]

        # ----------------------------------------------------------------- ERLE estimate
        if far_active and ist[I_DT] == 0 and ist[I_ADAPTED] == 1:
            a = 0.98
            fs[F_ERLE_IN] = a * fs[F_ERLE_IN] + (1 - a) * sdd
            fs[F_ERLE_LIN] = a * fs[F_ERLE_LIN] + (1 - a) * slin
            # (the finished output block is the previous one: close enough for a smoothed figure)
            fs[F_ERLE_OUT] = a * fs[F_ERLE_OUT] + (1 - a) * sout
            # converged at 6 dB of linear ERLE; back to "not converged" below 2 dB (echo path change)
            if ist[I_CONVERGED] == 0 and fs[F_ERLE_IN] > 4.0 * fs[F_ERLE_LIN]:
                ist[I_CONVERGED] = 1
            elif ist[I_CONVERGED] == 1 and fs[F_ERLE_IN] < 1.58 * fs[F_ERLE_LIN]:
                ist[I_CONVERGED] = 0
