"""Acoustic echo cancellation for the engine: WebRTC AEC3 through livekit's APM (issue 7).

One :class:`EchoCanceller` wraps one ``livekit.rtc.AudioProcessingModule`` for the life of an
audio session (never recreated per reply: AEC3's converged state is worth keeping). It takes

* the **far end** (:meth:`EchoCanceller.feed_reference`): exactly what is handed to the output
  device, at the device rate, with the block's ``t_dac`` (silence, ducking and fades
  included: after a flush the reference must not run ahead of what is really played);
* the **near end** (:meth:`EchoCanceller.process_capture`): the engine's 16 kHz mono PCM16
  capture frames (any multiple of 10 ms) with their ``t_adc``; it returns the cleaned frame.

**Reference rate.** The far end goes to the APM *at the device rate* (any rate with a whole
number of samples in 10 ms, up to 48 kHz: 16/24/32/44.1/48 kHz...; the APM resamples it
internally). Rates above 48 kHz are decimated by an integer factor (boxcar mean; only the
< M leftover samples carry over between blocks); other rates (22.05 kHz) go through soxr LQ
to 48 kHz. A *streaming* resampler in Python is otherwise avoided: it releases its output in
bursts, so the reference reaches the APM 16-27 ms late and jittering, and AEC3 then fails
outright on short echo paths (measured on speech: 41 dB ERLE with the device-rate reference,
3.9 dB with soxr MQ to 16 kHz at a 40 ms path, 4.3 dB with LQ at 20 ms; docs/aec.md).
``reference_rate`` forces a rate (soxr LQ, for experiments only). The reverse rate changes
only when the output device reopens at another rate (WebRTC reinitialises on a format
change; a new device is a new echo path anyway; cancelling resumes, tested).

**Delay.** The APM's "stream delay" is how much far end it has been given beyond the sample
whose echo is in the capture frame it is processing (WebRTC's ``(t_render - t_analyze) +
(t_process - t_capture)``). From the timestamps alone (no wall clock, so it stays right when a
worker processes the capture later): ``path delay = t_dac(end of the reference fed so far) -
t_adc(end of the capture frame)``, about output latency + input latency (+ the acoustic path,
a few ms). It is smoothed (EMA, alpha 0.05 per capture frame) and the hint given to the APM
is clamped to 0..500 ms (libwebrtc rejects more; AEC3 ignores the hint anyway and searches
itself, up to about 500 ms). For longer paths (Bluetooth, big buffers) the reference is
**pre-delayed** in a ring of 10 ms frames so the APM sees about ``predelay_target_ms``
(150 ms) of it: the pre-delay engages above ``predelay_above_ms`` (300 ms) and is re-chosen
only when the remainder leaves ``[predelay_min_ms, predelay_above_ms]`` (hysteresis: a
jittery estimate does not move the reference around). AEC3 needs the reference at least
~5 ms ahead of its echo (measured; a path delay below that is not cancelled).

**Threads.** ``feed_reference`` (output side) and ``process_capture`` (input side) may run on
different threads at once: each side's state belongs to that side, the native APM calls run
under one lock held only for the call (libwebrtc is built for render and capture on two
threads; the lock is cheap insurance for the FFI layer), the far-end activity intervals have
their own lock held for a few list operations, ``stats()`` reads plain attributes (a snapshot
may be off by a frame). Each ctypes call releases the GIL and must take it back, so inside a
PortAudio callback every APM call is a chance to wait for another thread's GIL slice: the
recommended place is :class:`AecWorker`, one thread fed by a queue (numbers: docs/aec.md).

**Observability** (``stats()``): frames processed, delays, time per 10 ms frame, and two echo
estimates over 10 ms capture frames during which the far end is *active* (a reference frame
above ``far_active_dbfs`` was played within ``[t_adc - tail_ms, t_adc_end]``):

* ``residual_echo_dbfs``: the median level (dBFS) of the cleaned capture over the last
  ``window_s`` seconds of such frames. The median keeps near-end speech (the user talking in
  fewer than half of those frames) from reading as residual echo, while a canceller that
  fails shows at once;
* ``erle_db``: the median of (input dB - output dB) over the same frames, counting only frames
  whose input is above ``erle_floor_dbfs`` (-60: something is audible at the mic).

**Residual echo gate** after AEC3: its rules are :mod:`hydrad.engine.echo_gate` (pure), the
echo path's strength they need is :mod:`hydrad.engine.echo_coupling` (measured at each
reply's start), the delay line they compare with is :mod:`hydrad.engine.echo_leak`; this
module measures each frame, applies the verdict and counts.

``make_canceller(mode, ...)`` maps ``audio.aec`` (``off`` | ``webrtc`` | ``system``) to an
:class:`EchoCanceller` or None.

Fallback where livekit has no wheel (32-bit ARM, musl): ``aec-audio-processing`` (the same
AEC3; builds from its sdist for minutes with a C++ toolchain; its reverse stream must be fed
at the capture rate). Not wired here; ``audio.aec = "system"`` with a PipeWire/PulseAudio
echo-cancel source is the other way out. See docs/aec.md.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from typing import Any, Callable

import numpy as np
import soxr

from hydrad.engine.echo_coupling import EchoCoupling
from hydrad.engine.echo_gate import APM_LATENCY, HOLD_FRAMES, STEADY_FRAMES, Verdict, decide, double_talk
from hydrad.engine.echo_gate import Frame as GateFrame
from hydrad.engine.echo_leak import EchoLeakDetector

CAPTURE_RATE = 16000          # the engine's uplink rate: the APM's capture stream
FRAME_S = 0.010               # the APM takes exactly 10 ms frames
MAX_APM_DELAY_MS = 500        # libwebrtc rejects a larger stream delay
MAX_APM_RATE = 48000
CAP_N = CAPTURE_RATE // 100   # 160 samples
_GATE_TAIL_S = 0.5            # the gate watches this long after the far end (room tail + path)
_RESYNC_FRAMES = 3            # the far end's lead on the capture moved this many frames: resync
_DAC_STEP_S = 0.005           # the output's DAC timeline moved this much between two blocks
_INSTALL_HINT = (
    "audio.aec = \"webrtc\" needs livekit's AudioProcessingModule: "
    "pip install 'livekit>=1.2,<2' (the 'aec' extra: pip install 'hydrad[aec]'). "
    "livekit has wheels for x86_64 and aarch64 glibc (manylinux_2_28), macOS arm64 and Windows; "
    "on 32-bit ARM (armv7l) or musl there is none and pip would pick livekit 0.2.3, which has no APM: "
    "there use audio.aec = \"system\" (a PipeWire/PulseAudio echo-cancel source) "
    "or see docs/aec.md for the aec-audio-processing fallback (builds from source)"
)


def _to_16k(frame: np.ndarray) -> np.ndarray:
    """A 10 ms reference frame at its APM rate, at 16 kHz for the echo leak test (a mean over
    whole-number ratios, linear interpolation otherwise: shapes only, no filter needed)."""
    n = len(frame)
    if n == CAP_N:
        return frame
    if n % CAP_N == 0:
        return frame.reshape(CAP_N, n // CAP_N).mean(axis=1, dtype=np.float32)
    return np.interp(np.arange(CAP_N) * (n / CAP_N), np.arange(n), frame).astype(np.float32)


class AecUnavailable(RuntimeError):
    """The in-engine canceller was asked for but livekit's APM cannot be loaded."""


