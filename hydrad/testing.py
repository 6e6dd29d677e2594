"""The test kit for plugin authors: a pytest plugin (entry point ``pytest11: hydrad``).

It runs the real thing, offline: the hydrad simulator on loopback, a real
:class:`~hydrad.pipeline.daemon.Daemon` with the real audio-engine child (``null`` backend by
default: silence in, audio discarded, both at real time), your plugin loaded next to a
recorder, and lets a test speak into the microphone, script what the "model" does on the
next turn, and assert on the hook calls your plugin got and on the tool output the
simulator received::

    import pytest
    import my_plugin

    @pytest.fixture
    def hydrad_plugins():
        return [my_plugin]                      # the plugin(s) under test

    @pytest.fixture
    def hydrad_config():
        return {"plugins": {"my_plugin": {"greeting": "hi"}}}   # its [plugins.<name>] table

    async def test_order_lookup(hydrad):
        hydrad.next_turn(tool_calls=[{"name": "order_status", "arguments": {"order": "A17"}}])
        await hydrad.say("hello")                  # speak; the simulator's VAD makes it a turn
        [out] = await hydrad.wait_for_tool_outputs(1)
        assert out["value"] == {"order": "A17", "status": "shipped"}
        assert "hydrad_tool_result" in hydrad.hooks_called("my_plugin")

Tests using the async fixtures need pytest-trio (``trio_mode = true`` or ``@pytest.mark.trio``).
Fixtures you may override: ``hydrad_plugins``, ``hydrad_config``, ``hydrad_sim_config``,
``hydrad_backend``, ``hydrad_entry_points``. ``start_hydrad(...)`` is the same thing as an
async context manager, for tests that need several set-ups.

This module is imported by every pytest run in an environment where hydrad is installed,
so it imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import json
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from hydrad.events import Event
    from hydrad.hooks import HookCall, HookDispatcher, PluginTools, Plugins
    from hydrad.pipeline.daemon import Daemon
    from hydrad.sim import SimConfig, Simulator

DATA = Path(__file__).resolve().parent / "data"
#: Built-in utterances (16 kHz mono PCM16): ``hello`` 2.7 s, ``interrupt`` 3.4 s.
SPEECH = {"hello": DATA / "hello.wav", "interrupt": DATA / "interrupt.wav"}
SIM_KEY = "sim-key"


def load_speech(speech: str | Path | bytes, seconds: float | None = None) -> bytes:
    """16 kHz mono PCM16 bytes of a built-in utterance name, a WAV path, or raw PCM16 bytes.

    ``seconds`` keeps only the first seconds *of speech* (leading silence is skipped).
    """
    if isinstance(speech, bytes):
        pcm = speech
    else:
        path = SPEECH.get(str(speech), Path(speech))
        with wave.open(str(path), "rb") as w:
            if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(f"{path}: the test kit takes 16 kHz mono 16-bit WAVs "
                                 f"(got {w.getframerate()} Hz, {w.getnchannels()} ch, {8 * w.getsampwidth()} bit)")
            pcm = w.readframes(w.getnframes())
    if seconds is not None:
        import numpy as np

        x = np.frombuffer(pcm, "<i2")
        loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 2000)
        onset = int(loud[0]) if len(loud) else 0
        pcm = x[onset: onset + int(seconds * 16000)].tobytes()
    return pcm


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Mouth:
    """Replaces microphone frames with queued speech, frame for frame (keeps real-time pacing)."""

    def __init__(self, daemon: Daemon) -> None:
        import trio

        self.daemon = daemon
        self.original = daemon.on_capture
        self.pending = bytearray()
        self.drained = trio.Event()
        self.drained.set()
        self.frames_replaced = 0

    def __call__(self, t_adc: float, pcm: bytes) -> None:
        if self.pending and self.daemon.gate_open:
            n = len(pcm)
            chunk = bytes(self.pending[:n])
            del self.pending[:n]
            pcm = chunk + bytes(n - len(chunk))
            self.frames_replaced += 1
            if not self.pending:
                self.drained.set()
        self.original(t_adc, pcm)

    def queue(self, pcm: bytes) -> None:
        import trio

        if len(pcm) % 2:
            pcm = pcm[:-1]
        if self.drained.is_set():
            self.drained = trio.Event()
        self.pending += pcm


class HydradHarness:
    """A running simulator + daemon + plugins, and what a plugin test needs to drive and check it.

    Attributes: ``sim`` (:class:`hydrad.sim.Simulator`), ``daemon``, ``plugins`` (the loaded
    :class:`~hydrad.hooks.Plugins`), ``dispatcher``, ``tools``, ``events`` (every bus event in
    publish order), ``hook_calls`` (every finished observer/life-cycle hook call of every
    plugin, a :class:`~hydrad.hooks.HookCall` each, in completion order).
    """

    def __init__(self, sim: Simulator, daemon: Daemon, plugins: Plugins, dispatcher: HookDispatcher,
                 tools: PluginTools, events: list[Event], hook_calls: list[HookCall], mouth: _Mouth) -> None:
        self.sim = sim
        self.daemon = daemon
        self.plugins = plugins
        self.dispatcher = dispatcher
        self.tools = tools
        self.events = events
        self.hook_calls = hook_calls
        self._mouth = mouth

    # ------------------------------------------------------------------ waiting
    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy (returned) or fail the test."""
        import trio

        with trio.move_on_after(timeout):
            while not (value := predicate()):
                await trio.sleep(0.02)
            return value
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def events_named(self, name: str, **match: Any) -> list[Event]:
        """Bus events called ``name`` whose fields equal every ``match`` item."""
        return [e for e in self.events if e.name == name and all(e.fields.get(k) == v for k, v in match.items())]

    async def wait_for_event(self, name: str, *, count: int = 1, timeout: float = 20.0, **match: Any) -> Event:
        """Wait until ``count`` events ``name`` (matching ``match``) happened; return the last of them."""
        found = await self.wait_for(lambda: (lambda es: es if len(es) >= count else None)(self.events_named(name, **match)),
                                    timeout, f"{count} x event {name} {match or ''}")
        return found[count - 1]

    def hooks_called(self, plugin: str | None = None, *, outcome: str | None = None) -> list[str]:
        """Names of the hooks called (in completion order), of one plugin or all."""
        return [c.hook for c in self.hook_calls
                if (plugin is None or c.plugin == plugin) and (outcome is None or c.outcome == outcome)]

    async def wait_for_hook(self, hook: str, plugin: str | None = None, *, count: int = 1, timeout: float = 20.0) -> HookCall:
        def found() -> Any:
            calls = [c for c in self.hook_calls if c.hook == hook and (plugin is None or c.plugin == plugin)]
            return calls if len(calls) >= count else None

        calls = await self.wait_for(found, timeout, f"{count} x {hook} of {plugin or 'any plugin'}")
        return calls[count - 1]

    # ------------------------------------------------------------------ the user
    async def wait_until_listening(self, timeout: float = 20.0) -> None:
        """Wait until the session is configured and the microphone streams."""
        await self.wait_for(lambda: self.daemon.gate_open, timeout, "the mic gate to open (session.configured)")

    async def say(self, speech: str | Path | bytes = "hello", *, seconds: float | None = None,
                  timeout: float = 30.0) -> None:
        """Speak into the microphone: a built-in utterance (``hello``, ``interrupt``), a 16 kHz
        mono WAV path, or PCM16 bytes. Returns when the last sample was captured; the
        simulator's VAD ends the turn 0.5 s later."""
        import trio

        await self.wait_until_listening(timeout)
        self._mouth.queue(load_speech(speech, seconds))
        with trio.fail_after(timeout):
            await self._mouth.drained.wait()

    async def blip(self) -> None:
        """A sound too short to be a turn (the simulator discards it: ``user_turn_done`` ``discarded``)."""
        await self.say("hello", seconds=0.08)

    # ------------------------------------------------------------------ the model
    def script(self, turn: int, **action: Any) -> None:
        """Set what the simulator does for user turn ``turn`` of the session (1-based), e.g.
        ``tool_calls=[{"name": ..., "arguments": {...}}]``, ``reply_s=5.0``, ``error="..."``."""
        self.sim.script(turn, **action)

    def next_turn(self, **action: Any) -> int:
        """Script the next completed user turn of the current session; returns its number."""
        since = 0
        for i, e in enumerate(self.events):
            if e.name == "session_connected":
                since = i
        done = sum(1 for e in self.events[since:] if e.name == "user_turn_done" and e.fields.get("status") == "completed")
        self.sim.script(done + 1, **action)
        return done + 1

    # ------------------------------------------------------------------ tools
    def tool_outputs(self) -> list[dict[str, Any]]:
        """Every ``function_call_output`` the simulator received, as ``{call_id, name, output,
        value, error}``: ``value`` is the output JSON-decoded (None if it is not JSON),
        ``name`` the tool called, ``error`` the daemon's error text or None."""
        names = {e.fields["call_id"]: e.fields["name"] for e in self.events if e.name == "tool_call"}
        errors = {e.fields["call_id"]: e.fields.get("error") for e in self.events if e.name == "tool_result"}
        out = []
        for record in self.sim.sessions:
            for item in record.tool_outputs:
                try:
                    value = json.loads(item["output"])
                except ValueError:
                    value = None
                out.append({"call_id": item["call_id"], "name": names.get(item["call_id"]), "output": item["output"],
                            "value": value, "error": errors.get(item["call_id"])})
        return out

    async def wait_for_tool_outputs(self, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until the simulator received ``count`` tool outputs; returns all of them."""
        return await self.wait_for(lambda: (lambda o: o if len(o) >= count else None)(self.tool_outputs()),
                                   timeout, f"{count} tool output(s) at the simulator")

    # ------------------------------------------------------------------ control
    async def cancel(self, source: str = "programmatic") -> dict[str, Any]:
        return await self.daemon.cancel(source)


@contextlib.asynccontextmanager
async def start_hydrad(
    tmp_path: Path | None = None,
    *,
    plugins: Sequence[Any] = (),
    config: dict[str, Any] | None = None,
    sim_config: SimConfig | None = None,
    backend: str = "null",
    entry_points: bool = False,
    wait_connected: bool = True,
) -> AsyncIterator[HydradHarness]:
    """Run the simulator, a daemon and the plugins until the block ends.

    ``plugins``: plugin objects (modules, instances, or ``(name, obj)``) loaded like installed
    ones; ``config``: TOML-shaped overrides merged into the test config (``plugins.<name>``
    tables, ``plugins.hook_deadline_s``, ``session``...); ``entry_points``: also load the
    installed ``hydrad`` entry points (off by default, so the test sees only its plugin).
    """
    import trio

    from hydrad.config import Secret, config_from_dict
    from hydrad.events import EventBus
    from hydrad.hooks import HookDispatcher, PluginTools, load_plugins
    from hydrad.pipeline.daemon import Daemon
    from hydrad.sim import SimConfig, Simulator

    sim = Simulator(sim_config or SimConfig(reply_s=1.0))
    events: list[Any] = []
    hook_calls: list[Any] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        data: dict[str, Any] = {
            "hydra": {"url": f"ws://127.0.0.1:{port}/waves/v1/s2s", "ping_interval_s": 2.0, "ping_timeout_s": 5.0},
            "audio": {"backend": backend},
            "control": {"enabled": False},
            "reconnect": {"initial_s": 0.1, "max_s": 0.5},
        }
        if backend == "wav":
            import tempfile

            where = tmp_path if tmp_path is not None else Path(tempfile.mkdtemp(prefix="hydrad-test-"))
            data["audio"]["wav"] = {"speaker": str(where / "speaker.wav")}
        cfg = config_from_dict(_merge(data, config or {}), "hydrad.testing")
        loaded = load_plugins(cfg, extra=list(plugins), entry_points=entry_points)
        tools = PluginTools(loaded)
        bus = EventBus()
        bus.subscribe(events.append)
        daemon = Daemon(cfg, Secret(SIM_KEY, "hydrad.testing"), tools=tools, bus=bus,
                        engine_options={"t0_speaker": time.monotonic()} if backend == "wav" else None)
        mouth = _Mouth(daemon)
        daemon.on_capture = mouth  # type: ignore[method-assign]
        dispatcher = HookDispatcher(loaded, daemon, bus)
        dispatcher.monitors.append(hook_calls.append)
        await nursery.start(dispatcher.run)
        await nursery.start(daemon.run)
        harness = HydradHarness(sim, daemon, loaded, dispatcher, tools, events, hook_calls, mouth)
        try:
            if wait_connected:
                await harness.wait_until_listening()
            yield harness
        finally:
            with trio.CancelScope(shield=True):
                daemon.request_stop()
                with trio.move_on_after(5):
                    await daemon.stopped.wait()
                with trio.move_on_after(loaded.hook_deadline_s * 2 + 2):
                    await dispatcher.aclose()
            nursery.cancel_scope.cancel()


# ============================================================================ fixtures


@pytest.fixture
def hydrad_plugins() -> list[Any]:
    """Override: the plugin objects under test (modules, instances, or ``(name, obj)``)."""
    return []


@pytest.fixture
def hydrad_config() -> dict[str, Any]:
    """Override: TOML-shaped config overrides, e.g. ``{"plugins": {"myplugin": {...}}}``."""
    return {}


@pytest.fixture
def hydrad_sim_config() -> Any:
    """Override: a :class:`hydrad.sim.SimConfig` (default: 1 s replies, otherwise the defaults)."""
    return None


@pytest.fixture
def hydrad_backend() -> str:
    """Override: the engine backend, ``null`` (default) or ``wav``."""
    return "null"


@pytest.fixture
def hydrad_entry_points() -> bool:
    """Override: True to load the installed ``hydrad`` entry points too."""
    return False


@pytest.fixture
async def hydrad(tmp_path: Path, hydrad_plugins: list[Any], hydrad_config: dict[str, Any], hydrad_sim_config: Any,
                 hydrad_backend: str, hydrad_entry_points: bool) -> AsyncIterator[HydradHarness]:
    """A running simulator + daemon with ``hydrad_plugins`` loaded; the session is configured."""
    async with start_hydrad(tmp_path, plugins=hydrad_plugins, config=hydrad_config, sim_config=hydrad_sim_config,
                            backend=hydrad_backend, entry_points=hydrad_entry_points) as harness:
        yield harness
