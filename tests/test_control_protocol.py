"""The control protocol's parser and encoder, without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydrad.control import protocol as P

from .test_control_support import check_response


def parse(obj: object) -> P.Request:
    return P.parse_request(json.dumps(obj).encode())


def error_of(line: bytes) -> P.RequestError:
    with pytest.raises(P.RequestError) as info:
        P.parse_request(line)
    return info.value


def test_minimal_and_full_requests() -> None:
    assert parse({"cmd": "ping"}) == P.Request(cmd="ping", id=None)
    assert parse({"v": 1, "id": "a-1", "cmd": "status", "args": {}}) == P.Request(cmd="status", id="a-1")
    assert parse({"v": 1, "id": 7, "cmd": "cancel", "args": None}).id == 7
    assert P.parse_request(b'  {"cmd": "mute"}\r') == P.Request(cmd="mute")


@pytest.mark.parametrize("line, code", [
    (b"", "bad_json"),
    (b"{", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    (b'{"cmd": NaN}', "bad_json"),
    (b'{"cmd": "ping", "id": Infinity}', "bad_json"),
    (b"[" * 100000 + b"]" * 100000, "bad_json"),
    (b"1" * 5000, "bad_json"),  # more digits than Python converts
    (b"[]", "bad_request"),
    (b'"ping"', "bad_request"),
    (b"null", "bad_request"),
    (b"{}", "bad_request"),
    (b'{"cmd": 1}', "bad_request"),
    (b'{"cmd": null}', "bad_request"),
    (b'{"cmd": "ping", "v": "1"}', "bad_request"),
    (b'{"cmd": "ping", "v": true}', "bad_request"),
    (b'{"cmd": "ping", "v": 2}', "unsupported_version"),
    (b'{"cmd": "ping", "v": 0}', "unsupported_version"),
    (b'{"cmd": "ping", "id": [1]}', "bad_request"),
    (b'{"cmd": "ping", "id": true}', "bad_request"),
    (b'{"cmd": "ping", "id": 1.5}', "bad_request"),
    (b'{"cmd": "ping", "id": 18446744073709551616}', "bad_request"),
    (b'{"cmd": "ping", "comand": "x"}', "bad_request"),
    (b'{"cmd": "ping", "args": []}', "bad_request"),
    (b'{"cmd": "ping", "args": {"x": 1}}', "bad_request"),
    (b'{"cmd": "reboot"}', "unknown_command"),
    (b'{"cmd": "PING"}', "unknown_command"),
    (b'{"cmd": ""}', "unknown_command"),
])
def test_bad_lines_get_the_right_code(line: bytes, code: str) -> None:
    assert error_of(line).code == code


def test_error_echoes_a_valid_id_and_drops_an_invalid_one() -> None:
    assert error_of(b'{"id": "x", "cmd": "reboot"}').req_id == "x"
    assert error_of(b'{"id": 3, "cmd": "ping", "v": 9}').req_id == 3
    assert error_of(b'{"id": {"a": 1}, "cmd": "reboot"}').req_id is None
    long_id = "i" * (P.MAX_ID_CHARS + 1)
    assert error_of(json.dumps({"id": long_id, "cmd": "ping"}).encode()).req_id is None
    reply = check_response(P.encode_error({"not": "an id"}, "bad_request", "x").rstrip(b"\n"))
    assert reply["id"] is None


def test_encoded_responses_are_single_ascii_lines() -> None:
    nasty = {"s": "line1\nline2\u2028\u2029\r\x00 é 🎙", "nan": float("nan"), "inf": float("-inf"),
             "nested": {"t": (1, 2), "set": {3}}, "obj": object(), 5: "int key"}
    for data in (P.encode_ok("id\n", nasty), P.encode_error(1, "internal", "boom\nboom"),
                 P.encode_request("status", "x")):
        assert data.endswith(b"\n") and data.count(b"\n") == 1 and data.isascii()
    obj = check_response(P.encode_ok(1, nasty).rstrip(b"\n"))
    assert obj["result"]["nan"] is None and obj["result"]["inf"] is None
    assert obj["result"]["s"].startswith("line1\nline2") and obj["result"]["5"] == "int key"


def test_response_parser_rejects_what_is_not_a_response() -> None:
    for bad in (b"hello", b"{}", b'{"v": 1, "ok": "yes"}', b'{"v": 2, "ok": true, "result": 1}',
                b'{"v": 1, "ok": true}', b'{"v": 1, "ok": false, "error": "x"}'):
        with pytest.raises(P.ResponseError):
            P.parse_response(bad)
    assert P.parse_response(P.encode_ok(1, {"a": 1}).rstrip())["result"] == {"a": 1}


def test_every_error_code_is_documented() -> None:
    doc = (P.__file__.rsplit("/hydrad/", 1)[0] + "/docs/control.md")
    text = open(doc, encoding="utf-8").read()
    for code in P.ERROR_CODES:
        assert f"`{code}`" in text, f"error code {code} is not in docs/control.md"
    for cmd in P.COMMANDS:
        assert f"`{cmd}`" in text, f"command {cmd} is not in docs/control.md"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
request_like = st.dictionaries(
    st.sampled_from(["v", "id", "cmd", "args", "x"]) | st.text(max_size=6),
    json_values | st.sampled_from(list(P.COMMANDS)) | st.just(1),
    max_size=5,
)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300) | request_like.map(lambda d: json.dumps(d).encode()))
def test_parser_never_fails_unexpectedly(line: bytes) -> None:
    """Anything parses to a Request or a RequestError, and both encode to one valid line."""
    try:
        req = P.parse_request(line)
    except P.RequestError as exc:
        out = P.encode_error(exc.req_id, exc.code, exc.message)
        obj = check_response(out[:-1])
        assert obj["error"]["code"] == exc.code
    else:
        assert req.cmd in P.COMMANDS and req.v == P.VERSION
        check_response(P.encode_ok(req.id, {"echo": line.decode("utf-8", "replace")})[:-1])
