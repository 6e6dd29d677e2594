"""End-to-end tests of the audio engine child process (``python -m hydrad.engine``).

Every test spawns the real child and speaks wire.py to it over its pipes. Audio goes through
the ``wav``/``null`` backends, which run at real time on absolute deadlines; positions in the
speaker WAV are exact functions of monotonic time (``t0_speaker + i / rate``), so the checks
on *where* audio lands are exact to a sample or two, and only wall-clock *arrival* checks
carry slack for a loaded 2-core machine (bounds stated at each test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path


import numpy as np
import pytest

from hydrad.engine import wire
from hydrad.engine.wire import Kind

from .engine_driver import REPO, EngineProc


# ---------------------------------------------------------------------------------------------
# harness


class Engine(EngineProc):
    """The engine tests' default: the ``null`` backend (``config("wav", ...)`` for the wav one)."""


@pytest.fixture
def engines():
    """Factory of engine children; all are killed at teardown."""
    made: list[Engine] = []

    def make() -> Engine:
        e = Engine()
        made.append(e)
        return e

    yield make
    for e in made:
        e.kill()
        e.stderr.close()


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5, phase: float = 0.0) -> np.ndarray:
    n = int(round(seconds * rate))
    x = amp * np.sin(2 * np.pi * freq * np.arange(n) / rate + phase)
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    x = x if x.ndim == 2 else x[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(x, "<i2").tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int64), w.getframerate()


def dominant_hz(x: np.ndarray, rate: int) -> float:
    """Peak of the windowed spectrum, refined by parabolic interpolation."""
    x = np.asarray(x, np.float64)
    spec = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), 8 * len(x)))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return k * rate / (8 * len(x))


# ---------------------------------------------------------------------------------------------
# handshake, liveness, exits


def test_handshake_ready_and_ping(engines, tmp_path):
    e = engines()
    ready = e.config("null", {"input_rate": 16000, "output_rate": 48000})
    assert ready["pid"] == e.p.pid
    assert ready["backend"] == "null"
    assert ready["input"]["rate"] == 16000 and ready["input"]["channels"] == 1
    assert ready["output"]["rate"] == 48000
    t1 = time.monotonic()
    e.send(Kind.PING, {"seq": 42})
    pong = e.wait_json(Kind.PONG)
    assert pong["seq"] == 42 and t1 <= pong["t"] <= time.monotonic()
    # STATS every second with the documented fields
    st = e.wait_json(Kind.STATS, timeout=3.0)
    for key in ("underruns", "overruns", "buffer_ms", "callbacks", "status_flags",
                "late_callbacks", "input_rate", "output_rate", "device_state"):
        assert key in st
    assert st["device_state"] == "open" and st["output_rate"] == 48000 and st["callbacks"] > 0
    assert e.stop() == 0

    w = engines()
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    ready = w.config("wav", {"speaker": str(spk), "speaker_rate": 16000, "t0_speaker": t0})
    assert ready["backend"] == "wav"
    assert ready["output"]["rate"] == 16000 and ready["output"]["path"] == str(spk)
    assert ready["output"]["t0_speaker"] == t0
    assert ready["input"]["rate"] == 16000  # no mic files: silent 16 kHz mono mic
    assert w.stop() == 0


def test_stdin_eof_exits_within_1s(engines):
    e = engines()
    e.config("wav", {})
    e.wait_for(lambda m: m.kind == Kind.CAPTURE)  # running, clock ticking
    t = time.monotonic()
    e.p.stdin.close()
    rc = e.p.wait(5)
    elapsed = time.monotonic() - t
    assert rc == 0
    assert elapsed < 1.0, f"took {elapsed:.3f} s to exit after stdin EOF"
    # EOF before CONFIG as well
    e2 = engines()
    t = time.monotonic()
    e2.p.stdin.close()
    assert e2.p.wait(5) == 0 and time.monotonic() - t < 1.5  # includes interpreter start


