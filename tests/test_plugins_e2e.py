"""Plugins against the real daemon, the real simulator and the real engine child (null backend).

The plugins are the two real pluggy plugins of ``tests/plugins_fixture`` installed through the
``hydrad`` entry-point group: ``testplugin`` (every hook a plain ``def``, run in worker threads)
and ``testplugin_async`` (every hook ``async def``). Each test checks the documented event order
(docs/plugins.md, "Event order") as *each plugin* saw it. The harness is ``hydrad.testing``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import structlog
import trio

from hydrad.sim import SimConfig
from hydrad.testing import start_hydrad

from .plugins_fixture import FIRST_PARTY, TESTPLUGIN, ensure_installed

ensure_installed(TESTPLUGIN, *FIRST_PARTY)

import hydrad_testplugin.journal as rec  # noqa: E402

pytestmark = pytest.mark.slow

SYNC, ASYNC = "testplugin", "testplugin_async"
BOTH = (SYNC, ASYNC)


def config(sync: dict | None = None, async_: dict | None = None, **plugins: Any) -> dict[str, Any]:
    return {"plugins": {"disabled": ["clock", "exec", "webhook"], SYNC: {"active": True, **(sync or {})},
                        ASYNC: {"active": True, **(async_ or {})}, **plugins}}


@pytest.fixture(autouse=True)
def clean_record():
    rec.clear()
    yield
    rec.clear()


def seen(plugin: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, fields) of the per-event hooks the plugin got, in call order (no engine_state)."""
    return [(c.hook.removeprefix("hydrad_"), c.fields) for c in rec.calls(plugin)
            if c.hook.startswith("hydrad_") and c.hook not in ("hydrad_event", "hydrad_call_tool", "hydrad_serve")
            and c.hook != "hydrad_engine_state"]


def names(plugin: str) -> list[str]:
    return [n for n, _ in seen(plugin)]


def index(plugin: str, name: str, **match: Any) -> int:
    for i, (n, f) in enumerate(seen(plugin)):
        if n == name and all(f.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"{plugin} never saw {name} {match}; saw {names(plugin)}")


def assert_same_order_as_the_bus(h: Any, plugin: str) -> None:
    """The plugin got every event exactly once, in publish order, each specific hook right before hydrad_event."""
    bus = [e.name for e in h.events]
    specific = [c.hook.removeprefix("hydrad_") for c in rec.calls(plugin)
                if c.hook.startswith("hydrad_") and c.hook not in ("hydrad_event", "hydrad_call_tool", "hydrad_serve",
                                                                    "hydrad_startup", "hydrad_shutdown")]
    generic = [c.event for c in rec.calls(plugin) if c.hook == "hydrad_event"]
    assert specific == bus, plugin
    assert generic == bus, plugin
    pairs = [c.hook for c in rec.calls(plugin) if c.event is not None]
    assert pairs == [h for name in bus for h in (f"hydrad_{name}", "hydrad_event")], plugin


# ============================================================================ the documented orders


async def test_normal_turn_order(tmp_path) -> None:
    async with start_hydrad(tmp_path, config=config(), entry_points=True) as h:
        await h.say("hello", seconds=1.0)
        await h.wait_for_event("response_done")
    for plugin in BOTH:
        rid = seen(plugin)[index(plugin, "response_created")][1]["response_id"]
        assert names(plugin) == [
            "startup", "session_connected", "session_configured",
            "speech_started", "speech_stopped", "user_turn_done", "response_created", "response_audio_started",
            "response_done", "cancel_requested", "session_disconnected", "shutdown",
        ], plugin
        assert seen(plugin)[index(plugin, "speech_started")][1]["during_response"] is False
        assert seen(plugin)[index(plugin, "user_turn_done")][1]["status"] == "completed"
        started = seen(plugin)[index(plugin, "response_audio_started")][1]
        done = seen(plugin)[index(plugin, "response_done")][1]
        assert started["response_id"] == done["response_id"] == rid
        assert started["latency_ms"] is not None and done["status"] == "completed"
        assert seen(plugin)[index(plugin, "cancel_requested")][1]["source"] == "shutdown"
        assert_same_order_as_the_bus(h, plugin)
    # engine_state came before the session, and the serve task was cancelled after shutdown
    assert [c.hook for c in rec.calls(ASYNC) if c.hook in ("hydrad_engine_state", "hydrad_session_connected")][-1] \
        == "hydrad_session_connected"
    assert [c.hook for c in rec.calls(ASYNC)][-1] == "serve_cancelled"
    assert all(c.main_thread is False for c in rec.calls(SYNC) if c.hook.startswith("hydrad_"))
    assert all(c.main_thread is True for c in rec.calls(ASYNC) if c.hook.startswith("hydrad_"))
    assert h.dispatcher.totals().get("errors", 0) == 0 and h.dispatcher.totals().get("timeouts", 0) == 0


