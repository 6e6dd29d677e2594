"""The observers on a real daemon: real simulator over a WebSocket, real engine child (wav backend).

The conversation is the demo's: turn 1 gets a 4 s reply that the user talks over (barge-in);
turn 2 makes the model call a tool, then narrate. The recorder's taps are wired the way
docs/metrics.md asks ``hydrad/app.py`` to wire them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hydrad.config import LogConfig, MetricsConfig, RecordingConfig
from hydrad.demo import _conversation_complete, demo_sim_config, demo_tools
from hydrad.observe.logging import configure_logging, log_context, reset_logging
from hydrad.observe.metrics import Metrics
from hydrad.observe.recorder import Recorder, load_recording
from hydrad.observe.timeline import render_timeline

from .harness import HELLO, INTERRUPT, running

pytestmark = pytest.mark.slow


def wire_recorder(daemon, rec: Recorder) -> None:
    """The three taps, for a daemon that does not call them itself (no ``recorder`` attribute)."""
    on_capture, on_flushed, play = daemon.on_capture, daemon.on_flushed, daemon.engine.play

    def capture(t_adc: float, pcm: bytes) -> None:
        rec.on_capture(t_adc, pcm)
        on_capture(t_adc, pcm)

    def flushed(info: dict) -> None:
        rec.on_flush(info.get("response_id"), info.get("t_silent"), int(info.get("dropped_samples", 0)))
        on_flushed(info)

    async def engine_play(response_id: str, pcm: bytes) -> None:
        conv = daemon.conversation
        rec.on_play(response_id, pcm, conv.output_rate if conv is not None else 24000)
        await play(response_id, pcm)

    daemon.on_capture, daemon.on_flushed, daemon.engine.play = capture, flushed, engine_play


async def test_logs_metrics_and_recording_of_a_real_conversation(tmp_path: Path) -> None:
    reset_logging()
    logs = io.StringIO()
    configure_logging(LogConfig(level="debug"), logs, secrets=["test-key"])  # the harness's API key
    rec = Recorder(RecordingConfig(enabled=True, dir=str(tmp_path / "rec")))
    try:
        async with running(tmp_path, sim_config=demo_sim_config(), mic=[(HELLO, 0.3), (INTERRUPT, 5.0)],
                           tools=demo_tools()) as rig:
            d = rig.daemon
            metrics = Metrics.for_daemon(d, MetricsConfig(snapshot_interval_s=0))
            for sink in (log_context, metrics, rec):
                d.bus.subscribe(sink)
            if hasattr(d, "recorder"):
                d.recorder = rec  # the daemon's own taps
            else:
                wire_recorder(d, rec)
            async with trio.open_nursery() as nursery:
                await nursery.start(rec.run)
                await rig.wait_for(lambda: _conversation_complete(rig.timeline), timeout=40, what="the conversation")
                await trio.sleep(0.3)
                text = metrics.metrics_text()
                counters = dict(d.counters)
                nursery.cancel_scope.cancel()
            events = list(rig.timeline.events)
    finally:
        reset_logging()

    # ---- metrics match what happened
    sm = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            sm[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, lb), v in sm.items() if n == name and labels.items() <= dict(lb).items())

    n_user = sum(1 for e in events if e.name == "user_turn_done" and e.fields["status"] == "completed")
    n_done = sum(1 for e in events if e.name == "response_done")
    assert n_user == 2 and total("hydrad_user_turns_total", status="completed") == 2
    assert total("hydrad_responses_total") == n_done >= 3
    assert total("hydrad_barge_ins_total") == 1 and total("hydrad_barge_ins_total", trigger="speech_started") == 1
    assert total("hydrad_tool_calls_total", tool="get_time", outcome="ok") == 1
    assert total("hydrad_turn_first_audible_seconds_count") >= 2
    assert 0 < total("hydrad_barge_in_stop_seconds_sum") < 0.1
    assert 0 < total("hydrad_uplink_frames_sent_total") <= counters["uplink_frames_sent"]
    assert total("hydrad_uplink_frames_sent_total") > 300  # > 6 s of 20 ms frames
    assert total("hydrad_audio_deltas_received_total") == counters["deltas_received"] > 0
    assert total("hydrad_session_connected") == 1

    # ---- logs: JSON, the context ids, one turn.completed per response_done, never the key
    out = logs.getvalue()
    assert "test-key" not in out
    records = [json.loads(line) for line in out.splitlines()]
    turns = [r for r in records if r["event"] == "turn.completed"]
    assert len(turns) == n_done
    sid = next(e.fields["session_id"] for e in events if e.name == "session_configured")
    assert all(t["session_id"] == sid for t in turns)
    assert any(r["event"] == "socket_open" and "api_key=" in r.get("url", "") for r in records)

    # ---- the recording: both tracks on the events' clock, the barge-in cut visible
    segs = load_recording(tmp_path / "rec", turns=10)
    rec_events = [e for s in segs for e in s.events]
    assert {"barge_in", "tool_call", "tool_result"} <= {e["name"] for e in rec_events}
    mics = [s.mic for s in segs if s.mic is not None]
    assert max(np.abs(m.samples).max() for m in mics) > 3000  # the user's speech is in it
    barge = next(e for e in events if e.name == "barge_in")
    cut = barge.fields["response_id"]
    first_audible = next(e.fields["first_audible"] for e in events
                         if e.name == "response_audio_started" and e.fields["response_id"] == cut)
    played = [s.played for s in segs if s.played is not None]
    seg = next(p for p in played if p.t0 <= first_audible + 0.01 and p.end > first_audible)
    # loud right after it became audible, silent after the cut (until the next response)
    i_cut = int((first_audible + barge.fields["heard_s"] - seg.t0) * seg.rate)
    assert np.abs(seg.samples[int((first_audible - seg.t0) * seg.rate):i_cut]).max() > 1000
    assert np.abs(seg.samples[i_cut + seg.rate // 50: i_cut + seg.rate // 2]).max() < 50
    png = render_timeline(tmp_path / "rec", tmp_path / "timeline.png", turns=10)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
