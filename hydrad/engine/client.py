"""The daemon's side of the audio engine: spawn, talk, watch, restart.

The engine is a child process so that a GC pause, a slow plugin or a wedged driver in one
process cannot glitch or hang the other. This class owns that process for the life of the
daemon: it restarts it when it exits, when its pipe breaks, or when it stops answering
pings (a SIGSTOPped or deadlocked engine), with backoff, while the WebSocket session goes on.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog
import trio

from . import wire
from .wire import Kind

log = structlog.get_logger("hydrad.engine")


@dataclass(frozen=True)
class EngineSpec:
    backend: str
    options: dict[str, Any]
    frame_ms: int = 20
    block_ms: int = 10
    fade_ms: float = 5.0
    ping_s: float = 1.0
    hang_s: float = 3.0
    ready_timeout_s: float = 10.0


class EngineHandlers:
    """What the daemon wants to hear from the engine. Override what you need; all are sync."""

    def on_capture(self, t_adc: float, pcm: bytes) -> None: ...
    def on_played(self, info: dict[str, Any]) -> None: ...
    def on_flushed(self, info: dict[str, Any]) -> None: ...
    def on_stats(self, info: dict[str, Any]) -> None: ...
    def on_device(self, info: dict[str, Any]) -> None: ...
    def on_state(self, state: str, detail: str | None) -> None: ...


class _Outbox:
    """Frames waiting for the engine's stdin. A FLUSH drops queued PLAYs and jumps the queue."""

    def __init__(self, limit: int = 512) -> None:
        self._q: collections.deque[tuple[Kind, bytes]] = collections.deque()
        self._limit = limit
        self._lot = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._q)

    async def put(self, kind: Kind, frame: bytes) -> None:
        while len(self._q) >= self._limit:
            await self._space.park()
        self._q.append((kind, frame))
        self._lot.unpark()

    def put_front(self, kind: Kind, frame: bytes, drop_plays: bool = False) -> int:
        dropped = 0
        if drop_plays:
            kept = [m for m in self._q if m[0] != Kind.PLAY]
            dropped = len(self._q) - len(kept)
            self._q = collections.deque(kept)
            self._space.unpark_all()
        self._q.appendleft((kind, frame))
        self._lot.unpark()
        return dropped

    async def get(self) -> bytes:
        while not self._q:
            await self._lot.park()
        self._space.unpark()
        return self._q.popleft()[1]

    def clear(self) -> None:
        self._q.clear()
        self._space.unpark_all()


