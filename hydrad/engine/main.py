"""The audio engine child process (``python -m hydrad.engine``): the engine end of wire.py.

Threads (no trio, no asyncio):

* **main** reads stdin (``wire.Decoder``, see :class:`Reader`) and handles each message under the control lock.
* **writer** owns stdout: it takes encoded frames (bytes) and callback events (tuples, which it
  encodes) from a ``queue.SimpleQueue`` and writes them in batches.
* **housekeeping** sends STATS every second, drains the playout resampler's tail when the
  buffer runs low, and closes/reopens a lost device with backoff (under the control lock).
* **audio**: the backend's thread (a clock thread, or PortAudio's callback thread) calls
  :meth:`Engine.process` once per block. It never blocks (one short lock with the control
  side), never logs, allocates little; it only ``put``s on the writer queue.

Exit codes: 0 after STOP or stdin EOF (or a broken stdout: the parent is gone); 2 for a
protocol error (``WireError``, bad JSON, a message out of place); 3 for an unusable CONFIG;
1 for an internal error (traceback on stderr). Every non-zero exit first sends a LOG line.
See docs/engine.md.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

import numpy as np

from . import wire
from .backends import base as bk
from .backends import create as create_backend
from .aec import AecDump, AecUnavailable, AecWorker, make_canceller
from .capture import Capture
from .playout import Playout
from .wire import Kind, WireError, encode_capture

EXIT_OK, EXIT_INTERNAL, EXIT_PROTOCOL, EXIT_CONFIG = 0, 1, 2, 3

_QUALITIES = {"QQ", "LQ", "MQ", "HQ", "VHQ"}


class ProtocolError(Exception):
    """The daemon sent something that is not valid here (exit 2)."""


class ConfigError(Exception):
    """CONFIG is unusable (exit 3)."""


def _json(msg: wire.Message) -> dict[str, Any]:
    try:
        return msg.json()
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{msg.kind.name} payload is not a JSON object: {exc}") from None


def _num(obj: dict[str, Any], key: str, default: float | None = None) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{key!r} must be a finite number, got {v!r}")
    return float(v)


class Writer:
    """Owns stdout. ``put`` is thread-safe and never blocks (the audio thread uses it)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        #: called once (from the writer thread) when stdout breaks: the parent is gone
        self.on_broken: Any = None
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.broken = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-writer", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        self.q.put(item)

    def send(self, kind: Kind, obj: dict[str, Any] | None = None) -> None:
        self.q.put(wire.encode_json(kind, obj))

    def qsize(self) -> int:
        return self.q.qsize()

    @staticmethod
    def _encode(item: Any) -> bytes:
        if isinstance(item, (bytes, bytearray)):
            return bytes(item)
        if item[0] == "played":
            _, rid, fa, samples, rate, done, flushed = item
            obj = {"response_id": rid, "first_audible": fa if fa >= 0.0 else None,
                   "samples": samples, "rate": rate, "done": done}
            if flushed:
                obj["flushed"] = True
            return wire.encode_json(Kind.PLAYED, obj)
        raise TypeError(f"unknown writer item {item!r}")

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self.q.get()
            batch = []
            while True:
                if item is None:
                    stop = True
                    break
                try:
                    batch.append(self._encode(item))
                except Exception as exc:  # never let one bad item kill the pipe
                    batch.append(wire.encode_json(Kind.LOG, {
                        "level": "error", "event": "writer_encode_failed", "error": repr(exc)}))
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
            if batch and not self.broken.is_set():
                try:
                    self._stream.write(b"".join(batch))
                    self._stream.flush()
                except (OSError, ValueError):
                    self.broken.set()  # the parent is gone: nobody will read us again
                    if self.on_broken is not None:
                        self.on_broken()

    def close(self, timeout: float = 1.0) -> None:
        self.q.put(None)
        self._thread.join(timeout)