def test_exits_when_parent_stops_listening():
    """The parent closed the engine's stdout but keeps stdin open: the engine exits (0) on
    the first failed write (CAPTURE frames are written every 20 ms) instead of living on."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "hydrad.engine"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO), env=env)
    try:
        p.stdin.write(wire.encode_json(Kind.CONFIG, {"backend": "null", "options": {}}))
        p.stdin.flush()
        assert wire.read_message(p.stdout).kind == Kind.READY
        t = time.monotonic()
        p.stdout.close()
        assert p.wait(5) == 0
        assert time.monotonic() - t < 1.0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdin.close()


def test_stop_exits_zero_quickly(engines):
    e = engines()
    e.config("null", {})
    e.play("r", tone(300, 2.0, 24000))  # audio buffered: STOP drains nothing
    e.wait_json(Kind.PLAYED)
    t = time.monotonic()
    assert e.stop() == 0
    assert time.monotonic() - t < 1.0


@pytest.mark.parametrize("case", ["garbage_first", "garbage_after_config", "bad_json_config",
                                  "truncated_play", "wrong_direction", "unknown_kind_short"])
def test_garbage_on_stdin_exits_nonzero_with_log(engines, case):
    e = engines()
    if case == "garbage_first":
        e.send_raw(b"\xffhello, this is not a frame\n" * 4)
    elif case == "bad_json_config":
        e.send_raw(wire.encode(Kind.CONFIG, b"{not json"))
    else:
        e.config("null", {})
        if case == "garbage_after_config":
            e.send_raw(os.urandom(3) + b"\xfe" + b"\x00" * 64)
        elif case == "unknown_kind_short":
            # an unknown kind with a plausible length: rejected at the header, not after
            # waiting (forever: stdin stays open) for 1 MiB of payload
            e.send_raw(wire.HEADER.pack(0xEE, 1 << 20))
        elif case == "truncated_play":
            e.send_raw(wire.encode(Kind.PLAY, b"\x09ab\x00"))  # id length 9, 2 bytes of id
        else:
            e.send(Kind.READY, {})
    # a stuck engine would keep stdin open and never exit: bounded wait
    rc = e.p.wait(5)
    e._reader.join(2)
    assert rc not in (0, None)
    logs = e.all_json(Kind.LOG)
    assert any(log["level"] == "error" for log in logs), logs


def test_unknown_backend_is_a_config_error(engines):
    e = engines()
    e.send(Kind.CONFIG, {"backend": "no-such", "options": {}})
    rc = e.p.wait(5)
    e._reader.join(2)
    assert rc == 3
    assert any(log["event"] == "config_invalid" for log in e.all_json(Kind.LOG))


# ---------------------------------------------------------------------------------------------
# capture


@pytest.mark.parametrize("in_rate,channels", [(16000, 1), (44100, 2)])
def test_capture_frames_exact_size_at_real_time(engines, in_rate, channels):
    """640-byte frames, t_adc exactly 20 ms apart, arrival rate = real time within 3 %.

    The 3 % bound: arrival times are fitted over ~2 s (100 frames), so a scheduling hiccup of
    up to ~30 ms on a loaded machine moves the slope by < 1.5 %; a clock running 5 % fast or
    slow, or frames of the wrong size/rate, fail it.
    """
    e = engines()
    ready = e.config("null", {"input_rate": in_rate, "input_channels": channels})
    assert ready["input"]["rate"] == in_rate
    e.wait_for(lambda m: m.kind == Kind.CAPTURE)
    time.sleep(2.1)
    caps = e.captures()
    assert e.stop() == 0
    caps = caps[5:]  # skip start-up
    assert len(caps) >= 95
    assert all(len(pcm) == 640 for _, _, pcm in caps)
    arrival = np.array([a for a, _, _ in caps])
    t_adc = np.array([t for _, t, _ in caps])
    assert np.allclose(np.diff(t_adc), 0.020, atol=1e-6), "t_adc must advance by exactly 20 ms"
    slope = np.polyfit(np.arange(len(arrival)), arrival, 1)[0]
    assert abs(slope / 0.020 - 1) < 0.03, f"frames arrive every {slope*1000:.2f} ms"
    # a frame cannot arrive before its last sample was captured; nor 300 ms later
    lag = arrival - (t_adc + 0.020)
    assert lag.min() > -0.001 and np.median(lag) < 0.3, (lag.min(), np.median(lag))


def test_wav_mic_schedule_resampled_at_right_time(engines, tmp_path):
    """A 48 kHz stereo tone in the mic schedule comes out as 16 kHz mono at t0 + at."""
    rate, freq, dur, at = 48000, 440.0, 0.6, 0.3
    left = tone(freq, dur, rate, amp=0.5)
    right = tone(freq, dur, rate, amp=0.25)
    mic = tmp_path / "mic.wav"
    write_wav(mic, np.stack([left, right], axis=1), rate)
    e = engines()
    ready = e.config("wav", {"mic": [{"path": str(mic), "at": at}]})
    assert ready["input"]["rate"] == 48000 and ready["input"]["channels"] == 2
    t0 = time.monotonic() + 0.1
    e.send(Kind.GATE, {"open": True, "t0": t0})
    e.wait_for(lambda m: m.kind == Kind.CAPTURE and wire.decode_capture(m.payload)[0] > t0 + 1.1,
               timeout=5.0)
    caps = e.captures()
    assert e.stop() == 0
    t_adc = np.array([t for _, t, _ in caps])
    assert np.allclose(np.diff(t_adc), 0.020, atol=1e-6)
    x = np.concatenate([np.frombuffer(p, "<i2") for _, _, p in caps]).astype(np.float64) / 32768
    t = t_adc[0] + np.arange(len(x)) / 16000
    expect_amp = 0.375  # mono = mean of the channels
    on = np.flatnonzero(np.abs(x) > 0.2 * expect_amp)
    onset, offset = t[on[0]], t[on[-1]]
    # onset/offset: the resampler is time-aligned; 2 ms covers its filter's spread
    assert abs(onset - (t0 + at)) < 0.002, f"tone starts {1000*(onset - t0 - at):+.2f} ms off"
    assert abs(offset - (t0 + at + dur)) < 0.002, f"tone ends {1000*(offset - t0 - at - dur):+.2f} ms off"
    seg = x[on[0] + 800 : on[-1] - 800]
    f = dominant_hz(seg, 16000)
    assert abs(f / freq - 1) < 0.01, f
    assert abs(np.max(np.abs(seg)) / expect_amp - 1) < 0.03
    assert np.max(np.abs(x[t < t0 + at - 0.005])) < 0.01  # silence before
    assert np.max(np.abs(x[t > t0 + at + dur + 0.005])) < 0.01  # and after


def test_capture_overrun_when_parent_stops_reading(engines):
    """The parent stops reading: once the writer queue holds max_queue items, capture frames
    are dropped (never blocking the callback) and counted as overruns; the rest still flows."""
    import fcntl

    e = engines()
    fcntl.fcntl(e.p.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: a 4 KiB pipe fills fast
    e.config("null", {}, max_queue=10)
    e.wait_for(lambda m: m.kind == Kind.CAPTURE)
    e.reading.clear()
    time.sleep(1.0)
    e.reading.set()
    st = e.wait_json(Kind.STATS, lambda o: o["overruns"] > 0, timeout=4)
    # ~1 s stalled = 50 frames, minus ~6 in the pipe and 10 queued: 20+ dropped (slack for load)
    assert st["overruns"] >= 20 and st["capture_dropped"] == st["overruns"]
    time.sleep(0.2)
    t_adc = np.array([t for _, t, _ in e.captures()])
    gaps = np.round(np.diff(t_adc) / 0.02).astype(int)
    assert gaps.min() == 1 and gaps.max() - 1 >= 20  # one hole where the frames were dropped
    assert e.stop() == 0


# ---------------------------------------------------------------------------------------------
# playout


def _played(e: Engine, rid: str, done: bool, timeout: float = 5.0) -> dict:
    return e.wait_json(Kind.PLAYED, lambda o: o["response_id"] == rid and o["done"] is done,
                       timeout=timeout)


@pytest.mark.parametrize("speaker_rate", [24000, 16000, 44100])
def test_play_keeps_pitch_and_duration(engines, tmp_path, speaker_rate):
    """PLAY at 24 kHz then (OUTPUT_FORMAT) 48 kHz into the speaker WAV: pitch within 1 %, the
    exact duration, and PLAYED first_audible/samples match where the audio is in the file."""
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    e = engines()
    e.config("wav", {"speaker": str(spk), "speaker_rate": speaker_rate, "t0_speaker": t0})
    a = tone(500, 0.5, 24000, phase=np.pi / 4)
    b = tone(800, 0.5, 48000, phase=np.pi / 4)
    e.play("r1", a, chunk=960)  # 40 ms deltas: the stream must not click at chunk joints
    e.send(Kind.OUTPUT_FORMAT, {"rate": 48000})
    e.play("r2", b, chunk=1920)
    p1 = _played(e, "r1", True)
    p2 = _played(e, "r2", True)
    first1 = _played(e, "r1", False)
    time.sleep(0.05)
    assert e.stop() == 0
    x, sr = read_wav(spk)
    assert sr == speaker_rate
    n_exp = 0.5 * speaker_rate
    for p in (p1, p2):
        assert p["rate"] == speaker_rate
        assert abs(p["samples"] - n_exp) <= 1, (p, n_exp)
    assert first1["first_audible"] == p1["first_audible"]
    i1 = round((p1["first_audible"] - t0) * sr)
    i2 = round((p2["first_audible"] - t0) * sr)
    assert i2 == i1 + p1["samples"], "r2 starts right after r1"
    # the audio is in the file exactly where PLAYED says
    assert not np.any(x[:i1]), "silence before the first audible sample"
    assert x[i1] != 0
    end = i2 + p2["samples"]
    assert np.any(x[end - 3 : end]) and not np.any(x[end + 2 :]), "silence after the last sample"
    for (lo, hi), freq in (((i1, i2), 500), ((i2, end), 800)):
        seg = x[lo:hi].astype(np.float64)
        f = dominant_hz(seg[sr // 50 : -sr // 50], sr)
        assert abs(f / freq - 1) < 0.01, (speaker_rate, freq, f)
        core = np.abs(seg[sr // 50 : -sr // 50])
        assert abs(core.max() / 16384 - 1) < 0.03
        # no clicks at the 40 ms chunk joints: no step bigger than the tone's own steepest
        # slope (+3 %); the first/last 2 ms ring because the test tone starts/ends abruptly
        steep = 16384 * 2 * np.pi * freq / sr
        edge = sr // 500
        assert np.abs(np.diff(seg[edge:-edge])).max() < steep * 1.03 + 4
    if speaker_rate == 24000:  # no resampling: bit exact
        assert np.array_equal(x[i1:i2], a)


def test_flush_fades_within_one_block_and_reports(engines, tmp_path):
    """FLUSH mid-playback: the tone stops within one block + fade of t_received, fades without
    a jump, nothing of the response plays afterwards, and FLUSHED/PLAYED match the file."""
    sr, block, fade = 24000, 0.010, 0.005
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    e = engines()
    e.config("wav", {"speaker": str(spk), "speaker_rate": sr, "t0_speaker": t0})
    amp = 16384
    src = tone(200, 2.0, sr, phase=0.3)
    e.play("r1", src)
    first = _played(e, "r1", False)
    time.sleep(0.35)
    e.send(Kind.FLUSH, {"seq": 7, "reason": "barge_in"})
    fl = e.wait_json(Kind.FLUSHED)
    e.play("r1", tone(200, 0.3, sr))  # a late delta of the flushed response: must be dropped
    final = _played(e, "r1", True)
    time.sleep(0.1)
    e.play("r2", tone(1000, 0.2, sr, phase=0.3))
    p2 = _played(e, "r2", True)
    st = e.wait_json(Kind.STATS, lambda o: o["dropped_after_flush"] > 0, timeout=3)
    assert e.stop() == 0
    x, _ = read_wav(spk)

    assert fl["seq"] == 7 and fl["response_id"] == "r1" and fl["reason"] == "barge_in"
    assert final.get("flushed") is True
    assert final["first_audible"] == first["first_audible"]
    assert st["dropped_after_flush"] == int(0.3 * sr)
    i_start = round((first["first_audible"] - t0) * sr)
    i_r2 = round((p2["first_audible"] - t0) * sr)
    r1 = x[i_start:i_r2]
    nz = np.flatnonzero(r1)
    last = i_start + nz[-1]  # last audible sample of r1
    t_last = t0 + (last + 1) / sr
    # the bound: one output block (what the device already has) + the fade
    assert t_last <= fl["t_received"] + block + fade + 1 / sr, (t_last - fl["t_received"])
    assert t_last >= fl["t_received"] - block, "stopped before the FLUSH arrived?"
    # t_silent is where the audio really ends (the fade's last sample is 0: <= 3 samples early)
    assert -1.5 / sr <= fl["t_silent"] - t_last <= 3.5 / sr
    # accounting: samples heard + dropped = the whole response; heard = what is in the file
    assert fl["faded_samples"] == round(fade * sr)
    assert final["samples"] + fl["dropped_samples"] == len(src)
    end = i_start + final["samples"]
    assert end - 3 <= last + 1 <= end
    assert np.array_equal(r1[: end - i_start - fl["faded_samples"]],
                          src[: end - i_start - fl["faded_samples"]])
    # the fade: linear envelope to 0, and no step steeper than the tone itself
    fade_n = fl["faded_samples"]
    faded = x[end - fade_n : end].astype(np.float64)
    envelope = amp * (1 - np.arange(1, fade_n + 1) / fade_n)
    assert np.all(np.abs(faded) <= envelope + 2), "fade exceeds the linear ramp"
    steep = amp * 2 * np.pi * 200 / sr
    assert np.abs(np.diff(x[i_start:end + 5])).max() <= steep + 4
    # nothing of r1 after the cut: only r2 (1 kHz) is left
    after = x[end:]
    nz_after = np.flatnonzero(after)
    assert nz_after[0] + end == i_r2 and nz_after[-1] + end < i_r2 + p2["samples"]
    assert abs(dominant_hz(x[i_r2 : i_r2 + p2["samples"]], sr) / 1000 - 1) < 0.01


def test_flush_when_idle_and_played_for_dropped_response(engines):
    e = engines()
    e.config("null", {"output_rate": 24000})
    e.send(Kind.FLUSH, {"seq": 1, "reason": "idle"})
    fl = e.wait_json(Kind.FLUSHED)
    assert fl["seq"] == 1 and fl["response_id"] is None and fl["dropped_samples"] == 0
    # two responses queued; the second never played: it gets PLAYED(done, samples=0)
    e.play("a", tone(300, 1.0, 24000))
    e.play("b", tone(300, 1.0, 24000))
    _played(e, "a", False)
    time.sleep(0.1)
    e.send(Kind.FLUSH, {"seq": 2})
    fl = e.wait_json(Kind.FLUSHED, lambda o: o["seq"] == 2)
    pb = _played(e, "b", True)
    pa = _played(e, "a", True)
    assert fl["response_id"] == "a"
    assert pb["samples"] == 0 and pb["first_audible"] is None and pb["flushed"]
    assert pa["samples"] + pb["samples"] + fl["dropped_samples"] == 48000
    assert e.stop() == 0


def test_underrun_counted_only_for_gaps_inside_a_response(engines):
    """Underrun = a response's audio ran dry and more of the same response came later."""
    e = engines()
    e.config("null", {"output_rate": 24000})
    e.play("a", tone(300, 0.2, 24000))
    pa = _played(e, "a", True)
    assert pa["samples"] == 4800
    e.play("b", tone(300, 0.1, 24000))  # a new response after idle: not an underrun
    _played(e, "b", True)
    time.sleep(0.2)
    e.play("b", tone(300, 0.1, 24000))  # more of b after it drained: one underrun
    n_done = lambda: len([o for o in e.all_json(Kind.PLAYED) if o["response_id"] == "b" and o["done"]])
    deadline = time.monotonic() + 3
    while n_done() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    played_b = [o for o in e.all_json(Kind.PLAYED) if o["response_id"] == "b"]
    assert [o["done"] for o in played_b] == [False, True, True]
    assert played_b[-1]["samples"] == 4800  # cumulative over both drain cycles
    assert played_b[-1]["first_audible"] == played_b[0]["first_audible"]
    st = e.wait_json(Kind.STATS, lambda o: o["underruns"] >= 1, timeout=3)
    assert st["underruns"] == 1
    assert 150 <= st["underrun_ms"] <= 1000  # the gap: ~0.2 s sleep + pipe/scheduling
    assert e.stop() == 0


