"""Structured logs: JSON lines off a TTY, console on a TTY, context ids, and never a secret."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from urllib.parse import quote

import pytest
import structlog
import trio

from hydrad.config import LogConfig, Secret
from hydrad.events import Event
from hydrad.observe.logging import (
    LogContext, configure_logging, log_context, redact_text, redact_value, register_secret, reset_logging,
)


@pytest.fixture(autouse=True)
def _reset():
    reset_logging()
    yield
    reset_logging()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(buf: io.StringIO) -> list[dict]:
    out = []
    for line in buf.getvalue().splitlines():
        out.append(json.loads(line))  # every line must be one JSON object
    return out


KEY = "sk_" + secrets.token_urlsafe(24)  # what a Hydra API key looks like: random, ~35 chars


def test_json_lines_never_contain_the_key_or_audio() -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(level="debug", format="auto"), buf, secrets=[Secret(KEY, "test")])
    log = structlog.get_logger("hydrad.test")
    audio_b64 = base64.b64encode(bytes(range(256)) * 8).decode()
    # 1. bound context (contextvars)
    structlog.contextvars.bind_contextvars(debug_note=f"key is {KEY}", request_token=KEY)
    # 2. a URL query string, and the same key URL-encoded in another one
    log.info("socket_open", url=f"wss://api.smallest.ai/waves/v1/s2s?model=hydra-v1.1&api_key={KEY}")
    log.info("retrying", target="wss://h/x?api_key=" + quote(KEY, safe=""))
    # 3. headers, nested
    log.debug("upgrade", headers={"Authorization": f"Bearer {KEY}", "User-Agent": "hydrad"})
    # 4. an exception message with the key, logged with its traceback, and as a field value
    try:
        raise RuntimeError(f"handshake refused for {KEY}")
    except RuntimeError as exc:
        log.exception("handshake_failed")
        log.warning("handshake_error", error=exc)
    # 5. audio: as a field, as bytes, and inside a raw frame string
    log.debug("frame", audio=audio_b64, pcm=b"\x01\x02" * 500, delta=audio_b64)
    log.debug("raw_frame", text=json.dumps({"type": "input_audio_buffer.append", "audio": audio_b64}))
    # 6. a key nobody registered, in a query string
    log.info("other", url="https://x.example/v1?token=unregistered-value-123&model=a")
    # 7. the standard library (trio-websocket logs through it)
    logging.getLogger("trio-websocket").warning("connecting to %s", f"wss://h/?api_key={KEY}")

    out = buf.getvalue()
    parsed = lines(buf)
    assert len(parsed) == 9
    assert KEY not in out and quote(KEY, safe="") not in out
    assert audio_b64[:40] not in out and audio_b64[100:140] not in out
    assert "unregistered-value-123" not in out
    for rec in parsed:
        assert isinstance(rec["event"], str) and rec["level"] and rec["ts"] and rec["logger"]
    by_event = {r["event"]: r for r in parsed}
    # Redaction is targeted: the rest of the line survives.
    assert by_event["socket_open"]["url"] == "wss://api.smallest.ai/waves/v1/s2s?model=hydra-v1.1&api_key=[redacted]"
    assert by_event["socket_open"]["debug_note"] == "key is [redacted]"
    assert by_event["socket_open"]["request_token"] == "[redacted]"
    assert by_event["upgrade"]["headers"] == {"Authorization": "[redacted]", "User-Agent": "hydrad"}
    assert "RuntimeError: handshake refused for [redacted]" in by_event["handshake_failed"]["exception"]
    assert by_event["frame"]["audio"].startswith("[audio") and by_event["frame"]["pcm"] == "[audio 1000 bytes]"
    assert "input_audio_buffer.append" in by_event["raw_frame"]["text"]
    assert "model=a" in by_event["other"]["url"]
    lib = by_event["library_log"]
    assert lib["logger"] == "trio-websocket" and lib["message"] == "connecting to wss://h/?api_key=[redacted]"


def test_key_registered_later_and_key_without_a_known_field_name() -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    log = structlog.get_logger("hydrad")
    other = "Zq8" + secrets.token_hex(10)
    register_secret(other)
    log.info("reloaded", note=f"new credential {other} loaded", listing=[other, {"x": other}])
    assert other not in buf.getvalue()
    assert lines(buf)[0]["listing"] == ["[redacted]", {"x": "[redacted]"}]


def test_each_redaction_rule_on_its_own() -> None:
    register_secret("Zx9-registered-secret")
    assert redact_text("a Zx9-registered-secret b") == "a [redacted] b"
    assert redact_value({"api_key": "short1", "password": "pw"}) == {"api_key": "[redacted]", "password": "[redacted]"}
    assert redact_text("Authorization: Bearer abc.def") == "Authorization: Bearer [redacted]"
    assert redact_text("x " + "A" * 80 + " y") == "x [base64 80 chars redacted] y"  # base64 silence
    b64 = base64.b64encode(bytes(range(200))).decode()
    assert b64[:30] not in redact_text(f"frame {b64}")
    path = "/var/lib/hydrad/recordings/site_kiosk_lobby_north_entrance/turn-000001/events_jsonl"
    assert redact_text(path) == path  # long, base64 alphabet, but not base64
    assert redact_text("sess_0f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0-0f8e7d6c-5b4a-3928") == \
        "sess_0f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0-0f8e7d6c-5b4a-3928"
    assert redact_value(b"\x00" * 10) == "[10 bytes]"
    assert redact_value(Secret("whatever-value", "t")) == "[redacted]"


def test_unredacted_values_stay_intact() -> None:
    # The redactor must not eat ordinary fields (numbers, ids, short strings, key names with audio_ prefixes).
    v = redact_value({"audio_start_ms": 1200, "item_id": "item_abc", "status": "completed", "heard_s": 1.5,
                      "during_response": True, "monkey": "banana", "tool_calls": [{"name": "x", "duration_ms": 3.5}]})
    assert v == {"audio_start_ms": 1200, "item_id": "item_abc", "status": "completed", "heard_s": 1.5,
                 "during_response": True, "monkey": "banana", "tool_calls": [{"name": "x", "duration_ms": 3.5}]}
    assert redact_text("monkey=banana&api_key=abc") == "monkey=banana&api_key=[redacted]"
    assert redact_value({"X-Api-Key": "abc", "Set-Cookie": "s=1"}) == {"X-Api-Key": "[redacted]", "Set-Cookie": "[redacted]"}


def test_console_renderer_on_a_tty_and_json_when_forced() -> None:
    tty = TTY()
    configure_logging(LogConfig(format="auto"), tty, secrets=[KEY])
    structlog.get_logger("hydrad").info("turn.completed", response_id="resp_1", secret_note=KEY)
    text = tty.getvalue()
    assert "turn.completed" in text and "resp_1" in text and KEY not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    forced = TTY()
    configure_logging(LogConfig(format="json"), forced)
    structlog.get_logger("hydrad").info("x")
    assert lines(forced)[0]["event"] == "x"


def test_level_comes_from_the_config() -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(level="warning"), buf)
    log = structlog.get_logger("hydrad")
    log.info("quiet")
    log.debug("quieter")
    log.warning("loud")
    logging.getLogger("some.lib").info("lib quiet")
    logging.getLogger("some.lib").error("lib loud")
    assert [r["event"] for r in lines(buf)] == ["loud", "library_log"]
    buf2 = io.StringIO()
    configure_logging(LogConfig(level="debug"), buf2)  # a reload takes effect on existing loggers
    log.debug("now visible")
    assert [r["event"] for r in lines(buf2)] == ["now visible"]


async def test_session_turn_and_response_ids_on_every_line_from_any_task() -> None:
    buf = io.StringIO()
    configure_logging(LogConfig(), buf)
    log = structlog.get_logger("hydrad")
    ready, logged = trio.Event(), trio.Event()

    async def other_task() -> None:  # a different trio task: its contextvars are its own
        await ready.wait()
        log.info("from_uplink_task")
        logged.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.sleep(0)
        for ev in (Event("session_connected", {"session_id": "sess_1"}),
                   Event("speech_started", {"item_id": "item_7"}),
                   Event("response_created", {"response_id": "resp_3"})):
            log_context(ev)
        ready.set()
        await logged.wait()
    log.info("explicit", response_id="resp_other")
    log_context(Event("response_done", {"response_id": "resp_3"}))
    log.info("after_done")
    log_context(Event("session_disconnected", {"session_id": "sess_1"}))
    log.info("after_disconnect")
    recs = {r["event"]: r for r in lines(buf)}
    first = recs["from_uplink_task"]
    assert (first["session_id"], first["turn_id"], first["response_id"]) == ("sess_1", "item_7", "resp_3")
    assert recs["explicit"]["response_id"] == "resp_other"  # an explicit field wins
    assert "response_id" not in recs["after_done"] and recs["after_done"]["turn_id"] == "item_7"
    assert not {"session_id", "turn_id", "response_id"} & set(recs["after_disconnect"])
    assert list(first)[:3] == ["ts", "level", "event"]


def test_a_private_context_tracker_can_be_used() -> None:
    ctx = LogContext()
    buf = io.StringIO()
    configure_logging(LogConfig(), buf, context=ctx)
    ctx(Event("session_configured", {"session_id": "sess_x"}))
    structlog.get_logger("hydrad").info("hello")
    assert lines(buf)[0]["session_id"] == "sess_x"