class Engine:
    """Implements :class:`hydrad.engine.backends.base.Host`."""

    def __init__(self, cfg: dict[str, Any], writer: Writer) -> None:
        self.writer = writer
        self.control = threading.RLock()
        backend_name = cfg.get("backend")
        options = cfg.get("options") or {}
        if not isinstance(backend_name, str) or not isinstance(options, dict):
            raise ConfigError('CONFIG needs "backend" (str) and "options" (object)')
        try:
            self.frame_ms = _num(cfg, "frame_ms", 20)
            self.block_ms = _num(cfg, "block_ms", 10)
            self.fade_ms = _num(cfg, "fade_ms", 5)
            self.duck_ms = _num(cfg, "duck_ms", 5)
            self.stats_interval = _num(cfg, "stats_interval", 1.0)
            self.max_queue = int(_num(cfg, "max_queue", 100))
            session_rate = int(_num(cfg, "output_rate", 24000))
            # output volume and mic gain (backend options, applied here for every backend)
            self.output_volume = _num(options, "output_volume", 1.0)
            self.mic_gain = _num(options, "mic_gain", 1.0)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if not 0.0 <= self.output_volume <= 4.0 or not 0.0 <= self.mic_gain <= 16.0:
            raise ConfigError("output_volume must be in 0..4 and mic_gain in 0..16")
        cq = cfg.get("capture_quality", "LQ")
        pq = cfg.get("playout_quality", "HQ")
        if cq not in _QUALITIES or pq not in _QUALITIES:
            raise ConfigError(f"capture_quality/playout_quality must be one of {sorted(_QUALITIES)}")
        if not 1 <= self.block_ms <= 200 or not 0 <= self.fade_ms <= 100:
            raise ConfigError("block_ms must be in 1..200 and fade_ms in 0..100")
        if not 8000 <= session_rate <= 192000:
            raise ConfigError(f"output_rate {session_rate} is outside 8000..192000")
        try:
            self.capture = Capture(self._emit_capture, self.frame_ms, quality=cq)
            self.capture.gain = self.mic_gain
            self.backend = create_backend(backend_name, options, self.block_ms, self)
        except (ValueError, TypeError, bk.DeviceError) as exc:
            raise ConfigError(str(exc)) from None
        # echo canceller (docs/aec.md): cleaned in a worker thread, off the audio callbacks
        self.aec_mode = options.get("aec", "off")
        try:
            canceller = make_canceller(self.aec_mode,
                                       gate_db=float(options.get("aec_gate_db", 15.0)),
                                       leak_check=bool(options.get("aec_leak_check", True)),
                                       noise_suppression=bool(options.get("aec_noise_suppression", False)),
                                       high_pass_filter=bool(options.get("aec_high_pass_filter", False)))
        except (AecUnavailable, ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None  # exit 3: asked for, not available
        self.aec: AecWorker | None = None
        self.backend_name = backend_name
        self.playout = Playout(writer.put, device_rate=24000, input_rate=session_rate,
                               fade_ms=self.fade_ms, duck_ms=self.duck_ms, quality=pq)
        self.block_s = self.block_ms / 1000.0
        self.device_state = "closed"
        self.running = False
        self.input_info: dict[str, Any] | None = None
        self.output_info: dict[str, Any] | None = None
        self.gate_state: tuple[bool, float] | None = None
        # audio-thread counters (written only from process(); with separate input and output
        # streams two threads write them, and the totals may be off by a few: stats only)
        self.callbacks = 0
        self.status_flags = 0
        self.flag_counts = dict.fromkeys(bk.STATUS_NAMES, 0)
        self.late = 0
        self.late_backend = 0
        self.cb_time = 0.0
        self.cb_max = 0.0
        self.cb_count_window = 0
        self._last_cb = 0.0
        self.cb_gap_max = 0.0       # longest interval between two callbacks, per STATS window
        self._flags_logged: dict[int, int] = {}
        self._out_tmp = np.zeros(8192, np.float32)
        self.reference = None  # optional (mono float32 view, t_dac) -> None: the AEC far end
        if canceller is not None:
            if os.environ.get("HYDRAD_AEC_DUMP"):
                canceller.dump = AecDump(os.environ["HYDRAD_AEC_DUMP"])
            aec = self.aec = AecWorker(canceller, self._emit_cleaned)
            self.capture.sink = aec.put_capture
            self.reference = lambda mono, t_dac: aec.put_reference(mono, self.playout.device_rate, t_dac)
        self._opened_once = False
        # housekeeping
        self._events: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reopen_at: float | None = None
        self._reopen_attempt = 0
        self._hk = threading.Thread(target=self._housekeeping, name="engine-hk", daemon=True)

    # ---- logging --------------------------------------------------------------------------
    def log(self, level: str, event: str, **fields: Any) -> None:
        self.writer.send(Kind.LOG, {"level": level, "event": event, **fields})

    # ---- Host (audio thread) ----------------------------------------------------------------
    def _emit_capture(self, frame: bytes) -> bool:
        if self.writer.q.qsize() > self.max_queue:
            return False
        self.writer.q.put(frame)
        return True

    def _emit_cleaned(self, pcm: bytes, t_adc: float) -> None:
        """The AEC worker's output: one echo-cancelled capture frame (worker thread)."""
        if not self._emit_capture(encode_capture(t_adc, pcm)):
            self.capture.dropped += 1

    def process(self, indata: np.ndarray | None, outdata: np.ndarray | None,
                t_adc: float, t_dac: float, status: int = 0) -> None:
        t_in = time.perf_counter()
        now = time.monotonic()
        if self._last_cb:
            gap = now - self._last_cb
            if gap > 2.0 * self.block_s:
                self.late += 1
            if gap > self.cb_gap_max:
                self.cb_gap_max = gap
        self._last_cb = now
        self.callbacks += 1
        if status:
            self.status_flags += 1
            for bit in self.flag_counts:
                if status & bit:
                    self.flag_counts[bit] += 1
        try:
            if outdata is not None:
                n = len(outdata)
                mono = self.playout.render(n, t_dac)
                vol = self.output_volume
                if vol != 1.0:  # mono is the playout's scratch buffer: scale it in place
                    mono *= vol
                    if vol > 1.0:
                        np.clip(mono, -1.0, 1.0, out=mono)
                if outdata.dtype == np.float32:
                    outdata[:] = mono[:, None]
                else:
                    if n > len(self._out_tmp):
                        self._out_tmp = np.zeros(2 * n, np.float32)
                    tmp = self._out_tmp[:n]
                    np.multiply(mono, 32768.0, out=tmp)
                    np.rint(tmp, out=tmp)
                    np.clip(tmp, -32768.0, 32767.0, out=tmp)
                    np.copyto(outdata, tmp[:, None], casting="unsafe")
                if self.reference is not None:
                    self.reference(mono, t_dac)
            if indata is not None:
                self.capture.feed(indata, t_adc)
        except Exception as exc:  # never raise into PortAudio; report as a device fault
            if outdata is not None:
                outdata.fill(0)
            self.device_event(bk.LOST, f"engine callback failed: {exc!r}")
        dt = time.perf_counter() - t_in
        self.cb_time += dt
        self.cb_count_window += 1
        if dt > self.cb_max:
            self.cb_max = dt

    def device_event(self, state: str, error: str | None = None) -> None:
        self._events.put((state, error))
        self._wake.set()

    def count_late(self, n: int = 1) -> None:
        self.late_backend += n

    # ---- lifecycle ----------------------------------------------------------------------------
    def _open(self) -> None:
        """Open + start the backend (control lock held). Raises DeviceError."""
        inp, out = self.backend.open()
        try:
            if out is not None:
                dropped = self.playout.set_device_rate(int(out["rate"]))
                if dropped:
                    self.log("warning", "playout_dropped_on_rate_change", samples=dropped)
            if inp is not None:
                self.capture.configure(int(inp["rate"]), int(inp["channels"]),
                                       max_block=int(2 * self.block_s * inp["rate"]) + 1024)
            self.input_info, self.output_info = inp, out
            self._last_cb = 0.0
            if self.gate_state is not None:
                self.backend.gate(*self.gate_state)
            if self.aec is not None and self._opened_once:
                self.aec.put_reset()  # a reopened device: new latencies, new echo path
            self._opened_once = True
            self.backend.start()
        except Exception:
            self.backend.close()
            raise
        self.running = True
        self.device_state = bk.OPEN

    def start(self) -> dict[str, Any]:
        """Open devices; return the READY payload."""
        ready: dict[str, Any] = {"pid": os.getpid(), "backend": self.backend_name,
                                 "aec": self.aec_mode}
        if self.aec is not None:
            self.aec.start()
        with self.control:
            try:
                self._open()
            except Exception as exc:  # DeviceError, or anything a device library raises
                if not isinstance(exc, bk.DeviceError):
                    exc = bk.DeviceError(f"{type(exc).__name__}: {exc}")
                self.device_state = bk.UNAVAILABLE
                ready.update(input=None, output=None, error=str(exc))
                self._schedule_reopen()
                self._hk.start()
                self.writer.send(Kind.READY, ready)
                self.writer.send(Kind.DEVICE, {"state": bk.UNAVAILABLE, "error": str(exc)})
                self.log("error", "device_unavailable", error=str(exc))
                return ready
        ready.update(input=self.input_info, output=self.output_info)
        self._hk.start()
        self.writer.send(Kind.READY, ready)
        return ready

    def _schedule_reopen(self) -> None:
        delay = min(0.1 * 2 ** self._reopen_attempt, 5.0)
        self._reopen_at = time.monotonic() + delay

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self.control:
            self.running = False
            self.backend.close()
            self.device_state = "closed"
        if self.aec is not None:
            self.aec.stop()  # processes what is queued: the cleaned frames still reach the writer
            self.aec.canceller.close()  # frees the APM and closes a HYDRAD_AEC_DUMP
        self._hk.join(timeout=1.0)

    # ---- housekeeping thread ----------------------------------------------------------------
    def _housekeeping(self) -> None:
        next_stats = time.monotonic() + self.stats_interval
        while not self._stopping.is_set():
            now = time.monotonic()
            timeout = next_stats - now
            if self.playout.pending_tail():
                timeout = min(timeout, self.block_s)
            if self._reopen_at is not None:
                timeout = min(timeout, self._reopen_at - now)
            self._wake.wait(max(0.0, timeout))
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                with self.control:
                    if self._stopping.is_set():
                        return
                    self._handle_device_events()
                    if self._reopen_at is not None and time.monotonic() >= self._reopen_at:
                        self._try_reopen()
                    self.playout.drain_tail_if_low(time.monotonic())
                if time.monotonic() >= next_stats:
                    self._log_new_flags()
                    next_stats += self.stats_interval
                    if next_stats < time.monotonic():
                        next_stats = time.monotonic() + self.stats_interval
                    self.writer.send(Kind.STATS, self.stats())
            except Exception as exc:
                self.log("error", "housekeeping_failed", error=repr(exc),
                         traceback=traceback.format_exc(limit=5))
                time.sleep(0.1)

    def _log_new_flags(self) -> None:
        """A LOG warning when PortAudio status flags (under/overflows) appeared since the last
        STATS: counted in every STATS, and said once per interval in the log."""
        counts = dict(self.flag_counts)
        new = {bk.STATUS_NAMES[b]: c - self._flags_logged.get(b, 0) for b, c in counts.items()
               if c > self._flags_logged.get(b, 0)}
        self._flags_logged = counts
        new.pop("priming_output", None)  # PortAudio's normal start-up, not a fault
        if new:
            self.log("warning", "device_status_flags", new=new, total=self.status_flags)

    def _handle_device_events(self) -> None:
        while True:
            try:
                state, error = self._events.get_nowait()
            except queue.Empty:
                return
            if state != bk.LOST or not self.running:
                continue
            self.running = False
            self.device_state = bk.LOST
            self.writer.send(Kind.DEVICE, {"state": bk.LOST, "error": error})
            self.log("warning", "device_lost", error=error)
            self.backend.close()
            self._reopen_attempt = 0
            self._schedule_reopen()

    def _try_reopen(self) -> None:
        self._reopen_attempt += 1
        self.device_state = bk.REOPENING
        self.writer.send(Kind.DEVICE, {"state": bk.REOPENING, "error": None,
                                       "attempt": self._reopen_attempt})
        try:
            self._open()
        except Exception as exc:  # DeviceError, or anything a device library raises
            if not isinstance(exc, bk.DeviceError):
                exc = bk.DeviceError(f"{type(exc).__name__}: {exc}")
            self.device_state = bk.UNAVAILABLE
            self._schedule_reopen()
            self.writer.send(Kind.DEVICE, {"state": bk.UNAVAILABLE, "error": str(exc),
                                           "attempt": self._reopen_attempt,
                                           "retry_in": round(self._reopen_at - time.monotonic(), 3)
                                           if self._reopen_at else None})
            return
        self._reopen_at = None
        self._reopen_attempt = 0
        self.writer.send(Kind.DEVICE, {"state": bk.OPEN, "error": None,
                                       "input": self.input_info, "output": self.output_info})
        self.log("info", "device_reopened")

    def stats(self) -> dict[str, Any]:
        n = self.cb_count_window
        cb_mean = self.cb_time / n if n else 0.0
        cb_max, gap_max = self.cb_max, self.cb_gap_max
        self.cb_time, self.cb_max, self.cb_count_window, self.cb_gap_max = 0.0, 0.0, 0, 0.0
        p = self.playout
        return {
            "pid": os.getpid(),
            "underruns": p.underruns,
            "underrun_ms": round(p.underrun_s * 1000.0, 3),
            "overruns": self.capture.dropped + self.flag_counts[bk.INPUT_OVERFLOW],
            "buffer_ms": round(p.buffer_ms(), 3),
            "callbacks": self.callbacks,
            "status_flags": self.status_flags,
            "flags": {bk.STATUS_NAMES[b]: c for b, c in self.flag_counts.items()},
            "late_callbacks": self.late + self.late_backend,
            "input_rate": self.input_info["rate"] if self.input_info else None,
            "output_rate": self.output_info["rate"] if self.output_info else None,
            "device_state": self.device_state,
            "capture_frames": self.capture.frames,
            "capture_dropped": self.capture.dropped,
            "writer_queue": self.writer.qsize(),
            "callback_us_mean": round(cb_mean * 1e6, 1),
            "callback_us_max": round(cb_max * 1e6, 1),
            "callback_gap_ms_max": round(gap_max * 1e3, 2),
            "dropped_after_flush": p.dropped_late,
            "overflow_dropped": p.overflow_dropped,
            "aec": self.aec.stats() if self.aec is not None else None,
            **self.backend.describe(),
        }

    # ---- control messages (main thread) -------------------------------------------------------
    def handle(self, msg: wire.Message, t_received: float) -> bool:
        """Handle one message; False means exit (STOP)."""
        k = msg.kind
        if k == Kind.PLAY:
            rid, pcm = wire.decode_play(msg.payload)
            with self.control:
                self.playout.push(rid, pcm)
            self._wake.set()  # the housekeeping thread watches the resampler tail
        elif k == Kind.FLUSH:
            obj = _json(msg)
            with self.control:
                reply = self.playout.flush(t_received, self.running)
            reply = {"seq": obj.get("seq"), **reply}
            if "reason" in obj:
                reply["reason"] = obj["reason"]
            self.writer.send(Kind.FLUSHED, reply)
        elif k == Kind.PING:
            obj = _json(msg)
            self.writer.send(Kind.PONG, {"seq": obj.get("seq"), "t": time.monotonic()})
        elif k == Kind.OUTPUT_FORMAT:
            rate = _num(_json(msg), "rate")
            if rate != int(rate) or not 8000 <= rate <= 192000:
                raise ProtocolError(f"OUTPUT_FORMAT rate {rate} is not an integer in 8000..192000")
            with self.control:
                self.playout.set_input_rate(int(rate))
        elif k == Kind.DUCK:
            gain = _num(_json(msg), "gain")
            with self.control:
                self.playout.duck(gain)
        elif k == Kind.GATE:
            obj = _json(msg)
            is_open = obj.get("open")
            if not isinstance(is_open, bool):
                raise ProtocolError('GATE needs "open": bool')
            t0 = _num(obj, "t0", t_received) if obj.get("t0") is not None else t_received
            with self.control:
                if is_open:
                    self.gate_state = (True, t0)
                self.backend.gate(is_open, t0)
        elif k == Kind.STOP:
            return False
        elif k == Kind.CONFIG:
            raise ProtocolError("CONFIG sent twice")
        else:
            raise ProtocolError(f"{k.name} is an engine->daemon message")
        return True


def _fatal(writer: Writer, code: int, event: str, error: str, **extra: Any) -> int:
    writer.send(Kind.LOG, {"level": "error", "event": event, "error": error, **extra})
    writer.close()
    print(f"hydrad.engine: {event}: {error}", file=sys.stderr)
    return code


class Reader:
    """Messages from stdin, with the monotonic time each one was read.

    Uses ``wire.Decoder`` over raw ``os.read`` chunks rather than ``wire.read_message``:
    the decoder rejects an unknown kind or an oversized length as soon as the 5-byte header
    is in, whereas ``read_message`` first waits for the whole (up to 8 MiB) payload of a
    garbage header, which hangs the engine while the parent keeps the pipe open.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._dec = wire.Decoder()
        self._ready: list[wire.Message] = []
        self._t = 0.0

    def read(self) -> tuple[wire.Message | None, float]:
        while not self._ready:
            data = os.read(self.fd, 1 << 16)
            self._t = time.monotonic()
            if not data:
                return None, self._t
            self._ready = self._dec.feed(data)
        return self._ready.pop(0), self._t


def run(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    if stdin is None:
        # the engine process: a 1 ms GIL switch interval keeps the audio callbacks and the
        # AEC worker from waiting a 5 ms slice behind another thread (docs/aec.md)
        sys.setswitchinterval(0.001)
    reader = Reader((stdin if stdin is not None else sys.stdin.buffer).fileno())
    writer = Writer(stdout if stdout is not None else sys.stdout.buffer)
    engine: Engine | None = None
    try:
        # ---- handshake
        while engine is None:
            msg, _ = reader.read()
            if msg is None:
                writer.close()
                return EXIT_OK
            if msg.kind == Kind.PING:
                writer.send(Kind.PONG, {"seq": _json(msg).get("seq"), "t": time.monotonic()})
                continue
            if msg.kind == Kind.STOP:
                writer.close()
                return EXIT_OK
            if msg.kind != Kind.CONFIG:
                raise ProtocolError(f"first message must be CONFIG, got {msg.kind.name}")
            try:
                engine = Engine(_json(msg), writer)
            except ConfigError as exc:
                return _fatal(writer, EXIT_CONFIG, "config_invalid", str(exc))
            engine.start()

            def _parent_gone(engine: Engine = engine) -> None:
                # main may be blocked reading a stdin the parent still holds: exit from here
                try:
                    engine.stop()
                finally:
                    os._exit(EXIT_OK)

            writer.on_broken = _parent_gone
        # ---- control loop
        while True:
            msg, t_received = reader.read()
            if msg is None:
                break
            if not engine.handle(msg, t_received):
                break
        engine.stop()
        writer.close()
        return EXIT_OK
    except (WireError, ProtocolError) as exc:
        if engine is not None:
            engine.stop()
        return _fatal(writer, EXIT_PROTOCOL, "protocol_error", str(exc))
    except KeyboardInterrupt:
        if engine is not None:
            engine.stop()
        writer.close()
        return EXIT_OK
    except Exception as exc:
        traceback.print_exc()
        try:
            if engine is not None:
                engine.stop()
        finally:
            code = _fatal(writer, EXIT_INTERNAL, "engine_crashed", repr(exc),
                          traceback=traceback.format_exc(limit=8))
        return code
