"""The daemon end to end: real WebSocket to the simulator, real engine child (wav backend)."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import trio

from hydrad.session.tools import StaticTools
from hydrad.sim.config import SimConfig, ToolCallSpec, TurnAction
from hydrad.sim.voice import response_f0

from .harness import HELLO, INTERRUPT, active_spans, dominant_hz, read_wav, running, write_wav

pytestmark = pytest.mark.slow


def appends(record) -> list[tuple[float, dict]]:
    return [(t, f) for t, f in record.received if f.get("type") == "input_audio_buffer.append"]


async def test_handshake_order_and_mic_gate(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.wait_for(lambda: len(rig.sim.sessions) and len(appends(rig.sim.sessions[0])) > 10, what="audio")
        rec = rig.sim.sessions[0]
        types = [f["type"] for _, f in rec.received]
        assert types[0] == "session.configure" and types.count("session.configure") == 1
        t_configured = next(t for t, f in rec.sent if f["type"] == "session.configured")
        assert all(t >= t_configured for t, _ in appends(rec)), "audio was sent before session.configured"
        configure = rec.received_of("session.configure")[0]
        assert configure["event_id"] and configure["session"]["generate_initial_response"] is False
        ids = [f.get("event_id") for _, f in rec.received]
        assert len(set(ids)) == len(ids), "client event_ids must be unique"


async def test_frames_are_640_bytes_paced_at_real_time(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.wait_for(lambda: len(rig.sim.sessions) and len(appends(rig.sim.sessions[0])) > 0, what="audio")
        await trio.sleep(3.0)
        frames = appends(rig.sim.sessions[0])
        assert {f["bytes"] for _, f in frames} == {640}
        # Rate over the steady part (skip the first 0.2 s): 50 frames/s.
        t_first = frames[0][0] + 0.2
        steady = [t for t, _ in frames if t >= t_first]
        rate = (len(steady) - 1) / (steady[-1] - steady[0])
        assert abs(rate - 50.0) / 50.0 < 0.03, f"uplink rate {rate:.2f} frames/s"
        # Never ahead of real time by more than the burst allowance (5 frames) over any prefix.
        t0 = steady[0]
        assert all(i - (t - t0) / 0.02 <= 5 + 1 for i, t in enumerate(steady))


async def test_normal_turn_plays_the_reply_at_the_right_pitch(tmp_path: Path) -> None:
    async with running(tmp_path, sim_config=SimConfig(reply_s=1.5), mic=[(HELLO, 0.2)]) as rig:
        done = await rig.wait_for(lambda: rig.events("response_done"), what="response_done")
        fields = done[0].fields
        assert fields["status"] == "completed"
        assert fields["metrics"]["heard_s"] == pytest.approx(1.5, abs=0.05)
        assert rig.events("response_audio_started")[0].fields["latency_ms"] is not None
        x, rate = rig.speaker_audio()
        spans = [s for s in active_spans(x, rate) if s[1] - s[0] > 0.3]
        assert len(spans) == 1 and spans[0][1] - spans[0][0] == pytest.approx(1.5, abs=0.05)
        seg = x[int(spans[0][0] * rate): int(spans[0][1] * rate)]
        assert dominant_hz(seg, rate) == pytest.approx(response_f0(1), rel=0.01)


async def test_barge_in_cuts_response_within_one_frame_and_never_resumes(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=5.0)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2), (INTERRUPT, 4.8)]) as rig:
        barge = await rig.wait_for(lambda: rig.events("barge_in"), what="barge_in")
        await rig.wait_for(lambda: len(rig.events("response_done")) >= 2, what="second response")
        await trio.sleep(0.3)
        x, rate = rig.speaker_audio()
        b = barge[0]
        t_event = next(e.t for e in rig.events("speech_started") if e.fields["during_response"])
        cut = rig.sample_at(t_event, rate)
        frame = rate * 20 // 1000
        fade = rate * 5 // 1000
        r1 = rig.sim.sessions[0].responses[0]
        assert b.fields["response_id"] == r1.id
        # Response 1 was playing right before the barge-in ...
        before = x[cut - rate // 2: cut]
        assert np.abs(before).max() > 1000 and dominant_hz(before, rate) == pytest.approx(response_f0(1), rel=0.02)
        # ... and is silent from one frame (+ fade) after it until response 2 starts.
        r2_start = next(e.fields["first_audible"] for e in rig.events("response_audio_started")
                        if e.fields["response_id"] != r1.id)
        after = x[cut + frame + fade: rig.sample_at(r2_start, rate) - 10]
        assert len(after) > rate and np.abs(after).max() == 0, "audio of the cut response kept playing"
        # Nothing at response 1's pitch anywhere after the cut.
        late = x[cut + frame + fade:]
        spans = active_spans(late, rate)
        for s, e in spans:
            seg = late[int(s * rate): int(e * rate)]
            if len(seg) > rate // 4:
                assert dominant_hz(seg, rate) != pytest.approx(response_f0(1), rel=0.02)
        assert b.fields["stop_ms"] < 40  # barge-in event -> engine silent
        assert b.fields["heard_s"] == pytest.approx((cut / rate) - (rig.events("response_audio_started")[0].fields["first_audible"] - rig.t0), abs=0.05)


async def test_programmatic_cancel_stops_audio_and_sends_response_cancel(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=6.0, realtime_factor=1.5)
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)]) as rig:
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="audio")
        await trio.sleep(0.5)
        info = await rig.daemon.cancel("programmatic")
        t_cancel = trio.current_time()
        assert info["in_flight"] is True and info["flushed"] is True
        await rig.wait_for(lambda: rig.sim.sessions[0].received_of("response.cancel"), what="response.cancel")
        done = await rig.wait_for(lambda: rig.events("response_done"), what="response_done")
        assert done[0].fields["status"] == "cancelled" and done[0].fields["reason"] == "client_cancelled"
        assert rig.events("cancel_requested")[0].fields["source"] == "programmatic"
        await trio.sleep(0.5)
        x, rate = rig.speaker_audio()
        spans = [s for s in active_spans(x, rate) if s[1] - s[0] > 0.1]
        assert len(spans) == 1 and spans[0][1] - spans[0][0] < 1.5  # 6 s reply cut after ~0.5 s
        # A second cancel with nothing in flight is a no-op on the wire.
        info2 = await rig.daemon.cancel("programmatic")
        assert info2["in_flight"] is False
        await trio.sleep(0.3)
        assert len(rig.sim.sessions[0].received_of("response.cancel")) == 1


async def test_discarded_turn_is_ignored(tmp_path: Path) -> None:
    x, rate = read_wav(HELLO)
    onset = int(np.argmax(np.abs(x) > 2000))
    blip = write_wav(tmp_path / "blip.wav", x[onset: onset + int(0.08 * rate)], rate)
    async with running(tmp_path, mic=[(blip, 0.3)]) as rig:
        turn = await rig.wait_for(lambda: rig.events("user_turn_done"), what="user_turn_done")
        assert turn[0].fields["status"] == "discarded"
        await trio.sleep(1.0)
        assert rig.events("response_created") == []
        assert rig.daemon.conversation.state_name() == "idle"


async def test_tool_round_trip_two_calls_split_mid_token_one_response_create(tmp_path: Path) -> None:
    tools = StaticTools()
    tools.add({"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}},
              lambda city: {"city": city, "temp_c": 12})

    async def slow_clock() -> dict:
        await trio.sleep(0.3)
        return {"time": "12:00"}

    tools.add({"name": "clock", "parameters": {"type": "object"}}, slow_clock)
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(tool_calls=(
        ToolCallSpec("weather", {"city": "Paris"}), ToolCallSpec("clock", {})), split=4)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)], tools=tools) as rig:
        await rig.wait_for(lambda: len([e for e in rig.events("response_done") if e.fields["metrics"]["heard_samples"]]) >= 1,
                           what="narration")
        rec = rig.sim.sessions[0]
        outputs = {o["call_id"]: json.loads(o["output"]) for o in rec.tool_outputs}
        assert sorted(v.get("city", v.get("time")) for v in outputs.values()) == ["12:00", "Paris"]
        assert len(rec.received_of("response.create")) == 1
        t_create = next(t for t, f in rec.received if f["type"] == "response.create")
        t_last_output = max(t for t, f in rec.received if f["type"] == "conversation.item.create")
        assert t_create >= t_last_output + 0.15  # debounced after the last output
        deltas = rec.sent_of("response.function_call_arguments.delta")
        weather_call = next(f["call_id"] for f in deltas if f.get("name") == "weather")
        weather = [f["delta"] for f in deltas if f["call_id"] == weather_call]
        assert len(weather) == 4 and "".join(weather) == '{"city":"Paris"}'
        assert not all(p.endswith(('"', "{", ":", ",")) for p in weather[:-1])  # split mid-token


async def test_tool_with_bad_arguments_gets_an_error_result(tmp_path: Path) -> None:
    tools = StaticTools()
    tools.add({"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}}, lambda city: {"city": city})
    sim = SimConfig(reply_s=0.5, turns={1: TurnAction(tool_calls=(ToolCallSpec("weather", {"town": 3}),))})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)], tools=tools) as rig:
        await rig.wait_for(lambda: rig.sim.sessions and rig.sim.sessions[0].tool_outputs, what="tool output")
        out = json.loads(rig.sim.sessions[0].tool_outputs[0]["output"])
        assert "error" in out and "city" in out["error"]
        await rig.wait_for(lambda: rig.sim.sessions[0].received_of("response.create"), what="response.create")


@pytest.mark.parametrize("frame, kind", [
    ("{not json", "json"),
    ('{"type": "response.output_audio.delta", "event_id": "sv_1", "delta": "AAAA"}', "missing_field"),
    ('{"type": "response.output_audio.delta", "event_id": "sv_1", "response_id": "r", "delta": "@@@"}', "malformed"),
    ('{"type": "response.output_audio.delta", "event_id": "sv_1", "response_id": "r", "delta": "%s"}'
     % base64.b64encode(b"\x01\x02\x03").decode(), "malformed"),
    ("big", "too_large"),
])
async def test_malformed_frames_are_counted_and_the_session_goes_on(tmp_path: Path, frame: str, kind: str) -> None:
    if frame == "big":
        frame = json.dumps({"type": "response.output_audio.delta", "delta": "A" * (10 * 1024 * 1024)})
    async with running(tmp_path, mic=[(HELLO, 1.0)]) as rig:
        await rig.wait_for(lambda: rig.daemon.state == "connected", what="connected")
        await rig.sim.send_raw(frame)
        await rig.wait_for(lambda: rig.events("malformed_frame"), what="malformed_frame")
        assert rig.events("malformed_frame")[0].fields["kind"] == kind
        assert rig.daemon.counters[f"malformed_frames.{kind}"] == 1
        # The same session still works: the turn completes.
        await rig.wait_for(lambda: rig.events("response_done"), what="a normal turn afterwards")
        assert len(rig.sim.sessions) == 1


async def test_server_close_mid_response_then_reconnect(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=4.0, close=1011, after_ms=300)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)]) as rig:
        await rig.wait_for(lambda: len(rig.sim.sessions) >= 2 and rig.daemon.state == "connected", what="reconnect")
        first, second = rig.sim.sessions[0], rig.sim.sessions[1]
        assert first.session_id != second.session_id
        assert first.closed == 1011
        assert len(second.received_of("session.configure")) == 1  # a new session is configured anew
        await rig.wait_for(lambda: len(appends(second)) > 20, what="audio on the new session")
        # The reply of the dead session does not keep playing after the close.
        assert any(e.fields["trigger"] == "disconnect" for e in rig.events("barge_in")) or \
            rig.daemon.counters["reconnects.closed"] == 1


async def test_engine_killed_mid_response_is_restarted_and_the_session_survives(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=4.0)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)]) as rig:
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="audio")
        session_id = rig.daemon.conversation.session_id
        old_pid = rig.daemon.engine.pid
        os.kill(old_pid, signal.SIGKILL)
        await rig.wait_for(lambda: rig.daemon.engine.state == "running" and rig.daemon.engine.pid != old_pid,
                           timeout=5, what="engine restart")
        assert rig.daemon.conversation.session_id == session_id and len(rig.sim.sessions) == 1
        n = len(appends(rig.sim.sessions[0]))
        await trio.sleep(1.0)
        assert len(appends(rig.sim.sessions[0])) - n >= 45  # the uplink never stopped
        done = await rig.wait_for(lambda: rig.events("response_done"), what="turn closed")
        assert done[0].fields["response_id"] == rig.sim.sessions[0].responses[0].id


async def test_sigstopped_engine_is_detected_as_hung_and_replaced(tmp_path: Path) -> None:
    async with running(tmp_path, overrides={"pipeline": {"engine_ping_s": 0.2, "engine_hang_s": 1.0}}) as rig:
        await rig.wait_for(lambda: rig.daemon.engine.state == "running", what="engine")
        old_pid = rig.daemon.engine.pid
        os.kill(old_pid, signal.SIGSTOP)
        try:
            await rig.wait_for(lambda: rig.daemon.engine.pid not in (None, old_pid) and rig.daemon.engine.state == "running",
                               timeout=6, what="hung engine replaced")
        finally:
            try:
                os.kill(old_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert rig.daemon.engine.counters["hangs"] >= 1


async def test_guard_confirms_a_real_barge_in_and_cuts(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=5.0)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2), (INTERRUPT, 4.8)],
                       overrides={"barge_in": {"policy": "guard", "guard_ms": 200}}) as rig:
        decision = await rig.wait_for(lambda: [e for e in rig.events("guard_decision")
                                               if e.fields["decision"] != "pending"], what="guard decision")
        assert decision[0].fields["decision"] == "confirmed"
        barge = await rig.wait_for(lambda: rig.events("barge_in"), what="barge_in")
        assert barge[0].fields["trigger"] == "speech_started"
        assert rig.daemon.counters.get("barge_in.false", 0) == 0


async def test_guard_false_alarm_ducks_then_resumes_the_reply(tmp_path: Path) -> None:
    # Quiet speech: the simulator's VAD (level-blind, like the service's) hears it, but it is
    # below the guard's level, like residual echo after the canceller.
    x, rate = read_wav(INTERRUPT)
    quiet = write_wav(tmp_path / "quiet.wav", x * 10 ** (-40 / 20), rate)
    sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=6.0)})
    async with running(tmp_path, sim_config=sim, mic=[(HELLO, 0.2), (quiet, 4.6)],
                       overrides={"barge_in": {"policy": "guard", "guard_ms": 200, "guard_window_ms": 800}}) as rig:
        decision = await rig.wait_for(lambda: [e for e in rig.events("guard_decision")
                                               if e.fields["decision"] != "pending"], what="guard decision")
        assert decision[0].fields["decision"] in ("false_alarm",)
        await rig.wait_for(lambda: rig.events("response_done"), timeout=25, what="first response done")
        first = rig.events("response_done")[0].fields
        assert first["metrics"]["cut_by_barge_in"] is False
        assert first["metrics"]["heard_s"] == pytest.approx(6.0, abs=0.1)  # resumed and heard to the end
        assert rig.events("barge_in") == [] or all(e.fields["trigger"] != "speech_started" for e in rig.events("barge_in"))
        x_out, r_out = rig.speaker_audio()
        t_pending = next(e.t for e in rig.events("guard_decision") if e.fields["decision"] == "pending")
        i = rig.sample_at(t_pending, r_out)
        before = np.abs(x_out[i - r_out // 2: i - r_out // 10]).max()
        during = np.abs(x_out[i + r_out // 10: i + r_out // 2]).max()
        assert during < before * 0.5, "playback was not ducked while the guard decided"