def test_duck_scales_smoothly(engines, tmp_path):
    sr = 24000
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    e = engines()
    e.config("wav", {"speaker": str(spk), "speaker_rate": sr, "t0_speaker": t0})
    e.play("r", tone(300, 1.2, sr))
    first = _played(e, "r", False)
    time.sleep(0.3)
    e.send(Kind.DUCK, {"gain": 0.25})
    time.sleep(0.3)
    e.send(Kind.DUCK, {"gain": 1.0})
    _played(e, "r", True)
    assert e.stop() == 0
    x, _ = read_wav(spk)
    i0 = round((first["first_audible"] - t0) * sr)
    r = np.abs(x[i0 : i0 + int(1.2 * sr)].astype(np.float64))
    win = sr // 50  # 20 ms windows (> one 300 Hz period)
    peaks = np.array([r[i : i + win].max() for i in range(0, len(r) - win, win)])
    assert abs(peaks[:10].max() / 16384 - 1) < 0.02          # full level first
    assert np.sum(np.abs(peaks / 16384 - 0.25) < 0.02) >= 8  # ducked for a while (~0.3 s)
    assert abs(peaks[-5:].max() / 16384 - 1) < 0.02          # back to full
    assert np.abs(np.diff(x[i0 : i0 + int(1.2 * sr)])).max() <= 16384 * 2 * np.pi * 300 / sr + 4


