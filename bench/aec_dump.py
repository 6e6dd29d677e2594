"""Read a ``HYDRAD_AEC_DUMP`` directory: the echo delay AEC3 had to find, burst by burst.

    HYDRAD_AEC_DUMP=/tmp/aec hydrad run ...        # or any test/bench that starts the engine
    python bench/aec_dump.py /tmp/aec             # the echo lag, burst by burst
    python bench/aec_dump.py /tmp/aec --replay    # re-run it through today's canceller

The dump holds what the canceller was given, in the order it was given (``far.raw``,
``near.raw``, ``out.raw``, ``order.txt``; see ``hydrad.engine.aec.AecDump``). For each burst of
far-end activity this prints the echo's lag behind the reference, counted in stream samples
from the start (what AEC3 has to track; clocks and timestamps play no part), the correlation
of that match, how far ahead the reference frames were given, and the cleaned level over the
burst's first 200 ms and over the rest. A lag that moves from burst to burst is an echo path
that drifts; a loud first 200 ms is AEC3 re-aligning after it.

``--replay`` feeds the recording, in its recorded order, through a fresh ``EchoCanceller``
three ways (no gate; the level gate alone; the gate with its leak check, the default) and
prints where the simulator's turn detector opens a turn on each output: a turn that one way
opens and the next does not is an echo that way let through. AEC3 is deterministic, so a
self-interruption recorded on a device replays from the start of the dump (not always from
the middle: its state at the event matters), with the recorded timestamps and device
reopens (older dumps without them: timestamps rebuilt from the frame counts and the
measured lag; they place the gate's far-end window).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

RATE = 16000
FRAME = RATE // 100  # 10 ms


@dataclass
class Dump:
    far: np.ndarray          # the reference frames as given (int16 at ``rate``)
    rate: int
    far16: np.ndarray        # the reference, resampled to 16 kHz (float64, PCM16 scale)
    near: np.ndarray         # the capture before cancelling
    out: np.ndarray          # after
    given: np.ndarray        # per 10 ms capture frame: reference frames given before it
    resets: list[int]        # capture frames before which the device was reopened
    far_t: np.ndarray | None = None   # t_dac per far-end frame (NaN: unknown; None: old dump)
    t_adc: np.ndarray | None = None   # per capture frame
    flags: list[str] | None = None    # per capture frame: what the gate did (see AecDump)


@dataclass
class Burst:
    start_s: float           # on the reference's timeline (its frames from the start)
    end_s: float
    delay_ms: float          # the echo's lag behind the reference, stream sample for sample
    corr: float              # normalised correlation at that lag
    ahead_ms: float          # mean reference given ahead of the capture frame being processed
    near_dbfs: float         # capture level over the burst's first 200 ms
    out_first_dbfs: float    # cleaned level over the first 200 ms
    out_rest_dbfs: float     # ... and over the rest of the burst


def load(directory: str | Path) -> Dump:
    d = Path(directory)
    lines = (d / "order.txt").read_text().split("\n")
    rate = int(next(x for x in lines if x.startswith("# reference_rate")).split()[-1])
    given_l: list[int] = []
    t_l: list[float] = []
    flags: list[str] = []
    resets: list[int] = []
    for x in lines:
        if x == "reset":
            resets.append(len(given_l))
        elif x.strip() and not x.startswith("#"):
            f = x.split()
            given_l.append(int(f[0]))
            if len(f) == 3:
                t_l.append(float(f[1]))
                flags.append(f[2])
    given = np.array(given_l)
    timed = len(t_l) == len(given_l) and (d / "far_t.f64").exists()
    far = np.fromfile(d / "far.raw", np.int16)
    f = far.astype(np.float64)
    far16 = soxr.resample(f, rate, RATE) if rate != RATE else f
    near = np.fromfile(d / "near.raw", np.int16).astype(np.float64)
    out = np.fromfile(d / "out.raw", np.int16).astype(np.float64)
    return Dump(far, rate, far16, near, out, given, resets,
                np.fromfile(d / "far_t.f64", np.float64) if timed else None,
                np.array(t_l) if timed else None, flags if timed else None)


def _dbfs(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x ** 2)) / 32768 + 1e-9)) if len(x) else float("nan")


def far_bursts(d: Dump, thr_dbfs: float = -40.0, gap_frames: int = 30, min_frames: int = 50) -> list[tuple[int, int]]:
    """[start, end) in 10 ms reference frames where the far end is active (gaps < 300 ms joined)."""
    n = len(d.far16) // FRAME
    level = np.sqrt((d.far16[: n * FRAME].reshape(n, FRAME) ** 2).mean(1))
    act = np.flatnonzero(level > 32768 * 10 ** (thr_dbfs / 20))
    spans: list[list[int]] = []
    for k in act:
        if spans and k - spans[-1][1] < gap_frames:
            spans[-1][1] = k + 1
        else:
            spans.append([k, k + 1])
    return [(a, b) for a, b in spans if b - a >= min_frames]


def analyse(d: Dump, min_delay_ms: float = -50.0, max_delay_ms: float = 250.0) -> list[Burst]:
    """Per far-end burst: the lag between the two streams, sample for sample from their starts
    (``near[s]`` echoes ``far16[s - lag]``). The APM gets one 10 ms reference frame per 10 ms
    capture frame on average, so a lag that moves is a path that drifts as AEC3 sees it,
    whatever the timestamps say; ``ahead_ms`` is how far the reference was given ahead of
    each capture frame (the call order's share of the delay)."""
    lags = np.arange(int(min_delay_ms * RATE / 1000), int(max_delay_ms * RATE / 1000))
    n_far = len(d.far16)
    bursts = []
    for fa, fb in far_bursts(d):
        a, b = fa * FRAME + lags[0], min((fb + 10) * FRAME + lags[-1], len(d.near))
        if b - a < 50 * FRAME or a < 0:
            continue
        y = d.near[a:b]
        ny = np.linalg.norm(y) + 1e-9
        c = np.empty(len(lags))
        s = np.arange(a, b)
        for i, lag in enumerate(lags):
            idx = s - lag
            ok = (idx >= 0) & (idx < n_far)
            x = np.where(ok, d.far16[np.clip(idx, 0, n_far - 1)], 0.0)
            c[i] = float(np.dot(x, y)) / ((np.linalg.norm(x) + 1e-9) * ny)
        best = int(np.argmax(c))
        lag = int(lags[best])
        e0 = fa * FRAME + lag                       # where the burst's echo starts in the capture
        first = slice(e0, e0 + 20 * FRAME)
        rest = slice(e0 + 20 * FRAME, min(fb * FRAME + lag, len(d.near)))
        ks = np.arange(e0 // FRAME, min(fb * FRAME + lag, len(d.near)) // FRAME)
        ks = ks[ks < len(d.given)]
        ahead = float(np.mean(d.given[ks] * FRAME - (ks + 1) * FRAME)) * 1000 / RATE if len(ks) else float("nan")
        bursts.append(Burst(fa / 100, fb / 100, lag * 1000 / RATE, float(c[best]), ahead,
                            _dbfs(d.near[first]), _dbfs(d.out[first]), _dbfs(d.out[rest])))
    return bursts


def replay(d: Dump, lag_s: float, **canceller_kw) -> np.ndarray:
    """The capture as a fresh ``EchoCanceller(**canceller_kw)`` cleans it, fed in the recorded
    order with the recorded timestamps (int16 at 16 kHz; dumps without timestamps get them
    rebuilt from the frame counts and ``lag_s``)."""
    from hydrad.engine.aec import EchoCanceller

    c = EchoCanceller(**canceller_kw)
    fn = d.rate // 100
    near = d.near.astype(np.int16)
    out = np.zeros(len(d.given) * FRAME, np.int16)
    t0, k = 1000.0, 0
    resets = set(d.resets)

    def t_dac(k: int) -> float | None:
        if d.far_t is None:
            return t0 + k / 100 + lag_s / 2
        return None if np.isnan(d.far_t[k]) else float(d.far_t[k])

    def t_adc(j: int) -> float | None:
        if d.t_adc is None:
            return t0 + j / 100 - lag_s / 2
        return None if np.isnan(d.t_adc[j]) else float(d.t_adc[j])

    try:
        for j, given in enumerate(d.given):
            if j in resets:
                c.reset_reference()
            while k < given:
                c.feed_reference(d.far[k * fn : (k + 1) * fn], d.rate, t_dac(k))
                k += 1
            a = j * FRAME
            out[a : a + FRAME] = c.process_capture(near[a : a + FRAME], t_adc(j))
    finally:
        c.close()
    return out


def turn_starts(x: np.ndarray) -> list[float]:
    """Seconds at which the simulator's turn detector (the service's VAD in the tests) opens
    a turn on ``x``."""
    from hydrad.sim.vad import SpeechStartedEv, TurnDetector

    n = iter(range(1 << 30))
    td = TurnDetector(lambda: f"item{next(n)}")
    return [e.audio_start_ms / 1000.0 for e in td.feed(np.asarray(x, "<i2").tobytes())
            if isinstance(e, SpeechStartedEv)]


REPLAYS = {"no gate": {"gate_db": 0}, "level gate": {"leak_check": False}, "gate + leak check": {}}


def replay_all(d: Dump, bursts: list[Burst]) -> dict[str, list[float]]:
    lag = float(np.median([b.delay_ms for b in bursts])) / 1000 if bursts else 0.05
    return {name: turn_starts(replay(d, lag, **kw)) for name, kw in REPLAYS.items()}


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--replay"):
        print(__doc__)
        return 2
    d = load(argv[0])
    if len(argv) == 2:
        starts = replay_all(d, analyse(d))
        names = list(starts)
        for i, name in enumerate(names):
            extra = ""
            if i:
                gone = [t for t in starts[names[i - 1]] if not any(abs(t - u) < 0.1 for u in starts[name])]
                extra = f"; gone since {names[i - 1]!r}: {gone}"
            print(f"{name:>18}: {len(starts[name])} turns opened{extra}")
        return 0
    print(f"{len(d.given)} capture frames, {len(d.far16) // FRAME} reference frames")
    print(f"{'burst (s)':>17} {'echo lag':>10} {'corr':>5} {'ahead':>7} {'near':>7} {'out 200ms':>9} {'out rest':>8}")
    for b in analyse(d):
        print(f"{b.start_s:7.2f}..{b.end_s:7.2f} {b.delay_ms:8.2f}ms {b.corr:5.2f} {b.ahead_ms:5.1f}ms {b.near_dbfs:7.1f} "
              f"{b.out_first_dbfs:9.1f} {b.out_rest_dbfs:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
