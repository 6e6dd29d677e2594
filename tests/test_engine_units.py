"""In-process tests of the engine's building blocks (playout, capture, the clock backend).

Deterministic and fast; the end-to-end behaviour through the child process is in
tests/test_engine.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import soxr

from hydrad.engine import wire
from hydrad.engine.backends.clock import ClockedBackend
from hydrad.engine.backends.wav import SpeakerFile
from hydrad.engine.capture import Capture
from hydrad.engine.playout import Playout


def _tone(freq: float, n: int, rate: int, amp: float = 0.5) -> np.ndarray:
    return np.round(amp * np.sin(2 * np.pi * freq * np.arange(n) / rate) * 32767).astype(np.int16)


def _render_all(p: Playout, block: int, t: float = 100.0, rate: int | None = None) -> np.ndarray:
    out = []
    rate = rate or p.device_rate
    while p.buffered:
        out.append(p.render(block, t).copy())
        t += block / rate
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def test_playout_resamples_as_one_stream_not_per_chunk():
    """40 ms PLAY chunks through the streaming resampler == resampling the whole response at
    once (per-chunk independent resampling would put a seam at every joint)."""
    events: list = []
    p = Playout(events.append, device_rate=44100, input_rate=24000)
    src = _tone(440, 24000, 24000)
    for i in range(0, len(src), 960):
        p.push("r", src[i : i + 960].tobytes())
    p.last_push -= 1.0  # the response looks finished
    assert p.drain_tail_if_low(time.monotonic()) is False  # buffer is still long
    got = []
    while p.buffered:
        got.append(p.render(441, 0.0).copy())
        p.drain_tail_if_low(time.monotonic() + 1.0)
    y = np.concatenate(got)
    ref = soxr.resample(src.astype(np.float32) / 32768, 24000, 44100, quality="HQ")
    assert len(y) == len(ref) == 44100
    assert np.max(np.abs(y - ref)) < 1e-4
    done = [e for e in events if e[5]]
    assert len(done) == 1 and done[0][3] == 44100  # one drain, every sample counted


def test_playout_tail_waits_while_plays_flow():
    """The held-back tail is not drained while PLAYs are still arriving (a drain resets the
    stream and leaves a seam), only once they stop and the buffer runs low."""
    p = Playout(lambda e: None, device_rate=48000, input_rate=24000)
    p.push("r", _tone(440, 480, 24000).tobytes())  # 20 ms in, soxr holds most of it back
    assert p.pending_tail()
    assert not p.drain_tail_if_low(p.last_push + 0.005)  # 5 ms after the PLAY: wait
    assert p.drain_tail_if_low(p.last_push + 0.05)       # 50 ms of silence: drain
    assert p.buffered == 960 and not p.pending_tail()


def test_playout_flush_fades_linearly_and_counts():
    events: list = []
    rate = 24000
    p = Playout(events.append, device_rate=rate, input_rate=rate, fade_ms=5)
    src = np.full(24000, 16384, np.int16)  # DC: the fade shape is the envelope itself
    p.push("r", src.tobytes())
    first = p.render(240, 10.0).copy()
    assert np.allclose(first, 0.5)
    res = p.flush(t_received=10.005, running=True)
    assert res["response_id"] == "r"
    assert res["faded_samples"] == 120 and res["dropped_samples"] == 24000 - 240 - 120
    assert abs(res["t_silent"] - (10.0 + 240 / rate + 120 / rate)) < 1e-9
    nxt = p.render(240, 10.0 + 240 / rate)
    expect = 0.5 * (1 - np.arange(1, 121) / 120)
    assert np.allclose(nxt[:120], expect) and not np.any(nxt[120:])
    played = [e for e in events if e[0] == "played"]
    assert played[-1][3] == 360 and played[-1][5] is True and played[-1][6] is True
    # a late PLAY of the flushed response is dropped
    assert p.push("r", src[:100].tobytes()) == 0 and p.buffered == 0


def test_playout_duck_ramps_over_5ms():
    rate = 24000
    p = Playout(lambda e: None, device_rate=rate, input_rate=rate, duck_ms=5)
    p.push("r", np.full(4800, 16384, np.int16).tobytes())
    p.render(240, 0.0)
    p.duck(0.0)
    y = p.render(240, 0.01).copy()
    assert np.all(np.diff(y[:120]) < 0) and np.allclose(y[119:], 0.0, atol=1e-6)
    assert np.max(np.abs(np.diff(y))) <= 0.5 / 120 + 1e-6  # no step larger than the ramp


def test_capture_frames_and_timestamps_from_odd_blocks():
    """44.1 kHz stereo int16 in 441-frame blocks -> exact 320-sample frames at 16 kHz whose
    t_adc follows the sample positions, and mono = mean of the channels."""
    frames: list[bytes] = []
    c = Capture(lambda b: frames.append(b) or True, frame_ms=20, quality="HQ")
    c.configure(44100, 2)
    rate, t0 = 44100, 1000.0
    mono = _tone(1000, rate, rate, amp=0.4).astype(np.int32)
    block = np.stack([mono + 1000, mono - 1000], axis=1).astype(np.int16)  # mean = tone
    for k in range(100):
        c.feed(block[k * 441 : (k + 1) * 441], t0 + k * 0.01)
    decoded = [wire.decode_capture(f[5:]) for f in frames]
    assert all(len(pcm) == 640 for _, pcm in decoded)
    n_out = len(decoded) * 320
    assert 16000 - 320 - 700 <= n_out <= 16000  # soxr holds back < 40 ms
    ts = np.array([t for t, _ in decoded])
    assert np.allclose(ts, t0 + 0.02 * np.arange(len(ts)), atol=1e-9)
    y = np.concatenate([np.frombuffer(p, "<i2") for _, p in decoded]).astype(np.float64)
    ref = soxr.resample(mono.astype(np.float32) / 32768, rate, 16000, quality="HQ")[: len(y)]
    assert np.max(np.abs(y / 32768 - ref)) < 2e-3


def test_capture_16k_mono_int16_is_bit_exact():
    frames: list[bytes] = []
    c = Capture(lambda b: frames.append(b) or True, frame_ms=20)
    c.configure(16000, 1)
    x = _tone(300, 16000, 16000)
    for k in range(100):
        c.feed(x[k * 160 : (k + 1) * 160, None], 5.0 + k * 0.01)
    y = np.concatenate([np.frombuffer(wire.decode_capture(f[5:])[1], "<i2") for f in frames])
    assert np.array_equal(y, x)


class _Host:
    def __init__(self, stall_at: int | None = None, stall_s: float = 0.0) -> None:
        self.calls: list[tuple[int, int, float, float]] = []
        self.late = 0
        self.stall_at, self.stall_s = stall_at, stall_s
        self.done = threading.Event()

    def process(self, indata, outdata, t_adc, t_dac, status=0):
        self.calls.append((len(indata), len(outdata), t_adc, t_dac))
        if len(self.calls) == self.stall_at:
            time.sleep(self.stall_s)
        if len(self.calls) >= 60:
            self.done.set()

    def device_event(self, state, error=None):
        pass

    def count_late(self, n=1):
        self.late += n


def test_clock_blocks_follow_absolute_positions_at_odd_rates():
    host = _Host()
    b = ClockedBackend({}, 10, host)
    b.in_rate, b.out_rate = 44100, 22050
    b.open()
    b.start()
    assert host.done.wait(5)
    b.close()
    calls = host.calls[:60]
    t_dac = np.array([c[3] for c in calls])
    assert np.allclose(np.diff(t_dac), 0.01, atol=1e-9)  # absolute deadlines, no drift
    k0 = round((t_dac[0] - b.anchor) / 0.01)
    outs = sum(c[1] for c in calls)
    assert outs == round((k0 + 60) * 220.5) - round(k0 * 220.5)  # 220/221 frames: exact
    assert sum(c[0] for c in calls) == 60 * 441
    assert all(abs(c[2] - (c[3] - 0.01)) < 1e-9 for c in calls)  # input block just ended


def test_clock_resyncs_instead_of_bursting():
    """A 100 ms stall: the missed ticks are counted late and skipped, not replayed in a burst."""
    host = _Host(stall_at=10, stall_s=0.1)
    b = ClockedBackend({}, 10, host)
    b.open()
    b.start()
    assert host.done.wait(5)
    b.close()
    t_dac = np.array([c[3] for c in host.calls])
    gaps = np.round(np.diff(t_dac) / 0.01).astype(int)
    assert host.late >= 5  # ~10 ticks missed, minus the 4-block catch-up allowance
    assert gaps.max() == 1 + host.late  # one jump over exactly the skipped ticks
    assert (gaps == 1).sum() == len(gaps) - 1


def test_speaker_file_reopen_appends_and_pads(tmp_path):
    path = str(tmp_path / "s.wav")
    f = SpeakerFile(path, 16000, append=True)  # absent: created
    f.write_at(0, np.full(100, 7, np.int16))
    f.close()
    g = SpeakerFile(path, 16000, append=True)
    assert g.data_len == 200
    g.write_at(300, np.full(50, 9, np.int16))  # gap 100..300 reads as silence
    g.close()
    import wave

    with wave.open(path) as w:
        assert w.getnframes() == 350 and w.getframerate() == 16000
        x = np.frombuffer(w.readframes(350), "<i2")
    assert np.all(x[:100] == 7) and not np.any(x[100:300]) and np.all(x[300:] == 9)
