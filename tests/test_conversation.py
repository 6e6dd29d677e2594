"""The turn state machine, driven with event sequences (no sockets: the rules themselves)."""

from __future__ import annotations

import json

import pytest

from hydrad.protocol import server_events as S
from hydrad.session.conversation import (
    ArmDebounce, Conversation, Emit, Flush, Play, RunTool, Send, SetGate, SetOutputRate,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def conv() -> Conversation:
    c = Conversation({"instructions": "x"}, "hydra-v1.1", "immediate", 0.2, clock=Clock())
    c.on_event(S.SessionCreated(session_id="s1"))
    c.on_event(S.SessionConfigured(session={"output_audio_sample_rate": 24000}))
    return c


def kinds(effects):
    return [type(e).__name__ if not isinstance(e, Emit) else "Emit:" + e.event.name for e in effects]


def sent(effects):
    return [json.loads(e.frame) for e in effects if isinstance(e, Send)]


def start_response(c: Conversation, rid: str, pcm: bytes = b"\x01\x00" * 480) -> list:
    out = c.on_event(S.ResponseCreated(response_id=rid))
    out += c.on_event(S.AudioDelta(response_id=rid, pcm=pcm))
    return out


def test_configure_is_sent_once_and_gate_opens_only_on_configured() -> None:
    c = Conversation({"voice": "aria"}, "hydra-v1.1")
    out = c.on_event(S.SessionCreated(session_id="s"))
    assert [f["type"] for f in sent(out)] == ["session.configure"]
    assert not any(isinstance(e, SetGate) for e in out)
    assert c.on_event(S.SessionCreated(session_id="s")) == []  # a second created never re-configures
    out = c.on_event(S.SessionConfigured(session={}))
    assert SetGate(True) in out
    assert SetOutputRate(24000) in out  # per-tag fallback when the echo has no rate


def test_output_rate_taken_from_the_echo_with_per_tag_fallback() -> None:
    c = Conversation({}, "hydra-v1.0")
    c.on_event(S.SessionCreated(session_id="s"))
    assert SetOutputRate(48000) in c.on_event(S.SessionConfigured(session={}))
    c = Conversation({}, "hydra-v1.0")
    c.on_event(S.SessionCreated(session_id="s"))
    assert SetOutputRate(16000) in c.on_event(S.SessionConfigured(session={"output_audio_sample_rate": 16000}))


def test_speech_started_during_playback_flushes_and_drops_late_deltas(conv: Conversation) -> None:
    start_response(conv, "r1")
    out = conv.on_event(S.SpeechStarted(audio_start_ms=10, item_id="u2"))
    assert Flush("r1", "speech_started") in out
    late = conv.on_event(S.AudioDelta(response_id="r1", pcm=b"\x00\x00" * 10))
    assert not any(isinstance(e, Play) for e in late)
    assert conv.responses["r1"].dropped_deltas == 1


def test_speech_started_when_idle_flushes_nothing(conv: Conversation) -> None:
    out = conv.on_event(S.SpeechStarted(audio_start_ms=10, item_id="u1"))
    assert not any(isinstance(e, Flush) for e in out)


def test_server_policy_waits_for_the_service(conv: Conversation) -> None:
    conv.policy = "server"
    start_response(conv, "r1")
    assert not any(isinstance(e, Flush) for e in conv.on_event(S.SpeechStarted(audio_start_ms=1, item_id="u")))
    out = conv.on_event(S.ResponseDone(response_id="r1", status="cancelled", reason="interrupted"))
    assert Flush("r1", "response_cancelled") in out


def test_new_response_before_previous_audio_done_cuts_it(conv: Conversation) -> None:
    start_response(conv, "r1")
    out = conv.on_event(S.ResponseCreated(response_id="r2"))
    assert Flush("r1", "response_created") in out


def test_new_response_after_previous_audio_done_does_not_cut(conv: Conversation) -> None:
    start_response(conv, "r1")
    conv.on_event(S.AudioDone(response_id="r1"))
    conv.on_event(S.ResponseDone(response_id="r1", status="completed"))
    out = conv.on_event(S.ResponseCreated(response_id="r2"))
    assert not any(isinstance(e, Flush) for e in out)


def test_cancel_in_flight_sends_cancel_and_flushes(conv: Conversation) -> None:
    start_response(conv, "r1")
    out, info = conv.request_cancel("control")
    assert [f["type"] for f in sent(out)] == ["response.cancel"]
    assert Flush("r1", "cancel") in out
    assert info["in_flight"] is True
    assert not any(isinstance(e, Play) for e in conv.on_event(S.AudioDelta(response_id="r1", pcm=b"\0\0")))


def test_cancel_when_idle_is_a_no_op(conv: Conversation) -> None:
    out, info = conv.request_cancel("control")
    assert sent(out) == [] and not any(isinstance(e, Flush) for e in out)
    assert info == {"in_flight": False, "audible": False, "response_id": None}


def test_cancel_after_server_done_flushes_locally_without_sending(conv: Conversation) -> None:
    start_response(conv, "r1")
    conv.on_event(S.AudioDone(response_id="r1"))
    conv.on_event(S.ResponseDone(response_id="r1", status="completed"))
    out, info = conv.request_cancel("plugin")
    assert sent(out) == []
    assert Flush("r1", "cancel") in out
    assert info["audible"] is True and info["in_flight"] is False


def test_discarded_turn_is_reported_and_nothing_else(conv: Conversation) -> None:
    conv.on_event(S.SpeechStarted(audio_start_ms=1, item_id="u1"))
    out = conv.on_event(S.ItemDone(item=S.Item(id="u1", type="message", role="user", status="incomplete")))
    assert kinds(out) == ["Emit:user_turn_done"]
    assert out[0].event.fields["status"] == "discarded"
    assert conv.state_name() == "idle"


def test_response_done_waits_for_local_playback_to_drain(conv: Conversation) -> None:
    conv.on_event(S.SpeechStopped(audio_end_ms=900, item_id="u1"))
    start_response(conv, "r1")
    conv.on_event(S.AudioDone(response_id="r1"))
    out = conv.on_event(S.ResponseDone(response_id="r1", status="completed"))
    assert "Emit:response_done" not in kinds(out)  # the user is still hearing it
    out = conv.on_played("r1", 100.5, 480, 24000, False)
    assert "Emit:response_audio_started" in kinds(out)
    out = conv.on_played("r1", 100.5, 960, 24000, True)
    done = [e for e in out if isinstance(e, Emit) and e.event.name == "response_done"]
    assert len(done) == 1
    m = done[0].event.fields["metrics"]
    assert m["heard_samples"] == 960 and m["status"] == "completed"


def test_tool_calls_two_in_one_turn_yield_one_debounced_response_create(conv: Conversation) -> None:
    conv.on_event(S.ResponseCreated(response_id="rt"))
    args = '{"city": "Paris"}'
    conv.on_event(S.FunctionArgsDelta(response_id="rt", call_id="c1", name="weather", delta=args[:4]))
    conv.on_event(S.FunctionArgsDelta(response_id="rt", call_id="c2", name="clock", delta="{}"))
    conv.on_event(S.FunctionArgsDelta(response_id="rt", call_id="c1", delta=args[4:]))
    run1 = conv.on_event(S.FunctionArgsDone(response_id="rt", call_id="c1", name="weather"))
    assert run1 == [RunTool("c1", "weather", args)]  # assembled from deltas split mid-token
    run2 = conv.on_event(S.FunctionArgsDone(response_id="rt", call_id="c2", name="clock", arguments="{}"))
    assert run2 == [RunTool("c2", "clock", "{}")]
    assert conv.on_event(S.FunctionArgsDone(response_id="rt", call_id="c2", name="clock", arguments="{}")) == []
    out = conv.on_tool_result("c1", '{"t":1}', None, 5.0)
    assert [f["type"] for f in sent(out)] == ["conversation.item.create"]
    assert not any(isinstance(e, ArmDebounce) for e in out)  # c2 still pending
    out = conv.on_tool_result("c2", '{"t":2}', None, 5.0)
    arm = [e for e in out if isinstance(e, ArmDebounce)]
    assert len(arm) == 1
    assert conv.on_debounce(arm[0].token) == []  # the tool response itself is not done yet
    out = conv.on_event(S.ResponseDone(response_id="rt", status="completed"))
    assert [f["type"] for f in sent(out)] == ["response.create"]
    assert conv.on_debounce(arm[0].token) == []  # exactly one
    out = conv.on_event(S.ResponseCreated(response_id="rn"))
    assert "Emit:response_created" in kinds(out)


def test_barge_in_abandons_the_tool_turn(conv: Conversation) -> None:
    conv.on_event(S.ResponseCreated(response_id="rt"))
    conv.on_event(S.FunctionArgsDone(response_id="rt", call_id="c1", name="slow", arguments="{}"))
    conv.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2"))
    conv.on_event(S.ResponseDone(response_id="rt", status="cancelled", reason="interrupted"))
    out = conv.on_tool_result("c1", "{}", None, 1.0)
    assert [f["type"] for f in sent(out)] == ["conversation.item.create"]  # the output is still posted
    for e in out:
        if isinstance(e, ArmDebounce):
            assert not any(isinstance(x, Send) for x in conv.on_debounce(e.token))


def test_disconnect_flushes_queued_audio_and_closes_the_gate(conv: Conversation) -> None:
    start_response(conv, "r1")
    out = conv.on_disconnected("network", 1006)
    assert SetGate(False) in out and Flush("r1", "disconnect") in out


# ----------------------------------------------------------------------------- echo guard

from hydrad.session.conversation import ArmGuard, Duck  # noqa: E402


@pytest.fixture
def guarded() -> Conversation:
    c = Conversation({}, "hydra-v1.1", "guard", 0.2, clock=Clock(), guard_window_s=1.0, duck_gain=0.25)
    c.on_event(S.SessionCreated(session_id="s1"))
    c.on_event(S.SessionConfigured(session={}))
    start_response(c, "r1")
    return c


def test_guard_ducks_and_waits_instead_of_flushing(guarded: Conversation) -> None:
    out = guarded.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2"))
    assert Duck(0.25) in out and any(isinstance(e, ArmGuard) for e in out)
    assert not any(isinstance(e, Flush) for e in out)
    assert [e.event.fields["decision"] for e in out if isinstance(e, Emit) and e.event.name == "guard_decision"] == ["pending"]


def test_guard_confirmed_by_speech_energy_flushes(guarded: Conversation) -> None:
    guarded.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2"))
    out = guarded.on_guard_evidence(320.0)
    assert Duck(1.0) in out and Flush("r1", "speech_started") in out
    assert guarded.counters["barge_in.confirmed"] == 1 and guarded.guard is None


def test_guard_timeout_is_a_false_alarm_and_playback_resumes(guarded: Conversation) -> None:
    arm = [e for e in guarded.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2")) if isinstance(e, ArmGuard)][0]
    out = guarded.on_event(S.ResponseDone(response_id="r1", status="cancelled", reason="interrupted"))
    assert not any(isinstance(e, Flush) for e in out)  # deferred to the guard's decision
    out = guarded.on_guard_timeout(arm.token)
    assert Duck(1.0) in out and not any(isinstance(e, Flush) for e in out)
    assert guarded.counters["barge_in.false"] == 1 and guarded.responses["r1"].audible
    assert guarded.on_guard_timeout(arm.token) == []  # decided once


def test_guard_discarded_turn_is_a_false_alarm(guarded: Conversation) -> None:
    guarded.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2"))
    out = guarded.on_event(S.ItemDone(item=S.Item(id="u2", type="message", role="user", status="incomplete")))
    assert Duck(1.0) in out and guarded.counters["barge_in.false"] == 1


def test_new_response_confirms_the_guard_and_cuts_a_cancelled_response(guarded: Conversation) -> None:
    arm = [e for e in guarded.on_event(S.SpeechStarted(audio_start_ms=5, item_id="u2")) if isinstance(e, ArmGuard)][0]
    guarded.on_event(S.ResponseDone(response_id="r1", status="cancelled", reason="interrupted"))
    guarded.on_guard_timeout(arm.token)  # false alarm: r1 resumed ...
    out = guarded.on_event(S.ResponseCreated(response_id="r2"))  # ... but the service answers a new turn
    assert Flush("r1", "response_created") in out
