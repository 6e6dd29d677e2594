"""The protocol module: tolerant where the service varies, strict where hydrad relies on a field."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydrad.protocol import MalformedFrame, client_frames as F, parse_server_frame
from hydrad.protocol import server_events as S

EVENTS = [
    S.Warning_(code="model_deprecated", message="use hydra-v1.0"),
    S.SessionCreated(session_id="abc"),
    S.SessionConfigured(session={"voice": "aria", "output_audio_sample_rate": 24000}),
    S.SessionUpdated(session={"tools": []}),
    S.SpeechStarted(audio_start_ms=1840, item_id="item_u1"),
    S.SpeechStopped(audio_end_ms=4120, item_id="item_u1"),
    S.ItemAdded(item=S.Item(id="item_u1", type="message", role="user", status="in_progress")),
    S.ItemDone(item=S.Item(id="item_u1", type="message", role="user", status="incomplete")),
    S.ResponseCreated(response_id="resp_1"),
    S.AudioDelta(response_id="resp_1", item_id="item_a1", pcm=b"\x01\x00\xff\xff"),
    S.AudioDone(response_id="resp_1", item_id="item_a1"),
    S.FunctionArgsDelta(response_id="resp_2", call_id="call_1", name="get_weather", delta='{"ci'),
    S.FunctionArgsDone(response_id="resp_2", call_id="call_1", name="get_weather", arguments='{"city":"Paris"}'),
    S.ResponseDone(response_id="resp_1", status="cancelled", reason="interrupted",
                   output=(S.Item(id="item_a1", type="message", role="assistant", status="incomplete"),)),
    S.ResponseDone(response_id="resp_5", status="failed", error_code="internal_error"),
    S.Error(code="invalid_audio", error_type="invalid_request_error", message="too small", param="audio",
            client_event_id="evt_1"),
    S.TranscriptDelta(delta="Sure."),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.TYPE)
def test_every_server_event_round_trips(event: S.ServerEvent) -> None:
    assert parse_server_frame(event.encode()) == event


def test_documented_examples_parse() -> None:
    done = parse_server_frame(json.dumps({"type": "response.done", "event_id": "sv_aa01bb02cc03dd13",
        "response": {"id": "resp_0001", "status": "completed",
                     "output": [{"id": "item_a001", "type": "message", "role": "assistant", "status": "completed",
                                 "content": [{"type": "output_audio", "text": None}]}],
                     "usage": {"input_tokens": 412, "output_tokens": 58, "total_tokens": 470}}}))
    assert isinstance(done, S.ResponseDone) and done.usage["total_tokens"] == 470 and done.reason is None
    cfg = parse_server_frame(json.dumps({"type": "session.configured", "event_id": "sv_1", "session": {
        "voice": "aria", "tools": [], "output_audio_sample_rate": 24000}}))
    assert isinstance(cfg, S.SessionConfigured) and cfg.output_rate == 24000


@pytest.mark.parametrize("frame", [
    {"type": "warning", "code": "model_deprecated", "message": "m"},
    {"type": "warning", "warning": {"code": "model_deprecated", "message": "m"}},
    {"type": "warning", "error": {"code": "model_deprecated", "message": "m"}},
])
def test_warning_code_found_top_level_or_nested(frame: dict) -> None:
    ev = parse_server_frame(json.dumps(frame))
    assert isinstance(ev, S.Warning_) and ev.code == "model_deprecated" and ev.message == "m"


def test_unknown_types_and_extra_fields_are_tolerated() -> None:
    ev = parse_server_frame('{"type": "response.output_audio_transcript.done", "delta": "x"}')
    assert isinstance(ev, S.UnknownEvent) and ev.type == "response.output_audio_transcript.done"
    ev = parse_server_frame('{"type": "session.created", "session_id": "s", "extra": {"new": 1}}')
    assert isinstance(ev, S.SessionCreated)


def test_output_rate_absent_or_bogus_means_fallback() -> None:
    assert S.SessionConfigured(session={}).output_rate is None
    assert S.SessionConfigured(session={"output_audio_sample_rate": "24000"}).output_rate is None
    assert S.SessionConfigured(session={"output_audio_sample_rate": True}).output_rate is None


def test_transcript_in_user_item_is_optional() -> None:
    with_text = {"type": "conversation.item.done", "item": {"id": "u", "type": "message", "role": "user",
                 "status": "completed", "content": [{"type": "input_audio", "text": "hello"}]}}
    assert parse_server_frame(json.dumps(with_text)).item.text == "hello"
    with_text["item"]["content"] = [{"type": "input_audio", "text": None}]
    assert parse_server_frame(json.dumps(with_text)).item.text is None


@pytest.mark.parametrize("frame, kind", [
    ("{not json", "json"),
    ("[1, 2]", "json"),
    ('{"no_type": 1}', "missing_field"),
    ('{"type": 7}', "missing_field"),
    ('{"type": "session.created"}', "missing_field"),
    ('{"type": "response.created", "response": {}}', "missing_field"),
    ('{"type": "response.output_audio.delta", "delta": "AAAA"}', "missing_field"),
    ('{"type": "response.output_audio.delta", "response_id": "r", "delta": "!!!"}', "malformed"),
    ('{"type": "response.output_audio.delta", "response_id": "r", "delta": 5}', "malformed"),
    ('{"type": "response.output_audio.delta", "response_id": "r", "delta": "%s"}' % base64.b64encode(b"abc").decode(),
     "malformed"),
    ('{"type": "response.function_call_arguments.delta", "delta": "x"}', "missing_field"),
])
def test_malformed_frames_have_a_reason_and_a_kind(frame: str, kind: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_server_frame(frame)
    assert info.value.kind == kind and info.value.reason


def test_a_10_mb_frame_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_server_frame('{"type":"x","pad":"' + "A" * (10 * 1024 * 1024) + '"}')
    assert info.value.kind == "too_large"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.dictionaries(st.text(max_size=10), st.recursive(
                     st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)),
                     max_size=5).map(json.dumps)))
def test_no_input_crashes_the_parser(frame: str | bytes) -> None:
    try:
        parse_server_frame(frame)
    except MalformedFrame:
        pass


def test_client_frames_carry_unique_event_ids() -> None:
    frames = [json.loads(f) for f in (F.session_configure({}), F.input_audio_append(b"\0\0"), F.response_create(),
                                      F.response_cancel("r"), F.function_call_output("c", "{}"))]
    assert len({f["event_id"] for f in frames}) == len(frames)
    assert frames[1]["audio"] == "AAA="
    assert frames[3] == {"type": "response.cancel", "event_id": frames[3]["event_id"], "response_id": "r"}
    assert frames[4]["item"] == {"type": "function_call_output", "call_id": "c", "output": "{}"}
    assert "response_id" not in json.loads(F.response_cancel())
