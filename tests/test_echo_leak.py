"""The echo leak test's crude canceller (``hydrad.engine.echo_leak``), on its own.

Far end: the simulator's reply voice or real speech; near end: the bundled utterance. Both
bundled WAVs come from one formant synthesizer and share bit-identical stretches, so the
"another talker" cases use the simulator's voice as the far end (an independent source)."""

from __future__ import annotations

import numpy as np
import pytest

from hydrad.engine.echo_leak import EchoLeakDetector
from hydrad.sim.voice import synthesize
from tests.test_aec_scene import load_wav16

N = 160  # 10 ms at 16 kHz


def feed(det: EchoLeakDetector, far: np.ndarray, mic: np.ndarray, ahead: int = 2):
    """Lockstep in 10 ms frames with the far end ``ahead`` frames early (as the engine gives
    it); yields after each capture frame."""
    for k in range(ahead):
        det.reference(far[k * N : (k + 1) * N])
    for j in range(len(mic) // N):
        k = j + ahead
        det.reference(far[k * N : (k + 1) * N] if (k + 1) * N <= len(far) else np.zeros(N))
        det.capture(mic[j * N : (j + 1) * N])
        yield j


def delayed(x: np.ndarray, lag: int, gain: float = 0.1) -> np.ndarray:
    return gain * (np.concatenate([np.zeros(lag), x])[: len(x)] if lag >= 0 else np.concatenate([x[-lag:], np.zeros(-lag)]))


@pytest.mark.parametrize("lag_ms", [-15.0, 0.0, 7.5, 40.0, 150.0, 290.0])
def test_a_delayed_copy_is_fitted_at_any_lag_in_range(lag_ms):
    far = load_wav16("hello")[:16000]
    mic = delayed(far, int(lag_ms * 16))
    det = EchoLeakDetector()
    for j in feed(det, far, mic):
        pass
    share, rest = det.fit()
    w = mic[-det.window :]
    e = float(np.dot(w, w)) * N / det.window    # mean energy per 10 ms frame
    assert share > 0.999, share
    assert det.near_bound() < 1e-4 * e          # the copy leaves next to nothing (-40 dB)
    assert len(rest) == det.fit_len


def test_a_path_step_is_fitted_20_ms_after_it():
    """The echo path steps by 9.4 ms (a playback stream re-buffered after a stall, as recorded
    on the virtual rig after a reopen): 20 ms later the bound is back to next to nothing,
    while copies fitted across the step (the 40 ms fit alone) still leave -20 dB of the echo
    here, and left -7 dB on the recording, where AEC3 passed its leak 4 dB under its input
    and the gate took it for the user."""
    far = load_wav16("hello")[:24000]
    step = 100 * N
    mic = np.concatenate([delayed(far, 520)[:step], delayed(far, 670)[step:]])
    det = EchoLeakDetector()
    for j in feed(det, far, mic):
        if j == 100 + 1:                          # the second frame after the step
            break
    e = float(np.dot(mic[step : step + 2 * N], mic[step : step + 2 * N])) / 2
    _, rest = det.fit()
    long_only = max(float(np.dot(rest[-N:], rest[-N:])), float(np.dot(rest[-2 * N : -N], rest[-2 * N : -N])))
    assert long_only > 3e-3 * e, long_only / e
    assert det.near_bound() < 1e-6 * e, det.near_bound() / e


def test_out_of_range_lags_are_not_fitted():
    far = np.random.default_rng(5).standard_normal(16000) * 3000  # nothing in it looks alike
    mic = delayed(far, int(400 * 16))
    det, wide = EchoLeakDetector(), EchoLeakDetector(max_lag_ms=450)
    for _ in feed(det, far, mic):
        pass
    for _ in feed(wide, far, mic):
        pass
    assert det.fit()[0] < 0.1
    assert wide.fit()[0] > 0.999


def test_another_talker_is_left_in_the_bound():
    """Over the whole utterance (voice against the simulator's reply), what the copies leave
    keeps at least half the talker's energy in 99 % of its speech frames."""
    near = load_wav16("interrupt")
    far = np.frombuffer(synthesize(1, len(near) / 16000 + 0.5, 16000), "<i2").astype(np.float64)
    mic = near + delayed(far, 640, gain=0.3)[: len(near)]  # and an echo 10 dB under it
    det = EchoLeakDetector()
    kept = []
    for j in feed(det, far, mic):
        e_near = float(np.dot(near[j * N : (j + 1) * N], near[j * N : (j + 1) * N]))
        if j >= 8 and e_near > N * 300.0**2:       # speech frames above -40 dBFS
            kept.append(det.near_bound() / e_near)
    kept = np.array(kept)
    assert len(kept) > 100
    assert np.mean(kept >= 0.5) >= 0.99, np.percentile(kept, [1, 5, 50])


def test_nothing_to_fit_leaves_the_input():
    det = EchoLeakDetector()
    assert det.fit()[0] == 0.0                      # nothing captured yet
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(16000) * 100
    for _ in feed(det, np.zeros(16000), noise):     # silent far end
        pass
    share, rest = det.fit()
    assert share == 0.0 and np.array_equal(rest, noise[-det.fit_len :].astype(np.float32).astype(np.float64))


def test_two_threads_feed_it():
    import threading

    far = load_wav16("hello")[:32000]
    det = EchoLeakDetector()
    done = threading.Event()

    def ref():
        for k in range(len(far) // N):
            det.reference(far[k * N : (k + 1) * N])
        done.set()

    t = threading.Thread(target=ref)
    t.start()
    mic = delayed(far, 480)
    for j in range(len(mic) // N):
        det.capture(mic[j * N : (j + 1) * N])
        det.fit()
    t.join()
    assert done.is_set()
    assert det.fit()[0] > 0.999                     # once both sides are in, the copy fits


def test_arguments_are_checked():
    for kw in (dict(window_ms=5), dict(min_lag_ms=10, max_lag_ms=5), dict(taps=0), dict(max_lag_ms=2000)):
        with pytest.raises(ValueError):
            EchoLeakDetector(**kw)


def test_skipped_capture_keeps_the_far_end_in_step():
    """The capture loses 30 ms the far end does not (a reopen), and the canceller finds out
    100 ms later. Told then, the detector fits the echo at its old lag at once; not told, 30 ms
    closer (and after a few such losses, outside the lags searched)."""
    far = load_wav16("hello")[:24000]
    mic = delayed(far, 640)
    lags = {}
    for skip in (True, False):
        det = EchoLeakDetector()
        for k in range(100):
            det.reference(far[k * N : (k + 1) * N])
            det.capture(mic[k * N : (k + 1) * N])
        assert det.fit()[0] > 0.999 and det.lag == 640
        for k in range(100, 110):          # the mic is 3 frames further on after the loss
            det.reference(far[k * N : (k + 1) * N])
            det.capture(mic[(k + 3) * N : (k + 4) * N])
        if skip:
            det.skip_capture(3 * N)
        assert det.fit()[0] > 0.999
        lags[skip] = det.lag
    assert lags == {True: 640, False: 640 - 3 * N}, lags


def test_the_pre_delay_moves_the_lags_searched_and_the_far_peak_follows():
    """With the canceller's pre-delay (a 700 ms Bluetooth path: 550 ms held back) the far end
    reaches the fitter 55 frames late: without ``offset`` the lags it searches hold no far
    end at all (the leak check and the keep rule would see none), with it the echo is fitted
    at its whole lag and ``far_peak`` is the far end's level."""
    far = load_wav16("hello")[:32000]
    lag = 700 * 16
    mic = delayed(far, lag)
    for offset in (0, 550 * 16):
        det = EchoLeakDetector()
        det.offset = offset
        for j in range(len(mic) // N):  # far frame k reaches it 53 frames late (the ring)
            if j >= 53:
                k = j - 53
                det.reference(far[k * N : (k + 1) * N])
            det.capture(mic[j * N : (j + 1) * N])
        peak = det.far_peak()
        rest = det.near_rest()
        e = float(np.dot(mic[-N:], mic[-N:]))
        if offset == 0:
            assert peak == 0.0
        else:
            assert peak > 10 * e
            assert float(np.dot(rest[-N:], rest[-N:])) < 1e-3 * e
            assert abs(det.lag - lag) <= 2


def test_the_fit_at_the_known_lag_matches_the_full_fit_on_an_echo():
    far = load_wav16("hello")[:16000]
    mic = delayed(far, 40 * 16)
    det = EchoLeakDetector()
    fast, full = [], []
    for j in feed(det, far, mic):
        if j > 30 and j % 5 == 0:
            full.append(det.near_rest())
            fast.append(det.near_rest_at_known_lag())
    e = float(np.dot(mic, mic)) / (len(mic) / N)
    assert det._known_lag is not None
    for a, b in zip(full, fast):
        assert float(np.dot(b[-N:], b[-N:])) < max(2 * float(np.dot(a[-N:], a[-N:])), 1e-4 * e)


def test_far_peak_is_the_loudest_10_ms_of_far_end_in_reach():
    det = EchoLeakDetector()
    far = np.zeros(16000)
    far[8000:8160] = 1000.0             # one loud block
    for j in feed(det, far, np.zeros(16000)):
        if j == 40:                     # 400 ms: the block (at 500 ms) is not yet in reach
            assert det.far_peak() == 0.0
        if j in (60, 85):               # lags -50..300 ms, plus the 80 ms window
            assert det.far_peak() == pytest.approx(160 * 1000.0**2, rel=1e-6)
        if j == 95:
            assert det.far_peak() == 0.0
