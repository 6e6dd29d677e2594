"""A real daemon against the real simulator, with the real engine child (wav backend).

Everything crosses real boundaries: a WebSocket on loopback, the engine's pipes, a WAV file
written in real time whose sample ``i`` is the instant ``t0 + i / rate``.
"""

from __future__ import annotations

import contextlib
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import trio

from hydrad.config import Secret, config_from_dict
from hydrad.demo import Timeline
from hydrad.events import EventBus
from hydrad.pipeline.daemon import Daemon
from hydrad.session.tools import ToolProvider
from hydrad.sim.config import SimConfig
from hydrad.sim.server import Simulator

DATA = Path(__file__).resolve().parents[1] / "hydrad" / "data"
HELLO = DATA / "hello.wav"          # 2.74 s of speech
INTERRUPT = DATA / "interrupt.wav"  # 3.39 s of speech


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64), w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(samples, -32768, 32767).astype("<i2").tobytes())
    return path


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def active_spans(x: np.ndarray, rate: int, threshold: float = 50.0, block_ms: int = 5) -> list[tuple[float, float]]:
    """(start_s, end_s) of stretches whose per-block peak exceeds ``threshold``."""
    b = rate * block_ms // 1000
    n = len(x) // b
    on = np.abs(x[: n * b]).reshape(n, b).max(axis=1) > threshold
    spans, start = [], None
    for i, v in enumerate(on):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start * b / rate, i * b / rate))
            start = None
    if start is not None:
        spans.append((start * b / rate, n * b / rate))
    return spans


@dataclass
class Rig:
    sim: Simulator | None  # None when the test runs (and kills) its own server
    daemon: Daemon
    timeline: Timeline
    speaker: Path
    t0: float
    #: monotonic time at which the last ``wait_for`` saw its condition true
    last_seen: float = 0.0

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        with trio.move_on_after(timeout):
            while not (value := pred()):
                await trio.sleep(0.01)
            self.last_seen = time.monotonic()
            return value
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; daemon state {self.daemon.state}")

    def events(self, name: str) -> list[Any]:
        return self.timeline.named(name)

    def speaker_audio(self) -> tuple[np.ndarray, int]:
        return read_wav(self.speaker)

    def sample_at(self, t: float, rate: int) -> int:
        return int(round((t - self.t0) * rate))


@contextlib.asynccontextmanager
async def daemon_at(tmp_path: Path, url: str, *, mic: list[tuple[Path, float]] = (),
                    overrides: dict[str, Any] | None = None, tools: ToolProvider | None = None,
                    backend: str = "wav", key: str = "test-key", sim: Simulator | None = None) -> AsyncIterator[Rig]:
    """A real Daemon (real engine child) pointed at ``url``; stopped gracefully on exit."""
    speaker = tmp_path / "speaker.wav"
    bus = EventBus()
    timeline = Timeline()
    bus.subscribe(timeline)
    data: dict[str, Any] = {
        "hydra": {"url": url, "ping_interval_s": 1.0, "ping_timeout_s": 2.0, "connect_timeout_s": 5.0},
        "audio": {"backend": backend, "wav": {"mic": [{"path": str(p), "at": at} for p, at in mic],
                                              "speaker": str(speaker), "speaker_rate": 24000}},
        "control": {"enabled": False},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5},
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    cfg = config_from_dict(data, "test")
    t0 = time.monotonic()
    daemon = Daemon(cfg, Secret(key, "test"), tools=tools, bus=bus, engine_options={"t0_speaker": t0})
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield Rig(sim, daemon, timeline, speaker, t0)
        finally:
            daemon.request_stop()
            with trio.move_on_after(6):
                await daemon.stopped.wait()
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, sim_config: SimConfig | None = None, mic: list[tuple[Path, float]] = (),
                  overrides: dict[str, Any] | None = None, tools: ToolProvider | None = None,
                  backend: str = "wav") -> AsyncIterator[Rig]:
    """The simulator on a free port and a daemon talking to it."""
    sim = Simulator(sim_config or SimConfig(reply_s=1.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        async with daemon_at(tmp_path, f"ws://127.0.0.1:{port}/waves/v1/s2s", mic=mic, overrides=overrides,
                             tools=tools, backend=backend, sim=sim) as rig:
            yield rig
        nursery.cancel_scope.cancel()
