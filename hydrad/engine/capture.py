"""Capture path: device input blocks -> mono -> 16 kHz -> exact ``frame_ms`` PCM16 frames.

Runs inside the audio callback (``Capture.feed``): measured 21 us per 10 ms block of 48 kHz
stereo int16 (downmix, soxr LQ to 16 kHz, framing, encoding) and 8 us for 16 kHz mono on
this project's 2-vCPU machine (docs/engine.md), far below the block period, so no extra
thread and no extra queue hop.
It allocates only the resampler's output array and the encoded frame.

Timestamps: soxr's stream output is time-aligned with its input (output sample ``m`` is input
position ``m * in_rate / 16000``), so the first sample of a frame that starts at output index
``m`` was captured at ``t_adc(block) + m / 16000 - p(block) / in_rate``, where ``p(block)``
is the input position of the most recent block's first sample. Using the newest block as
the reference follows a device clock that drifts against CLOCK_MONOTONIC.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import soxr

from .wire import encode_capture

OUT_RATE = 16000


class Capture:
    def __init__(
        self,
        emit: Callable[[bytes], bool],
        frame_ms: float = 20.0,
        quality: str = "LQ",
    ) -> None:
        """``emit(frame_bytes) -> bool`` queues an encoded CAPTURE frame; False = dropped."""
        n = frame_ms * OUT_RATE / 1000.0
        if n != int(n) or n <= 0:
            raise ValueError(f"frame_ms={frame_ms} is not a whole number of 16 kHz samples")
        self.frame_n = int(n)
        self.quality = quality
        self._emit = emit
        #: optional ``sink(pcm16_bytes, t_adc)``: when set (the echo canceller's worker), each
        #: frame's PCM goes there instead of ``encode_capture`` + ``emit`` (counted in ``frames``)
        self.sink: Callable[[bytes, float], Any] | None = None
        self.in_rate = OUT_RATE
        self.channels = 1
        self.gain = 1.0          # mic gain (linear), applied with the int16 scaling
        self.frames = 0          # frames emitted
        self.dropped = 0         # frames the writer refused (overruns)
        self._rs: soxr.ResampleStream | None = None
        self._in_pos = 0         # input samples fed so far (since configure)
        self._out_pos = 0        # output samples framed so far
        self._acc = np.zeros(0, np.float32)
        self._acc_n = 0
        self._mono = np.zeros(0, np.float32)
        self._tmp = np.zeros(self.frame_n, np.float32)

    def configure(self, in_rate: int, channels: int, max_block: int = 8192) -> None:
        """(Re)start for a device at ``in_rate``/``channels``. Control thread, device stopped."""
        self.in_rate, self.channels = int(in_rate), int(channels)
        self._rs = (
            None
            if self.in_rate == OUT_RATE
            else soxr.ResampleStream(self.in_rate, OUT_RATE, 1, dtype="float32", quality=self.quality)
        )
        self._in_pos = self._out_pos = 0
        self._alloc(max_block)

    def _alloc(self, max_block: int) -> None:
        self._mono = np.zeros(max_block, np.float32)
        out_max = int(max_block * OUT_RATE / self.in_rate) + 4096  # + soxr burst headroom
        self._acc = np.zeros(self.frame_n + out_max, np.float32)
        self._acc_n = 0

    def feed(self, block: np.ndarray, t_adc: float) -> None:
        """One input block (frames x channels, int16 or float32). Audio thread."""
        n = len(block)
        if n > len(self._mono):  # a bigger block than ever before: grow once
            keep = self._acc[: self._acc_n].copy()
            self._alloc(2 * n)
            self._acc[: len(keep)] = keep
            self._acc_n = len(keep)
        mono = self._mono[:n]
        ch = block.shape[1] if block.ndim == 2 else 1
        if ch == 1:
            np.copyto(mono, block.reshape(n), casting="unsafe")
        else:
            np.add.reduce(block, axis=1, dtype=np.float32, out=mono)
        scale = (1.0 / 32768.0 if block.dtype == np.int16 else 1.0) / ch * self.gain
        if scale != 1.0:
            mono *= scale
        p_block = self._in_pos
        self._in_pos += n
        y = mono if self._rs is None else self._rs.resample_chunk(mono)
        m = len(y)
        acc = self._acc
        a = self._acc_n
        if a + m > len(acc):  # cannot happen with the headroom above; never overflow silently
            m = len(acc) - a
        acc[a : a + m] = y[:m]
        a += m
        fn = self.frame_n
        i = 0
        tmp = self._tmp
        base = t_adc - p_block / self.in_rate
        while a - i >= fn:
            t = base + self._out_pos / OUT_RATE
            np.multiply(acc[i : i + fn], 32768.0, out=tmp)
            np.rint(tmp, out=tmp)
            np.clip(tmp, -32768.0, 32767.0, out=tmp)
            sink = self.sink
            if sink is not None:
                sink(tmp.astype("<i2").tobytes(), t)
                self.frames += 1
            elif self._emit(encode_capture(t, tmp.astype("<i2").tobytes())):
                self.frames += 1
            else:
                self.dropped += 1
            self._out_pos += fn
            i += fn
        if i:
            rest = a - i
            acc[:rest] = acc[i:a]
            a = rest
        self._acc_n = a

    def stats(self) -> dict[str, Any]:
        return {"capture_frames": self.frames, "capture_dropped": self.dropped}
