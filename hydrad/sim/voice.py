"""The simulator's "voice": reply audio whose content a test can check.

An amplitude-modulated harmonic buzz, not a pure tone: webrtcvad classifies a buzz with
harmonics and a syllable-rate (4 Hz) envelope as speech at any fundamental, while a pure
600 Hz tone is not, and echo/barge-in tests need the reply to look like speech to the VAD.

The fundamental encodes the response number, so a test can tell from the audio alone which
response it is hearing (or which one leaked through as echo): see :func:`response_f0`.
"""

from __future__ import annotations

import numpy as np

HARMONICS = 5
AM_HZ = 4.0
AM_DEPTH = 0.45
PEAK_DBFS = -10.0
FADE_S = 0.005


def response_f0(n: int) -> float:
    """Fundamental (Hz) of the n-th response (1-based, per session): 200, 240, ... 560, 200, ..."""
    if n < 1:
        raise ValueError(f"response numbers start at 1, got {n}")
    return 200.0 + 40.0 * ((n - 1) % 10)


def _harmonic_peak() -> float:
    """Peak of sum_k sin(k*theta)/k, k=1..HARMONICS, so the scaled buzz peaks at PEAK_DBFS."""
    theta = np.linspace(0.0, 2.0 * np.pi, 200_000, endpoint=False)
    wave = sum(np.sin(k * theta) / k for k in range(1, HARMONICS + 1))
    return float(np.max(np.abs(wave)))


_PEAK = _harmonic_peak()
_SCALE = 32767.0 * 10 ** (PEAK_DBFS / 20.0) / _PEAK


#: Incommensurate (rate Hz, weight) pairs for the irregular syllable envelope of a jittered voice.
_ENVELOPE = ((4.0, 0.5), (2.71, 0.3), (6.37, 0.2))


def _phase(f0: float, t: np.ndarray, jitter: float, total_s: float) -> np.ndarray:
    """Phase (radians) of a buzz whose every glottal cycle has a random length.

    Cycle ``k`` lasts ``(1 + jitter * u_k) / f0`` with ``u_k`` uniform in [-1, 1] from an RNG
    seeded by ``f0``: deterministic, so rendering chunk by chunk gives the same samples as
    rendering whole. Per-cycle jitter is what makes real voices aperiodic; without it the
    echo canceller's delay search locks onto the wrong period.
    """
    if jitter <= 0:
        return 2.0 * np.pi * f0 * t
    rng = np.random.default_rng(int(f0 * 1000))
    n_cycles = int(total_s * f0 / (1.0 - jitter)) + 2
    periods = (1.0 + jitter * rng.uniform(-1.0, 1.0, n_cycles)) / f0
    bounds = np.concatenate([[0.0], np.cumsum(periods)])
    k = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, n_cycles - 1)
    return 2.0 * np.pi * (k + (t - bounds[k]) / periods[k])


def buzz(f0: float, rate: int, total: int, start: int = 0, count: int | None = None,
         jitter: float = 0.0) -> np.ndarray:
    """Samples ``start .. start+count`` of a ``total``-sample buzz, as floats in PCM16 scale.

    Computed from absolute sample indices, so rendering a reply chunk by chunk gives exactly
    the same (phase-continuous) samples as rendering it whole, without holding a long reply
    in memory or blocking the event loop to synthesise it up front. The 5 ms fades sit at
    sample 0 and sample ``total``.

    ``jitter`` > 0 (e.g. 0.2) makes the voice aperiodic: a vibrato of about that relative
    depth and an irregular syllable envelope, more like speech for echo-cancellation tests;
    the average pitch stays ``f0`` but a long-window pitch estimate spreads accordingly.
    """
    count = total - start if count is None else max(0, min(count, total - start))
    idx = np.arange(start, start + count, dtype=np.float64)
    t = idx / rate
    wave = np.zeros(count)
    theta = _phase(f0, t, jitter, total / rate)
    top = f0 * (1.0 + jitter)
    for k in range(1, HARMONICS + 1):
        if k * top < rate / 2:  # never alias a harmonic above Nyquist
            wave += np.sin(k * theta) / k
    if jitter > 0:
        env = sum(w * np.sin(2.0 * np.pi * a * t) for a, w in _ENVELOPE)
    else:
        env = np.sin(2.0 * np.pi * AM_HZ * t)
    wave *= (1.0 + AM_DEPTH * env) / (1.0 + AM_DEPTH) * _SCALE
    fade = min(int(FADE_S * rate), total // 2)
    if fade:
        gain = np.minimum(np.minimum(idx / fade, (total - 1 - idx) / fade), 1.0)
        wave *= np.clip(gain, 0.0, 1.0)
    return wave


def _pcm(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def render(n: int, rate: int, total: int, start: int, count: int, jitter: float = 0.0) -> bytes:
    """PCM16 LE samples ``start .. start+count`` of response ``n``'s ``total``-sample reply."""
    return _pcm(buzz(response_f0(n), rate, total, start, count, jitter))


def synthesize(n: int, seconds: float, rate: int, jitter: float = 0.0) -> bytes:
    """PCM16 LE mono reply audio for response number ``n`` (the whole reply at once)."""
    total = max(0, int(round(seconds * rate)))
    return render(n, rate, total, 0, total, jitter)


def dominant_frequency(pcm: bytes, rate: int) -> float:
    """Strongest frequency in PCM16 audio (Hann window + parabolic peak interpolation).

    A helper for tests and plugin authors checking which response they heard.
    """
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if x.size < 16:
        raise ValueError("need more audio to estimate a frequency")
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    spectrum[0] = 0.0
    i = int(np.argmax(spectrum))
    if 0 < i < spectrum.size - 1:
        a, b, c = np.log(spectrum[i - 1:i + 2] + 1e-12)
        denom = a - 2 * b + c
        i_f = i + (0.5 * (a - c) / denom if denom else 0.0)
    else:
        i_f = float(i)
    return i_f * rate / x.size