def load_rtc() -> Any:
    """``livekit.rtc`` with an ``AudioProcessingModule``, or :class:`AecUnavailable`."""
    try:
        from livekit import rtc  # noqa: PLC0415 (optional dependency, ~130 ms import)
    except ImportError as exc:
        raise AecUnavailable(f"{_INSTALL_HINT} (import failed: {exc})") from None
    if not hasattr(rtc, "AudioProcessingModule") or not hasattr(rtc, "AudioFrame"):
        version = getattr(rtc, "__version__", "?")
        raise AecUnavailable(f"{_INSTALL_HINT} (livekit rtc {version} has no AudioProcessingModule)")
    return rtc


def apm_reference_rate(device_rate: int) -> tuple[int, int]:
    """(rate the APM gets, integer decimation factor) for an output device rate.

    Device rates with a whole number of samples per 10 ms up to 48 kHz go as they are
    (factor 1); higher ones are divided by the smallest integer that gives such a rate
    (96000 -> 48000, 88200 -> 44100); (0, 0) when there is none (then soxr is used)."""
    if device_rate <= MAX_APM_RATE:
        return (device_rate, 1) if device_rate % 100 == 0 and device_rate >= 8000 else (0, 0)
    for m in range(2, 64):
        if device_rate % m == 0:
            r = device_rate // m
            if r <= MAX_APM_RATE and r % 100 == 0:
                return r, m
    return 0, 0


def _db(energy: float, n: int) -> float:
    """dBFS of ``n`` PCM16-scale samples with sum of squares ``energy`` (floor -120)."""
    if energy <= 0.0:
        return -120.0
    return max(-120.0, 10.0 * math.log10(energy / (n * 32768.0 * 32768.0)))


class _Timing:
    """Time per 10 ms frame: cumulative mean, and mean/max since the last ``take``."""

    __slots__ = ("total_ns", "frames", "win_max_ns", "win_ns", "win_frames")

    def __init__(self) -> None:
        self.total_ns = 0
        self.frames = 0.0
        self.win_max_ns = 0.0
        self.win_ns = 0
        self.win_frames = 0.0

    def add(self, ns: int, frames: float) -> None:
        if frames <= 0:
            return
        self.total_ns += ns
        self.frames += frames
        self.win_ns += ns
        self.win_frames += frames
        per = ns / frames
        if per > self.win_max_ns:
            self.win_max_ns = per

    def take(self, prefix: str) -> dict[str, float | None]:
        wf, wn, wm = self.win_frames, self.win_ns, self.win_max_ns
        self.win_ns, self.win_frames, self.win_max_ns = 0, 0.0, 0.0
        return {
            f"{prefix}_us_mean": round(wn / wf / 1000.0, 1) if wf else None,
            f"{prefix}_us_max": round(wm / 1000.0, 1) if wf else None,
            f"{prefix}_us_mean_total": round(self.total_ns / self.frames / 1000.0, 1) if self.frames else None,
        }


