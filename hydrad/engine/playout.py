"""The playback buffer between the control thread (PLAY/FLUSH/DUCK) and the audio callback.

Threads:

* the control thread (main thread, and the housekeeping thread for tail drains; serialised by
  the engine's control lock) calls :meth:`Playout.push`, :meth:`flush`, :meth:`duck`,
  :meth:`set_input_rate`, :meth:`set_device_rate`, :meth:`drain_tail_if_low`. Resampling
  (``soxr.ResampleStream``) and every allocation happen there.
* the audio thread calls :meth:`render` once per output block. It only slices preallocated
  arrays, copies, bumps counters and ``put``s small tuples on the writer queue.

The shared state (the chunk deque, counters, gain) is guarded by ``self.lock``; it is held
for a few microseconds of memory copies, never across I/O or resampling.

Accounting (see docs/engine.md): each response id gets a :class:`Slot` from a fixed pool.
``render`` counts the samples of each response that reach the device and emits ``PLAYED``
events as tuples ``("played", rid, first_audible, samples, rate, done, flushed)``, which the
writer thread encodes.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable

import numpy as np
import soxr

_EMPTY = np.zeros(0, np.float32)


class Slot:
    """Per-response counters; preallocated (a pool), reused round-robin."""

    __slots__ = ("rid", "first_audible", "samples", "queued", "playing", "drained_at",
                 "flushed", "dead", "cycles")

    def __init__(self) -> None:
        self.reset("")

    def reset(self, rid: str) -> None:
        self.rid = rid
        self.first_audible = -1.0   # t_dac of its first sample; < 0: not yet audible
        self.samples = 0            # device-rate samples handed to the device so far
        self.queued = 0             # device-rate samples in the buffer
        self.playing = False        # in a drain cycle (has played since the last drain)
        self.drained_at = -1.0      # t_dac just after its last drained sample
        self.flushed = False        # a FLUSH cut it: its next drain reports flushed=True
        self.dead = False           # flushed: later PLAYs for it are dropped (control side)
        self.cycles = 0             # drain cycles (1 + underruns)


class Playout:
    POOL = 64

    def __init__(
        self,
        put: Callable[[Any], None],
        device_rate: int,
        input_rate: int = 24000,
        fade_ms: float = 5.0,
        duck_ms: float = 5.0,
        quality: str = "HQ",
        tail_ms: float = 40.0,
        tail_idle_ms: float = 20.0,
        max_buffer_s: float = 600.0,
    ) -> None:
        self.lock = threading.Lock()
        self._put = put                 # writer queue put (thread-safe, non-blocking)
        self.quality = quality
        self.fade_ms = float(fade_ms)
        self.duck_ms = float(duck_ms)
        self.tail_ms = float(tail_ms)
        self.tail_idle_ms = float(tail_idle_ms)
        self.last_push = 0.0            # monotonic time of the last push (control side)
        self.max_buffer_s = float(max_buffer_s)
        # shared with the callback (under lock)
        self._chunks: collections.deque[list[Any]] = collections.deque()  # [slot, array, offset]
        self.buffered = 0               # device-rate samples in _chunks
        self.last_t_dac = 0.0           # t_dac of the last rendered block
        self.last_n = 0                 # its length (0: no block rendered since (re)open)
        self.underruns = 0
        self.underrun_s = 0.0
        self.rendered = 0               # samples of response audio rendered (all responses)
        self._gain = 1.0
        self._gain_target = 1.0
        self._gain_step = 0.0
        # control side only
        self._pool = [Slot() for _ in range(self.POOL)]
        self._pool_next = 0
        self._by_rid: dict[str, Slot] = {}
        self._rs: soxr.ResampleStream | None = None
        self._rs_slot: Slot | None = None   # the response whose samples are inside _rs
        self._rs_pending = False
        self.dropped_late = 0           # samples of PLAYs for already-flushed responses
        self.overflow_dropped = 0       # samples refused because the buffer was full
        self.input_rate = int(input_rate)
        self.device_rate = int(device_rate)
        self._scratch = np.zeros(0, np.float32)
        self._idx = np.zeros(0, np.float32)
        self._alloc(8192)
        self._rebuild_resampler()

    # ---- helpers ----------------------------------------------------------------------------
    def _alloc(self, n: int) -> None:
        self._scratch = np.zeros(n, np.float32)
        self._idx = np.arange(1, n + 1, dtype=np.float32)

    def _rebuild_resampler(self) -> None:
        self._rs = (
            None
            if self.input_rate == self.device_rate
            else soxr.ResampleStream(self.input_rate, self.device_rate, 1, dtype="float32",
                                     quality=self.quality)
        )
        self._rs_slot, self._rs_pending = None, False

    def _slot(self, rid: str) -> Slot:
        slot = self._by_rid.get(rid)
        if slot is not None:
            return slot
        for _ in range(self.POOL):
            cand = self._pool[self._pool_next]
            self._pool_next = (self._pool_next + 1) % self.POOL
            if cand.queued == 0 and cand is not self._rs_slot:
                break
        else:  # 64 responses with audio queued at once: reuse the oldest anyway
            cand = self._pool[self._pool_next]
        if cand.rid and self._by_rid.get(cand.rid) is cand:
            del self._by_rid[cand.rid]
        with self.lock:
            cand.reset(rid)
        self._by_rid[rid] = cand
        return cand

    def _append(self, slot: Slot, y: np.ndarray) -> int:
        """Queue device-rate samples for ``slot``; returns the number refused (buffer full)."""
        n = len(y)
        if not n:
            return 0
        room = int(self.max_buffer_s * self.device_rate) - self.buffered
        refused = 0
        if n > room:
            refused = n - max(room, 0)
            y = y[: max(room, 0)]
            self.overflow_dropped += refused
            if not len(y):
                return refused
        with self.lock:
            self._chunks.append([slot, y, 0])
            slot.queued += len(y)
            self.buffered += len(y)
        return refused

    def _drain_resampler(self) -> None:
        """Push the resampler's held-back tail into the buffer (tagged with its response) and
        reset the stream. Called when the response changes, the rate changes, or the buffer
        is about to run dry (the tail would otherwise wait for the next PLAY)."""
        if self._rs is None or not self._rs_pending:
            return
        tail = self._rs.resample_chunk(_EMPTY, last=True)
        self._rs.clear()
        slot, self._rs_slot, self._rs_pending = self._rs_slot, None, False
        if slot is not None and not slot.dead:
            self._append(slot, np.ascontiguousarray(tail, np.float32))

    # ---- control side -----------------------------------------------------------------------
    def push(self, rid: str, pcm: bytes) -> int:
        """Queue PCM16 mono at ``input_rate``. Returns device-rate samples queued (0 when the
        response was flushed before: PLAYs that arrive after its FLUSH are dropped)."""
        self.last_push = time.monotonic()
        slot = self._slot(rid)
        if slot.dead:
            self.dropped_late += len(pcm) // 2
            return 0
        x = np.frombuffer(pcm, "<i2").astype(np.float32)
        x *= 1.0 / 32768.0
        if self._rs is None:
            y = x
        else:
            if self._rs_slot is not slot:
                self._drain_resampler()
            y = self._rs.resample_chunk(x)
            self._rs_slot, self._rs_pending = slot, True
        self._append(slot, y)
        return len(y)

    def pending_tail(self) -> bool:
        return self._rs_pending

    def drain_tail_if_low(self, now: float) -> bool:
        """Drain the resampler's held-back tail when the response looks finished: it holds
        samples, no PLAY came for ``tail_idle_ms``, and less than ``tail_ms`` is buffered.

        soxr holds back up to ~40 ms of output (HQ) until more input comes, so without this
        the end of every response would wait for the next PLAY. Draining resets the stream:
        if more audio of the same response comes later, it starts a new stream (a tiny seam,
        but only where the buffer was about to run dry anyway). Called every block by the
        housekeeping thread while a tail is pending."""
        if not self._rs_pending:
            return False
        if now - self.last_push < self.tail_idle_ms / 1000.0:
            return False  # PLAYs are still flowing: the next one pushes the tail out
        if self.buffered * 1000.0 / self.device_rate >= self.tail_ms:
            return False
        self._drain_resampler()
        return True

    def set_input_rate(self, rate: int) -> None:
        """OUTPUT_FORMAT: following PLAYs are at ``rate``."""
        if rate == self.input_rate:
            return
        self._drain_resampler()
        self.input_rate = int(rate)
        self._rebuild_resampler()

    def set_device_rate(self, rate: int) -> int:
        """The output device (re)opened at ``rate``. If it changed, the buffered audio (at the
        old rate) is dropped without fade (the old device is gone). Returns samples dropped."""
        dropped = 0
        with self.lock:
            self.last_n = 0
            if rate != self.device_rate:
                dropped = self.buffered
                for c in self._chunks:
                    c[0].queued = 0
                    c[0].playing = False
                self._chunks.clear()
                self.buffered = 0
        if rate != self.device_rate:
            self.device_rate = int(rate)
            self._rebuild_resampler()
        return dropped

    def duck(self, gain: float) -> None:
        """Ramp the playback gain to ``gain`` over ``duck_ms``."""
        gain = float(min(max(gain, 0.0), 1.0))
        n = max(1, int(round(self.duck_ms * self.device_rate / 1000.0)))
        with self.lock:
            self._gain_target = gain
            self._gain_step = (gain - self._gain) / n

    def flush(self, t_received: float, running: bool) -> dict[str, Any]:
        """FLUSH: keep the next ``fade_ms`` of audio ramped linearly to 0, drop the rest.

        Returns the FLUSHED fields except ``seq``. PLAYED(done, flushed) for responses cut
        entirely is emitted here; for the response(s) in the kept fade it comes from the
        callback when the fade has played.
        """
        rate = self.device_rate
        fade_n = max(1, int(round(self.fade_ms * rate / 1000.0)))
        rs_slot = self._rs_slot
        if self._rs is not None:  # samples still inside the resampler are thrown away
            self._rs.clear()
        self._rs_slot, self._rs_pending = None, False
        kept: list[list[Any]] = []
        with self.lock:
            total = self.buffered
            keep = min(total, fade_n)
            head = self._chunks[0][0] if self._chunks else None
            affected: list[Slot] = []
            for c in self._chunks:
                if c[0] not in affected:
                    affected.append(c[0])
            pos = 0
            for slot, arr, off in self._chunks:
                if pos >= keep:
                    break
                take = min(len(arr) - off, keep - pos)
                ramp = 1.0 - np.arange(pos + 1, pos + take + 1, dtype=np.float32) / fade_n
                kept.append([slot, arr[off : off + take] * ramp, 0])
                pos += take
            for s in affected:
                s.queued = 0
                s.flushed = True
            for c in kept:
                c[0].queued += len(c[1])
            self._chunks.clear()
            self._chunks.extend(kept)
            self.buffered = keep
            done_now = [s for s in affected if s.queued == 0]
            for s in done_now:
                s.playing = False
            t_next = self.last_t_dac + self.last_n / rate if (running and self.last_n) else None
            if rs_slot is not None and rs_slot not in affected:
                done_now.append(rs_slot)  # all of its audio was still inside the resampler
            reports = [(s.rid, s.first_audible, s.samples) for s in done_now]
        for s in affected:
            s.dead = True
        if rs_slot is not None:
            rs_slot.dead = True
        for rid, fa, samples in reports:
            self._put(("played", rid, fa, samples, rate, True, True))
        t_silent = t_received if t_next is None else t_next + keep / rate
        return {
            "response_id": head.rid if head is not None else None,
            "dropped_samples": total - keep,
            "faded_samples": keep,
            "rate": rate,
            "t_received": t_received,
            "t_silent": t_silent,
        }

    # ---- audio thread -------------------------------------------------------------------------
    def render(self, n: int, t_dac: float) -> np.ndarray:
        """Fill and return the first ``n`` samples of a float32 scratch buffer (mono, device
        rate, gain applied). The returned view is valid until the next call."""
        if n > len(self._scratch):
            self._alloc(2 * n)  # only if a backend hands a bigger block than ever before
        out = self._scratch[:n]
        rate = self.device_rate
        put = self._put
        with self.lock:
            self.last_t_dac, self.last_n = t_dac, n
            filled = 0
            chunks = self._chunks
            while filled < n and chunks:
                c = chunks[0]
                slot, arr, off = c
                take = len(arr) - off
                if take > n - filled:
                    take = n - filled
                first = False
                if not slot.playing:
                    slot.playing = True
                    slot.cycles += 1
                    t = t_dac + filled / rate
                    if slot.first_audible < 0.0:
                        slot.first_audible = t
                        first = True
                    elif slot.drained_at >= 0.0:
                        self.underruns += 1
                        self.underrun_s += t - slot.drained_at
                out[filled : filled + take] = arr[off : off + take]
                filled += take
                slot.samples += take
                slot.queued -= take
                self.buffered -= take
                self.rendered += take
                if off + take >= len(arr):
                    chunks.popleft()
                else:
                    c[2] = off + take
                if first:
                    put(("played", slot.rid, slot.first_audible, slot.samples, rate, False, False))
                if slot.queued <= 0:
                    slot.playing = False
                    slot.drained_at = t_dac + filled / rate
                    put(("played", slot.rid, slot.first_audible, slot.samples, rate, True,
                         slot.flushed))
            if filled < n:
                out[filled:] = 0.0
            g, target = self._gain, self._gain_target
            if g != target:
                step = self._gain_step
                k = min(n, math.ceil(abs((target - g) / step))) if step else n
                ramp = self._idx[:k] * step
                ramp += g
                out[:k] *= ramp
                if k < n:
                    out[k:] *= target
                    g = target
                else:
                    g = g + k * step
                    if (step > 0 and g >= target) or (step < 0 and g <= target):
                        g = target
                self._gain = g
            elif g != 1.0:
                out *= g
        return out

    # ---- stats ------------------------------------------------------------------------------
    def buffer_ms(self) -> float:
        return self.buffered * 1000.0 / self.device_rate
