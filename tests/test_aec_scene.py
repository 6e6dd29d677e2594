"""A simulated room for the echo-canceller tests and bench (and tests of the simulation itself).

The far end (``far_kind``) is the simulator's reply voice (``hydrad.sim.voice``: a harmonic
buzz webrtcvad calls speech; replies ``voices``) or real speech (``hydrad/data/hello.wav``
looped), played at the device rate; the echo path is built in numpy: a bulk delay, an
attenuated direct path, a short exponentially decaying noise tail, resampling to 16 kHz, a
little noise; the near end is the bundled utterance ``hydrad/data/interrupt.wav``.

Timeline (``Scene.far_spans``, ``Scene.near_at``), 16.5 s by default: reply 1 plays
0.5-7.5 s, reply 2 9.0-14.0 s; the user speaks at 10.0 s (3.4 s: hard double talk, the
near end about 3 dB below the echo in energy).

:func:`drive` plays the scene through a canceller the way the engine would: every block a
reference block with its ``t_dac`` (``L_out`` after it is fed), and every ``cap_ms`` a capture
frame with its ``t_adc`` (``L_in`` before it is processed), so that the echo delay in the
signal, ``delay_s = L_out + L_in``, is also what the timestamps say.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import soxr
import webrtcvad

from hydrad.sim.voice import synthesize

RATE = 16000
T0 = 1000.0  # monotonic origin of the simulated session


def dbfs(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    e = float(np.mean(x * x)) if len(x) else 0.0
    return 10.0 * np.log10(e / 32768.0**2) if e > 0 else -120.0


def frame_db(x: np.ndarray, n: int) -> np.ndarray:
    """dBFS of consecutive ``n``-sample frames (the tail that does not fill a frame is cut)."""
    f = np.asarray(x[: len(x) // n * n], np.float64).reshape(-1, n)
    e = (f * f).mean(axis=1) / 32768.0**2
    return 10.0 * np.log10(np.maximum(e, 1e-12))


def load_wav16(name: str) -> np.ndarray:
    """A bundled 16 kHz mono utterance (``hydrad/data/<name>.wav``) as float64 PCM16 scale."""
    with resources.as_file(resources.files("hydrad") / "data" / f"{name}.wav") as p, wave.open(str(p)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)


def load_near() -> np.ndarray:
    return load_wav16("interrupt")


def far_signal(kind: str, n: int, seconds: float, rate: int) -> np.ndarray:
    """One far-end span: ``voice`` = the simulator's reply ``n``; ``speech`` = the bundled
    ``hello.wav`` looped (real speech, at about the same active level)."""
    if kind == "voice":
        return np.frombuffer(synthesize(n, seconds, rate), "<i2").astype(np.float64)
    if kind == "speech":
        x = soxr.resample(load_wav16("hello"), RATE, rate, quality="HQ")
        total = int(round(seconds * rate))
        return np.resize(x, total)
    raise ValueError(kind)


@dataclass
class Scene:
    far: np.ndarray              # float64, PCM16 scale, at dev_rate: what the speaker plays
    dev_rate: int
    echo: np.ndarray             # float64 at 16 kHz: the echo component at the mic
    near: np.ndarray             # float64 at 16 kHz: the near-end component at the mic
    noise: np.ndarray
    mic: np.ndarray              # int16 at 16 kHz: echo + near + noise
    delay_s: float
    far_spans: list[tuple[float, float]] = field(default_factory=list)
    near_at: float | None = None

    @property
    def seconds(self) -> float:
        return len(self.mic) / RATE


def room_response(rate: int, delay_s: float, gain_db: float = -8.0, rt60_s: float = 0.15,
                  tail_s: float = 0.2, seed: int = 1, reverb: float = 0.5) -> np.ndarray:
    """Direct path at ``delay_s`` with ``gain_db``, then a Gaussian tail decaying by 60 dB in
    ``rt60_s`` and carrying ``reverb`` times the direct path's energy (0: a dry path, as a
    loudspeaker next to the microphone, or the virtual rig)."""
    rng = np.random.default_rng(seed)
    d = int(round(delay_s * rate))
    n_tail = int(tail_s * rate)
    h = np.zeros(d + 1 + n_tail + 1)
    g = 10 ** (gain_db / 20.0)
    h[d] = g
    t = np.arange(n_tail) / rate
    tail = rng.standard_normal(n_tail) * np.exp(-6.91 * t / rt60_s)
    tail *= np.sqrt(reverb * g * g / np.sum(tail * tail))
    h[d + 2 : d + 2 + n_tail] = tail
    return h


def _fftconv(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)
    return y[: len(x)]


def build_scene(delay_s: float = 0.04, dev_rate: int = 48000, seconds: float = 16.5,
                far_spans: tuple[tuple[float, float], ...] = ((0.5, 7.5), (9.0, 14.0)),
                near_at: float | None = 10.0, near_gain_db: float = -8.0,
                echo_gain_db: float = -8.0, noise_dbfs: float = -65.0, seed: int = 7,
                far_kind: str = "voice", voices: tuple[int, ...] = (1, 4),
                jumps: tuple[tuple[float, float], ...] = (), reverb: float = 0.5) -> Scene:
    far = np.zeros(int(round(seconds * dev_rate)))
    for k, (a, b) in enumerate(far_spans):
        if a >= seconds:
            continue
        x = far_signal(far_kind, voices[k % len(voices)], min(b, seconds) - a, dev_rate)
        i = int(round(a * dev_rate))
        far[i : i + len(x)] = x[: len(far) - i]
    h = room_response(dev_rate, delay_s, echo_gain_db, seed=seed, reverb=reverb)
    echo_dev = _fftconv(far, h)
    echo = soxr.resample(echo_dev, dev_rate, RATE, quality="HQ")
    n = int(round(seconds * RATE))
    echo = np.pad(echo, (0, max(0, n - len(echo))))[:n]
    for at, by in jumps:  # the path grows by `by` s at `at` (silence inserted, as a sound server
        i, k = int(round(at * RATE)), int(round(by * RATE))  # re-buffering), or shrinks (skipped)
        if k >= 0:
            echo[i:] = np.concatenate([np.zeros(k), echo[i : n - k]])
        else:
            echo[i:] = np.concatenate([echo[i - k :], np.zeros(-k)])
    rng = np.random.default_rng(seed + 100)
    noise = rng.standard_normal(n) * 32768.0 * 10 ** (noise_dbfs / 20.0)
    near = np.zeros(n)
    if near_at is not None:
        v = load_near() * 10 ** (near_gain_db / 20.0)
        i = int(round(near_at * RATE))
        near[i : i + len(v)] = v[: n - i]
    mic = np.clip(np.round(echo + near + noise), -32768, 32767).astype(np.int16)
    return Scene(far, dev_rate, echo, near, noise, mic, delay_s, list(far_spans), near_at)


def drive(canceller, scene: Scene, *, cap_ms: int = 20, block_ms: float = 10.0,
          out_share: float = 0.6, ref_dtype: str = "float32", timestamps: bool = True,
          as_bytes: bool = False, reopens: tuple[tuple[float, float], ...] = ()) -> np.ndarray:
    """Play ``scene`` through ``canceller`` (None: pass the mic through); return the 16 kHz output.

    Lockstep, as a duplex callback would: each output block of ``block_ms`` first feeds the
    reference, then every complete capture frame is processed. ``out_share`` of the delay is
    output latency (t_dac ahead of the feed), the rest input latency (t_adc behind).
    ``timestamps=False`` passes None for both; ``as_bytes`` hands capture frames as bytes.
    ``reopens``: (at_s, lost_s[, silent_s]): the device reopens at ``at_s``
    (``reset_reference()``) and the capture loses ``lost_s`` of input the far end does not (a
    duplex stream's backlog dropped; the output there stays 0), then starts with ``silent_s``
    of digital silence (PulseAudio's first input blocks after a reopen).
    """
    l_out = scene.delay_s * out_share
    l_in = scene.delay_s - l_out
    rate = scene.dev_rate
    cap_n = RATE * cap_ms // 1000
    out = np.zeros(len(scene.mic), np.int16)
    far = scene.far.astype(np.float32) / 32768.0 if ref_dtype == "float32" else scene.far.astype(np.int16)
    n_blocks = int(scene.seconds * 1000 / block_ms)
    j = 0  # next capture sample
    pending = sorted(reopens)
    silent_until = -1
    for k in range(n_blocks):
        a = int(round(k * block_ms * rate / 1000))
        b = int(round((k + 1) * block_ms * rate / 1000))
        if canceller is not None:  # block k is handed to the device at T0 + a / rate
            canceller.feed_reference(far[a:b], rate, T0 + a / rate + l_out if timestamps else None)
        t_cap_end = T0 + (k + 1) * block_ms / 1000  # capture available up to here
        while (j + cap_n) / RATE <= t_cap_end - T0 + 1e-9 and j + cap_n <= len(scene.mic):
            if pending and j / RATE >= pending[0][0]:
                canceller.reset_reference()
                _, lost_s, *silent = pending.pop(0)
                j += int(round(lost_s * RATE))
                silent_until = j + int(round((silent[0] if silent else 0.0) * RATE))
                continue
            frame = scene.mic[j : j + cap_n]
            if j < silent_until:
                frame = np.zeros(cap_n, np.int16)
            if canceller is None:
                out[j : j + cap_n] = frame
            else:
                t_adc = T0 + j / RATE - l_in if timestamps else None
                if as_bytes:
                    got = canceller.process_capture(frame.tobytes(), t_adc)
                    assert isinstance(got, bytes)
                    out[j : j + cap_n] = np.frombuffer(got, "<i2")
                else:
                    out[j : j + cap_n] = canceller.process_capture(frame, t_adc)
            j += cap_n
    return out


# ---- metrics ---------------------------------------------------------------------------------
def _active(spans, t0: float, t1: float) -> bool:
    return any(a < t1 and t0 < b for a, b in spans)


def echo_only_mask(scene: Scene, n: int, start_s: float = 1.0, floor_dbfs: float = -50.0) -> np.ndarray:
    """Frames of ``n`` samples with the echo component above ``floor_dbfs``, no near end within
    50 ms, and after ``start_s``."""
    e_db = frame_db(scene.echo, n)
    near_db = frame_db(scene.near, n)
    k = len(e_db)
    guard = int(np.ceil(0.05 * RATE / n))
    near_on = near_db > -90
    near_near = np.zeros(k, bool)
    for s in range(-guard, guard + 1):
        near_near |= np.roll(near_on, s)
    t = np.arange(k) * n / RATE
    return (e_db > floor_dbfs) & ~near_near & (t >= start_s)


def erle_db(scene: Scene, out: np.ndarray, mask: np.ndarray, n: int = 160) -> float:
    mic = scene.mic.astype(np.float64)[: len(mask) * n].reshape(-1, n)[mask]
    o = out.astype(np.float64)[: len(mask) * n].reshape(-1, n)[mask]
    return float(10 * np.log10(np.sum(mic * mic) / max(np.sum(o * o), 1e-9)))


def vad_flags(x: np.ndarray, mode: int = 2, ms: int = 20) -> np.ndarray:
    v = webrtcvad.Vad(mode)
    n = RATE * ms // 1000
    k = len(x) // n
    b = np.asarray(x[: k * n], "<i2").tobytes()
    return np.array([v.is_speech(b[i * 2 * n : (i + 1) * 2 * n], RATE) for i in range(k)], bool)


def false_vad(scene: Scene, out: np.ndarray, floor_dbfs: float = -50.0) -> tuple[int, int]:
    """(echo-only 20 ms frames webrtcvad mode 2 calls speech and louder than ``floor_dbfs``,
    echo-only frames in all)."""
    mask = echo_only_mask(scene, 320)
    flags = vad_flags(out)[: len(mask)]
    loud = frame_db(out, 320)[: len(mask)] > floor_dbfs
    return int(np.sum(flags & loud & mask)), int(np.sum(mask))


def near_recall(scene: Scene, out: np.ndarray, lag: int = 0, min_dbfs: float = -40.0) -> tuple[float, int]:
    """webrtcvad (mode 2, 20 ms) recall on the near end's speech frames during double talk.

    Near-end speech frames: frames webrtcvad calls speech in the clean near end (+ the mic
    noise) whose near-end level is above ``min_dbfs``, inside a far-end span. ``out`` is
    read ``lag`` samples later (the canceller's own latency, 8 ms for AEC3). Returns
    (fraction of those frames flagged in ``out``, their count)."""
    clean = np.clip(np.round(scene.near + scene.noise), -32768, 32767).astype(np.int16)
    ref = vad_flags(clean) & (frame_db(scene.near, 320) > min_dbfs)
    k = len(ref)
    t = np.arange(k) * 0.02
    dt = np.array([_active(scene.far_spans, a, a + 0.02) for a in t])
    sel = ref & dt
    o = np.concatenate([np.asarray(out[lag:], np.int16), np.zeros(lag, np.int16)])
    got = vad_flags(o)[:k]
    return float(np.mean(got[sel])) if sel.any() else float("nan"), int(sel.sum())


def turn_starts(x: np.ndarray) -> list[float]:
    """Seconds at which the simulator's turn detector (``hydrad.sim.vad.TurnDetector``, the
    stand-in for the service's VAD: webrtcvad mode 2, 60 ms onset) raises ``speech_started``
    on ``x``."""
    from hydrad.sim.vad import SpeechStartedEv, TurnDetector

    n = iter(range(1_000_000))
    td = TurnDetector(lambda: f"item{next(n)}")
    events = td.feed(np.asarray(x, "<i2").tobytes())
    return [e.audio_start_ms / 1000.0 for e in events if isinstance(e, SpeechStartedEv)]


def xcorr_lag(x: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """Lag (samples) by which ``y`` trails ``x``, by FFT cross-correlation within ±max_lag."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = len(x) + len(y)
    size = 1 << (n - 1).bit_length()
    c = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(x, size)), size)
    lags = np.concatenate([c[: max_lag + 1], c[-max_lag:]])
    idx = np.concatenate([np.arange(max_lag + 1), np.arange(-max_lag, 0)])
    return int(idx[int(np.argmax(lags))])


# ---- tests of the simulation itself ---------------------------------------------------------
def test_scene_echo_has_the_configured_delay_and_level():
    s = build_scene(delay_s=0.25, seconds=8.0, near_at=None, far_kind="speech")
    far16 = soxr.resample(s.far, s.dev_rate, RATE, quality="HQ")[: len(s.echo)]
    lag = xcorr_lag(far16, s.echo, int(0.4 * RATE))
    assert abs(lag - 0.25 * RATE) <= 2
    e = s.echo[int(1.0 * RATE) : int(7.0 * RATE)]
    assert -30 < dbfs(e) < -20      # the echo at the mic: about -24 dBFS
    assert -67 < dbfs(s.noise) < -63


def test_scene_raw_echo_looks_like_speech_to_webrtcvad():
    """Without this the false-VAD assertions below would prove nothing."""
    s = build_scene(delay_s=0.04, seconds=8.0, near_at=None)
    flagged, total = false_vad(s, s.mic)
    assert total > 250 and flagged > 0.8 * total
