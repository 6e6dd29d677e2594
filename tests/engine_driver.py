"""Drive an engine child (``python -m hydrad.engine``) over its pipes, as the daemon does.

A reader thread collects every message with its arrival time; tests wait on predicates over
them. Used by the engine tests (wav/null backends) and the audio tests (sounddevice backend).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hydrad.engine import wire
from hydrad.engine.wire import Kind

REPO = Path(__file__).resolve().parents[1]


class EngineProc:
    """A running engine child with a reader thread collecting its messages."""

    #: the backend ``config()`` asks for unless told otherwise
    backend = "null"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(env if env is not None else os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.stderr = tempfile.TemporaryFile()
        self.p = subprocess.Popen([sys.executable, "-m", "hydrad.engine"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.stderr, cwd=str(REPO), env=env)
        self.msgs: list[tuple[float, wire.Message]] = []  # (arrival monotonic, message)
        self.cond = threading.Condition()
        self.reading = threading.Event()  # clear it to stop reading the engine's stdout
        self.reading.set()
        self.eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        try:
            while True:
                self.reading.wait()
                m = wire.read_message(self.p.stdout)
                with self.cond:
                    if m is None:
                        self.eof = True
                        self.cond.notify_all()
                        return
                    self.msgs.append((time.monotonic(), m))
                    self.cond.notify_all()
        except Exception:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    # -- sending
    def send_raw(self, data: bytes) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def send(self, kind: Kind, obj: dict[str, Any] | None = None) -> None:
        self.send_raw(wire.encode_json(kind, obj))

    def play(self, rid: str, pcm: np.ndarray | bytes, chunk: int = 4800) -> None:
        """PLAY in chunks of ``chunk`` samples (the daemon forwards Hydra deltas like this)."""
        data = pcm if isinstance(pcm, bytes) else np.clip(np.round(pcm), -32768, 32767).astype("<i2").tobytes()
        for i in range(0, len(data), 2 * chunk):
            self.send_raw(wire.encode_play(rid, data[i: i + 2 * chunk]))

    # -- receiving
    def wait_for(self, pred: Callable[[wire.Message], bool], timeout: float = 5.0,
                 start: int = 0) -> tuple[float, wire.Message]:
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.msgs):
                    t, m = self.msgs[i]
                    i += 1
                    if pred(m):
                        return t, m
                if self.eof:
                    raise AssertionError(f"engine exited (rc={self.p.poll()}) before the message came;"
                                         f" stderr: {self.read_stderr()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for a message; got kinds "
                                         f"{sorted({m.kind.name for _, m in self.msgs})}")
                self.cond.wait(left)

    def wait_json(self, kind: Kind, pred: Callable[[dict[str, Any]], bool] = lambda o: True,
                  timeout: float = 5.0, start: int = 0) -> dict[str, Any]:
        _, m = self.wait_for(lambda m: m.kind == kind and pred(m.json()), timeout, start)
        return m.json()

    def mark(self) -> int:
        """An index for ``start=``: only messages after this point."""
        with self.cond:
            return len(self.msgs)

    def all_json(self, kind: Kind) -> list[dict[str, Any]]:
        with self.cond:
            return [m.json() for _, m in self.msgs if m.kind == kind]

    def timed_json(self, kind: Kind) -> list[tuple[float, dict[str, Any]]]:
        with self.cond:
            return [(t, m.json()) for t, m in self.msgs if m.kind == kind]

    def captures(self, start: int = 0) -> list[tuple[float, float, bytes]]:
        """(arrival, t_adc, pcm) of the CAPTURE frames from message index ``start``."""
        with self.cond:
            return [(t, *wire.decode_capture(m.payload)) for t, m in self.msgs[start:] if m.kind == Kind.CAPTURE]

    def capture_audio(self, start: int = 0) -> tuple[np.ndarray, list[float]]:
        caps = self.captures(start)
        x = np.frombuffer(b"".join(c[2] for c in caps), "<i2").astype(np.float64)
        return x, [c[1] for c in caps]

    def read_stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    # -- lifecycle
    def config(self, backend: str | None = None, options: dict[str, Any] | None = None, *, wait: bool = True,
               **extra: Any) -> dict[str, Any]:
        cfg = {"backend": backend or self.backend, "options": options or {}, "frame_ms": 20, "block_ms": 10,
               "fade_ms": 5, **extra}
        self.send(Kind.CONFIG, cfg)
        return self.wait_json(Kind.READY, timeout=10.0) if wait else {}

    def stop(self, timeout: float = 5.0) -> int | None:
        """STOP and wait; returns the exit status (None after a kill when it did not exit)."""
        try:
            self.send(Kind.STOP, {})
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._reader.join(2.0)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)
