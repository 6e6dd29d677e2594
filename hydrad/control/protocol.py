"""The control socket's wire format: versioned, newline-delimited JSON (see docs/control.md).

One request per line, one response line per request, in order::

    -> {"v": 1, "id": 7, "cmd": "status"}
    <- {"v": 1, "id": 7, "ok": true, "result": {...}}
    <- {"v": 1, "id": 7, "ok": false, "error": {"code": "unknown_command", "message": "..."}}

Pure functions, no I/O: the server, the client and the tests share them. Every line this
module encodes is ASCII JSON (non-ASCII is escaped) ending in exactly one ``\\n``, so a
response can never be confused with two lines, whatever a request contained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

#: the protocol version this side speaks (``v`` in every request and response)
VERSION = 1

#: every command, with a one-line description (``hydrad ctl --help`` and docs/control.md)
COMMANDS: dict[str, str] = {
    "ping": "check that the daemon answers",
    "status": "connection state, session, turn state, uptime, audio engine, last error",
    "cancel": "cancel the response in flight and flush playback (replies after the flush)",
    "mute": "send silence instead of microphone audio (the stream keeps running)",
    "unmute": "send microphone audio again",
    "metrics": "Prometheus text exposition of the daemon's metrics",
}

#: the keys a request may carry; anything else is a ``bad_request`` (typos must not pass silently)
REQUEST_KEYS = frozenset({"v", "id", "cmd", "args"})

#: longest accepted ``id`` string (the id is echoed in the response)
MAX_ID_CHARS = 256

#: error codes, with when each is sent (docs/control.md lists the same)
ERROR_CODES: dict[str, str] = {
    "bad_json": "the line is not UTF-8 JSON",
    "bad_request": "valid JSON, but not a request object (missing or mistyped field, unknown key)",
    "unsupported_version": "'v' is not a version this daemon speaks",
    "unknown_command": "'cmd' names no command",
    "line_too_long": "the line exceeds the configured limit; the connection is closed",
    "forbidden": "the peer's uid/gid is not on the allow-list; the connection is closed",
    "busy": "too many open control connections; the connection is closed",
    "idle_timeout": "no complete request within the idle timeout; the connection is closed",
    "timeout": "the command did not finish in time",
    "unavailable": "the command is not available in this daemon (e.g. no metrics)",
    "internal": "the command failed inside the daemon (logged); the daemon keeps running",
}

#: error codes after which the server closes the connection
CLOSING_CODES = frozenset({"line_too_long", "forbidden", "busy", "idle_timeout"})

#: MIME type of the ``metrics`` result text
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestError(Exception):
    """A request line that cannot be served; becomes an error response with ``code``."""

    def __init__(self, code: str, message: str, req_id: Any = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass(frozen=True)
class Request:
    cmd: str
    id: Any = None
    args: dict[str, Any] = field(default_factory=dict)
    v: int = VERSION


def _valid_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> Request:
    """Parse one line (without its newline) into a :class:`Request` or raise :class:`RequestError`.

    The ``id`` is echoed in the error whenever it could be read and is valid, so a client
    that pipelines requests can tell which one failed.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("bad_json", f"the line is not UTF-8 (byte {exc.start})") from None
    try:
        # NaN/Infinity are not JSON; Python accepts them by default.
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("bad_json", "the JSON is nested too deeply") from None
    except ValueError as exc:
        raise RequestError("bad_json", f"not valid JSON: {_short(str(exc))}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request", f"a request is a JSON object, not {_json_type(obj)}")
    req_id = obj.get("id")
    if not _valid_id(req_id):
        raise RequestError("bad_request",
                           f"'id' must be a string of at most {MAX_ID_CHARS} characters, a 64-bit integer or null")
    unknown = sorted(k for k in obj if k not in REQUEST_KEYS)
    if unknown:
        raise RequestError("bad_request", f"unknown key {_short(unknown[0])!r}; allowed keys: args, cmd, id, v", req_id)
    v = obj.get("v", VERSION)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError("bad_request", f"'v' must be an integer (this daemon speaks version {VERSION})", req_id)
    if v != VERSION:
        raise RequestError("unsupported_version", f"version {v} is not supported; this daemon speaks version {VERSION}",
                           req_id)
    if "cmd" not in obj:
        raise RequestError("bad_request", "missing 'cmd'; commands: " + ", ".join(COMMANDS), req_id)
    cmd = obj["cmd"]
    if not isinstance(cmd, str):
        raise RequestError("bad_request", f"'cmd' must be a string, not {_json_type(cmd)}", req_id)
    if cmd not in COMMANDS:
        raise RequestError("unknown_command", f"unknown command {_short(cmd)!r}; commands: " + ", ".join(COMMANDS),
                           req_id)
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError("bad_request", f"'args' must be an object, not {_json_type(args)}", req_id)
    if args:
        # No command takes arguments in version 1; refusing them keeps room to add some later.
        raise RequestError("bad_request", f"command {cmd!r} takes no arguments", req_id)
    return Request(cmd=cmd, id=req_id, args=args, v=v)


def _sanitize(value: Any, depth: int = 0) -> Any:
    """Make a result JSON-safe: non-finite floats become null, unknown objects their str()."""
    if depth > 32:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _sanitize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_sanitize(v, depth + 1) for v in value]
    return str(value)


def _dumps(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n").encode("ascii")


def encode_ok(req_id: Any, result: Any) -> bytes:
    return _dumps({"v": VERSION, "id": req_id, "ok": True, "result": _sanitize(result)})


def encode_error(req_id: Any, code: str, message: str) -> bytes:
    assert code in ERROR_CODES, code
    return _dumps({"v": VERSION, "id": req_id if _valid_id(req_id) else None, "ok": False,
                   "error": {"code": code, "message": _short(str(message), 500)}})


def encode_request(cmd: str, req_id: Any = None, args: dict[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"v": VERSION, "id": req_id, "cmd": cmd}
    if args:
        obj["args"] = args
    return _dumps(obj)


class ResponseError(ValueError):
    """A response line that does not follow this protocol (client side)."""


def parse_response(line: bytes) -> dict[str, Any]:
    """Validate one response line; returns the object (``ok`` and ``result`` or ``error``)."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ResponseError(f"the daemon's reply is not JSON: {_short(str(exc))}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION or not isinstance(obj.get("ok"), bool):
        raise ResponseError(f"the daemon's reply is not a version-{VERSION} response: {_short(line.decode('utf-8', 'replace'))}")
    if obj["ok"]:
        if "result" not in obj:
            raise ResponseError("the daemon's reply has ok=true but no result")
    else:
        err = obj.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
            raise ResponseError("the daemon's error reply has no error code and message")
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(text: str, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