# ---------------------------------------------------------------------------------------------
# speaker timeline, restarts, device faults


def test_speaker_wav_valid_while_running_and_silence_is_written(engines, tmp_path):
    sr = 16000
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    e = engines()
    e.config("wav", {"speaker": str(spk), "speaker_rate": sr, "t0_speaker": t0})
    time.sleep(0.5)
    x, rate = read_wav(spk)  # header valid mid-run
    elapsed = time.monotonic() - t0
    assert rate == sr and not np.any(x)
    # the file runs up to the end of the last rendered block: at most one block (10 ms) ahead
    # of the wall clock, and (100 ms slack for a loaded machine) not far behind
    assert elapsed - 0.1 <= len(x) / sr <= elapsed + 0.0101
    assert e.stop() == 0


def test_sigkill_then_restart_continues_the_timeline(engines, tmp_path):
    sr = 24000
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    opts = {"speaker": str(spk), "speaker_rate": sr, "t0_speaker": t0}
    a = engines()
    a.config("wav", opts)
    a.play("r1", tone(400, 0.3, sr, phase=0.5))
    pa = _played(a, "r1", True)
    time.sleep(0.1)
    a.p.send_signal(signal.SIGKILL)
    a.p.wait(5)
    t_kill = time.monotonic()
    x, _ = read_wav(spk)  # the header is valid after SIGKILL
    assert t_kill - t0 - 0.1 <= len(x) / sr <= t_kill - t0 + 0.0101
    time.sleep(0.3)
    b = engines()
    ready = b.config("wav", opts)
    assert ready["output"]["t0_speaker"] == t0
    b.play("r2", tone(700, 0.3, sr, phase=0.5))
    pb = _played(b, "r2", True)
    time.sleep(0.1)
    t_stop = time.monotonic()
    assert b.stop() == 0
    x, _ = read_wav(spk)
    # the file is the wall-clock timeline since t0 (gap while no engine ran = silence)
    assert t_stop - t0 - 0.1 <= len(x) / sr <= t_stop - t0 + 0.0101
    i1 = round((pa["first_audible"] - t0) * sr)
    i2 = round((pb["first_audible"] - t0) * sr)
    nz = np.flatnonzero(x)
    assert nz[0] == i1 and nz[-1] < i2 + pb["samples"]
    seg1 = nz[nz < i2]
    assert seg1[-1] < i1 + pa["samples"]
    assert np.flatnonzero(x[i1 + pa["samples"] :])[0] + i1 + pa["samples"] == i2
    assert abs(dominant_hz(x[i1 : i1 + pa["samples"]], sr) / 400 - 1) < 0.01
    assert abs(dominant_hz(x[i2 : i2 + pb["samples"]], sr) / 700 - 1) < 0.01


