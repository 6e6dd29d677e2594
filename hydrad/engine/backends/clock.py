"""A simulated duplex device driven by a clock thread on absolute deadlines.

Tick ``k`` fires at ``anchor + k * block`` (``time.monotonic()``). It hands the engine

* the input block covering ``[anchor + (k-1)*block, anchor + k*block)``: it was "captured"
  during the block that just ended, so ``t_adc = anchor + (k-1)*block``;
* the output block covering ``[anchor + k*block, anchor + (k+1)*block)``: the simulated DAC
  has no latency, so ``t_dac = anchor + k*block``.

Block sizes come from absolute sample positions (``round(k * block * rate)``), so rates whose
block is not a whole number of samples (22050 Hz, 10 ms) never drift. Deadlines are absolute,
so the clock does not drift either; a tick that is late by up to ``max_late_blocks`` blocks is
still run (a short catch-up), beyond that the missed ticks are skipped (``Host.count_late``)
and the clock resyncs instead of bursting.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from .base import LOST, Backend, DeviceError, Host


class ClockedBackend(Backend):
    """Base of ``null`` and ``wav``. Subclasses set rates/channels in :meth:`_open_devices`
    and may override :meth:`_fill_input` / :meth:`_consume_output`."""

    in_dtype: Any = np.float32
    out_dtype: Any = np.float32

    def __init__(self, options: dict[str, Any], block_ms: float, host: Host) -> None:
        super().__init__(options, block_ms, host)
        self.block = self.block_ms / 1000.0
        if not 1.0 <= self.block_ms <= 200.0:
            raise DeviceError(f"block_ms={block_ms} is outside 1..200")
        self.in_rate = 16000
        self.in_channels = 1
        self.out_rate = 24000
        self.out_channels = 1
        self.anchor: float | None = None
        self.max_late_blocks = int(options.get("max_late_blocks", 4))
        # fault injection, for testing the engine's reopen path
        self._fail_opens = int(options.get("simulate_open_failures", 0))
        self._loss_after = options.get("simulate_loss_after")
        self._opens = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._inbuf = np.zeros((0, 1), self.in_dtype)
        self._outbuf = np.zeros((0, 1), self.out_dtype)

    # -- subclass hooks ---------------------------------------------------------------------
    def _open_devices(self) -> None:
        """Open files etc.; set in/out rates and channels and (optionally) ``self.anchor``."""

    def _close_devices(self) -> None:
        pass

    def _fill_input(self, start: int, buf: np.ndarray) -> None:
        """Fill ``buf`` (frames x channels) with input samples ``start .. start+len(buf)``."""
        buf.fill(0)

    def _consume_output(self, start: int, buf: np.ndarray) -> None:
        """The engine filled ``buf`` with output samples ``start .. start+len(buf)``."""

    def _info(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        common = {"latency": 0.0, "block_ms": self.block_ms, "t0": self.anchor}
        inp = {"name": f"{self.name}:in", "rate": self.in_rate, "channels": self.in_channels,
               "dtype": np.dtype(self.in_dtype).name, **common}
        out = {"name": f"{self.name}:out", "rate": self.out_rate, "channels": self.out_channels,
               "dtype": np.dtype(self.out_dtype).name, **common}
        return inp, out

    # -- Backend ----------------------------------------------------------------------------
    def open(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        self._opens += 1
        if self._opens <= self._fail_opens:
            raise DeviceError(f"simulated open failure {self._opens}/{self._fail_opens}")
        self._open_devices()
        if self.anchor is None:
            self.anchor = time.monotonic()
        max_in = int(math.ceil(self.block * self.in_rate)) + 2
        max_out = int(math.ceil(self.block * self.out_rate)) + 2
        self._inbuf = np.zeros((max_in, self.in_channels), self.in_dtype)
        self._outbuf = np.zeros((max_out, self.out_channels), self.out_dtype)
        return self._info()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        loss_at = None
        if self._loss_after is not None and self._opens == 1 + self._fail_opens:
            loss_at = time.monotonic() + float(self._loss_after)
        self._thread = threading.Thread(
            target=self._run, args=(loss_at,), name=f"{self.name}-clock", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2.0)
        self._close_devices()

    # -- the clock thread -------------------------------------------------------------------
    def _pos(self, k: int, rate: int) -> int:
        return int(round(k * self.block * rate))

    def _run(self, loss_at: float | None) -> None:
        assert self.anchor is not None
        anchor, block = self.anchor, self.block
        host = self.host
        k = max(0, math.ceil((time.monotonic() - anchor) / block))
        late_limit = self.max_late_blocks * block
        stop = self._stop
        while not stop.is_set():
            deadline = anchor + k * block
            now = time.monotonic()
            if deadline > now:
                # Event.wait is the sleep (so close() interrupts it at once)
                if stop.wait(deadline - now):
                    break
                now = time.monotonic()
            if now - deadline > late_limit:
                k_now = int((now - anchor) / block)
                host.count_late(k_now - k)
                k = k_now
                continue
            if loss_at is not None and now >= loss_at:
                host.device_event(LOST, "simulated device loss")
                return
            try:
                self._tick(k)
            except Exception as exc:  # a device fault (e.g. the speaker file became unwritable)
                host.device_event(LOST, f"{type(exc).__name__}: {exc}")
                return
            k += 1

    def _tick(self, k: int) -> None:
        anchor, block = self.anchor, self.block
        i0, i1 = self._pos(k - 1, self.in_rate), self._pos(k, self.in_rate)
        o0, o1 = self._pos(k, self.out_rate), self._pos(k + 1, self.out_rate)
        inb = self._inbuf[: i1 - i0]
        outb = self._outbuf[: o1 - o0]
        self._fill_input(i0, inb)
        self.host.process(inb, outb, anchor + (k - 1) * block, anchor + k * block, 0)  # type: ignore[operator]
        self._consume_output(o0, outb)