class EngineClient:
    def __init__(self, spec: EngineSpec, handlers: EngineHandlers, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.h = handlers
        self.clock = clock
        self.state = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.ready_info: dict[str, Any] = {}
        self.last_stats: dict[str, Any] = {}
        self.device: dict[str, Any] = {}
        self._outbox = _Outbox()
        self._flush_seq = 0
        self._output_rate: int | None = None
        self._gate: tuple[bool, float] | None = None
        self._last_pong = 0.0
        self._proc: trio.Process | None = None
        self._running = trio.Event()
        self.stopping = False
        self._started = False
        self.counters: dict[str, int] = collections.Counter()

    # -------------------------------------------------------------- commands (any task)
    async def play(self, response_id: str, pcm: bytes) -> None:
        await self._outbox.put(Kind.PLAY, wire.encode_play(response_id, pcm))

    def flush(self, reason: str) -> int:
        """Cut playback now: queued PLAYs never reach the engine; the engine fades and empties."""
        self._flush_seq += 1
        dropped = self._outbox.put_front(Kind.FLUSH, wire.encode_json(Kind.FLUSH, {"seq": self._flush_seq, "reason": reason}),
                                         drop_plays=True)
        self.counters["plays_dropped_before_engine"] += dropped
        return self._flush_seq

    def set_output_rate(self, rate: int) -> None:
        self._output_rate = rate
        self._outbox.put_front(Kind.OUTPUT_FORMAT, wire.encode_json(Kind.OUTPUT_FORMAT, {"rate": rate}))

    def gate(self, open_: bool, t0: float) -> None:
        self._gate = (open_, t0)
        self._outbox.put_front(Kind.GATE, wire.encode_json(Kind.GATE, {"open": open_, "t0": t0}))

    def duck(self, gain: float) -> None:
        self._outbox.put_front(Kind.DUCK, wire.encode_json(Kind.DUCK, {"gain": gain}))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """For fault injection and hang recovery."""
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, sig)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "backend": self.spec.backend,
                "devices": {k: self.ready_info.get(k) for k in ("input", "output")}, "device": self.device,
                "stats": self.last_stats}

    # -------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep an engine running until cancelled; restart it whenever it dies or hangs."""
        delay = 0.2
        while True:
            t_start = self.clock()
            try:
                await self._run_once(task_status)
            except _EngineGone as exc:
                log.warning("engine_exited", reason=str(exc), pid=self.pid)
            except Exception as exc:  # noqa: BLE001 - whatever broke, the engine is restarted
                log.warning("engine_failed", error=repr(exc), pid=self.pid)
            # The first start may have failed: report started anyway, the daemon runs without audio
            # (uplink sends silence) and keeps retrying here.
            self._report_started(task_status)
            self.restarts += 1
            self._set_state("restarting", None)
            if self.clock() - t_start > 10:
                delay = 0.2
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _run_once(self, task_status: Any) -> None:
        self._set_state("starting", None)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hydrad.engine"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._proc, self.pid = proc, proc.pid
        try:
            assert proc.stdin is not None and proc.stdout is not None
            config = {"backend": self.spec.backend, "options": self.spec.options, "frame_ms": self.spec.frame_ms,
                      "block_ms": self.spec.block_ms, "fade_ms": self.spec.fade_ms}
            await proc.stdin.send_all(wire.encode_json(Kind.CONFIG, config))
            if self._output_rate:
                await proc.stdin.send_all(wire.encode_json(Kind.OUTPUT_FORMAT, {"rate": self._output_rate}))
            if self._gate:
                await proc.stdin.send_all(wire.encode_json(Kind.GATE, {"open": self._gate[0], "t0": self._gate[1]}))
            self._outbox.clear()  # anything queued for a dead engine is stale
            decoder = wire.Decoder()
            with trio.fail_after(self.spec.ready_timeout_s):
                ready = await self._read_until_ready(proc, decoder)
            self.ready_info = ready
            self._last_pong = self.clock()
            self._set_state("running", None)
            self._report_started(task_status)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, proc, decoder)
                nursery.start_soon(self._writer, proc)
                nursery.start_soon(self._pinger)
                await proc.wait()
                nursery.cancel_scope.cancel()
            raise _EngineGone(f"exit status {proc.returncode}")
        except trio.TooSlowError:
            raise _EngineGone("no READY in time") from None
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(proc)

    def _report_started(self, task_status: Any) -> None:
        if not self._started:
            self._started = True
            task_status.started()

    async def stop(self) -> None:
        """Ask the engine to close its devices and exit; used on shutdown."""
        self.stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        with trio.move_on_after(1.0):
            # Through the outbox: only the writer task writes to stdin. A direct send_all here
            # raced _writer (BusyResourceError: the engine counted as failed and was killed and
            # restarted mid-shutdown), and STOP now goes after the GATE/FLUSH frames the shutdown
            # just queued.
            await self._outbox.put(Kind.STOP, wire.encode_json(Kind.STOP))
            await proc.wait()

    async def _reap(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(2):
            await proc.wait()
        self._proc = None

    async def _read_until_ready(self, proc: trio.Process, decoder: wire.Decoder) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            data = await proc.stdout.receive_some(65536)
            if not data:
                raise _EngineGone("closed stdout before READY")
            for msg in decoder.feed(data):
                if msg.kind == Kind.READY:
                    return msg.json()
                self._dispatch(msg)

    async def _reader(self, proc: trio.Process, decoder: wire.Decoder) -> None:
        """Messages from the engine; a broken stream kills it (``proc.wait()`` then restarts it)."""
        assert proc.stdout is not None
        try:
            while True:
                data = await proc.stdout.receive_some(65536)
                if not data:
                    return  # proc.wait() in the parent will notice the exit
                for msg in decoder.feed(data):
                    self._dispatch(msg)
        except (wire.WireError, ValueError) as exc:
            log.error("engine_protocol_error", error=str(exc), pid=proc.pid)
            self.counters["protocol_errors"] += 1
            proc.kill()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _dispatch(self, msg: wire.Message) -> None:
        k = msg.kind
        if k == Kind.CAPTURE:
            t_adc, pcm = wire.decode_capture(msg.payload)
            self.h.on_capture(t_adc, pcm)
        elif k == Kind.PLAYED:
            self.h.on_played(msg.json())
        elif k == Kind.FLUSHED:
            self.h.on_flushed(msg.json())
        elif k == Kind.PONG:
            self._last_pong = self.clock()
        elif k == Kind.STATS:
            self.last_stats = msg.json()
            self.h.on_stats(self.last_stats)
        elif k == Kind.DEVICE:
            self.device = msg.json()
            self.h.on_device(self.device)
        elif k == Kind.LOG:
            fields = msg.json()
            level = str(fields.pop("level", "info")).lower()
            event = str(fields.pop("event", "engine_log"))
            getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(event, engine_pid=self.pid, **fields)
        else:
            self.counters["unexpected_messages"] += 1

    async def _writer(self, proc: trio.Process) -> None:
        assert proc.stdin is not None
        try:
            while True:
                frame = await self._outbox.get()
                await proc.stdin.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the engine is gone; proc.wait() in the parent notices and restarts it

    async def _pinger(self) -> None:
        seq = 0
        while True:
            await trio.sleep(self.spec.ping_s)
            if self.clock() - self._last_pong > self.spec.hang_s:
                log.warning("engine_hung", pid=self.pid, silent_s=round(self.clock() - self._last_pong, 2))
                self.counters["hangs"] += 1
                self.kill()
                return
            seq += 1
            self._outbox.put_front(Kind.PING, wire.encode_json(Kind.PING, {"seq": seq}))

    def _set_state(self, state: str, detail: str | None) -> None:
        if state != self.state:
            self.state = state
            self.h.on_state(state, detail)


class _EngineGone(Exception):
    pass
