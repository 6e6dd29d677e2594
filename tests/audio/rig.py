"""A real daemon with the ``sounddevice`` backend on the virtual devices, against the real
simulator: the audio-device counterpart of ``tests/harness.py`` (used by tests and by
``bench/barge_in.py``).

Everything crosses real boundaries: espeak speech played into the virtual mic with
``paplay``, PortAudio capture in the engine child, the WebSocket to the simulator, PortAudio
playback, and the virtual speaker recorded with ``parec`` on a monotonic timeline.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio

from hydrad.config import Secret, config_from_dict
from hydrad.demo import Timeline
from hydrad.events import EventBus
from hydrad.pipeline.daemon import Daemon
from hydrad.sim.config import SimConfig
from hydrad.sim.server import Simulator

from .vaudio import Recorder, VirtualAudio


@dataclass
class AudioRig:
    va: VirtualAudio
    sim: Simulator
    daemon: Daemon
    timeline: Timeline
    recorder: Recorder
    flushed: list[dict[str, Any]] = field(default_factory=list)   # every FLUSHED the daemon got
    stats: list[dict[str, Any]] = field(default_factory=list)     # every STATS
    device: list[dict[str, Any]] = field(default_factory=list)    # every DEVICE
    captures: list[float] = field(default_factory=list)           # arrival (monotonic) of CAPTURE frames
    capture_log: list[tuple[float, bytes]] = field(default_factory=list)  # (t_adc, pcm) of each, if asked
    log_captures: bool = False
    played: list[dict[str, Any]] = field(default_factory=list)    # every PLAYED

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        with trio.move_on_after(timeout):
            while not (value := pred()):
                await trio.sleep(0.01)
            return value
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: "
                             f"{[e.name for e in self.timeline.events][-30:]}")

    def events(self, name: str) -> list[Any]:
        return self.timeline.named(name)

    def output_info(self) -> dict[str, Any]:
        return self.daemon.engine.ready_info.get("output") or {}


@contextlib.asynccontextmanager
async def audio_daemon(va: VirtualAudio, *, sim_config: SimConfig | None = None,
                       sounddevice: dict[str, Any] | None = None, audio: dict[str, Any] | None = None,
                       overrides: dict[str, Any] | None = None, record_rate: int | None = None,
                       ) -> AsyncIterator[AudioRig]:
    """Run simulator + daemon (sounddevice backend) with the speaker recorded from the start.
    The environment must already point at ``va`` (the fixture exports it)."""
    sim = Simulator(sim_config or SimConfig(reply_s=1.0))
    bus = EventBus()
    timeline = Timeline()
    bus.subscribe(timeline)
    recorder = va.record(rate=record_rate)
    recorder.wait_started()
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve)
            data: dict[str, Any] = {
                "hydra": {"url": f"ws://127.0.0.1:{port}/waves/v1/s2s", "ping_interval_s": 1.0, "ping_timeout_s": 2.0},
                "audio": {"backend": "sounddevice", "sounddevice": sounddevice or {}, **(audio or {})},
                "control": {"enabled": False},
                "reconnect": {"initial_s": 0.1, "max_s": 0.5},
            }
            for section, values in (overrides or {}).items():
                data.setdefault(section, {}).update(values)
            cfg = config_from_dict(data, "test")
            daemon = Daemon(cfg, Secret("test-key", "test"), bus=bus)
            rig = AudioRig(va, sim, daemon, timeline, recorder)
            # probes: the daemon's engine handlers, wrapped (instance attributes shadow the methods)
            for name, sink in (("on_flushed", rig.flushed), ("on_stats", rig.stats),
                               ("on_device", rig.device), ("on_played", rig.played)):
                orig = getattr(daemon, name)

                def probe(info: dict[str, Any], orig: Any = orig, sink: list[Any] = sink) -> None:
                    sink.append({**info, "_t": time.monotonic()})
                    orig(info)

                setattr(daemon, name, probe)
            orig_capture = daemon.on_capture

            def on_capture(t_adc: float, pcm: bytes) -> None:
                rig.captures.append(time.monotonic())
                if rig.log_captures:
                    rig.capture_log.append((t_adc, pcm))
                orig_capture(t_adc, pcm)

            daemon.on_capture = on_capture  # type: ignore[method-assign]
            await nursery.start(daemon.run)
            try:
                yield rig
            finally:
                daemon.request_stop()
                with trio.move_on_after(5):
                    await daemon.stopped.wait()
                nursery.cancel_scope.cancel()
    finally:
        recorder.stop()