async def test_barge_in_order(tmp_path) -> None:
    sim = SimConfig(reply_s=1.0, realtime_factor=1.0)  # real-time generation: the reply is still in flight
    async with start_hydrad(tmp_path, config=config(), sim_config=sim, entry_points=True) as h:
        h.next_turn(reply_s=6.0)
        await h.say("hello", seconds=1.0)
        await h.wait_for_event("response_audio_started")
        await trio.sleep(0.5)
        await h.say("interrupt", seconds=1.0)
        await h.wait_for_event("response_done", count=2)
    for plugin in BOTH:
        r1 = seen(plugin)[index(plugin, "response_created")][1]["response_id"]
        audible = index(plugin, "response_audio_started", response_id=r1)
        barge_speech = index(plugin, "speech_started", during_response=True)
        barge = index(plugin, "barge_in", response_id=r1, trigger="speech_started")
        done1 = index(plugin, "response_done", response_id=r1)
        assert audible < barge_speech < barge < done1, names(plugin)
        assert seen(plugin)[done1][1]["status"] == "cancelled" and seen(plugin)[done1][1]["reason"] == "interrupted"
        assert 0.3 < seen(plugin)[barge][1]["heard_s"] < 3.0
        # the interrupting turn then runs as a normal turn
        stopped = index(plugin, "speech_stopped", item_id=seen(plugin)[barge_speech][1]["item_id"])
        turn = index(plugin, "user_turn_done", item_id=seen(plugin)[barge_speech][1]["item_id"])
        created2 = max(i for i, (n, _) in enumerate(seen(plugin)) if n == "response_created")
        done2 = max(i for i, (n, _) in enumerate(seen(plugin)) if n == "response_done")
        assert barge_speech < stopped < turn < created2 < done2
        assert seen(plugin)[done2][1]["status"] == "completed"
        assert_same_order_as_the_bus(h, plugin)


async def test_cancel_requested_by_a_plugin_order(tmp_path) -> None:
    sim = SimConfig(reply_s=6.0, realtime_factor=1.0)
    # the def plugin asks for the cancel from its worker thread as soon as the answer is audible
    async with start_hydrad(tmp_path, config=config(sync={"cancel_on": "response_audio_started"}), sim_config=sim,
                            entry_points=True) as h:
        await h.say("hello", seconds=1.0)
        done = await h.wait_for_event("response_done")
        assert len(h.sim.sessions[0].received_of("response.cancel")) == 1
        assert done.fields["metrics"]["heard_s"] < 2.0  # a 6 s answer, cut right after it began
    for plugin in BOTH:
        audible = index(plugin, "response_audio_started")
        cancel = index(plugin, "cancel_requested", source="plugin")
        barge = index(plugin, "barge_in", trigger="cancel")
        done = index(plugin, "response_done")
        assert audible < cancel < barge < done, names(plugin)
        assert seen(plugin)[cancel][1]["in_flight"] is True
        assert seen(plugin)[done][1]["status"] == "cancelled" and seen(plugin)[done][1]["reason"] == "client_cancelled"
        assert_same_order_as_the_bus(h, plugin)


async def test_discarded_turn_order(tmp_path) -> None:
    async with start_hydrad(tmp_path, config=config(), entry_points=True) as h:
        await h.blip()
        await h.wait_for_event("user_turn_done")
        await trio.sleep(1.5)
    for plugin in BOTH:
        assert names(plugin) == [
            "startup", "session_connected", "session_configured", "speech_started", "speech_stopped",
            "user_turn_done", "cancel_requested", "session_disconnected", "shutdown",
        ], plugin
        assert seen(plugin)[index(plugin, "user_turn_done")][1]["status"] == "discarded"
        assert_same_order_as_the_bus(h, plugin)