def test_device_loss_is_reported_and_reopened(engines, tmp_path):
    """lost -> reopening -> open; capture resumes and the speaker file keeps its timeline
    (what was written before the loss stays, new audio lands at its monotonic position)."""
    sr = 24000
    spk = tmp_path / "spk.wav"
    t0 = time.monotonic()
    e = engines()
    e.config("wav", {"speaker": str(spk), "speaker_rate": sr, "t0_speaker": t0,
                     "simulate_loss_after": 0.3})
    e.play("r0", tone(300, 0.1, sr, phase=0.5))
    p0 = _played(e, "r0", True)
    lost = e.wait_json(Kind.DEVICE, lambda o: o["state"] == "lost", timeout=3)
    assert "simulated" in lost["error"]
    e.wait_json(Kind.DEVICE, lambda o: o["state"] == "reopening", timeout=3)
    e.wait_json(Kind.DEVICE, lambda o: o["state"] == "open", timeout=3)
    n = len(e.captures())
    e.play("r", tone(500, 0.2, sr, phase=0.5))
    p = _played(e, "r", True)
    assert len(e.captures()) > n  # capture resumed
    assert e.stop() == 0
    x, _ = read_wav(spk)
    i0 = round((p0["first_audible"] - t0) * sr)
    i = round((p["first_audible"] - t0) * sr)
    nz = np.flatnonzero(x)
    assert nz[0] == i0 and np.array_equal(x[i0 : i0 + 2400], tone(300, 0.1, sr, phase=0.5))
    assert nz[nz > i0 + 2400][0] == i  # still on the same timeline


