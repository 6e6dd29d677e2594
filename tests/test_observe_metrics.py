"""Metrics: values from a scripted conversation, daemon counters, engine stats, exposition, snapshot."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hydrad.config import LogConfig, MetricsConfig
from hydrad.events import Event, EventBus
from hydrad.observe.logging import configure_logging, reset_logging
from hydrad.observe.metrics import Metrics
from hydrad.observe.scripted import FakeClock, ScriptedConversation


@pytest.fixture(autouse=True)
def _reset_logs():
    reset_logging()
    yield
    reset_logging()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse with the library's parser: {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(sm: dict, metric: str, /, **labels: str) -> float:
    return sm[(metric, tuple(sorted(labels.items())))]


def run_script(metrics: Metrics) -> ScriptedConversation:
    clock = metrics.clock
    bus = EventBus()
    bus.subscribe(metrics)
    sc = ScriptedConversation(bus, clock=clock)
    sc.run()
    assert bus.sink_errors == 0
    return sc


def test_scripted_two_turns_one_barge_in_one_tool_call() -> None:
    m = Metrics(clock=FakeClock(1000.0))
    sc = run_script(m)
    text = m.metrics_text()
    sm = samples(text)
    # the script: 2 completed user turns + 1 discarded interruption; 3 responses; 1 barge-in; 1 tool call
    assert value(sm, "hydrad_user_turns_total", status="completed") == 2
    assert value(sm, "hydrad_user_turns_total", status="discarded") == 1
    assert value(sm, "hydrad_responses_total", status="completed") == 2
    assert value(sm, "hydrad_responses_total", status="cancelled") == 1
    assert sum(v for (n, _), v in sm.items() if n == "hydrad_barge_ins_total") == 1
    assert value(sm, "hydrad_barge_ins_total", trigger="speech_started") == 1
    assert sum(v for (n, _), v in sm.items() if n == "hydrad_tool_calls_total") == 1
    assert value(sm, "hydrad_tool_calls_total", tool="get_weather", outcome="ok") == 1
    assert value(sm, "hydrad_tool_call_duration_seconds_count", tool="get_weather") == 1
    assert value(sm, "hydrad_tool_call_duration_seconds_sum", tool="get_weather") == pytest.approx(0.35)
    # latencies: the exact values of the script (speech_stopped -> first delta / first audible)
    assert value(sm, "hydrad_turn_first_delta_seconds_count") == 2
    assert value(sm, "hydrad_turn_first_delta_seconds_sum") == pytest.approx(0.35 + 1.05)
    assert value(sm, "hydrad_turn_first_audible_seconds_count") == 2
    assert value(sm, "hydrad_turn_first_audible_seconds_sum") == pytest.approx(0.47 + 1.17)
    assert value(sm, "hydrad_turn_first_audible_seconds_bucket", le="0.5") == 1
    assert value(sm, "hydrad_turn_first_audible_seconds_bucket", le="1.25") == 2
    assert value(sm, "hydrad_barge_in_stop_seconds_count") == 1
    assert value(sm, "hydrad_barge_in_stop_seconds_sum") == pytest.approx(0.012)
    assert value(sm, "hydrad_user_speech_seconds_count") == 3
    assert value(sm, "hydrad_user_speech_seconds_sum") == pytest.approx(1.2 + 1.5 + 0.7)
    assert value(sm, "hydrad_heard_audio_seconds_total") == pytest.approx(2.0 + 40607 / 24000, abs=1e-3)
    assert value(sm, "hydrad_sessions_total") == 1 and value(sm, "hydrad_session_connected") == 1
    types = families(text)
    for h in ("hydrad_turn_first_delta_seconds", "hydrad_turn_first_audible_seconds", "hydrad_barge_in_stop_seconds",
              "hydrad_tool_call_duration_seconds", "hydrad_user_speech_seconds"):
        assert types[h] == "histogram"
    assert sc.sent.count("response.create") == 1  # the script did what it says


def test_one_turn_completed_log_line_per_response_done() -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    m = Metrics(clock=FakeClock(1000.0))
    run_script(m)
    turns = [json.loads(line) for line in buf.getvalue().splitlines() if json.loads(line)["event"] == "turn.completed"]
    assert [t["response_id"] for t in turns] == ["resp_1", "resp_2", "resp_3"]
    t1, t2, t3 = turns
    assert t1["turn_id"] == "item_u1" and t1["status"] == "completed"
    assert t1["end_of_speech_to_first_delta_ms"] == 350.0 and t1["end_of_speech_to_first_audible_ms"] == 470.0
    assert t1["user_speech_ms"] == 1200.0 and t1["response_audio_s"] == 2.0 and t1["heard_s"] == 2.0
    assert t2["tool_calls"] == [{"call_id": "call_1", "name": "get_weather"}]
    # resp_3 belongs to the user's 2nd turn, even though the interruption (item_u3) is current by then
    assert t3["turn_id"] == "item_u2" and t3["status"] == "cancelled" and t3["reason"] == "turn_detected"
    assert t3["barge_in_trigger"] == "speech_started" and t3["barge_in_stop_ms"] == 12.0
    assert t3["heard_s"] == pytest.approx(1.692)
    assert len(m.recent_turns) == 3


def test_daemon_counters_engine_stats_and_gauges_are_pulled_at_scrape_time() -> None:
    counters: collections.Counter[str] = collections.Counter()
    stats: dict = {}
    engine = {"restarts": 0, "hangs": 0, "plays_dropped_before_engine": 4}
    gauges = {"uplink_backlog_frames": 3, "playback_queue_chunks": 7, "muted": 1}
    m = Metrics(lambda: counters, engine_stats=lambda: stats, engine_counters=lambda: engine,
                gauges=lambda: gauges, uplink_latency_ms=lambda: [10.0, 20.0, 30.0, 40.0])
    counters.update({"uplink_frames_sent": 500, "uplink_silence_filled": 4, "uplink_frames_muted": 50,
                     "uplink_frames_dropped.backlog": 6, "capture_frames_gated": 9, "frames_sent.response.cancel": 1,
                     "frames_sent.conversation.item.create": 2, "deltas_received": 42, "reconnects.network": 2,
                     "reconnects.server_full": 1, "malformed_frames.invalid_json": 3, "some_new_counter": 5,
                     "playback_chunks_dropped_flushed": 2})
    stats.update({"pid": 100, "underruns": 5, "underrun_ms": 40.0, "overruns": 2, "buffer_ms": 120.0,
                  "flags": {"output_underflow": 5}, "dropped_after_flush": 10})
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_uplink_frames_sent_total") == 500
    assert value(sm, "hydrad_uplink_silence_frames_total", reason="no_capture") == 4
    assert value(sm, "hydrad_uplink_silence_frames_total", reason="muted") == 50
    assert value(sm, "hydrad_uplink_frames_dropped_total", reason="backlog") == 6
    assert value(sm, "hydrad_uplink_frames_dropped_total", reason="gate_closed") == 9
    assert value(sm, "hydrad_client_frames_sent_total", type="response.cancel") == 1
    assert value(sm, "hydrad_audio_deltas_received_total") == 42
    assert value(sm, "hydrad_reconnects_total", cause="network") == 2
    assert value(sm, "hydrad_reconnects_total", cause="server_full") == 1
    assert value(sm, "hydrad_daemon_counter_total", name="some_new_counter") == 5
    assert value(sm, "hydrad_playback_chunks_dropped_total", reason="flushed_in_daemon_queue") == 2
    assert value(sm, "hydrad_playback_chunks_dropped_total", reason="flushed_in_engine_outbox") == 4
    # malformed frames are counted from the bus events, never twice
    assert not any(n == "hydrad_daemon_counter_total" and "malformed" in str(lb) for (n, lb) in sm)
    assert value(sm, "hydrad_playback_underruns_total") == 5
    assert value(sm, "hydrad_playback_underrun_seconds_total") == pytest.approx(0.04)
    assert value(sm, "hydrad_capture_overruns_total") == 2
    assert value(sm, "hydrad_playback_buffer_seconds") == pytest.approx(0.12)
    assert value(sm, "hydrad_engine_status_flags_total", flag="output_underflow") == 5
    assert value(sm, "hydrad_engine_audio_dropped_total", reason="flushed_in_engine") == 10
    assert value(sm, "hydrad_uplink_backlog_frames") == 3 and value(sm, "hydrad_playback_queue_chunks") == 7
    assert value(sm, "hydrad_muted") == 1
    assert value(sm, "hydrad_uplink_latency_seconds", quantile="0.5") == pytest.approx(0.025)
    assert value(sm, "hydrad_uplink_latency_seconds", quantile="max") == pytest.approx(0.04)
    # The engine restarts: its counts start from zero, the exported counters must not go down.
    engine["restarts"] = 1
    stats.clear()
    stats.update({"pid": 101, "underruns": 2, "underrun_ms": 5.0, "overruns": 0, "buffer_ms": 0.0})
    counters["uplink_frames_sent"] += 50
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_playback_underruns_total") == 7
    assert value(sm, "hydrad_capture_overruns_total") == 2
    assert value(sm, "hydrad_engine_restarts_total") == 1
    assert value(sm, "hydrad_uplink_frames_sent_total") == 550
    stats["underruns"] = 3
    assert value(samples(m.metrics_text()), "hydrad_playback_underruns_total") == 8


def test_event_counters_errors_malformed_plugins_cancels() -> None:
    m = Metrics()
    for ev in (
        Event("service_error", {"code": "invalid_request_error", "type": "invalid_request_error", "message": "x"}),
        Event("service_error", {"code": "invalid_request_error"}),
        Event("service_error", {"code": "server_full"}),
        Event("malformed_frame", {"kind": "invalid_json", "reason": "x"}),
        Event("plugin_error", {"plugin": "crm", "hook": "on_response_done", "kind": "timeout"}),
        Event("plugin_error", {"plugin": "crm", "hook": "on_response_done", "error": "boom"}),
        Event("cancel_requested", {"source": "control", "response_id": "r", "in_flight": True}),
        Event("engine_state", {"state": "restarting", "detail": None}),
        Event("session_disconnected", {"session_id": "s", "reason": "closed", "code": 1011}),
        Event("not_an_event_we_know", {}),
    ):
        m(ev)
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_service_errors_total", code="invalid_request_error") == 2
    assert value(sm, "hydrad_service_errors_total", code="server_full") == 1
    assert value(sm, "hydrad_malformed_frames_total", kind="invalid_json") == 1
    assert value(sm, "hydrad_plugin_errors_total", plugin="crm", hook="on_response_done", kind="timeout") == 1
    assert value(sm, "hydrad_plugin_errors_total", plugin="crm", hook="on_response_done", kind="error") == 1
    assert value(sm, "hydrad_cancels_total", source="control") == 1
    assert value(sm, "hydrad_engine_state_changes_total", state="restarting") == 1
    assert value(sm, "hydrad_session_disconnects_total", code="1011") == 1


def test_label_values_from_peers_are_bounded() -> None:
    m = Metrics()
    for i in range(200):
        m(Event("service_error", {"code": f"weird_code_{i}"}))
    sm = samples(m.metrics_text())
    codes = [dict(lb)["code"] for (n, lb) in sm if n == "hydrad_service_errors_total"]
    assert len(codes) <= 33 and "other" in codes
    assert sum(v for (n, _), v in sm.items() if n == "hydrad_service_errors_total") == 200


def test_a_failing_provider_does_not_break_the_scrape() -> None:
    def broken() -> dict:
        raise RuntimeError("provider exploded")

    m = Metrics(broken, engine_stats=broken)
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_metrics_provider_errors_total") == 2
    assert value(sm, "hydrad_uplink_frames_sent_total") == 0


def test_snapshot_is_compact_and_json_serialisable() -> None:
    m = Metrics(lambda: {"uplink_frames_sent": 9}, clock=FakeClock(1000.0))
    run_script(m)
    snap = m.snapshot()
    json.dumps(snap)
    assert snap["responses"] == {"completed": 2, "cancelled": 1, "failed": 0, "incomplete": 0}
    assert snap["barge_ins"]["speech_started"] == 1
    assert snap["uplink_frames_sent"] == 9
    assert snap["turn_first_audible_seconds"] == {"count": 2, "sum": pytest.approx(1.64)}
    assert snap["recent"]["first_audible_ms"]["p50"] == pytest.approx(820.0)


def test_textfile_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "node-exporter" / "hydrad.prom"
    m = Metrics(lambda: {"uplink_frames_sent": 3}, cfg=MetricsConfig(textfile=str(target)))
    assert m.write_textfile()
    sm = samples(target.read_text())
    assert value(sm, "hydrad_uplink_frames_sent_total") == 3
    assert os.listdir(target.parent) == ["hydrad.prom"]  # no temp file left behind
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert m.write_textfile(path=str(blocked / "hydrad.prom")) is False  # logged, never raised
    assert m.textfile_errors == 1


async def test_periodic_snapshot_and_textfile_task(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    target = tmp_path / "hydrad.prom"
    counters = collections.Counter({"uplink_frames_sent": 1})
    m = Metrics(lambda: counters, cfg=MetricsConfig(snapshot_interval_s=0.2, textfile=str(target)),
                textfile_interval_s=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        with trio.fail_after(2):
            while not target.exists():  # written at once: the scraper sees hydrad up
                await trio.sleep(0.01)
        counters["uplink_frames_sent"] = 77
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    snaps = [json.loads(line) for line in buf.getvalue().splitlines() if '"metrics.snapshot"' in line]
    assert 2 <= len(snaps) <= 3 and snaps[-1]["uplink_frames_sent"] == 77
    assert value(samples(target.read_text()), "hydrad_uplink_frames_sent_total") == 77
    assert [p.name for p in tmp_path.iterdir()] == ["hydrad.prom"]


async def test_snapshot_disabled_and_no_textfile_means_an_idle_task(autojump_clock) -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    m = Metrics(cfg=MetricsConfig(snapshot_interval_s=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert "metrics.snapshot" not in buf.getvalue()


def test_metrics_for_a_daemon_like_object() -> None:
    class Engine:
        counters = collections.Counter({"hangs": 1})
        restarts = 2
        last_stats = {"underruns": 1, "buffer_ms": 60.0}

    class Q:
        def __len__(self) -> int:
            return 4

    class FakeDaemon:
        counters = collections.Counter({"uplink_frames_sent": 12})
        engine = Engine()
        uplink_latency_ms = collections.deque([5.0, 15.0])
        muted = False
        _uplink_q = Q()

    sm = samples(Metrics.for_daemon(FakeDaemon()).metrics_text())
    assert value(sm, "hydrad_uplink_frames_sent_total") == 12
    assert value(sm, "hydrad_engine_restarts_total") == 2 and value(sm, "hydrad_engine_hangs_total") == 1
    assert value(sm, "hydrad_playback_buffer_seconds") == pytest.approx(0.06)
    assert value(sm, "hydrad_uplink_backlog_frames") == 4


def test_plugin_stats_and_other_components() -> None:
    stats = {"crm": collections.Counter({"calls": 10, "errors": 2, "timeouts": 1, "dropped": 3})}
    control = collections.Counter({"requests.status": 4, "refused": 1})
    m = Metrics(plugin_stats=lambda: stats, extra_counters={"control": lambda: control})
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_plugin_hook_calls_total", plugin="crm") == 10
    assert value(sm, "hydrad_plugin_hook_failures_total", plugin="crm", kind="error") == 2
    assert value(sm, "hydrad_plugin_hook_failures_total", plugin="crm", kind="timeout") == 1
    assert value(sm, "hydrad_plugin_events_dropped_total", plugin="crm") == 3
    assert value(sm, "hydrad_component_counter_total", component="control", name="requests.status") == 4
    assert value(sm, "hydrad_component_counter_total", component="control", name="refused") == 1


def test_engine_counter_reset_without_a_pid_is_detected() -> None:
    stats = {"underruns": 9}
    m = Metrics(engine_stats=lambda: stats)
    assert value(samples(m.metrics_text()), "hydrad_playback_underruns_total") == 9
    stats["underruns"] = 1  # a new engine that does not report its pid: the count went down
    assert value(samples(m.metrics_text()), "hydrad_playback_underruns_total") == 10


def test_echo_canceller_figures_are_exported_and_in_each_turn_line() -> None:
    stats: dict = {"pid": 7, "aec": {"erle_db": 55.5, "residual_echo_dbfs": -94.0, "path_delay_ms": 48.0,
                                      "gated_frames": 120, "leak_frames": 9, "resyncs": 2, "kept_frames": 30,
                                      "echo_coupling_db": -19.5, "double_talk_frames": 40,
                                      "double_talk_cut_frames": 4}}
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    m = Metrics(engine_stats=lambda: stats, clock=FakeClock(1000.0))
    sm = samples(m.metrics_text())
    assert value(sm, "hydrad_echo_erle_db") == 55.5 and value(sm, "hydrad_echo_residual_dbfs") == -94.0
    assert value(sm, "hydrad_echo_path_delay_seconds") == pytest.approx(0.048)
    assert value(sm, "hydrad_echo_gated_frames_total") == 120
    assert value(sm, "hydrad_echo_leak_frames_total") == 9
    assert value(sm, "hydrad_echo_resyncs_total") == 2
    assert value(sm, "hydrad_echo_kept_frames_total") == 30
    assert value(sm, "hydrad_echo_double_talk_frames_total") == 40
    assert value(sm, "hydrad_echo_double_talk_cut_frames_total") == 4
    assert value(sm, "hydrad_echo_coupling_db") == -19.5
    run_script(m)
    turns = [json.loads(line) for line in buf.getvalue().splitlines() if json.loads(line)["event"] == "turn.completed"]
    assert turns and all(t["echo_erle_db"] == 55.5 and t["echo_gated_frames"] == 120
                         and t["echo_leak_frames"] == 9 and t["echo_kept_frames"] == 30 for t in turns)
    # double talk per turn: the first turn has all of it, the next none (the counters did not move)
    assert len(turns) >= 2
    assert (turns[0]["echo_double_talk_frames"], turns[0]["echo_double_talk_cut_share"]) == (40, 0.1)
    assert all(t["echo_double_talk_frames"] == 0 and t["echo_double_talk_cut_share"] is None for t in turns[1:])
    # without a canceller: no echo series, no echo fields
    stats["aec"] = None
    assert not any(n.startswith("hydrad_echo_") for n, _ in samples(m.metrics_text()))
