"""Did the canceller lose the echo path? A second, cruder canceller to compare with (issue 7).

AEC3 aligns the far end to the echo by sample count. When the echo path steps (a host stall
makes the sound server re-buffer the playback stream: every sample then plays 7.5-10 ms
later), or the two streams restart out of step after a device reopen, AEC3 drops its filter
and passes the echo through at 3-10 dB below its input until it has re-aligned: 100-200 ms,
more than a server VAD needs to open a turn (60 ms for the simulator's). Level alone cannot
tell that leak from a user talking over the reply; a canceller that does not care about
alignment can.

:class:`EchoLeakDetector` keeps the far end as AEC3 was given it (at 16 kHz, in stream
samples) and the last ``window_ms`` of the microphone, and fits up to ``taps`` delayed,
scaled copies of the far end to it, at whatever lag in ``[min_lag_ms, max_lag_ms]`` fits
best (the lag by an FFT cross-correlation at 8 kHz over the whole window, then greedy
matching pursuit at 16 kHz within 12 ms of it on the window's newest half, and again on its
newest 20 ms alone). What the copies leave, :meth:`EchoLeakDetector.near_bound`, is at most
the near end (the user, the room) plus what one delay line cannot model (reverberation).
AEC3's output is normally far below it; when AEC3's output is well *above* it, AEC3 is
passing echo that a delay line would have removed, and the engine's gate mutes the frame
(``EchoCanceller.process_capture``). A user talking is in both (the copies cannot fit a
voice that is not the far end's), so it passes.

Where the echo is mostly one path (a loudspeaker a hand's width from the microphone, the
virtual rig), the fit leaves -80 dBFS of a -36 dBFS echo within 20 ms of a step (measured on
a recorded self-interruption, docs/aec.md). In a reverberant room the copies leave the
reverberation, the bound is loose and the test simply lets more through: it never mutes
what AEC3 handles, so it costs nothing there but CPU, and only in frames where AEC3's output
is loud during playback (a user talking, or a leak).

The gate's keep rule (issue 19) asks the opposite question on every frame of a reply: is
most of this frame *not* the far end (a user AEC3 suppressed)? For that,
:meth:`EchoLeakDetector.near_rest_at_known_lag` fits at the lag found last (a fifth of the
cost of the full search, which it falls back to when that lag explains under half) and
records when the lag moves (:meth:`EchoLeakDetector.steady`); :meth:`EchoLeakDetector.far_peak`
gives the loudest 10 ms of far end in reach from per-block energies. ``offset`` moves the
lags searched past the canceller's pre-delay (a long path's echo lags the far end by more
than the 300 ms searched).

Pure numpy, no threads of its own: ``reference`` may be called from another thread than
``capture``/``skip_capture``/``fit`` (one lock, held for a copy).
"""

from __future__ import annotations

import threading

import numpy as np

RATE = 16000
BLOCK = RATE // 100  # 10 ms
KNOWN_LAG_S = 1.0    # how long a fitted lag is trusted without a full search
LAG_MOVED = 16       # samples (1 ms): the copies found this far from the known lag: a step
REFINE = 192  # samples (12 ms) either side of the coarse lag where the copies are fitted


def bound_of(rest: np.ndarray) -> float:
    """The near end's bound from a :meth:`EchoLeakDetector.near_rest`: the larger energy of
    its two 10 ms frames (the canceller's output trails its input by a few ms)."""
    n = BLOCK
    return max(float(np.dot(rest[-n:], rest[-n:])), float(np.dot(rest[-2 * n : -n], rest[-2 * n : -n])))