async def test_tool_turn_order_two_tools_one_sync_one_async(tmp_path) -> None:
    async with start_hydrad(tmp_path, config=config(), entry_points=True) as h:
        h.next_turn(tool_calls=[{"name": "echo", "arguments": {"text": "hi"}},
                                {"name": "slow_async", "arguments": {"delay_s": 0.3}}])
        await h.say("hello", seconds=1.0)
        outs = await h.wait_for_tool_outputs(2)
        await h.wait_for_event("response_done", count=2)
        record = h.sim.sessions[0]
        assert len(record.received_of("response.create")) == 1  # one narration for both outputs
        assert [r.kind for r in record.responses] == ["tool_calls", "audio"]
    by_name = {o["name"]: o for o in outs}
    assert by_name["echo"]["value"] == {"echo": "hi"} and by_name["echo"]["error"] is None
    assert by_name["slow_async"]["value"] == {"slept": 0.3} and by_name["slow_async"]["error"] is None
    [echo] = rec.calls(SYNC, "hydrad_call_tool")
    [slow] = rec.calls(ASYNC, "hydrad_call_tool")
    assert echo.main_thread is False and slow.main_thread is True
    for plugin in BOTH:
        a = seen(plugin)[index(plugin, "response_created")][1]["response_id"]
        order = [index(plugin, n) for n in ("speech_started", "speech_stopped", "user_turn_done", "response_created")]
        assert order == sorted(order)
        created_a = order[-1]
        done_a = index(plugin, "response_done", response_id=a)
        created_b = max(i for i, (n, _) in enumerate(seen(plugin)) if n == "response_created")
        assert created_b > created_a
        b = seen(plugin)[created_b][1]["response_id"]
        for o in outs:
            call = index(plugin, "tool_call", call_id=o["call_id"])
            result = index(plugin, "tool_result", call_id=o["call_id"])
            assert created_a < call < result < created_b
            assert call < done_a
        assert done_a < created_b < index(plugin, "response_audio_started", response_id=b) \
            < index(plugin, "response_done", response_id=b)
        assert seen(plugin)[done_a][1]["metrics"]["tool_calls"] and seen(plugin)[done_a][1]["status"] == "completed"
        assert_same_order_as_the_bus(h, plugin)


# ============================================================================ tools that go wrong


