"""Echo canceller (``hydrad.engine.aec``) cost, latency and quality, offline. Not a test: it
prints numbers (docs/benchmarks.md "Echo cancellation" has a recorded run).

    .venv/bin/python bench/aec.py [all|cpu|latency|contention|quality|voices] [--json out.json]

* ``cpu``: time per 10 ms step (one 10 ms reference block at 48 kHz + half a 20 ms capture
  frame, the engine's defaults) for baselines measured in the same run -- a plain numpy copy
  of the same frames, a soxr 48->16 kHz stream of the reference plus the copy, the livekit
  APM with every stage off (FFI cost alone), the bare APM with AEC -- and for
  ``EchoCanceller`` (AEC, AEC+NS+HPF, and AEC without the gate's leak check). Best of 3
  passes over a 16.5 s scene; ratios.
* ``leak``: the gate's leak check (``EchoLeakDetector.near_bound``) per call against one
  numpy FFT of the same size measured in the same run, and how many capture frames of the
  scene (and of a 3.4 s double talk) it runs on.
* ``latency``: the added capture latency: a near-end-only signal through the canceller
  (far end silent), input vs output cross-correlated; plus the processing time per frame.
* ``contention``: a 10 ms "audio callback" thread next to a CPU-bound pure-Python thread
  (the GIL's worst case): callback duration with the canceller inline vs the callback only
  enqueueing for :class:`AecWorker` vs a copy-only baseline; and the worker's queue latency.
* ``quality``: the test scenes (tests/test_aec_scene.py) with and without the canceller:
  ERLE, webrtcvad false frames, double-talk recall, the simulator VAD's speech_started.
* ``voices``: ERLE and false VAD frames per simulator reply number (the harmonic buzz) vs
  real speech vs the buzz with 10 % / 20 % per-period pitch jitter (and what that does to
  ``dominant_frequency``, which the simulator's tests use to tell replies apart).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydrad.engine.aec import AecWorker, EchoCanceller  # noqa: E402
from hydrad.sim.voice import HARMONICS, response_f0  # noqa: E402
from tests.test_aec_scene import (  # noqa: E402
    RATE,
    T0,
    Scene,
    _fftconv,
    build_scene,
    drive,
    echo_only_mask,
    erle_db,
    false_vad,
    load_wav16,
    near_recall,
    room_response,
    turn_starts,
    xcorr_lag,
)

DEV = 48000
L_OUT, L_IN = 0.15, 0.10


def _pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


# ---- cpu ------------------------------------------------------------------------------------
def _steps(s: Scene) -> tuple[np.ndarray, np.ndarray, int]:
    far = (s.far / 32768.0).astype(np.float32)
    return far, s.mic, int(s.seconds * 100) - 1


def _run_pass(step: Callable[[int], None], n: int) -> tuple[float, list[float], float]:
    times = []
    c0 = time.process_time()
    for k in range(n):
        t = time.perf_counter_ns()
        step(k)
        times.append((time.perf_counter_ns() - t) / 1000.0)
    return float(np.mean(times)), times, (time.process_time() - c0) / n * 1e6


def bench_cpu(passes: int = 3) -> dict[str, Any]:
    from livekit import rtc

    s = build_scene(delay_s=0.25, far_kind="speech")
    far, mic, n = _steps(s)

    def make(kind: str) -> Callable[[int], None]:
        if kind == "copy":
            def step(k: int) -> None:
                np.array(far[k * 480 : (k + 1) * 480], copy=True)
                if k % 2:
                    j = (k - 1) * 160
                    mic[j : j + 320].tobytes()
            return step
        if kind == "soxr":
            rs = soxr.ResampleStream(DEV, RATE, 1, dtype="float32", quality="LQ")

            def step(k: int) -> None:
                rs.resample_chunk(far[k * 480 : (k + 1) * 480])
                if k % 2:
                    j = (k - 1) * 160
                    mic[j : j + 320].tobytes()
            return step
        if kind in ("apm_off", "apm_aec"):
            apm = rtc.AudioProcessingModule(echo_cancellation=kind == "apm_aec")
            rb = bytearray(960)
            rv = np.frombuffer(rb, np.int16)
            rf = rtc.AudioFrame(rb, DEV, 1, 480)
            cb = bytearray(320)
            cv = np.frombuffer(cb, np.int16)
            cf = rtc.AudioFrame(cb, RATE, 1, 160)
            tmp = np.zeros(480, np.float32)

            def step(k: int) -> None:
                np.multiply(far[k * 480 : (k + 1) * 480], 32768.0, out=tmp)
                np.copyto(rv, np.clip(tmp, -32768, 32767), casting="unsafe")
                apm.process_reverse_stream(rf)
                if k % 2:  # a 20 ms capture frame every other step, as two 10 ms APM frames
                    j = (k - 1) * 160
                    for h in (0, 160):
                        cv[:] = mic[j + h : j + h + 160]
                        apm.process_stream(cf)
            return step
        ns = kind == "canceller_ns_hpf"
        c = EchoCanceller(noise_suppression=ns, high_pass_filter=ns, leak_check=not kind.endswith("no_leak"))
        fa, mi = (far_dry, mic_dry) if "_dry" in kind else (far, mic)

        def step(k: int) -> None:
            c.feed_reference(fa[k * 480 : (k + 1) * 480], DEV, T0 + k / 100 + L_OUT)
            if k % 2:
                j = (k - 1) * 160
                c.process_capture(mi[j : j + 320], T0 + j / RATE - L_IN)
        return step

    # the virtual rig's room (issue 19): a dry -20 dB path, the simulator's voice, the user 1 s
    # into reply 2: the gate's keep rule fits the far end on every frame of a reply there
    dry = build_scene(delay_s=0.25, far_kind="voice", echo_gain_db=-20.0, reverb=0.0, near_gain_db=-4.0,
                      far_spans=((0.5, 1.5), (9.0, 14.0)))
    far_dry, mic_dry, _ = _steps(dry)
    kinds = ["copy", "soxr", "apm_off", "apm_aec", "canceller", "canceller_ns_hpf", "canceller_no_leak",
             "canceller_dry", "canceller_dry_no_leak"]
    res: dict[str, Any] = {}
    best: dict[str, tuple[float, list[float], float]] = {}
    for _ in range(passes):  # interleaved, so a burst of load elsewhere hits every variant
        for kind in kinds:
            mean, times, cpu = _run_pass(make(kind), n)
            if kind not in best or mean < best[kind][0]:
                best[kind] = (mean, times, cpu)
    for kind in kinds:
        mean, times, cpu = best[kind]
        res[kind] = {"us_mean": round(mean, 1), "us_p50": round(_pct(times, 50), 1),
                     "us_p99": round(_pct(times, 99), 1), "us_max": round(max(times), 1),
                     "cpu_us_per_step": round(cpu, 1), "core_pct": round(mean / 100.0, 2)}
    for kind in kinds:
        res[kind]["x_copy"] = round(res[kind]["us_mean"] / res["copy"]["us_mean"], 1)
        res[kind]["x_apm_off"] = round(res[kind]["us_mean"] / res["apm_off"]["us_mean"], 2)
    print("\nCPU per 10 ms step (48 kHz reference block + half a 20 ms capture frame), best of "
          f"{passes} passes of {n} steps:")
    print(f"{'variant':18} {'mean us':>8} {'p50':>7} {'p99':>7} {'max':>8} {'cpu us':>7} {'% core':>7} "
          f"{'x copy':>7} {'x apm_off':>9}")
    for kind in kinds:
        r = res[kind]
        print(f"{kind:18} {r['us_mean']:8.1f} {r['us_p50']:7.1f} {r['us_p99']:7.1f} {r['us_max']:8.1f} "
              f"{r['cpu_us_per_step']:7.1f} {r['core_pct']:7.2f} {r['x_copy']:7.1f} {r['x_apm_off']:9.2f}")
    return res


# ---- the leak check -----------------------------------------------------------------------------
def bench_leak(calls: int = 300) -> dict[str, Any]:
    from hydrad.engine.echo_leak import EchoLeakDetector

    s = build_scene(delay_s=0.04, far_kind="speech")
    c = EchoCanceller()
    drive(c, s)
    det = EchoLeakDetector()
    far16 = soxr.resample(s.far, DEV, RATE)
    for k in range(200):  # 2 s of far end and mic in
        det.reference(far16[k * 160 : (k + 1) * 160])
        det.capture(s.mic[k * 160 : (k + 1) * 160])
    x = np.random.default_rng(1).standard_normal(det._nfft)
    times: dict[str, list[float]] = {"fft": [], "near_bound": []}
    for _ in range(calls):  # interleaved with the baseline
        t = time.perf_counter()
        np.fft.irfft(np.fft.rfft(x))
        times["fft"].append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        det.near_bound()
        times["near_bound"].append((time.perf_counter() - t) * 1e6)
    res = {k: {"us_p50": round(_pct(v, 50), 1), "us_p99": round(_pct(v, 99), 1)} for k, v in times.items()}
    res["x_fft"] = round(res["near_bound"]["us_p50"] / res["fft"]["us_p50"], 1)
    res["frames"] = c.frames
    res["frames_tested"] = c._leak.tests if c._leak else 0
    res["leak_frames"] = c.leak_frames
    print(f"\nleak check per call: p50 {res['near_bound']['us_p50']} us, p99 {res['near_bound']['us_p99']} us "
          f"= {res['x_fft']} x one rfft+irfft of {det._nfft} (p50 {res['fft']['us_p50']} us); ran on "
          f"{res['frames_tested']} of {res['frames']} capture frames of the scene (muted {res['leak_frames']})")
    return res


# ---- latency ------------------------------------------------------------------------------------
def bench_latency() -> dict[str, Any]:
    s = build_scene(delay_s=0.04, far_kind="speech")
    near_only = Scene(np.zeros_like(s.far), DEV, np.zeros_like(s.echo), s.near, s.noise,
                      np.clip(np.round(s.near + s.noise), -32768, 32767).astype(np.int16),
                      s.delay_s, [], s.near_at)
    a, b = int(10.0 * RATE), int(13.4 * RATE)
    res: dict[str, Any] = {}
    for name, kw in (("aec", {}), ("aec_ns_hpf", {"noise_suppression": True, "high_pass_filter": True})):
        c = EchoCanceller(**kw)
        out = drive(c, near_only)
        lag = xcorr_lag(near_only.mic[a:b], out[a:b], 1600)
        st = c.stats()
        res[name] = {"lag_samples": lag, "lag_ms": round(lag / RATE * 1000, 2),
                     "capture_us_per_10ms": st["capture_us_mean_total"],
                     "capture_us_max_per_10ms": st["capture_us_max"]}
    print("\nAdded capture latency (near end only, far end silent; input vs output cross-correlation):")
    for name, r in res.items():
        print(f"  {name:11} {r['lag_samples']:4d} samples = {r['lag_ms']:5.2f} ms algorithmic; "
              f"processing {r['capture_us_per_10ms']} us per 10 ms (max {r['capture_us_max_per_10ms']} us)")
    return res


# ---- contention --------------------------------------------------------------------------------
def bench_contention(seconds: float = 5.0) -> dict[str, Any]:
    s = build_scene(delay_s=0.25, far_kind="speech")
    far, mic, _ = _steps(s)
    n = int(seconds * 100)
    res: dict[str, Any] = {}
    for busy in (False, True):
        for mode in ("copy", "inline", "worker"):
            stop = threading.Event()

            def burn() -> None:
                x = 0
                while not stop.is_set():
                    for i in range(2000):
                        x += i * i

            burner = threading.Thread(target=burn, daemon=True)
            c = EchoCanceller()
            put_t: dict[float, int] = {}
            lat: list[float] = []

            def emit(pcm: bytes, t_adc: float) -> None:
                lat.append((time.perf_counter_ns() - put_t.pop(t_adc)) / 1000.0)

            w = AecWorker(c, emit) if mode == "worker" else None
            if w:
                w.start()
            durs: list[float] = []
            if busy:
                burner.start()
            next_t = time.perf_counter() + 0.01
            for k in range(n):
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_t += 0.01
                t0 = time.perf_counter_ns()
                blk = far[k * 480 : (k + 1) * 480]
                t_dac = T0 + k / 100 + L_OUT
                j = (k - 1) * 160
                if mode == "copy":
                    np.array(blk, copy=True)
                    if k % 2:
                        mic[j : j + 320].tobytes()
                elif mode == "inline":
                    c.feed_reference(blk, DEV, t_dac)
                    if k % 2:
                        c.process_capture(mic[j : j + 320].tobytes(), T0 + j / RATE - L_IN)
                else:
                    w.put_reference(blk, DEV, t_dac)
                    if k % 2:
                        t_adc = T0 + j / RATE - L_IN
                        put_t[t_adc] = time.perf_counter_ns()
                        w.put_capture(mic[j : j + 320].tobytes(), t_adc)
                durs.append((time.perf_counter_ns() - t0) / 1000.0)
            if w:
                w.stop(timeout=5)
            stop.set()
            if busy:
                burner.join()
            key = f"{mode}{'_busy' if busy else ''}"
            res[key] = {"cb_us_mean": round(statistics.fmean(durs), 1), "cb_us_p99": round(_pct(durs, 99), 1),
                        "cb_us_max": round(max(durs), 1), "cb_over_1ms": sum(d > 1000 for d in durs),
                        "cb_over_4ms": sum(d > 4000 for d in durs), "callbacks": n}
            if lat:
                res[key].update(queue_us_p50=round(_pct(lat, 50), 1), queue_us_p99=round(_pct(lat, 99), 1),
                                queue_us_max=round(max(lat), 1))
    print(f"\nCallback duration, 10 ms period, {n} callbacks each (switch interval "
          f"{sys.getswitchinterval() * 1000:.0f} ms); '_busy' = a CPU-bound Python thread runs alongside:")
    print(f"{'mode':13} {'mean us':>8} {'p99 us':>8} {'max us':>8} {'>1 ms':>6} {'>4 ms':>6}   "
          "worker queue -> emitted (p50/p99/max us)")
    for key, r in res.items():
        q = (f"{r['queue_us_p50']}/{r['queue_us_p99']}/{r['queue_us_max']}" if "queue_us_p50" in r else "")
        print(f"{key:13} {r['cb_us_mean']:8.1f} {r['cb_us_p99']:8.1f} {r['cb_us_max']:8.1f} "
              f"{r['cb_over_1ms']:6d} {r['cb_over_4ms']:6d}   {q}")
    return res


# ---- quality ----------------------------------------------------------------------------------
def bench_quality() -> dict[str, Any]:
    res: dict[str, Any] = {}
    cases = [("speech", 0.04, {}), ("speech", 0.25, {}), ("speech", 0.7, {}),
             ("speech", 0.7, {"auto_predelay": False}),
             ("speech", 0.25, {"noise_suppression": True, "high_pass_filter": True}),
             ("voice1", 0.04, {}), ("voice1", 0.25, {})]
    print("\nQuality (tests/test_aec_scene.py scenes; false = webrtcvad mode-2 frames > -50 dBFS in "
          "echo-only 20 ms frames; recall = near-end frames > -40 dBFS during double talk):")
    print(f"{'far end':7} {'delay':>5} {'options':24} {'ERLE dB':>7} {'false raw':>10} {'false aec':>9} "
          f"{'recall':>6} {'near dB':>7}  speech_started raw -> aec")
    for kind, delay, kw in cases:
        if kind == "speech":
            s = build_scene(delay_s=delay, far_kind="speech")
        else:
            s = build_scene(delay_s=delay, seconds=8.0, far_spans=((0.5, 7.5),), near_at=None)
        c = EchoCanceller(**kw)
        out = drive(c, s)
        erle = erle_db(s, out, echo_only_mask(s, 160))
        raw_f, total = false_vad(s, s.mic)
        f, _ = false_vad(s, out)
        row: dict[str, Any] = {"erle_db": round(erle, 1), "false_raw": raw_f, "false_aec": f, "echo_only_frames": total,
                               "starts_raw": turn_starts(s.mic), "starts_aec": turn_starts(out),
                               "stats": {k: v for k, v in c.stats().items() if not k.endswith(("_us_mean", "_us_max"))}}
        if s.near_at is not None:
            a, b = int(s.near_at * RATE), int((s.near_at + 3.3) * RATE)
            lag = xcorr_lag(s.near[a:b], out[a:b], 400)
            row["recall"], _ = near_recall(s, out, lag=lag)
            row["recall_ser6"] = _recall_ser(s, out, lag, -6.0)
            clean = s.near[a:b] + s.noise[a:b]
            kept = out[a + lag : b + lag].astype(np.float64)
            row["near_gain_db"] = round(10 * np.log10(np.sum(kept**2) / np.sum(clean**2)), 1)
        name = ",".join(f"{k}={v}" for k, v in kw.items()) or "-"
        res[f"{kind}_{int(delay * 1000)}ms_{name}"] = row
        rec = f"{row['recall']:.2f}" if "recall" in row else "-"
        ng = f"{row['near_gain_db']:.1f}" if "near_gain_db" in row else "-"
        print(f"{kind:7} {int(delay * 1000):5d} {name[:24]:24} {erle:7.1f} {raw_f:4d}/{total:<5d} {f:9d} {rec:>6} {ng:>7}  "
              f"{row['starts_raw']} -> {row['starts_aec']}")
    return res


def _recall_ser(s: Scene, out: np.ndarray, lag: int, ser_db: float) -> float:
    """Recall on near-end frames not more than ``-ser_db`` dB under the echo."""
    from tests.test_aec_scene import _active, frame_db, vad_flags

    clean = np.clip(np.round(s.near + s.noise), -32768, 32767).astype(np.int16)
    nd, ed = frame_db(s.near, 320), frame_db(s.echo, 320)
    ref = vad_flags(clean) & (nd > -40) & (nd >= ed + ser_db)
    t = np.arange(len(ref)) * 0.02
    sel = ref & np.array([_active(s.far_spans, a, a + 0.02) for a in t])
    o = np.concatenate([out[lag:], np.zeros(lag, np.int16)])
    return round(float(np.mean(vad_flags(o)[: len(ref)][sel])), 3)


# ---- voices -------------------------------------------------------------------------------------
def _jittered_buzz(n: int, seconds: float, rate: int, jitter: float = 0.10, seed: int = 3) -> np.ndarray:
    """The simulator's buzz (same harmonics, 4 Hz AM, -10 dBFS peak) with the fundamental
    redrawn every period from N(f0, jitter * f0): no longer periodic."""
    rng = np.random.default_rng(seed)
    f0 = response_f0(n)
    total = int(seconds * rate)
    per = int(rate / f0) + 1
    f = f0 * (1 + jitter * np.repeat(rng.standard_normal(total // per + 2), per)[:total])
    ph = 2 * np.pi * np.cumsum(f) / rate
    t = np.arange(total) / rate
    w = sum(np.sin(k * ph) / k for k in range(1, HARMONICS + 1)) * (1 + 0.45 * np.sin(2 * np.pi * 4 * t)) / 1.45
    return w / np.abs(w).max() * 32767 * 10 ** (-10 / 20)


def _one_span(far_span: np.ndarray, delay: float) -> Scene:
    far = np.zeros(int(8.0 * DEV))
    far[DEV // 2 : DEV // 2 + len(far_span)] = far_span[: len(far) - DEV // 2]
    echo = soxr.resample(_fftconv(far, room_response(DEV, delay)), DEV, RATE, quality="HQ")
    noise = np.random.default_rng(107).standard_normal(len(echo)) * 32768 * 10 ** (-65 / 20)
    mic = np.clip(np.round(echo + noise), -32768, 32767).astype(np.int16)
    return Scene(far, DEV, echo, np.zeros(len(echo)), noise, mic, delay, [(0.5, 7.5)], None)


def bench_voices() -> dict[str, Any]:
    from hydrad.sim.voice import dominant_frequency, synthesize

    res: dict[str, Any] = {}
    rows = [(f"reply {n} ({response_f0(n):.0f} Hz)", lambda n=n: np.frombuffer(synthesize(n, 7.0, DEV), "<i2").astype(float))
            for n in range(1, 11)]
    rows.append(("speech (hello.wav)", lambda: np.resize(soxr.resample(load_wav16("hello"), RATE, DEV), 7 * DEV)))
    rows += [(f"reply {n} + {int(j * 100)}% jitter", lambda n=n, j=j: _jittered_buzz(n, 7.0, DEV, jitter=j))
             for j in (0.10, 0.20) for n in (2, 5, 8)]
    print("\nFar-end material vs AEC3 (one 7 s span; ERLE dB / webrtcvad false frames > -50 dBFS "
          "of ~330 echo-only frames / simulator speech_started count):")
    print(f"{'far end':24} {'40 ms':>22} {'250 ms':>22}   dominant_frequency (Hz)")
    for name, make in rows:
        x = make()
        cells = []
        for delay in (0.04, 0.25):
            s = _one_span(x, delay)
            out = drive(EchoCanceller(), s)
            erle = erle_db(s, out, echo_only_mask(s, 160))
            f, total = false_vad(s, out)
            starts = len(turn_starts(out))
            res[f"{name} {int(delay * 1000)}ms"] = {"erle_db": round(erle, 1), "false": f, "frames": total, "starts": starts}
            cells.append(f"{erle:5.1f} / {f:3d} / {starts}")
        f0 = dominant_frequency(np.clip(np.round(soxr.resample(x, DEV, RATE)), -32768, 32767).astype("<i2").tobytes(), RATE)
        res[name] = {"dominant_frequency": round(f0, 1)}
        print(f"{name:24} {cells[0]:>22} {cells[1]:>22}   {f0:6.1f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all",
                    choices=["all", "cpu", "leak", "latency", "contention", "quality", "voices"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--switch-ms", type=float, default=None,
                    help="sys.setswitchinterval for the run (Python's default: 5 ms)")
    args = ap.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1000.0)
    import livekit.rtc

    print(f"python {platform.python_version()} {platform.machine()}, livekit "
          f"{getattr(livekit.rtc, '__version__', '?')}, numpy {np.__version__}, soxr {soxr.__version__}")
    out: dict[str, Any] = {}
    todo = ["cpu", "leak", "latency", "contention", "quality", "voices"] if args.what == "all" else [args.what]
    for what in todo:
        out[what] = globals()[f"bench_{what}"]()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
