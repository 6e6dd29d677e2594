"""``sounddevice`` backend: real microphones and speakers through PortAudio.

One full-duplex ``sd.Stream`` when input and output are the same device and can run at one
rate (one callback, aligned blocks), else an ``InputStream`` and an ``OutputStream`` (two
callbacks, which the engine allows: capture and playout state are disjoint).

Options (``audio.sounddevice`` in the config; all optional):

``input_device`` / ``output_device``
    index, exact name or unique name substring (see :mod:`hydrad.engine.devices`); None =
    the default device. A name that matches nothing while PortAudio does list devices is a
    configuration error and fails at once (CONFIG -> exit 3, the message lists the devices).
    With no devices at all the engine answers READY without devices and retries (DEVICE
    ``unavailable``) until they appear.
``input_rate`` / ``output_rate``
    device rates. None: the first rate the device accepts among its default rate, 48000,
    44100, 32000, 24000, 22050, 16000 (the default rate is the hardware's native one on
    most host APIs; the engine converts with soxr: to 16 kHz mono for the uplink, from the
    session rate for playback).
``input_channels`` / ``output_channels``
    None: 1 if the device accepts it, else 2, else its maximum (capture is downmixed; the
    mono playback signal goes to every channel).
``latency``
    PortAudio's suggested latency: ``"low"`` (default), ``"high"`` or seconds.
``stall_s`` (0.5)
    no callback for this long (after the first one) = the device is lost.
``start_grace_s`` (2.0)
    time allowed for the first callback after start.
``output_volume``, ``mic_gain``, ``aec``, ``aec_gate_db``, ``aec_leak_check``, ``aec_noise_suppression``, ``aec_high_pass_filter``
    applied by the engine (``output_volume``/``mic_gain``; the ``aec*`` keys configure its
    echo canceller, docs/aec.md); accepted here.

The callbacks only convert PortAudio's clock to ``time.monotonic()`` and call
``host.process``: they never block, never log, and allocate nothing themselves (sounddevice
wraps the buffers in two small numpy views per call).

Timing: PortAudio's stream clock need not be CLOCK_MONOTONIC (with ALSA it is the wall
clock), so only differences are used: ``t_adc = now - (currentTime - inputBufferAdcTime)``
and ``t_dac = now + (outputBufferDacTime - currentTime)`` with ``now = time.monotonic()``
at callback entry. A host API that reports no times (``currentTime == 0``) or nonsense
(negative, over 2 s) falls back to the stream latency PortAudio reported at open.

Faults: ``finished_callback`` firing while we did not stop the stream (PortAudio stops a
stream whose device failed, e.g. the sound server died), a callback stall (watchdog thread),
a stream whose delay stays far above the latency PortAudio reported (the latency guard: a
full-duplex stream keeps its input backlog after an xrun, see :meth:`_latency_guard`), or a
failure in the callback -> ``host.device_event("lost", why)``; the engine closes the backend
and reopens it with backoff. Each (re)open after the first re-initialises PortAudio, whose
device list is otherwise frozen at initialisation: a device that appears later (USB plugged
in, sound server started) is found. Status flags (under/overflows) go to the engine with
every block; it counts them in STATS and logs new ones once per STATS interval.

Closing never ``pthread_cancel``s a PortAudio thread that may be running Python (see
:meth:`close`). A device wedged inside the driver can still block ``close``; the daemon's
ping watchdog then restarts the engine.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..devices import INPUT, OUTPUT, DeviceNotFound, list_devices, load_sounddevice, match_device, reinitialize
from .base import LOST, Backend, DeviceError, Host

_RATES = (48000, 44100, 32000, 24000, 22050, 16000)
_KNOWN = {"input_device", "output_device", "input_rate", "output_rate", "input_channels", "output_channels",
          "latency", "stall_s", "start_grace_s", "output_volume", "mic_gain", "aec", "aec_gate_db",
          "aec_leak_check", "aec_noise_suppression", "aec_high_pass_filter"}


def _opt_int(options: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = options.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not lo <= v <= hi:
        raise ValueError(f"sounddevice option {key}={v!r}: expected an integer in {lo}..{hi} or null")
    return int(v)


def _opt_float(options: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = options.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"sounddevice option {key}={v!r}: expected a number in {lo}..{hi}")
    return float(v)


def _opt_device(options: dict[str, Any], key: str) -> str | int | None:
    v = options.get(key)
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or isinstance(v, str):
        return v
    raise ValueError(f"sounddevice option {key}={v!r}: expected a device index, a name or null")


class SounddeviceBackend(Backend):
    name = "sounddevice"

    def __init__(self, options: dict[str, Any], block_ms: float, host: Host) -> None:
        super().__init__(options, block_ms, host)
        unknown = sorted(set(options) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown sounddevice option(s) {unknown}; known: {sorted(_KNOWN)}")
        self.in_spec = _opt_device(options, "input_device")
        self.out_spec = _opt_device(options, "output_device")
        self.in_rate_opt = _opt_int(options, "input_rate", 8000, 192000)
        self.out_rate_opt = _opt_int(options, "output_rate", 8000, 192000)
        self.in_ch_opt = _opt_int(options, "input_channels", 1, 64)
        self.out_ch_opt = _opt_int(options, "output_channels", 1, 64)
        lat = options.get("latency", "low")
        if lat is None:
            lat = "low"
        if not (lat in ("low", "high") or (isinstance(lat, (int, float)) and not isinstance(lat, bool)
                                           and 0.0 <= lat <= 2.0)):
            raise ValueError(f'sounddevice option latency={lat!r}: expected "low", "high" or seconds (0..2)')
        self.latency: str | float = lat
        self.stall_s = _opt_float(options, "stall_s", 0.5, 0.05, 30.0)
        self.start_grace_s = _opt_float(options, "start_grace_s", 2.0, 0.1, 60.0)
        try:
            self.sd = load_sounddevice()
        except ImportError as exc:
            raise DeviceError(str(exc)) from None
        # Fail fast on a device name that matches nothing among the devices PortAudio lists
        # (a configuration error). With no devices at all, open() reports "unavailable" and
        # the engine retries until they appear.
        devices = list_devices(self.sd)
        if devices:
            try:
                match_device(self.in_spec, INPUT, devices)
                match_device(self.out_spec, OUTPUT, devices)
            except DeviceNotFound as exc:
                raise DeviceError(str(exc)) from None
        self._abort = self.sd.CallbackAbort
        self._opens = 0
        self._streams: list[Any] = []
        self._kind = ""
        self._gen = 0
        self._closing = True
        self._lost = False
        self._started_at = 0.0
        self._last_in = 0.0       # monotonic time of the last input (or duplex) callback
        self._last_out = 0.0      # ... output callback
        self._in_lat = 0.0
        self._out_lat = 0.0
        self._in_rate = 0
        self._out_rate = 0
        self._dac_min = 1e9       # output delay (t_dac - now) seen since the last describe()
        self._dac_max = 0.0
        self._adc_max = 0.0
        self._cb_errors = 0
        # latency guard: minimum input/output delay over windows of ~0.25 s of callbacks
        self._win = 25
        self._in_min_cur = self._out_min_cur = 1e9
        self._in_n = self._out_n = 0
        self._in_min_win = self._out_min_win = 0.0   # minimum of the last complete window
        self._in_wins = self._out_wins = 0           # complete windows so far
        self._guard_events = 0
        self._watchdog: threading.Thread | None = None
        self._wd_stop = threading.Event()

    # ---- device selection --------------------------------------------------------------------
    def _check(self, kind: str, index: int, rate: int, ch: int) -> bool:
        check = self.sd.check_input_settings if kind == INPUT else self.sd.check_output_settings
        try:
            check(device=index, samplerate=rate, channels=ch, dtype="float32")
            return True
        except Exception:
            return False

    def _choices(self, kind: str, dev: dict[str, Any]) -> tuple[list[int], list[int]]:
        rate_opt = self.in_rate_opt if kind == INPUT else self.out_rate_opt
        ch_opt = self.in_ch_opt if kind == INPUT else self.out_ch_opt
        max_ch = dev["max_input_channels" if kind == INPUT else "max_output_channels"]
        rates = [rate_opt] if rate_opt else list(dict.fromkeys([int(dev["default_samplerate"]), *_RATES]))
        chans = [ch_opt] if ch_opt else list(dict.fromkeys(c for c in (1, 2, max_ch) if 1 <= c <= max_ch))
        return rates, chans

    def _pick(self, kind: str, dev: dict[str, Any]) -> tuple[int, int]:
        rates, chans = self._choices(kind, dev)
        for ch in chans:
            for r in rates:
                if self._check(kind, dev["index"], r, ch):
                    return r, ch
        raise DeviceError(f"{kind} device [{dev['index']}] {dev['name']!r} accepts none of "
                          f"rates {rates} x channels {chans} (float32)")

    def _pick_duplex(self, din: dict[str, Any], dout: dict[str, Any]) -> tuple[int, int, int] | None:
        """One rate both directions accept (output's preference order), with channels."""
        if self.in_rate_opt and self.out_rate_opt and self.in_rate_opt != self.out_rate_opt:
            return None
        fixed = self.out_rate_opt or self.in_rate_opt
        o_rates, o_chans = self._choices(OUTPUT, dout)
        _, i_chans = self._choices(INPUT, din)
        rates = [fixed] if fixed else o_rates
        for r in rates:
            ci = next((c for c in i_chans if self._check(INPUT, din["index"], r, c)), None)
            co = next((c for c in o_chans if self._check(OUTPUT, dout["index"], r, c)), None)
            if ci is not None and co is not None:
                return r, ci, co
        return None

    # ---- Backend -------------------------------------------------------------------------------
    def open(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        sd = self.sd
        self.close()
        if self._opens:
            try:
                reinitialize(sd)  # PortAudio's device list is frozen at initialisation
            except Exception as exc:
                raise DeviceError(f"PortAudio re-initialisation failed: {exc}") from None
        self._opens += 1
        devices = list_devices(sd)
        try:
            din = match_device(self.in_spec, INPUT, devices)
            dout = match_device(self.out_spec, OUTPUT, devices)
        except DeviceNotFound as exc:
            raise DeviceError(str(exc)) from None
        self._gen += 1
        gen = self._gen
        bs = self.block_ms / 1000.0
        try:
            duplex = self._pick_duplex(din, dout) if din["index"] == dout["index"] else None
            if duplex is not None:
                rate, ci, co = duplex
                try:
                    st = sd.Stream(device=(din["index"], dout["index"]), samplerate=rate,
                                   blocksize=int(round(bs * rate)), channels=(ci, co), dtype="float32",
                                   latency=self.latency, callback=self._cb_duplex,
                                   finished_callback=lambda g=gen: self._finished(g, "duplex"))
                except Exception:
                    duplex = None  # some devices cannot do duplex at one rate: two streams
                else:
                    self._streams = [st]
                    self._kind = "duplex"
                    self._in_rate = self._out_rate = rate
                    self._in_lat, self._out_lat = (float(x) for x in st.latency)
                    i_rate, o_rate, i_ch, o_ch = rate, rate, ci, co
            if duplex is None:
                i_rate, i_ch = self._pick(INPUT, din)
                o_rate, o_ch = self._pick(OUTPUT, dout)
                sin = sd.InputStream(device=din["index"], samplerate=i_rate,
                                     blocksize=int(round(bs * i_rate)), channels=i_ch, dtype="float32",
                                     latency=self.latency, callback=self._cb_input,
                                     finished_callback=lambda g=gen: self._finished(g, "input"))
                self._streams = [sin]
                sout = sd.OutputStream(device=dout["index"], samplerate=o_rate,
                                       blocksize=int(round(bs * o_rate)), channels=o_ch, dtype="float32",
                                       latency=self.latency, callback=self._cb_output,
                                       finished_callback=lambda g=gen: self._finished(g, "output"))
                self._streams.append(sout)
                self._kind = "split"
                self._in_rate, self._out_rate = i_rate, o_rate
                self._in_lat, self._out_lat = float(sin.latency), float(sout.latency)
        except DeviceError:
            self.close()
            raise
        except Exception as exc:  # sd.PortAudioError, ValueError from sounddevice's checks
            self.close()
            raise DeviceError(f"cannot open {din['name']!r} / {dout['name']!r}: {exc}") from None
        common = {"dtype": "float32", "block_ms": self.block_ms, "stream": self._kind}
        inp = {"name": din["name"], "index": din["index"], "hostapi": din["hostapi"], "rate": i_rate,
               "channels": i_ch, "latency": self._in_lat, "blocksize": int(round(bs * i_rate)), **common}
        out = {"name": dout["name"], "index": dout["index"], "hostapi": dout["hostapi"], "rate": o_rate,
               "channels": o_ch, "latency": self._out_lat, "blocksize": int(round(bs * o_rate)), **common}
        return inp, out

    def start(self) -> None:
        self._closing = False
        self._lost = False
        self._last_in = self._last_out = 0.0
        self._win = max(10, int(round(0.25 / (self.block_ms / 1000.0))))
        self._in_min_cur = self._out_min_cur = 1e9
        self._in_n = self._out_n = self._in_wins = self._out_wins = 0
        self._started_at = time.monotonic()
        for st in self._streams:
            st.start()
        self._wd_stop.clear()
        self._watchdog = threading.Thread(target=self._watch, args=(self._gen,), name="sd-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        """Stop without cancelling a thread that may be running Python.

        ``Pa_AbortStream`` on ALSA ``pthread_cancel``s the callback thread. Cancelled while it
        waits for the GIL (entering our callback, or the finished callback after a device
        error), that thread can leave the GIL's mutex locked and the whole engine deadlocks (the
        likely cause of a hang seen once in the device-loss test, right after the finished
        callback ran). So the callbacks are told to end the stream themselves
        (``CallbackAbort``: PortAudio's thread exits normally, after the finished callback),
        and ``abort()`` only runs once the streams are inactive, or after a timeout when the
        device no longer calls back (its thread is then stuck in C, where cancelling is safe)."""
        self._closing = True
        self._wd_stop.set()
        wd, self._watchdog = self._watchdog, None
        if wd is not None and wd is not threading.current_thread():
            wd.join(timeout=1.0)
        streams, self._streams = self._streams, []
        if streams:
            deadline = time.monotonic() + max(0.3, 5 * self.block_ms / 1000.0 + self._out_lat + self._in_lat)
            while time.monotonic() < deadline and any(self._active(st) for st in streams):
                time.sleep(0.003)
        for st in streams:
            try:
                st.abort(ignore_errors=True)  # no drain: buffered playback is dropped at once
            finally:
                st.close(ignore_errors=True)

    @staticmethod
    def _active(st: Any) -> bool:
        try:
            return bool(st.active)
        except Exception:
            return False

    def describe(self) -> dict[str, Any]:
        lo, hi, adc = self._dac_min, self._dac_max, self._adc_max
        self._dac_min, self._dac_max, self._adc_max = 1e9, 0.0, 0.0
        return {
            "device_stream": self._kind or None,
            "device_latency_ms": {"input": round(self._in_lat * 1000, 2), "output": round(self._out_lat * 1000, 2)},
            # output delay (t_dac - callback time) and input delay seen over the last interval
            "dac_delay_ms": [round(lo * 1000, 2), round(hi * 1000, 2)] if hi else None,
            "adc_delay_ms_max": round(adc * 1000, 2) if adc else None,
            # minimum delay of the last complete ~0.25 s window (what the latency guard watches)
            "guard_min_ms": {"input": round(self._in_min_win * 1000, 2), "output": round(self._out_min_win * 1000, 2)},
            "callback_errors": self._cb_errors,
            "latency_guard_reopens": self._guard_events,
        }

    # ---- faults ----------------------------------------------------------------------------------
    def _report(self, gen: int, why: str) -> bool:
        if gen != self._gen or self._closing or self._lost:
            return False
        self._lost = True
        self.host.device_event(LOST, why)
        return True

    def _finished(self, gen: int, which: str) -> None:
        # PortAudio thread; after our own abort()/close() _closing is set and this is ignored
        self._report(gen, f"{which} stream stopped unexpectedly (PortAudio finished it: device error or removed)")

    def _latency_guard(self, gen: int, state: list[int]) -> bool:
        """A stream whose delay stays far above what PortAudio reported at open is reopened.

        Measured on PulseAudio: after a callback stall (an xrun), a full-duplex stream keeps the
        input backlog for good (PortAudio consumes input at the output's pace): 150 ms stalls
        left the capture 181, then 305, then 423 ms late, and the uplink with it. Separate
        streams catch up by themselves. The guard watches the *minimum* delay over ~0.25 s
        windows; two windows in a row above the limit -> ``lost`` (the engine reopens,
        which drops the backlog: a gap of ~0.2 s instead of a permanent delay)."""
        block = self.block_ms / 1000.0
        # measured in normal operation (PulseAudio, 10 ms blocks): window minimum of the input
        # delay 0-10 ms, of the output delay ~1 ms under the reported latency
        lim_in = self._in_lat + block + 0.01
        lim_out = self._out_lat + block + 0.005
        for k, (wins, low, lim, which) in enumerate((
                (self._in_wins, self._in_min_win, lim_in, "input"),
                (self._out_wins, self._out_min_win, lim_out, "output"))):
            if wins == state[2 * k]:
                continue
            state[2 * k] = wins
            state[2 * k + 1] = state[2 * k + 1] + 1 if low > lim else 0
            if state[2 * k + 1] >= 2:
                if self._report(gen, f"{which} latency stuck at {low * 1000:.0f} ms (PortAudio reported "
                                     f"{(self._in_lat if which == 'input' else self._out_lat) * 1000:.0f} ms; "
                                     f"backlog after an xrun): reopening"):
                    self._guard_events += 1
                return True
        return False

    def _watch(self, gen: int) -> None:
        period = min(0.1, self.stall_s / 2)
        split = self._kind == "split"
        guard = [0, 0, 0, 0]  # input windows seen, input strikes, output windows seen, output strikes
        while not self._wd_stop.wait(period):
            if self._latency_guard(gen, guard):
                return
            if gen != self._gen or self._closing:
                return
            now = time.monotonic()
            lasts = [("input", self._last_in), ("output", self._last_out)] if split else [("audio", self._last_in)]
            for which, last in lasts:
                if last == 0.0:
                    if now - self._started_at > self.start_grace_s:
                        self._report(gen, f"no {which} callback {self.start_grace_s:g} s after start")
                        return
                elif now - last > self.stall_s:
                    self._report(gen, f"{which} callbacks stalled: none for {now - last:.2f} s")
                    return
            for st in self._streams:
                try:
                    if not st.active and not self._closing:
                        self._report(gen, "stream is no longer active")
                        return
                except Exception:
                    pass

    # ---- callbacks (PortAudio thread: no blocking, no logging, no allocation of our own) ------
    def _times_in(self, now: float, ti: Any, frames: int) -> float:
        cur = ti.currentTime
        d = cur - ti.inputBufferAdcTime if cur else -1.0
        if not 0.0 <= d < 2.0:
            d = self._in_lat + frames / self._in_rate
        if d > self._adc_max:
            self._adc_max = d
        if d < self._in_min_cur:
            self._in_min_cur = d
        self._in_n += 1
        if self._in_n >= self._win:
            self._in_min_win, self._in_min_cur, self._in_n = self._in_min_cur, 1e9, 0
            self._in_wins += 1
        return now - d

    def _times_out(self, now: float, ti: Any) -> float:
        cur = ti.currentTime
        d = ti.outputBufferDacTime - cur if cur else -1.0
        if not 0.0 <= d < 2.0:
            d = self._out_lat
        if d < self._dac_min:
            self._dac_min = d
        if d > self._dac_max:
            self._dac_max = d
        if d < self._out_min_cur:
            self._out_min_cur = d
        self._out_n += 1
        if self._out_n >= self._win:
            self._out_min_win, self._out_min_cur, self._out_n = self._out_min_cur, 1e9, 0
            self._out_wins += 1
        return now + d

    def _cb_duplex(self, indata: Any, outdata: Any, frames: int, ti: Any, status: Any) -> None:
        if self._closing:  # close() waits for this: the stream ends on PortAudio's own thread
            outdata.fill(0)
            raise self._abort
        now = time.monotonic()
        self._last_in = now
        try:
            self.host.process(indata, outdata, self._times_in(now, ti, frames), self._times_out(now, ti),
                              status._flags)
        except BaseException:  # never raise into PortAudio (the engine's process() does not raise)
            outdata.fill(0)
            self._cb_errors += 1

    def _cb_input(self, indata: Any, frames: int, ti: Any, status: Any) -> None:
        if self._closing:  # close() waits for this: the stream ends on PortAudio's own thread
            raise self._abort
        now = time.monotonic()
        self._last_in = now
        try:
            self.host.process(indata, None, self._times_in(now, ti, frames), 0.0, status._flags)
        except BaseException:
            self._cb_errors += 1

    def _cb_output(self, outdata: Any, frames: int, ti: Any, status: Any) -> None:
        if self._closing:  # close() waits for this: the stream ends on PortAudio's own thread
            outdata.fill(0)
            raise self._abort
        now = time.monotonic()
        self._last_out = now
        try:
            self.host.process(None, outdata, 0.0, self._times_out(now, ti), status._flags)
        except BaseException:
            outdata.fill(0)
            self._cb_errors += 1