def test_device_unavailable_at_start_retries_with_backoff(engines):
    e = engines()
    ready = e.config("null", {"simulate_open_failures": 2})
    assert ready["input"] is None and ready["output"] is None and "simulated" in ready["error"]
    states = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [o["state"] for o in e.all_json(Kind.DEVICE)]
        if "open" in states:
            break
        time.sleep(0.02)
    assert states == ["unavailable", "reopening", "unavailable", "reopening", "open"], states
    e.wait_for(lambda m: m.kind == Kind.CAPTURE, timeout=2)
    assert e.stop() == 0


def test_gate_t0_resumes_mic_schedule_after_restart(engines, tmp_path):
    """Resending the same GATE t0 to a restarted engine continues the mic schedule."""
    rate = 16000
    mic = tmp_path / "mic.wav"
    write_wav(mic, tone(300, 1.5, rate), rate)
    opts = {"mic": [{"path": str(mic), "at": 0.0}]}
    a = engines()
    a.config("wav", opts)
    t0 = time.monotonic()
    a.send(Kind.GATE, {"open": True, "t0": t0})
    a.wait_for(lambda m: m.kind == Kind.CAPTURE and wire.decode_capture(m.payload)[0] > t0 + 0.3)
    a.kill()
    b = engines()
    b.config("wav", opts)
    b.send(Kind.GATE, {"open": True, "t0": t0})
    _, m = b.wait_for(lambda m: m.kind == Kind.CAPTURE and wire.decode_capture(m.payload)[0] > t0 + 0.6)
    t_adc, pcm = wire.decode_capture(m.payload)
    assert b.stop() == 0
    got = np.frombuffer(pcm, "<i2")
    j = round((t_adc - t0) * rate)
    expect = tone(300, 1.5, rate)[j : j + len(got)]
    assert np.array_equal(got, expect), "the schedule resumed at the wrong position"
