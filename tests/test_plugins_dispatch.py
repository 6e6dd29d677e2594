"""Hook dispatch, the plugin context and the plugin tool provider, without a daemon.

Real plugins installed through entry points (``tests/plugins_fixture``), a real
:class:`EventBus`, a fake controller standing in for the daemon.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest
import structlog
import trio

from hydrad.config import config_from_dict
from hydrad.events import Event, EventBus
from hydrad.hooks import HookDispatcher, NotRunning, PluginTools, ToolError, hookimpl, load_plugins

from .plugins_fixture import TESTPLUGIN, ensure_installed

ensure_installed(TESTPLUGIN)

import hydrad_testplugin.journal as rec  # noqa: E402  (installed just above if it was missing)

SYNC, ASYNC = "testplugin", "testplugin_async"


class FakeController:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.muted = False

    async def cancel(self, source: str = "programmatic") -> dict[str, Any]:
        self.calls.append(("cancel", source, threading.current_thread() is threading.main_thread()))
        return {"in_flight": True, "audible": True, "response_id": "resp_1", "flushed": True}

    def status(self) -> dict[str, Any]:
        self.calls.append(("status", threading.current_thread() is threading.main_thread()))
        return {"state": "connected", "session_id": "s1", "turn_state": "speaking", "muted": self.muted,
                "model": "hydra-v1.1", "voice": "zoe", "output_rate": 24000,
                "config_source": "/etc/hydrad/secret-path.toml", "engine": {"pid": 1}, "last_error": None}

    def mute(self) -> dict[str, Any]:
        self.calls.append(("mute", threading.current_thread() is threading.main_thread()))
        self.muted = True
        return {"muted": True}

    def unmute(self) -> dict[str, Any]:
        self.calls.append(("unmute", threading.current_thread() is threading.main_thread()))
        self.muted = False
        return {"muted": False}


def load(sync: dict | None = None, async_: dict | None = None, deadline: float = 2.0, **plugins_cfg: Any):
    tables = {SYNC: {"active": True, **(sync or {})}, ASYNC: {"active": True, **(async_ or {})}}
    cfg = config_from_dict({"plugins": {"hook_deadline_s": deadline, "disabled": ["clock", "exec", "webhook"],
                                        **tables, **plugins_cfg}}, "test")
    return load_plugins(cfg)


@pytest.fixture(autouse=True)
def clean_record():
    rec.clear()
    yield
    rec.clear()


def ev(name: str, **fields: Any) -> Event:
    return Event(name, fields)


async def wait_until(pred, timeout: float = 10.0, what: str = "condition"):
    with trio.move_on_after(timeout):
        while not (v := pred()):
            await trio.sleep(0.005)
        return v
    raise AssertionError(f"timed out waiting for {what}")


def observed(plugin: str, generic: bool = False) -> list[tuple[str, Any]]:
    return [(c.hook, c.fields.get("i")) for c in rec.calls(plugin)
            if c.hook.startswith("hydrad_") and (generic or c.hook != "hydrad_event")
            and c.hook not in ("hydrad_startup", "hydrad_shutdown", "hydrad_serve", "hydrad_call_tool")]


# ============================================================================ delivery


async def test_sync_hooks_run_in_worker_threads_and_async_hooks_in_the_trio_thread(nursery) -> None:
    bus = EventBus()
    dispatcher = HookDispatcher(load(), FakeController(), bus)
    await nursery.start(dispatcher.run)
    bus.publish(ev("speech_started", item_id="u1", audio_start_ms=10, during_response=False))
    await wait_until(lambda: len(rec.calls(hook="hydrad_speech_started")) == 2, what="both plugins")
    [s] = rec.calls(SYNC, "hydrad_speech_started")
    [a] = rec.calls(ASYNC, "hydrad_speech_started")
    assert s.main_thread is False and a.main_thread is True
    assert s.fields == {"item_id": "u1", "audio_start_ms": 10, "during_response": False}
    await dispatcher.aclose()


async def test_each_plugin_sees_events_in_publish_order_specific_hook_before_generic(nursery) -> None:
    bus = EventBus()
    dispatcher = HookDispatcher(load(), FakeController(), bus)
    await nursery.start(dispatcher.run)
    names = ["speech_started", "speech_stopped", "user_turn_done", "response_created", "response_audio_started",
             "barge_in", "response_done", "tool_call", "tool_result", "service_error"]
    expected = []
    for i in range(200):
        name = names[(i * 7) % len(names)]
        bus.publish(ev(name, i=i))
        expected += [(f"hydrad_{name}", i), ("hydrad_event", i)]
        if i % 50 == 0:
            await trio.sleep(0)  # let workers run part-way: order must hold across interleavings
    for plugin in (SYNC, ASYNC):
        await wait_until(lambda: len(observed(plugin, generic=True)) == len(expected), what=plugin)
        assert observed(plugin, generic=True) == expected, plugin
    assert dispatcher.totals().get("dropped", 0) == 0
    await dispatcher.aclose()


async def test_an_event_without_a_specific_hook_goes_to_hydrad_event_only(nursery) -> None:
    class OnlyGeneric:
        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def hydrad_event(self, event: Event) -> None:
            self.seen.append(event.name)

    p = OnlyGeneric()
    plugins = load_plugins(config_from_dict({}, "t"), extra=[("generic", p)], entry_points=False)
    bus = EventBus()
    dispatcher = HookDispatcher(plugins, None, bus)
    await nursery.start(dispatcher.run)
    bus.publish(ev("some_future_event"))
    bus.publish(ev("speech_started"))
    await wait_until(lambda: len(p.seen) == 2)
    assert p.seen == ["some_future_event", "speech_started"]
    await dispatcher.aclose()


async def test_each_plugin_gets_its_own_copy_of_the_event(nursery) -> None:
    class Vandal:
        @hookimpl
        def hydrad_response_done(self, event: Event) -> None:
            event.fields["metrics"]["heard_s"] = -1
            event.fields["status"] = "vandalised"

    class Reader:
        def __init__(self) -> None:
            self.seen: list[dict] = []

        @hookimpl
        async def hydrad_response_done(self, event: Event) -> None:
            await trio.sleep(0.05)  # let the vandal go first
            self.seen.append(event.fields)

    reader = Reader()
    plugins = load_plugins(config_from_dict({}, "t"), extra=[("vandal", Vandal()), ("reader", reader)],
                           entry_points=False)
    bus = EventBus()
    kept: list[Event] = []
    bus.subscribe(kept.append)  # like the timeline, which keeps events
    dispatcher = HookDispatcher(plugins, None, bus)
    await nursery.start(dispatcher.run)
    bus.publish(ev("response_done", status="completed", metrics={"heard_s": 1.5}))
    await wait_until(lambda: reader.seen)
    await trio.sleep(0.1)
    assert reader.seen == [{"status": "completed", "metrics": {"heard_s": 1.5}}]
    assert kept[0].fields == {"status": "completed", "metrics": {"heard_s": 1.5}}
    assert dispatcher.stats["vandal"]["errors"] == 0
    await dispatcher.aclose()


async def test_a_raising_hook_is_logged_with_the_plugin_name_counted_and_the_next_event_delivered(nursery) -> None:
    bus = EventBus()
    dispatcher = HookDispatcher(load(sync={"raise_in": ["hydrad_speech_started"]},
                                     async_={"raise_in": ["hydrad_speech_started"]}), FakeController(), bus)
    await nursery.start(dispatcher.run)
    with structlog.testing.capture_logs() as logs:
        bus.publish(ev("speech_started", i=1))
        bus.publish(ev("speech_stopped", i=2))
        for plugin in (SYNC, ASYNC):
            await wait_until(lambda: ("hydrad_speech_stopped", 2) in observed(plugin), what=plugin)
    failed = [entry for entry in logs if entry["event"] == "plugin_hook_failed"]
    assert {(e["plugin"], e["hook"]) for e in failed} == {(SYNC, "hydrad_speech_started"), (ASYNC, "hydrad_speech_started")}
    assert all("fails in hydrad_speech_started on purpose" in e["error"] for e in failed)
    assert dispatcher.stats[SYNC]["errors"] == 1 and dispatcher.stats[ASYNC]["errors"] == 1
    assert bus.sink_errors == 0  # the failure never reached the publisher
    await dispatcher.aclose()


async def test_hooks_past_the_deadline_are_abandoned_and_the_next_event_follows(nursery) -> None:
    bus = EventBus()
    plugins = load(sync={"hang_in": ["hydrad_speech_started"], "hang_s": 1.5},
                   async_={"hang_in": ["hydrad_speech_started"], "hang_s": 30}, deadline=0.2)
    dispatcher = HookDispatcher(plugins, FakeController(), bus)
    await nursery.start(dispatcher.run)
    with structlog.testing.capture_logs() as logs:
        t0 = time.monotonic()
        bus.publish(ev("speech_started", i=1))
        bus.publish(ev("speech_stopped", i=2))
        for plugin in (SYNC, ASYNC):
            await wait_until(lambda: ("hydrad_speech_stopped", 2) in observed(plugin), what=plugin)
        took = time.monotonic() - t0
    assert 0.15 < took < 1.2, took  # after the 0.2 s deadline, long before the 1.5 s / 30 s hang
    timeouts = [(e["plugin"], e["hook"]) for e in logs if e["event"] == "plugin_hook_timeout"]
    assert sorted(timeouts) == [(SYNC, "hydrad_speech_started"), (ASYNC, "hydrad_speech_started")]
    assert dispatcher.stats[SYNC]["timeouts"] == 1 and dispatcher.stats[ASYNC]["timeouts"] == 1
    await dispatcher.aclose()


async def test_a_stuck_plugin_loses_its_own_events_never_blocks_publish_or_other_plugins(nursery) -> None:
    bus = EventBus()
    plugins = load(async_={"hang_in": ["*"], "hang_s": 60}, deadline=60)
    dispatcher = HookDispatcher(plugins, FakeController(), bus, queue_size=4)
    await nursery.start(dispatcher.run)
    worst = 0.0
    for i in range(20):
        t = time.perf_counter()
        bus.publish(ev("speech_started", i=i))
        worst = max(worst, time.perf_counter() - t)
        await trio.sleep(0.01)
    await wait_until(lambda: len(observed(SYNC)) == 20, what="the healthy plugin got everything")
    assert worst < 0.05
    # the stuck plugin: one event in its hook, 4 queued, the rest dropped for it alone
    assert dispatcher.stats[ASYNC]["dropped"] == 20 - 1 - 4
    assert dispatcher.stats[SYNC]["dropped"] == 0


async def test_life_cycle_startup_serve_then_queued_events_then_shutdown_then_serve_cancelled(nursery) -> None:
    bus = EventBus()
    dispatcher = HookDispatcher(load(), FakeController(), bus)
    await nursery.start(dispatcher.run)
    # started() came after every startup hook finished
    assert {c.plugin for c in rec.calls(hook="hydrad_startup")} == {SYNC, ASYNC}
    await wait_until(lambda: rec.calls(ASYNC, "hydrad_serve"), what="serve")
    bus.publish(ev("session_disconnected", i=1))
    await dispatcher.aclose()
    for plugin in (SYNC, ASYNC):
        hooks = [c.hook for c in rec.calls(plugin) if c.hook != "hydrad_event"]
        assert hooks.index("hydrad_startup") < hooks.index("hydrad_session_disconnected") < hooks.index("hydrad_shutdown")
    hooks = [c.hook for c in rec.calls(ASYNC)]
    assert hooks[-1] == "serve_cancelled" and hooks[-2] == "hydrad_shutdown"
    bus.publish(ev("speech_started", i=2))  # after the stop: not delivered, not an error
    await trio.sleep(0.05)
    assert ("hydrad_speech_started", 2) not in observed(SYNC) and bus.sink_errors == 0


# ============================================================================ the context


async def test_plugin_requests_reach_the_controller_in_the_trio_thread_from_threads_and_tasks(nursery) -> None:
    bus = EventBus()
    controller = FakeController()
    plugins = load(sync={"cancel_on": "speech_started", "mute_on": "speech_stopped"},
                   async_={"cancel_on": "barge_in", "mute_on": "response_done"})
    dispatcher = HookDispatcher(plugins, controller, bus)
    await nursery.start(dispatcher.run)
    for name in ("speech_started", "speech_stopped", "barge_in", "response_done"):
        bus.publish(ev(name))
    await wait_until(lambda: len([c for c in controller.calls if c[0] == "cancel"]) == 2, what="two cancels")
    await wait_until(lambda: len(rec.calls(hook="mute")) == 2, what="two mutes")
    cancels = [c for c in controller.calls if c[0] == "cancel"]
    assert cancels == [("cancel", "plugin", True), ("cancel", "plugin", True)]
    assert all(c[-1] is True for c in controller.calls), "the controller was called outside the trio thread"
    for plugin in (SYNC, ASYNC):
        [m] = rec.calls(plugin, "mute")
        assert set(m.fields["before"]) == {"state", "session_id", "turn_state", "muted", "model", "voice", "output_rate"}
        assert m.fields["after"]["muted"] is True
    await dispatcher.aclose()


async def test_context_control_outside_a_run_raises_not_running() -> None:
    plugins = load()
    ctx = plugins[SYNC].ctx
    assert ctx.plugin == SYNC and ctx.settings.active is True
    for call in (ctx.request_cancel, ctx.mute, ctx.unmute, ctx.session_state):
        with pytest.raises(NotRunning):
            call()


# ============================================================================ tools


async def test_plugin_tools_sync_async_errors_and_results() -> None:
    tools = PluginTools(load(sync={"hang_s": 2.0}))
    names = [s["name"] for s in tools.schemas()]
    assert names == ["echo", "add", "boom", "refuse", "hang", "not_json", "state", "slow_async", "hang_async",
                     "boom_async"]  # load order
    assert all(s["type"] == "function" for s in tools.schemas())
    assert await tools.call("echo", {"text": "hi"}, "c1") == '{"echo":"hi"}'
    assert await tools.call("add", {"a": 2, "b": 3}, "c2") == "5"
    [c] = [c for c in rec.calls(SYNC, "hydrad_call_tool") if c.fields["call_id"] == "c1"]
    assert c.main_thread is False  # a def tool runs in a worker thread
    t = time.monotonic()
    assert await tools.call("slow_async", {"delay_s": 0.2}, "c3") == '{"slept":0.2}'
    assert time.monotonic() - t >= 0.19
    with pytest.raises(ToolError, match=r"^the order system is offline$"):
        await tools.call("refuse", {}, "c4")
    with pytest.raises(ToolError, match=r"^tool 'boom' failed: RuntimeError: kaboom$"):
        await tools.call("boom", {}, "c5")
    with pytest.raises(ToolError, match=r"^tool 'boom_async' failed: ValueError: async kaboom$"):
        await tools.call("boom_async", {}, "c6")
    with pytest.raises(ToolError, match=r"not JSON-serialisable \(set\)"):
        await tools.call("not_json", {}, "c7")
    with pytest.raises(ToolError, match="no tool named 'nope'"):
        await tools.call("nope", {}, "c8")
    for name in ("hang", "hang_async"):  # the daemon's fail_after cuts both, sync thread or task
        t = time.monotonic()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.2):
                await tools.call(name, {}, "c9")
        assert time.monotonic() - t < 1.0
    assert tools.stats[SYNC]["cancelled"] == 1 and tools.stats[ASYNC]["cancelled"] == 1
    assert tools.stats[SYNC]["errors"] == 3 and tools.stats[ASYNC]["errors"] == 1
    assert tools.owner("echo") == SYNC and tools.owner("slow_async") == ASYNC


# ============================================================================ cost on the pipeline


class _SyncObserver:
    def __init__(self) -> None:
        self.delays: list[float] = []

    @hookimpl
    def hydrad_speech_started(self, event: Event) -> None:
        self.delays.append(time.monotonic() - event.t)


class _AsyncObserver:
    def __init__(self) -> None:
        self.delays: list[float] = []

    @hookimpl
    async def hydrad_speech_started(self, event: Event) -> None:
        self.delays.append(time.monotonic() - event.t)


async def _hook_delay(observer: Any, n: int = 200) -> float:
    """Median milliseconds from publish to the hook running (the dispatcher idle between events)."""
    plugins = load_plugins(config_from_dict({}, "t"), extra=[("p", observer)], entry_points=False)
    bus = EventBus()
    async with trio.open_nursery() as nursery:
        dispatcher = HookDispatcher(plugins, None, bus)
        await nursery.start(dispatcher.run)
        for _ in range(n):
            bus.publish(ev("speech_started"))
            await trio.sleep(0.002)
        await wait_until(lambda: len(observer.delays) == n)
        await dispatcher.aclose()
    return statistics.median(observer.delays) * 1000


async def _publish_cost(plugins_objs: list[Any], n: int = 3000) -> dict[str, float]:
    """Median / p99 microseconds spent inside ``bus.publish`` with the dispatcher subscribed."""
    plugins = load_plugins(config_from_dict({}, "t"), extra=[(f"p{i}", o) for i, o in enumerate(plugins_objs)],
                           entry_points=False)
    bus = EventBus()
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        dispatcher = HookDispatcher(plugins, None, bus, queue_size=256)
        await nursery.start(dispatcher.run)
        event = ev("speech_started", item_id="u", audio_start_ms=0, during_response=False)
        for batch in range(n // 100):
            for _ in range(100):
                t = time.perf_counter_ns()
                bus.publish(event)
                samples.append((time.perf_counter_ns() - t) / 1000)
            # let the workers drain (as the pipeline's own awaits would), outside the timing
            while dispatcher.totals().get("calls", 0) < (batch + 1) * 100 * len(plugins_objs):
                await trio.sleep(0.001)
        assert dispatcher.totals().get("dropped", 0) == 0
        await dispatcher.aclose()
    samples.sort()
    return {"median_us": statistics.median(samples), "p99_us": samples[int(len(samples) * 0.99)]}


async def test_dispatch_cost_on_the_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    results = {
        "no plugin": await _publish_cost([]),
        "1 sync hook": await _publish_cost([_SyncObserver()]),
        "1 async hook": await _publish_cost([_AsyncObserver()]),
        "5 sync + 5 async hooks": await _publish_cost([_SyncObserver() for _ in range(5)]
                                                      + [_AsyncObserver() for _ in range(5)]),
    }
    delay_sync, delay_async = await _hook_delay(_SyncObserver()), await _hook_delay(_AsyncObserver())
    with capsys.disabled():
        print("\nbus.publish cost with the hook dispatcher subscribed (us):")
        for what, r in results.items():
            print(f"  {what:24s} median {r['median_us']:6.1f}   p99 {r['p99_us']:6.1f}")
        print(f"publish -> hook running (ms, median): sync (worker thread) {delay_sync:.2f}, "
              f"async (task) {delay_async:.2f}")
    assert delay_sync < 50 and delay_async < 50
    # Generous bounds (a shared 2-core box): the publish path is a queue put per plugin,
    # not a hook call (a thread hop alone is ~50-100 us; a slow hook would show as seconds).
    assert results["1 sync hook"]["median_us"] < 100
    assert results["1 async hook"]["median_us"] < 100
    assert results["5 sync + 5 async hooks"]["median_us"] < 300