class AecDump:
    """What the canceller was given, in the order it was given (like WebRTC's aecdump), for
    diagnosing echo that leaks: ``far.raw`` (the far end as played, 10 ms frames of PCM16 at
    ``reference_rate``, before the pre-delay and the lead resync), ``near.raw`` (the capture
    before cancelling, PCM16 16 kHz), ``out.raw`` (after the canceller and the residual echo
    gate: what goes up), ``far_t.f64`` (each far-end frame's ``t_dac``, float64, NaN if
    unknown) and ``order.txt`` (one line per 10 ms capture frame: how many far-end frames had
    come before it, so the two streams line up as the canceller saw them whatever the clocks
    said, its ``t_adc``, and what the gate did: ``a`` far end active, ``L`` leak check
    muted, ``K``/``R`` kept (the mic / the delay line's rest went up), ``0`` muted, ``-``
    none; a line ``reset`` where the device was reopened). A fresh
    canceller fed the same way makes the same decisions (``bench/aec_dump.py --replay``).
    Turned on by ``HYDRAD_AEC_DUMP=<dir>`` in the engine's environment; about 200 KB/s at
    48 kHz. Written by the thread that runs the canceller."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self._far = open(os.path.join(directory, "far.raw"), "wb")  # noqa: SIM115
        self._near = open(os.path.join(directory, "near.raw"), "wb")  # noqa: SIM115
        self._out = open(os.path.join(directory, "out.raw"), "wb")  # noqa: SIM115
        self._order = open(os.path.join(directory, "order.txt"), "w")  # noqa: SIM115
        self._far_t = open(os.path.join(directory, "far_t.f64"), "wb")  # noqa: SIM115
        self.far_frames = 0

    def far(self, frame: np.ndarray, rate: int, t_dac: float | None) -> None:
        if self.far_frames == 0:
            self._order.write(f"# reference_rate {rate}\n")
        self._far.write(frame.tobytes())
        self._far_t.write(np.float64(np.nan if t_dac is None else t_dac).tobytes())
        self.far_frames += 1

    def near(self, raw: np.ndarray, cleaned: np.ndarray, t_adc: float | None, flags: str) -> None:
        self._near.write(raw.tobytes())
        self._out.write(cleaned.tobytes())
        self._order.write(f"{self.far_frames} {'nan' if t_adc is None else f'{t_adc:.6f}'} {flags or '-'}\n")

    def reset(self) -> None:
        self._order.write("reset\n")

    def close(self) -> None:
        for f in (self._far, self._near, self._out, self._order, self._far_t):
            f.close()


class EchoCanceller:
    """WebRTC AEC3 (livekit APM) between the engine's playback and its 16 kHz capture.

    Keyword-only constructor arguments:

    * ``noise_suppression`` / ``high_pass_filter`` / ``auto_gain_control``: the APM's other
      stages (default off: AEC alone; NS adds ~6 ms of latency, docs/aec.md);
    * ``reference_rate``: force the APM reverse rate (None: the device rate, see the module
      doc; a forced rate is reached with a streaming soxr resampler: experiments only);
    * ``auto_predelay`` (True): pre-delay the reference for paths longer than
      ``predelay_above_ms`` (300) so the APM sees about ``predelay_target_ms`` (150); re-chosen
      when the remainder leaves ``[predelay_min_ms (40), predelay_above_ms]``; at most
      ``max_predelay_ms`` (3000);
    * ``far_active_dbfs`` (-50): a 10 ms reference frame above it means "far end active";
      ``tail_ms`` (150): how long the echo may ring on after it;
    * ``window_s`` (5.0): the residual-echo/ERLE medians cover this much far-end-active
      capture; ``erle_floor_dbfs`` (-60): quieter input frames are left out of the ERLE;
    * ``gate_db`` (15; 0 turns it off): the **residual echo gate**, see :meth:`process_capture`;
    * ``resync`` (True): keep the far end's lead on the capture as it was at the start when
      either stream loses frames (see ``_track_lead``);
    * ``leak_check`` (True; needs the gate): the gate also mutes frames AEC3 passed at least
      3 dB louder than a delay line fitted to the far end leaves
      (:class:`~hydrad.engine.echo_leak.EchoLeakDetector`), and gives back frames AEC3
      suppressed that the delay line and the measured echo path cannot explain (the keep
      rule, :mod:`hydrad.engine.echo_gate`: a user AEC3 took for echo).
    """

    def __init__(
        self,
        *,
        noise_suppression: bool = False,
        high_pass_filter: bool = False,
        auto_gain_control: bool = False,
        reference_rate: int | None = None,
        auto_predelay: bool = True,
        predelay_above_ms: float = 300.0,
        predelay_target_ms: float = 150.0,
        predelay_min_ms: float = 40.0,
        max_predelay_ms: float = 3000.0,
        far_active_dbfs: float = -50.0,
        tail_ms: float = 150.0,
        window_s: float = 5.0,
        erle_floor_dbfs: float = -60.0,
        gate_db: float = 15.0,
        leak_check: bool = True,
        resync: bool = True,
    ) -> None:
        rtc = load_rtc()
        if not 0.0 <= gate_db <= 60.0:
            raise ValueError(f"gate_db {gate_db} must be 0..60 (0: no residual echo gate)")
        if reference_rate is not None and apm_reference_rate(reference_rate) != (reference_rate, 1):
            raise ValueError(f"reference_rate {reference_rate} must be 8000..48000 with whole 10 ms frames")
        if not 0 <= predelay_min_ms < predelay_target_ms < predelay_above_ms <= 450:
            raise ValueError("need 0 <= predelay_min_ms < predelay_target_ms < predelay_above_ms <= 450")
        if not 0 <= max_predelay_ms <= 10000:
            raise ValueError("max_predelay_ms must be in 0..10000")
        self._rtc = rtc
        self.noise_suppression = bool(noise_suppression)
        self.high_pass_filter = bool(high_pass_filter)
        self.auto_gain_control = bool(auto_gain_control)
        t0 = time.perf_counter()
        self._apm: Any = rtc.AudioProcessingModule(
            echo_cancellation=True,
            noise_suppression=self.noise_suppression,
            high_pass_filter=self.high_pass_filter,
            auto_gain_control=self.auto_gain_control,
        )
        self.create_ms = (time.perf_counter() - t0) * 1000.0
        self._lock = threading.Lock()        # around the APM's native calls only
        # -- reference side (output thread); per-rate state is built by _restart_reference --
        self._forced_rate = reference_rate
        self._max_predelay_frames = int(max_predelay_ms / 10)
        self.ref_rate = 0                    # rate the APM gets (0: nothing fed yet)
        self.ref_n = 0
        self.decimation = 1
        self._ref_in_rate: int | None = None
        self._rs: soxr.ResampleStream | None = None
        self._dec_rest = np.zeros(0, np.float32)
        self._ref_in_pos = 0                 # device samples since the stream (re)started
        self._ref_out_pos = 0                # APM-rate samples framed since then
        self._ref_acc = np.zeros(0, np.float32)
        self._ref_acc_n = 0
        self._ref_tmp = np.zeros(0, np.float32)
        self._ring = np.zeros((0, 0), np.int16)
        self._ring_cap = self._max_predelay_frames + 64
        self._ring_head = 0                  # index of the oldest held frame
        self._ring_count = 0
        self._ref_view = np.zeros(0, np.int16)
        self._ref_frame: Any = None
        self._far_thr = 0.0
        self._pushed_end: float | None = None  # t_dac of the end of the newest pushed frame
        self.reference_frames = 0            # 10 ms frames given to the APM
        self._ref_base: float | None = None  # t_dac of the stream's sample 0, per the newest block
        self.output_steps = 0                # times it stepped (read by the capture side)
        self._steps_seen = 0
        self.pushed_frames = 0               # ... put into the pre-delay ring (resync padding included)
        self._ref_pad = 0                    # resync: far-end frames of silence to put in
        self._cap_count = 0                  # capture frames processed, resync silence included
        self._leads: list[int] = []          # pushed - captured, per capture frame (capture side)
        self._lead0: float | None = None     # its baseline
        self._resync_soon = False            # a reopen: check after 10 frames
        self.resync = bool(resync)
        self.resyncs = 0
        self.resync_frames = 0               # net capture (+) or far-end (-) frames of silence put in
        self.reference_dropped = 0           # frames lost (ring full; cannot happen by design)
        self.rate_changes = 0
        self._t_ref = _Timing()
        # -- far-end activity (written by the output side, read by the capture side) --
        self.far_active_dbfs = float(far_active_dbfs)
        self._tail_s = tail_ms / 1000.0
        self._act: list[list[float]] = []    # merged [t_dac start, t_dac end] of active frames
        self._act_lock = threading.Lock()
        # -- delay / pre-delay (written by the capture side, read by the output side) --
        self.auto_predelay = bool(auto_predelay)
        self._pd_above = predelay_above_ms / 1000.0
        self._pd_target = predelay_target_ms / 1000.0
        self._pd_min = predelay_min_ms / 1000.0
        self.predelay_frames = 0
        self.path_delay: float | None = None  # smoothed t_dac(pushed end) - t_adc(frame end), s
        self.delay_ms: int | None = None      # the hint given to the APM (clamped)
        self.delay_outliers = 0
        self.predelay_changes = 0
        # -- capture side (input thread) --
        self._cap_buf = bytearray(CAP_N * 2)
        self._cap_view = np.frombuffer(self._cap_buf, np.int16)
        self._cap_frame = rtc.AudioFrame(self._cap_buf, CAPTURE_RATE, 1, CAP_N)
        self._cap_f = np.zeros(CAP_N, np.float32)
        self.frames = 0                      # 10 ms capture frames processed
        self.errors = 0
        self.last_error: str | None = None
        self._t_cap = _Timing()
        # -- echo estimates --
        self._win = max(10, int(window_s * 100))
        self._in_db = np.zeros(self._win, np.float32)
        self._out_db = np.zeros(self._win, np.float32)
        self._win_i = 0
        self._win_n = 0
        self.far_active_frames = 0
        self._erle_floor = float(erle_floor_dbfs)
        # -- residual echo gate (capture side) --
        self.gate_db = float(gate_db)
        self._gate_ratio = 10.0 ** (self.gate_db / 10.0) if self.gate_db > 0 else 0.0
        self._gate_gain = 1.0                # gain applied at the end of the previous frame
        self._e_in_prev = 0.0                # energy of the previous capture frame (before the APM)
        self._gate_ramp = np.linspace(0.0, 1.0, CAP_N + 1, dtype=np.float32)[1:]
        self.gated_frames = 0                # 10 ms frames the gate closed on
        self._gate_hold = 0                  # frames the gate stays open after near-end speech
        self._leak = EchoLeakDetector() if leak_check and self.gate_db > 0 else None
        self.leak_frames = 0                 # frames muted as AEC3 having lost the echo path
                                             # (louder than its input, or failing the leak check)
        self.kept_frames = 0                 # frames AEC3 suppressed as echo that the echo path
                                             # cannot explain: the microphone went up
        self.double_talk_frames = 0          # far-end-active frames holding a user (echo_gate)
        self.double_talk_cut_frames = 0      # ... that went up 10 dB or more under the mic
        self._keep_mix = 0.0                 # share of that rest in the previous frame's output
        self._mic_hist = np.zeros(CAP_N + APM_LATENCY, np.float32)
        self._alt = np.zeros(CAP_N, np.float32)  # what a kept frame sends
        self._far_thr16 = CAP_N * 32768.0 * 32768.0 * 10 ** (self.far_active_dbfs / 10.0)
        self.coupling = EchoCoupling(min_far=self._far_thr16)  # the echo path's strength
        self.dump: AecDump | None = None     # set by the engine from HYDRAD_AEC_DUMP

    # ---- far end ------------------------------------------------------------------------
    def feed_reference(self, pcm: Any, rate: int, t_dac: float | None) -> None:
        """One output block exactly as handed to the device: mono float ([-1, 1]) or int16
        (an array, or PCM16 LE bytes), at the device ``rate``; ``t_dac`` = when its first
        sample is heard (None: unknown; the delay estimate then ignores this block).

        Cut into 10 ms APM frames (the remainder waits for the next block), held
        ``predelay_frames`` in the ring, then given to the APM. The block is not kept (the
        engine's scratch buffer may be passed). Output thread or worker; a native error is
        counted in ``errors``, never raised.
        """
        t_start = time.perf_counter_ns()
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = np.frombuffer(pcm, "<i2")
        x = np.asarray(pcm)
        scale = 1.0 / 32768.0 if x.dtype == np.int16 else 1.0
        if x.ndim == 2:  # frames x channels: the mean (int16 stays at PCM16 scale, then scaled)
            x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        rate = int(rate)
        if rate != self._ref_in_rate:
            self._restart_reference(rate)
        n = len(x)
        if n == 0:
            return
        p_block = self._ref_in_pos
        self._ref_in_pos += n
        if self._rs is not None:
            y = self._rs.resample_chunk(x.astype(np.float32) * np.float32(scale))
        elif self.decimation > 1:
            m = self.decimation
            xs = x.astype(np.float32) * np.float32(scale)
            if len(self._dec_rest):
                xs = np.concatenate([self._dec_rest, xs])
            k = len(xs) // m
            y = xs[: k * m].reshape(k, m).mean(axis=1)
            self._dec_rest = xs[k * m :].copy()
        else:
            y = x
        m = len(y)
        a = self._ref_acc_n
        if a + m > len(self._ref_acc):
            grown = np.zeros(2 * (a + m), np.float32)
            grown[:a] = self._ref_acc[:a]
            self._ref_acc = grown
        acc = self._ref_acc
        acc[a : a + m] = y
        if scale != 1.0 and y is x:
            acc[a : a + m] *= np.float32(scale)
        a += m
        # APM-rate sample k of this stream plays at base + k / ref_rate (decimation and
        # soxr streams are time-aligned with their input; the newest block anchors the map)
        base = None if t_dac is None else t_dac - p_block / rate
        if base is not None:  # the output timeline stepped: a stall re-buffered the playback
            if self._ref_base is not None and abs(base - self._ref_base) > _DAC_STEP_S:
                self.output_steps += 1
            self._ref_base = base
        fn = self.ref_n
        i = 0
        tmp = self._ref_tmp
        while a - i >= fn:
            seg = acc[i : i + fn]
            energy = float(np.dot(seg, seg)) * (32768.0 * 32768.0)
            t_frame = None if base is None else base + self._ref_out_pos / self.ref_rate
            np.multiply(seg, 32768.0, out=tmp)
            np.rint(tmp, out=tmp)
            np.clip(tmp, -32768.0, 32767.0, out=tmp)
            self._push(tmp, energy, t_frame)
            self._ref_out_pos += fn
            i += fn
        if i:
            rest = a - i
            acc[:rest] = acc[i:a]
            a = rest
        self._ref_acc_n = a
        self._t_ref.add(time.perf_counter_ns() - t_start, n / rate / FRAME_S)

    def _restart_reference(self, rate: int) -> None:
        """A new device rate: the APM rate, the framing and the time map start over (the
        pre-delay ring is dropped: its frames are at the old rate)."""
        if self._forced_rate is not None:
            apm_rate, dec = self._forced_rate, 1
            use_soxr = rate != apm_rate
        else:
            apm_rate, dec = apm_reference_rate(rate)
            use_soxr = apm_rate == 0
            if use_soxr:
                apm_rate, dec = MAX_APM_RATE, 1
        self._rs = (soxr.ResampleStream(rate, apm_rate, 1, dtype="float32", quality="LQ")
                    if use_soxr else None)
        self.decimation = dec
        self._dec_rest = np.zeros(0, np.float32)
        if self._ref_in_rate is not None:
            self.rate_changes += 1
        self._ref_in_rate = rate
        self._ref_in_pos = self._ref_out_pos = 0
        self._ref_acc_n = 0
        self._ref_base = None
        if apm_rate != self.ref_rate:
            self.ref_rate = apm_rate
            self.ref_n = fn = apm_rate // 100
            self._ref_acc = np.zeros(4 * fn + 8192, np.float32)
            self._ref_tmp = np.zeros(fn, np.float32)
            self._ring = np.zeros((self._ring_cap, fn), np.int16)
            buf = bytearray(fn * 2)
            self._ref_view = np.frombuffer(buf, np.int16)
            self._ref_frame = self._rtc.AudioFrame(buf, apm_rate, 1, fn)
            self._far_thr = fn * 32768.0 * 32768.0 * 10 ** (self.far_active_dbfs / 10.0)
        self._ring_head = self._ring_count = 0

    def _push(self, frame_f: np.ndarray, energy: float, t_frame: float | None) -> None:
        pad = self._ref_pad
        if pad:  # a resync asked by the capture side (see _track_lead): silence first
            with self._act_lock:
                pad, self._ref_pad = self._ref_pad, 0
            for _ in range(pad):
                self._ring_put(np.zeros(self.ref_n, np.float32))
        if self.dump is not None:
            self.dump.far(frame_f.astype(np.int16), self.ref_rate, t_frame)
        self._ring_put(frame_f)
        if t_frame is not None:
            t_end = t_frame + FRAME_S
            if energy > self._far_thr:
                with self._act_lock:
                    act = self._act
                    if act and act[-1][1] >= t_frame - 0.002:
                        act[-1][1] = t_end
                    else:
                        act.append([t_frame, t_end])
                        if len(act) > 4096:  # nobody reads them (no capture): stay bounded
                            del act[:2048]
            self._pushed_end = t_end
        # release what exceeds the pre-delay; after the pre-delay shrank, drain the excess at
        # up to 4 frames per new frame rather than in one burst (AEC3 buffers only so many
        # render frames between two capture frames)
        released = 0
        cap = self._ring_cap
        while self._ring_count > self.predelay_frames and released < 4 + pad:
            released += 1
            np.copyto(self._ref_view, self._ring[self._ring_head])
            self._ring_head = (self._ring_head + 1) % cap
            self._ring_count -= 1
            if self._leak is not None:
                self._leak.reference(_to_16k(self._ref_view))
            try:
                with self._lock:
                    self._apm.process_reverse_stream(self._ref_frame)
            except Exception as exc:  # RuntimeError from the FFI (or closed): count it
                self._error(exc)
            self.reference_frames += 1

    def _ring_put(self, frame_f: np.ndarray) -> None:
        cap = self._ring_cap
        if self._ring_count >= cap:  # cannot happen (max_predelay < ring); never block
            self._ring_head = (self._ring_head + 1) % cap
            self._ring_count -= 1
            self.reference_dropped += 1
        slot = (self._ring_head + self._ring_count) % cap
        np.copyto(self._ring[slot], frame_f, casting="unsafe")
        self._ring_count += 1
        self.pushed_frames += 1

    def _track_lead(self) -> None:
        """Keep the far end as many frames ahead of the capture as it was at the start.

        AEC3 pairs the two streams by sample count. When the capture loses samples the far
        end does not (a duplex stream's input backlog dropped by a reopen after a stall, an
        input overrun), every echo lands that much earlier in the capture than before; after
        a few such events it arrives *before* its reference and AEC3 cannot cancel it at all
        (recorded: 20 ms ahead at the start, 170 ms after seven 60 ms stalls). The lead
        (reference frames pushed minus capture frames processed) is constant while nothing
        is lost: its median over the first 50 capture frames is the baseline, and when the
        median over 50 frames (10 after a device reopen) is off by ``_RESYNC_FRAMES`` (1 after
        a reopen) or more, the missing frames are put back at once as silence: capture frames
        the APM processes and the leak check counts (what goes up is not touched), or far-end
        frames when the far end is the one that lost them. Both streams then show the gap
        that really happened, and the echo's lag is what it was."""
        if self._ref_pad or not self.resync:
            return  # the last resync is still being applied
        self._leads.append(self.pushed_frames - self._cap_count)
        n = len(self._leads)
        if self._lead0 is None:
            if n >= 50:
                self._lead0 = float(np.median(self._leads))
                self._leads.clear()
            return
        if n < (10 if self._resync_soon else 50):
            return
        d = int(round(float(np.median(self._leads)) - self._lead0))
        threshold = 1 if self._resync_soon else _RESYNC_FRAMES
        self._leads.clear()
        self._resync_soon = False
        if abs(d) < threshold:
            return
        self.resyncs += 1
        self.resync_frames += d
        if d < 0:
            with self._act_lock:
                self._ref_pad = -d
            return
        view = self._cap_view
        view[:] = 0
        for _ in range(d):
            try:
                with self._lock:
                    self._apm.process_stream(self._cap_frame)
            except Exception as exc:
                self._error(exc)
        self._cap_count += d
        if self._leak is not None:
            self._leak.skip_capture(d * CAP_N)

    # ---- near end -----------------------------------------------------------------------
    def process_capture(self, frame: Any, t_adc: float | None) -> Any:
        """Cancel the echo in one 16 kHz mono PCM16 capture frame of any multiple of 10 ms
        (the engine's 10/20/30/40 ms frames are split into 10 ms APM frames).

        ``frame``: an int16 array (a new array is returned, the input is left alone) or PCM16
        LE bytes-like (bytes are returned). ``t_adc``: when its first sample hit the ADC
        (None: unknown; the delay estimate, echo metrics and gate skip it). A frame the APM
        fails on is returned unprocessed and counted in ``errors``. Raises ValueError only
        for a wrong shape/dtype/length (a programming error).

        **Residual echo gate** (while the far end is active), per 10 ms frame: the rules of
        :mod:`hydrad.engine.echo_gate` (leak, near, keep, held, residual), measured here
        with the leak check's delay line (:class:`EchoLeakDetector`; ``leak_check``). Muted
        frames are counted in ``gated_frames`` (``leak_frames`` of them for a lost echo
        path), kept ones (AEC3 suppressed a user the far end cannot explain, so the delay
        line's rest went up) in ``kept_frames``; ``double_talk_frames`` counts frames that
        hold a user over the reply, ``double_talk_cut_frames`` those of them that went up
        10 dB or more under the mic.
        Muting and switching ramp over the frame (no click).
        """
        t_start = time.perf_counter_ns()
        as_bytes = isinstance(frame, (bytes, bytearray, memoryview))
        x = np.frombuffer(frame, "<i2") if as_bytes else np.asarray(frame)
        if x.dtype != np.int16 or x.ndim != 1:
            raise ValueError(f"capture frame must be mono int16, got {x.dtype} with shape {x.shape}")
        n = len(x)
        if n == 0 or n % CAP_N:
            raise ValueError(f"capture frame of {n} samples is not a multiple of 10 ms at 16 kHz")
        if t_adc is not None:
            self._update_delay(t_adc + n / CAPTURE_RATE)
        out = np.empty(n, np.int16)
        view = self._cap_view
        f = self._cap_f
        for s in range(0, n, CAP_N):
            seg = x[s : s + CAP_N]
            self._track_lead()  # may process silence through the APM: before this frame's turn
            view[:] = seg
            try:
                with self._lock:
                    self._apm.process_stream(self._cap_frame)
            except Exception as exc:  # pass the audio through rather than drop it
                self._error(exc)
                view[:] = seg
            self.frames += 1
            self._cap_count += 1
            if self._leak is not None:
                self._leak.capture(seg)
            active = gate_active = False
            if t_adc is not None:
                t0 = t_adc + s / CAPTURE_RATE
                active, gate_active = self._far_active(t0, t0 + FRAME_S)
            np.copyto(f, seg, casting="unsafe")
            e_in = float(np.dot(f, f))
            # the APM's output trails its input by ~8 ms: a word's end is still in the output
            # one frame after it left the input
            e_in_recent = max(e_in, self._e_in_prev)
            self._e_in_prev = e_in
            verdict, talk = Verdict.PASS, False
            hist = self._mic_hist  # the capture, delayed as AEC3's output is (for keep)
            hist[:-CAP_N] = hist[CAP_N:]
            hist[-CAP_N:] = f
            leak = self._leak
            far_peak = leak.far_peak() if active and leak is not None else 0.0
            rest, rest_fast = self._lazy_rest() if leak is not None and gate_active else (None, None)
            if t_adc is not None:
                e_rest = None
                if rest_fast is not None and self.coupling.measuring and far_peak > 0.0:
                    r = rest_fast()[-CAP_N:]
                    e_rest = float(np.dot(r, r))
                self.coupling.frame(active, e_in, far_peak, e_rest)
            if gate_active:
                np.copyto(f, view, casting="unsafe")
                e_out = float(np.dot(f, f))
                if active:
                    i = self._win_i
                    self._in_db[i] = _db(e_in, CAP_N)
                    self._out_db[i] = _db(e_out, CAP_N)
                    self._win_i = (i + 1) % self._win
                    self._win_n = min(self._win_n + 1, self._win)
                    self.far_active_frames += 1
                if self._gate_ratio:
                    verdict, talk = self._judge(e_in, e_in_recent, e_out, far_peak, rest, rest_fast)
            dst = out[s : s + CAP_N]
            self._apply(dst, verdict, rest_fast)
            if talk and active:
                self.double_talk_frames += 1
                sent = dst.astype(np.float32)
                if float(np.dot(sent, sent)) * 10.0 < e_in:
                    self.double_talk_cut_frames += 1
            if self.dump is not None:
                flags = (("a" if gate_active else "") + ("L" if verdict is Verdict.LEAK else "")
                         + ("K" if verdict is Verdict.KEEP_MIC else "R" if verdict is Verdict.KEEP_REST else "")
                         + ("0" if verdict.muted else ""))
                self.dump.near(seg, dst, None if t_adc is None else t_adc + s / CAPTURE_RATE, flags)
        self._t_cap.add(time.perf_counter_ns() - t_start, n // CAP_N)
        return out.tobytes() if as_bytes else out

    def _lazy_rest(self) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
        """What the far-end copies leave of the newest 20 ms, fitted on first call only: the
        full fit (the leak rule's), and the fit at the known lag (the keep rule's and the
        coupling's; the full fit's result once there is one)."""
        leak = self._leak
        full: list[np.ndarray] = []
        fast: list[np.ndarray] = []

        def rest() -> np.ndarray:
            if not full:
                full.append(leak.near_rest())  # type: ignore[union-attr]
            return full[0]

        def rest_fast() -> np.ndarray:
            if full:
                return full[0]
            if not fast:
                fast.append(leak.near_rest_at_known_lag())  # type: ignore[union-attr]
            return fast[0]
        return rest, rest_fast

    def _judge(self, e_in: float, e_in_recent: float, e_out: float, far_peak: float,
               rest: Callable[[], np.ndarray] | None,
               rest_fast: Callable[[], np.ndarray] | None) -> tuple[Verdict, bool]:
        """The gate's verdict on a far-end-active frame (``hydrad.engine.echo_gate``), its
        hold and counters kept: (verdict, whether the frame is double talk). ``far_peak``:
        the loudest 10 ms of far end within the echo lags (0 in the gate's tail after the far
        end, or without the leak check); ``rest``, ``rest_fast``: the lazy fits (None
        without the leak check)."""
        c = self.coupling
        path_known = rest is not None and c.value is not None and far_peak >= self._far_thr16
        leak = self._leak
        if leak is not None and self.output_steps != self._steps_seen:
            self._steps_seen = self.output_steps
            leak.mark_moved()  # the echo path moves with the output's timeline

        def steady() -> bool:
            return leak is None or leak.steady(STEADY_FRAMES * CAP_N)

        frame = GateFrame(e_in, e_in_recent, e_out, rest, rest_fast, c.ceiling(far_peak),
                          c.rest_ceiling(far_peak), path_known, steady)
        verdict = decide(frame, self._gate_ratio, self._gate_hold > 0)
        if verdict.muted:
            self.gated_frames += 1
            if verdict is Verdict.LEAK:
                self.leak_frames += 1
                self._gate_hold = 0
        elif verdict.opens:
            self._gate_hold = HOLD_FRAMES
            if verdict.kept:
                self.kept_frames += 1
        elif verdict is Verdict.HELD:
            self._gate_hold -= 1
        return verdict, double_talk(frame)

    def _apply(self, dst: np.ndarray, verdict: Verdict, rest: Callable[[], np.ndarray] | None) -> None:
        """Write what goes up of the APM's output frame (``_cap_view``) into ``dst``: muted,
        passed, or kept (the microphone, or what the far-end copies leave of it, delayed as
        AEC3's output is), ramped from the previous frame's gain and source over the frame
        (no click, no step at the edge)."""
        view = self._cap_view
        f = self._cap_f
        g0, g1 = self._gate_gain, 0.0 if verdict.muted else 1.0
        m0, m1 = self._keep_mix, 1.0 if verdict.kept else 0.0
        self._gate_gain, self._keep_mix = g1, m1
        if verdict is Verdict.KEEP_REST and rest is not None:
            self._alt[:] = rest()[-CAP_N - APM_LATENCY : -APM_LATENCY]
        elif m0 or m1:  # keep_mic, or fading out of a kept run
            self._alt[:] = self._mic_hist[-CAP_N - APM_LATENCY : -APM_LATENCY]
        if g1 == g0 == 1.0 and not (m0 or m1):
            dst[:] = view
            return
        np.copyto(f, view, casting="unsafe")
        if m0 or m1:
            ramp = m0 + (m1 - m0) * self._gate_ramp
            f *= 1.0 - ramp
            f += ramp * self._alt
        if g0 != 1.0 or g1 != 1.0:
            f *= g0 + (g1 - g0) * self._gate_ramp
        np.rint(f, out=f)
        np.clip(f, -32768.0, 32767.0, out=f)
        dst[:] = f

    def _error(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _far_active(self, a: float, b: float) -> tuple[bool, bool]:
        """Was a reference frame above ``far_active_dbfs`` played within [a - tail, b]
        (the echo metrics' window), and within [a - gate tail, b] (the gate's)?"""
        lo = a - self._tail_s
        with self._act_lock:
            act = self._act
            k = 0
            while k < len(act) and act[k][1] < a - _GATE_TAIL_S:
                k += 1
            if k:
                del act[:k]
            if not act or act[0][0] > b:
                return False, False
            return any(e >= lo for _, e in act), True

    def _update_delay(self, t_adc_end: float) -> None:
        end = self._pushed_end
        if end is None:
            return
        raw = end - t_adc_end
        if not -0.1 <= raw <= 10.0:  # no fresh reference (output stopped) or a bogus clock
            self.delay_outliers += 1
            return
        d = self.path_delay
        d = raw if d is None else d + 0.05 * (raw - d)
        self.path_delay = d
        if self.auto_predelay:
            rem = d - self.predelay_frames * FRAME_S
            settled = (self.predelay_frames == 0 and d <= self._pd_above) or (
                self._pd_min <= rem <= self._pd_above)
            if not settled:
                p = 0 if d <= self._pd_above else int(round((d - self._pd_target) / FRAME_S))
                p = max(0, min(p, self._max_predelay_frames))
                if p != self.predelay_frames:
                    self.predelay_frames = p
                    self.predelay_changes += 1
                    if self._leak is not None:  # the echo lags the frames AEC3 gets by this less
                        self._leak.offset = p * CAP_N
        hint = int(round((d - self.predelay_frames * FRAME_S) * 1000.0))
        hint = max(0, min(hint, MAX_APM_DELAY_MS))
        if self.delay_ms is None or abs(hint - self.delay_ms) >= 10:
            try:
                with self._lock:
                    self._apm.set_stream_delay_ms(hint)
                self.delay_ms = hint
            except Exception as exc:
                self._error(exc)

    # ---- lifecycle / stats ----------------------------------------------------------------
    def reset_reference(self) -> None:
        """Forget the far-end stream and the delay estimate (the output device was closed or
        reopened) but keep the APM and its converged state. Call with no feed running
        (from the worker, or with the device stopped)."""
        self._ref_in_rate = None
        self._rs = None
        self._ref_acc_n = 0
        self._dec_rest = np.zeros(0, np.float32)
        self._ring_count = 0
        self._pushed_end = None
        self.path_delay = None
        self._leads.clear()
        self._resync_soon = True
        # the capture restarts too: what the APM still holds of the old stream's last frame
        # is not near-end speech in the new one
        self._e_in_prev = 0.0
        self._mic_hist[:] = 0.0
        if self._leak is not None:
            self._leak.forget_lag()
        if self.dump is not None:
            self.dump.reset()
        # the far-end activity stays: the gate keeps watching across the reopen (AEC3's
        # output right after it can carry the old stream's echo)

    def stats(self) -> dict[str, Any]:
        """For the engine's STATS. Counters are cumulative; ``*_us_mean``/``*_us_max`` (time
        per 10 ms frame) cover the time since the previous ``stats()`` call (None if no frame),
        ``*_us_mean_total`` the whole session; the echo estimates cover the last ``window_s``
        of far-end-active capture (None before 10 such frames)."""
        n = self._win_n
        residual = erle = None
        if n >= 10:
            out_db = self._out_db[:n].copy()
            in_db = self._in_db[:n].copy()
            residual = round(float(np.median(out_db)), 1)
            audible = in_db > self._erle_floor
            if int(audible.sum()) >= 10:
                erle = round(float(np.median(in_db[audible] - out_db[audible])), 1)
        d = self.path_delay
        return {
            "aec": "webrtc",
            "ns": self.noise_suppression,
            "hpf": self.high_pass_filter,
            "agc": self.auto_gain_control,
            "reference_rate": self.ref_rate or None,
            "frames": self.frames,
            "reference_frames": self.reference_frames,
            "reference_dropped": self.reference_dropped,
            "resyncs": self.resyncs,
            "resync_frames": self.resync_frames,
            "output_steps": self.output_steps,
            "path_delay_ms": None if d is None else round(d * 1000.0, 1),
            "predelay_ms": self.predelay_frames * 10,
            "delay_ms": self.delay_ms,
            "predelay_changes": self.predelay_changes,
            "delay_outliers": self.delay_outliers,
            "far_active_frames": self.far_active_frames,
            "residual_echo_dbfs": residual,
            "erle_db": erle,
            "gate_db": self.gate_db,
            "gated_frames": self.gated_frames,
            "leak_check": self._leak is not None,
            "leak_tests": self._leak.tests if self._leak is not None else 0,
            "leak_frames": self.leak_frames,
            "kept_frames": self.kept_frames,
            "echo_coupling_db": (None if self.coupling.value is None
                                 else round(10.0 * math.log10(max(self.coupling.value, 1e-12)), 1)),
            "double_talk_frames": self.double_talk_frames,
            "double_talk_cut_frames": self.double_talk_cut_frames,
            "errors": self.errors,
            "last_error": self.last_error,
            **self._t_cap.take("capture"),
            **self._t_ref.take("reference"),
        }

    def close(self) -> None:
        """Drop the native APM (idempotent). Later calls pass audio through, counted in
        ``errors``."""
        with self._lock:
            self._apm = None
        if self.dump is not None:
            self.dump.close()
            self.dump = None


class AecWorker:
    """Runs an :class:`EchoCanceller` on its own thread, off the audio callbacks.

    The callbacks only copy and enqueue: ``put_reference(mono, rate, t_dac)`` from the output
    callback, ``put_capture(pcm16_bytes, t_adc)`` from the input side (the capture path's
    exact frames). The worker applies them in arrival order, so it alone touches the APM, and
    hands each cleaned frame to ``emit(pcm16_bytes, t_adc)`` (e.g. encode CAPTURE and queue it
    for the writer). The delay estimate uses only the timestamps, so the queue hop does not
    bias it. ``put_reset()`` queues :meth:`EchoCanceller.reset_reference` (device reopened).

    Nothing is dropped or skipped on the way (that would desynchronise the far end from the
    capture); a starved worker shows as ``worker_queue_max`` and ``worker_latency_us_*`` in
    ``stats()``. ``stop()`` processes what is queued, then ends the thread.
    """

    def __init__(self, canceller: EchoCanceller, emit: Callable[[bytes, float], Any],
                 name: str = "engine-aec") -> None:
        self.canceller = canceller
        self._emit = emit
        self._q: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.emitted = 0
        self.queue_max = 0
        self._lat_ns = 0
        self._lat_n = 0
        self._lat_max = 0
        self.failures = 0
        self.last_failure: str | None = None

    def start(self) -> None:
        self._thread.start()

    def put_reference(self, mono: np.ndarray, rate: int, t_dac: float | None) -> None:
        """Output callback: a copy of the block is queued (the caller may reuse its buffer)."""
        self._q.put(("r", np.array(mono, copy=True), rate, t_dac))

    def put_capture(self, pcm: bytes, t_adc: float) -> None:
        """Input side: one capture frame (PCM16 LE bytes, a multiple of 10 ms at 16 kHz)."""
        self._q.put(("c", pcm, t_adc, time.perf_counter_ns()))

    def put_reset(self) -> None:
        self._q.put(("x",))

    def stop(self, timeout: float = 1.0) -> None:
        """Process what is queued, then end the thread."""
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        c = self.canceller
        q = self._q
        while True:
            item = q.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "r":
                    c.feed_reference(item[1], item[2], item[3])
                elif kind == "c":
                    size = q.qsize()
                    if size > self.queue_max:
                        self.queue_max = size
                    out = c.process_capture(item[1], item[2])
                    lat = time.perf_counter_ns() - item[3]
                    self._lat_ns += lat
                    self._lat_n += 1
                    if lat > self._lat_max:
                        self._lat_max = lat
                    self._emit(out, item[2])
                    self.emitted += 1
                else:
                    c.reset_reference()
            except Exception as exc:  # never let the thread die: count and go on
                self.failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"

    def stats(self) -> dict[str, Any]:
        """The canceller's stats plus the queue: ``queue_max`` (items waiting behind a capture
        frame, max since start), ``latency_us_*`` (enqueue -> emitted, since the last call)."""
        n, tot, mx = self._lat_n, self._lat_ns, self._lat_max
        self._lat_n = self._lat_ns = self._lat_max = 0
        return {
            **self.canceller.stats(),
            "worker_emitted": self.emitted,
            "worker_queue_max": self.queue_max,
            "worker_latency_us_mean": round(tot / n / 1000.0, 1) if n else None,
            "worker_latency_us_max": round(mx / 1000.0, 1) if n else None,
            "worker_failures": self.failures,
            "worker_last_failure": self.last_failure,
        }


def make_canceller(mode: str, **kwargs: Any) -> EchoCanceller | None:
    """``audio.aec`` -> a canceller: ``webrtc`` -> :class:`EchoCanceller` (``kwargs`` are its
    constructor's; :class:`AecUnavailable` naming the fix if livekit's APM cannot be loaded);
    ``off`` and ``system`` (the operator supplies an echo-cancelled source) -> None."""
    if mode == "webrtc":
        return EchoCanceller(**kwargs)
    if mode in ("off", "system"):
        return None
    raise ValueError(f"unknown aec mode {mode!r} (expected 'off', 'webrtc' or 'system')")