class EchoLeakDetector:
    """Delayed copies of the far end in the microphone, found by correlation.

    ``window_ms`` (80): how much microphone is fitted at once (the newest frame and what came
    just before it: enough cycles of a voice that a look-alike stretch of the far end rarely
    fits it; at 40 ms one window in a hundred of another talker fits 70-90 %);
    ``min_lag_ms`` / ``max_lag_ms`` (-50 / 300): the echo lags searched, in stream samples
    (the capture's position minus the far end's, as the canceller sees them); ``taps`` (3):
    delayed copies fitted (a direct path plus its neighbours: the two streams' resamplers
    differ, which spreads even a pure delay over a few samples).
    """

    def __init__(self, *, window_ms: float = 80.0, min_lag_ms: float = -50.0,
                 max_lag_ms: float = 300.0, taps: int = 3) -> None:
        if not 10.0 <= window_ms <= 200.0:
            raise ValueError(f"window_ms {window_ms} must be 10..200")
        if not -100.0 <= min_lag_ms < max_lag_ms <= 1000.0:
            raise ValueError("need -100 <= min_lag_ms < max_lag_ms <= 1000")
        if not 1 <= taps <= 8:
            raise ValueError(f"taps {taps} must be 1..8")
        self.window = int(window_ms * RATE / 1000)
        self.min_lag = int(min_lag_ms * RATE / 1000)
        self.max_lag = int(max_lag_ms * RATE / 1000)
        self.taps = int(taps)
        self.fit_len = self.window // 2         # the newest part the copies are fitted to
        self._span = self.window + self.max_lag - self.min_lag   # far-end samples one test reads
        self._nfft = 1 << (self._span - 1).bit_length()
        self._cap = 1 << (self._span + 2 * RATE - 1).bit_length()   # + 2 s of far end ahead
        self._far = np.zeros(self._cap, np.float64)
        self._far_pos = 0                    # far-end samples written (stream position)
        self._blocks = self._cap // BLOCK
        self._far_e = np.zeros(self._blocks, np.float64)  # energy of each 10 ms block written
        self._near = np.zeros(self.window, np.float32)
        self._near_pos = 0                   # capture samples written
        self._lock = threading.Lock()
        self.tests = 0                       # fit() calls that computed something
        self.lag: int | None = None          # samples: the strongest copy's lag at the last fit
        self._peak: tuple[int, float] = (-1, 0.0)  # (capture position, far_peak() there)
        self._known_lag: tuple[int, int] | None = None  # (capture position, lag) of the last
                                             # fit that explained most of the capture
        self.moved_at: int | None = None     # capture position where the path last moved
        self.offset = 0                      # samples added to every lag searched: the
                                             # canceller's pre-delay (set by its capture side)

    def reference(self, frame: np.ndarray) -> None:
        """The next far-end samples at 16 kHz (PCM16 scale or any: only shapes are compared)."""
        x = np.asarray(frame, np.float32)
        n = len(x)
        if n > self._cap:
            x = x[-self._cap :]
            self._far_pos += n - self._cap
            n = self._cap
        sq = x.astype(np.float64) ** 2
        with self._lock:
            pos = self._far_pos
            i = pos % self._cap
            k = min(n, self._cap - i)
            self._far[i : i + k] = x[:k]
            self._far[: n - k] = x[k:]
            j = 0  # the energy of each 10 ms block of the stream, for far_peak
            while j < n:
                off = (pos + j) % BLOCK
                m = min(BLOCK - off, n - j)
                e = float(sq[j : j + m].sum())
                slot = (pos + j) // BLOCK % self._blocks
                self._far_e[slot] = e if off == 0 else self._far_e[slot] + e
                j += m
            self._far_pos += n

    def skip_capture(self, n: int) -> None:
        """The capture lost ``n`` samples the far end did not (a reopen dropped the input's
        backlog), found out after the fact (the canceller's lead check runs 100-500 ms later):
        the capture kept since is ``n`` samples further on than counted. Its position moves,
        its samples stay, so the fit lines up at once (silence put in *now* would blind it for
        a window). The capture's thread."""
        self._near_pos += n
        self._known_lag = None
        self.mark_moved()

    def capture(self, frame: np.ndarray) -> None:
        """The next capture samples at 16 kHz, as the microphone gave them (before the
        canceller; the newest ``window_ms`` are kept)."""
        y = np.asarray(frame, np.float32)
        n = len(y)
        w = self.window
        if n >= w:
            self._near[:] = y[-w:]
        else:
            self._near[:-n] = self._near[n:]
            self._near[-n:] = y
        self._near_pos += n

    def _far_segment(self) -> np.ndarray:
        """Far-end samples at positions [p - window - max_lag, p - min_lag) for the newest
        capture position p (zeros where nothing was written or it was overwritten)."""
        a = self._near_pos - self.window - self.max_lag - self.offset
        out = np.zeros(self._span, np.float64)
        cap = self._cap
        with self._lock:
            lo = max(a, self._far_pos - cap, 0)
            hi = min(a + self._span, self._far_pos)
            while lo < hi:  # at most two pieces: the ring wraps once
                i = lo % cap
                k = min(hi - lo, cap - i)
                out[lo - a : lo - a + k] = self._far[i : i + k]
                lo += k
        return out

    def fit(self) -> tuple[float, np.ndarray]:
        """Fit up to ``taps`` delayed, scaled copies of the far end to the newest half of the
        ``window_ms`` of capture: (the fraction of its energy they explain, what they leave:
        float64, one value per capture sample of that half).

        Two stages: the lag of the best single copy over the whole lag range and the whole
        window, at 8 kHz (one FFT cross-correlation: a long window keeps look-alikes out),
        then the copies themselves at 16 kHz within ``REFINE`` samples (12 ms) of that lag,
        on the newest half only (direct dot products: a path that stepped by a few ms inside
        the window is fitted at its new lag 40 ms after the step, not 80). Stops when the best
        copy explains under a tenth (no echo worth fitting)."""
        share, r, _ = self._fit()
        return share, r

    def _fit(self) -> tuple[float, np.ndarray, tuple[np.ndarray, int, int] | None]:
        """:meth:`fit`, plus what a shorter fit needs: (the far-end segment, the refine range)."""
        w = self.window
        fw = self.fit_len
        y = self._near.astype(np.float64)
        yf = y[w - fw :]
        if float(np.dot(yf, yf)) <= 0.0 or self._near_pos < self.window:
            return 0.0, yf, None
        x = self._far_segment()
        m = len(x) // 2 * 2
        x8 = (x[0:m:2] + x[1:m:2]) * 0.5
        y8 = (y[0 : w - 1 : 2] + y[1:w:2]) * 0.5
        w8 = len(y8)
        cs8 = np.concatenate(([0.0], np.cumsum(x8 * x8)))
        ex8 = cs8[w8:] - cs8[:-w8]                  # energy of each candidate copy
        ok8 = ex8 > 1e-6 * float(np.dot(y8, y8))
        if not ok8.any():
            return 0.0, yf, None
        self.tests += 1
        n8 = self._nfft // 2
        c8 = np.fft.irfft(np.fft.rfft(x8, n8) * np.conj(np.fft.rfft(y8, n8)), n8)[: len(ex8)]
        i0 = 2 * int(np.argmax(np.where(ok8, c8 * c8 / np.where(ok8, ex8, 1.0), 0.0)))
        lo = max(0, i0 - REFINE)
        hi = min(len(x) - w, i0 + REFINE)
        share, r, i = self._pursue(x[lo + w - fw : hi + w], yf)
        if i is not None:  # the first copy is x[lo + i ...]: the one at lag max_lag - (lo + i)
            self.lag = self.max_lag - (lo + i) + self.offset
            if share >= 0.5:
                self._known_lag = (self._near_pos, self.lag)
        return share, r, (x, lo, hi)

    def _pursue(self, seg: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, int | None]:
        """Greedy matching pursuit: up to ``taps`` scaled copies ``seg[i : i + len(y)]`` taken
        out of ``y``: (share explained, the rest, the first copy's offset or None)."""
        n = len(y)
        ey = float(np.dot(y, y))
        cs = np.concatenate(([0.0], np.cumsum(seg * seg)))
        ex = cs[n:] - cs[:-n]
        ok = ex > 1e-6 * ey
        r = y.copy()
        share = 0.0
        first = None
        for k in range(self.taps):
            c = np.correlate(seg, r, "valid")
            score = np.where(ok, c * c / np.where(ok, ex, 1.0), 0.0)
            i = int(np.argmax(score))
            if score[i] <= 0.0:
                break
            r -= (c[i] / ex[i]) * seg[i : i + n]
            if k == 0:
                first = i
            share = 1.0 - float(np.dot(r, r)) / ey
            if k == 0 and share < 0.1:
                break
        return max(0.0, min(1.0, share)), r, first

    def near_rest(self) -> np.ndarray:
        """What the far-end copies leave of the newest two capture frames (20 ms, float64, one
        value per capture sample; the capture itself when there is nothing to fit): an
        estimate of the near end alone (the user, the room), plus what one delay line cannot
        model (reverberation).

        The copies are fitted twice, on the newest 40 ms (:meth:`fit`) and on the newest
        20 ms alone at lags near the same one, and the smaller rest counts: when the echo path
        steps (a stream re-buffered after a stall), the short fit has the new lag 20 ms after
        the step, while copies spanning both sides of it fit neither for 40 ms, long enough
        for AEC3's own leak to pass."""
        n = RATE // 100
        _, r, found = self._fit()
        r = r[-2 * n :]
        if found is not None:
            x, lo, hi = found
            w = self.window
            _, r2, _ = self._pursue(x[lo + w - 2 * n : hi + w], self._near[-2 * n :].astype(np.float64))
            if float(np.dot(r2, r2)) < float(np.dot(r, r)):
                r = r2
        return r

    def far_peak(self) -> float:
        """Energy (sum of squares) of the loudest 10 ms of far end within the lags searched
        for the newest capture frame (0: none). No fit: cheap enough for every frame."""
        pos, peak = self._peak
        if pos != self._near_pos:
            a = self._near_pos - self.window - self.max_lag - self.offset
            with self._lock:
                lo = max(a, self._far_pos - (self._blocks - 1) * BLOCK, 0) // BLOCK
                hi = (min(a + self._span, self._far_pos) + BLOCK - 1) // BLOCK
                peak = (float(np.max(np.take(self._far_e, np.arange(lo, hi), mode="wrap")))
                        if hi > lo else 0.0)
            self._peak = (self._near_pos, peak)
        return peak

    def mark_moved(self) -> None:
        """The echo path moved now (a lag step, the output's timeline stepped, a reopen)."""
        self.moved_at = self._near_pos

    def forget_lag(self) -> None:
        """The streams restarted (a device reopen): search every lag again (and count the
        path as moved)."""
        self._known_lag = None
        self.mark_moved()

    def steady(self, samples: int) -> bool:
        """Has the echo path stayed put for ``samples``: no fit that explained most of the
        capture at another lag than the known one, no reopen?"""
        return self.moved_at is None or self._near_pos - self.moved_at >= samples

    def near_rest_at_known_lag(self) -> np.ndarray:
        """:meth:`near_rest` from the short fit alone, within ``REFINE`` of the lag of a fit
        that explained most of the capture in the last ``KNOWN_LAG_S`` (no lag search over
        the whole range: about a fifth of the cost, for a test that runs on every frame of a
        reply); :meth:`near_rest` itself when there is no such lag, or when the copies at
        that lag explain under half of the capture (a user talking, or a path that moved:
        the full search finds the new lag)."""
        known = self._known_lag
        n = RATE // 100
        if known is None or self._near_pos - known[0] > KNOWN_LAG_S * RATE or self._near_pos < self.window:
            return self.near_rest()
        y = self._near[-2 * n :].astype(np.float64)
        if float(np.dot(y, y)) <= 0.0:
            return y
        x = self._far_segment()
        w = self.window
        q = self.max_lag + self.offset - known[1]
        lo, hi = max(0, q - REFINE), min(len(x) - w, q + REFINE)
        if hi <= lo:
            return self.near_rest()
        share, r, i = self._pursue(x[lo + w - 2 * n : hi + w], y)
        if i is not None and share >= 0.5:
            lag = self.max_lag - (lo + i) + self.offset
            if abs(lag - known[1]) > LAG_MOVED:  # a step (a stall re-buffered the playback)
                self.mark_moved()
            self._known_lag = (self._near_pos, lag)
            return r
        # most of it is not the far end at that lag: a user, or a path that moved (a stall,
        # a reopen); only the full search can tell
        self._known_lag = None
        r = self.near_rest()
        found = self._known_lag  # set again if the full search explained most of it
        if found is not None and abs(found[1] - known[1]) > LAG_MOVED:
            self.mark_moved()
        return r

    def near_bound(self) -> float:
        """Energy (sum of squares over 10 ms) that the near end can at most have put in the
        newest capture frame: what the far-end copies leave of it (:meth:`near_rest`; the
        larger of the last two frames: the canceller's output trails its input by a few ms)."""
        return bound_of(self.near_rest())