async def test_tools_invalid_arguments_raise_hang_refuse_and_bad_results_all_answer_the_model(tmp_path) -> None:
    cfg = config(sync={"hang_s": 3.0}, tool_deadline_s=1.0)
    async with start_hydrad(tmp_path, config=cfg, entry_points=True) as h:
        calls = [
            {"name": "add", "arguments": {"a": "x", "b": 1}, "call_id": "c_invalid"},
            {"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}, "call_id": "c_extra"},
            {"name": "boom", "arguments": {}, "call_id": "c_boom"},
            {"name": "boom_async", "arguments": {}, "call_id": "c_boom_async"},
            {"name": "hang", "arguments": {}, "call_id": "c_hang"},
            {"name": "hang_async", "arguments": {}, "call_id": "c_hang_async"},
            {"name": "refuse", "arguments": {}, "call_id": "c_refuse"},
            {"name": "not_json", "arguments": {}, "call_id": "c_not_json"},
            {"name": "add", "arguments": {"a": 1, "b": 2}, "call_id": "c_ok"},
            {"name": "state", "arguments": {}, "call_id": "c_state"},
        ]
        h.next_turn(tool_calls=calls)
        t0 = time.monotonic()
        await h.say("hello", seconds=1.0)
        outs = {o["call_id"]: o for o in await h.wait_for_tool_outputs(len(calls), timeout=30)}
        took = time.monotonic() - t0
        narration = await h.wait_for_event("response_done", count=2)
        assert len(h.sim.sessions[0].received_of("response.create")) == 1
        session_id = h.sim.sessions[0].session_id
    assert took < 8.0  # the hung tools were cut at the 1 s deadline, well before the sim's 10 s tool timeout
    assert narration.fields["status"] == "completed"  # the conversation went on
    assert outs["c_invalid"]["value"] == {"error": "invalid arguments at a: 'x' is not of type 'integer'"}
    assert outs["c_extra"]["error"].startswith("invalid arguments at arguments: Additional properties")
    assert outs["c_boom"]["value"] == {"error": "tool 'boom' failed: RuntimeError: kaboom"}
    assert outs["c_boom_async"]["value"] == {"error": "tool 'boom_async' failed: ValueError: async kaboom"}
    assert outs["c_hang"]["value"] == {"error": "tool 'hang' timed out after 1.0 s"}
    assert outs["c_hang_async"]["value"] == {"error": "tool 'hang_async' timed out after 1.0 s"}
    assert outs["c_refuse"]["value"] == {"error": "the order system is offline"}
    assert "not JSON-serialisable (set)" in outs["c_not_json"]["error"]
    assert outs["c_ok"]["output"] == "3" and outs["c_ok"]["error"] is None
    state = outs["c_state"]["value"]
    assert state["session_id"] == session_id and state["state"] == "connected" and state["muted"] is False
    assert set(state) == {"state", "session_id", "turn_state", "muted", "model", "voice", "output_rate"}
    # arguments failing the schema never reached the plugin
    reached = {c.fields["call_id"] for c in rec.calls(hook="hydrad_call_tool")}
    assert "c_invalid" not in reached and "c_extra" not in reached and "c_ok" in reached
    for plugin in BOTH:  # every call was observed with its result, errors included
        results = {f["call_id"]: f for n, f in seen(plugin) if n == "tool_result"}
        assert set(results) == set(outs)
        assert results["c_ok"]["error"] is None and results["c_hang"]["error"].endswith("timed out after 1.0 s")


# ============================================================================ broken plugins, audio goes on


async def test_plugins_raising_and_hanging_in_every_hook_do_not_disturb_audio(tmp_path) -> None:
    cfg = config(sync={"raise_in": ["*"]}, async_={"hang_in": ["*"], "hang_s": 30.0}, hook_deadline_s=0.3)
    sim = SimConfig(reply_s=3.0)
    with structlog.testing.capture_logs() as logs:
        async with start_hydrad(tmp_path, config=cfg, sim_config=sim, entry_points=True) as h:
            d = h.daemon
            publish, cost_us = d.bus.publish, []

            def timed_publish(event: Any) -> None:  # the time the pipeline spends handing out events
                t = time.perf_counter_ns()
                publish(event)
                cost_us.append((time.perf_counter_ns() - t) / 1000)

            d.bus.publish = timed_publish  # type: ignore[method-assign]
            frames0, t0 = d.counters["uplink_frames_sent"], time.monotonic()
            filled0 = d.counters["uplink_silence_filled"]
            await h.say("hello", seconds=1.0)
            done = await h.wait_for_event("response_done", timeout=30)
            await trio.sleep(1.2)  # one more engine STATS report
            frames, elapsed = d.counters["uplink_frames_sent"] - frames0, time.monotonic() - t0
            filled = d.counters["uplink_silence_filled"] - filled0
            engine_stats = dict(d.engine.last_stats)
            dispatcher_stats = {k: dict(v) for k, v in h.dispatcher.stats.items()}
    # the mic kept streaming at real time (50 frames/s of 20 ms) through all of it
    assert 0.9 * elapsed * 50 < frames < 1.1 * elapsed * 50 + 6, (frames, elapsed)
    assert filled <= 2, f"the uplink starved {filled} times"
    # the whole answer was played, without underruns
    assert done.fields["status"] == "completed"
    assert done.fields["metrics"]["heard_s"] == pytest.approx(3.0, abs=0.1)
    assert engine_stats.get("underruns", 0) == 0 and engine_stats.get("capture_dropped", 0) == 0
    # and the failures were counted and logged with the plugin's name
    assert dispatcher_stats[SYNC]["errors"] >= 8 and dispatcher_stats[SYNC].get("timeouts", 0) == 0
    assert dispatcher_stats[ASYNC]["timeouts"] >= 4
    failed = {e["plugin"] for e in logs if e["event"] == "plugin_hook_failed"}
    timed_out = {e["plugin"] for e in logs if e["event"] == "plugin_hook_timeout"}
    assert failed == {SYNC} and timed_out == {ASYNC}
    # what one publish costs the pipeline in the real daemon, with both broken plugins subscribed
    cost_us.sort()
    print(f"\nbus.publish in the daemon with 2 plugins (sync raising, async hanging): n={len(cost_us)} "
          f"median {cost_us[len(cost_us) // 2]:.1f} us, max {cost_us[-1]:.1f} us")
    assert len(cost_us) >= 8 and cost_us[len(cost_us) // 2] < 200


# ============================================================================ the kit itself, wav backend


async def test_kit_with_the_wav_backend_records_what_the_user_heard(tmp_path) -> None:
    import wave

    async with start_hydrad(tmp_path, config=config(), sim_config=SimConfig(reply_s=1.0), backend="wav",
                            entry_points=True) as h:
        await h.say("hello", seconds=1.0)
        done = await h.wait_for_event("response_done")
        # hooks run off the pipeline (a def hook in a worker thread): wait for the call to finish
        await h.wait_for_hook("hydrad_response_done", SYNC)
        assert h.hooks_called(SYNC).count("hydrad_response_done") == 1
        assert done.fields["metrics"]["heard_s"] == pytest.approx(1.0, abs=0.05)
    with wave.open(str(tmp_path / "speaker.wav")) as w:
        assert w.getnframes() / w.getframerate() > 2.0
        pcm = w.readframes(w.getnframes())
    assert any(pcm[i] or pcm[i + 1] for i in range(0, len(pcm) - 1, 2))  # the reply was played

