"""Server -> client events: typed, parsed tolerantly, encoded faithfully.

The daemon calls :func:`parse_server_frame` on every text frame; the simulator builds the
same dataclasses and calls :meth:`ServerEvent.encode`. One definition serves both sides so
they cannot drift apart.

Tolerance rules (reference §4, §9): unknown ``type``s become :class:`UnknownEvent`, extra
fields are ignored, ``warning`` may carry ``code``/``message`` at top level or nested,
transcript deltas are optional. Strictness: a field hydrad acts on (ids, audio) must be
present and well-formed or the frame is :class:`MalformedFrame`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .audio import decode_pcm, encode_pcm
from .errors import MalformedFrame

#: Frames above this are refused before JSON parsing (a 10 MB frame must not stall the loop).
MAX_FRAME_BYTES = 4 * 1024 * 1024


def server_event_id() -> str:
    return "sv_" + secrets.token_hex(8)


def _req(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise MalformedFrame(f"{where} lacks {key!r}", "missing_field")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise MalformedFrame(f"{where}.{key} has type {type(value).__name__}", "missing_field")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ServerEvent:
    TYPE: ClassVar[str] = ""
    event_id: str = field(default_factory=server_event_id, kw_only=True)

    def encode(self) -> str:
        body = {"type": self.TYPE, "event_id": self.event_id}
        body.update(self._fields())
        return json.dumps(body, separators=(",", ":"))

    def _fields(self) -> dict[str, Any]:  # pragma: no cover - overridden
        return {}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "ServerEvent":  # pragma: no cover - overridden
        return cls(event_id=str(obj.get("event_id", "")))


@dataclass(frozen=True)
class Warning_(ServerEvent):
    """``warning``: shape unpublished; code/message looked up at top level and nested."""

    TYPE: ClassVar[str] = "warning"
    code: str | None = None
    message: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "Warning_":
        nested = obj.get("warning") if isinstance(obj.get("warning"), dict) else obj.get("error")
        nested = nested if isinstance(nested, dict) else {}
        return cls(
            code=_opt_str(obj, "code") or _opt_str(nested, "code"),
            message=_opt_str(obj, "message") or _opt_str(nested, "message"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class SessionCreated(ServerEvent):
    TYPE: ClassVar[str] = "session.created"
    session_id: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "SessionCreated":
        return cls(session_id=_req(obj, "session_id", str, cls.TYPE), event_id=str(obj.get("event_id", "")))


@dataclass(frozen=True)
class SessionConfigured(ServerEvent):
    """Effective configuration; ``output_rate`` is None when the service did not announce it."""

    TYPE: ClassVar[str] = "session.configured"
    session: dict[str, Any] = field(default_factory=dict)

    @property
    def output_rate(self) -> int | None:
        rate = self.session.get("output_audio_sample_rate")
        return rate if isinstance(rate, int) and not isinstance(rate, bool) and 8000 <= rate <= 192000 else None

    def _fields(self) -> dict[str, Any]:
        return {"session": self.session}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "SessionConfigured":
        session = obj.get("session")
        return cls(session=session if isinstance(session, dict) else {}, event_id=str(obj.get("event_id", "")))


@dataclass(frozen=True)
class SessionUpdated(SessionConfigured):
    TYPE: ClassVar[str] = "session.updated"


@dataclass(frozen=True)
class SpeechStarted(ServerEvent):
    TYPE: ClassVar[str] = "input_audio_buffer.speech_started"
    audio_start_ms: int = 0
    item_id: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"audio_start_ms": self.audio_start_ms, "item_id": self.item_id}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "SpeechStarted":
        start = obj.get("audio_start_ms")
        return cls(
            audio_start_ms=start if isinstance(start, int) and not isinstance(start, bool) else -1,
            item_id=_opt_str(obj, "item_id") or "",
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class SpeechStopped(ServerEvent):
    TYPE: ClassVar[str] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int = 0
    item_id: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"audio_end_ms": self.audio_end_ms, "item_id": self.item_id}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "SpeechStopped":
        end = obj.get("audio_end_ms")
        return cls(
            audio_end_ms=end if isinstance(end, int) and not isinstance(end, bool) else -1,
            item_id=_opt_str(obj, "item_id") or "",
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class Item:
    """A ConversationItem: flat, every field optional (reference §2.8)."""

    id: str | None = None
    type: str | None = None
    role: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    text: str | None = None  # content[0].text when a transcript is present

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if v is not None and k != "text"}
        if self.type == "message":
            kind = "input_audio" if self.role == "user" else "output_audio"
            out["content"] = [{"type": kind, "text": self.text}]
        return out

    @classmethod
    def decode(cls, obj: object) -> "Item":
        if not isinstance(obj, dict):
            raise MalformedFrame("item is not an object", "missing_field")
        text = None
        content = obj.get("content")
        if isinstance(content, list) and content and isinstance(content[0], dict):
            text = _opt_str(content[0], "text")
        return cls(
            **{k: _opt_str(obj, k) for k in ("id", "type", "role", "status", "call_id", "name", "arguments", "output")},
            text=text,
        )


@dataclass(frozen=True)
class ItemAdded(ServerEvent):
    TYPE: ClassVar[str] = "conversation.item.added"
    item: Item = field(default_factory=Item)
    previous_item_id: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"previous_item_id": self.previous_item_id, "item": self.item.encode()}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "ItemAdded":
        return cls(
            item=Item.decode(obj.get("item")),
            previous_item_id=_opt_str(obj, "previous_item_id"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class ItemDone(ItemAdded):
    TYPE: ClassVar[str] = "conversation.item.done"


@dataclass(frozen=True)
class ResponseCreated(ServerEvent):
    TYPE: ClassVar[str] = "response.created"
    response_id: str = ""
    status: str | None = "in_progress"

    def _fields(self) -> dict[str, Any]:
        return {"response": {"id": self.response_id, "status": self.status}}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "ResponseCreated":
        response = _req(obj, "response", dict, cls.TYPE)
        return cls(
            response_id=_req(response, "id", str, cls.TYPE + ".response"),
            status=_opt_str(response, "status"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class AudioDelta(ServerEvent):
    TYPE: ClassVar[str] = "response.output_audio.delta"
    response_id: str = ""
    item_id: str | None = None
    pcm: bytes = b""
    output_index: int = 0
    content_index: int = 0

    def _fields(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id, "item_id": self.item_id, "output_index": self.output_index,
            "content_index": self.content_index, "delta": encode_pcm(self.pcm),
        }

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "AudioDelta":
        return cls(
            response_id=_req(obj, "response_id", str, cls.TYPE),
            item_id=_opt_str(obj, "item_id"),
            pcm=decode_pcm(obj.get("delta"), cls.TYPE + ".delta"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class AudioDone(ServerEvent):
    TYPE: ClassVar[str] = "response.output_audio.done"
    response_id: str = ""
    item_id: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "AudioDone":
        return cls(
            response_id=_req(obj, "response_id", str, cls.TYPE),
            item_id=_opt_str(obj, "item_id"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class FunctionArgsDelta(ServerEvent):
    TYPE: ClassVar[str] = "response.function_call_arguments.delta"
    response_id: str = ""
    call_id: str = ""
    delta: str = ""
    name: str | None = None

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"response_id": self.response_id, "call_id": self.call_id, "delta": self.delta}
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "FunctionArgsDelta":
        return cls(
            response_id=_opt_str(obj, "response_id") or "",
            call_id=_req(obj, "call_id", str, cls.TYPE),
            delta=_req(obj, "delta", str, cls.TYPE),
            name=_opt_str(obj, "name"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class FunctionArgsDone(ServerEvent):
    TYPE: ClassVar[str] = "response.function_call_arguments.done"
    response_id: str = ""
    call_id: str = ""
    name: str | None = None
    arguments: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"response_id": self.response_id, "call_id": self.call_id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "FunctionArgsDone":
        return cls(
            response_id=_opt_str(obj, "response_id") or "",
            call_id=_req(obj, "call_id", str, cls.TYPE),
            name=_opt_str(obj, "name"),
            arguments=_opt_str(obj, "arguments"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class ResponseDone(ServerEvent):
    TYPE: ClassVar[str] = "response.done"
    response_id: str = ""
    status: str = "completed"
    reason: str | None = None
    error_code: str | None = None
    output: tuple[Item, ...] = ()
    usage: dict[str, Any] | None = None

    def _fields(self) -> dict[str, Any]:
        response: dict[str, Any] = {"id": self.response_id, "status": self.status,
                                    "output": [i.encode() for i in self.output]}
        if self.reason or self.error_code:
            details: dict[str, Any] = {}
            if self.reason:
                details["reason"] = self.reason
            if self.error_code:
                details["error"] = {"code": self.error_code, "type": "server_error"}
            response["status_details"] = details
        if self.usage is not None:
            response["usage"] = self.usage
        return {"response": response}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "ResponseDone":
        response = _req(obj, "response", dict, cls.TYPE)
        details = response.get("status_details")
        details = details if isinstance(details, dict) else {}
        error = details.get("error") if isinstance(details.get("error"), dict) else {}
        output = response.get("output")
        items = tuple(Item.decode(i) for i in output if isinstance(i, dict)) if isinstance(output, list) else ()
        usage = response.get("usage")
        return cls(
            response_id=_req(response, "id", str, cls.TYPE + ".response"),
            status=_opt_str(response, "status") or "completed",
            reason=_opt_str(details, "reason"),
            error_code=_opt_str(error, "code"),
            output=items,
            usage=usage if isinstance(usage, dict) else None,
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class Error(ServerEvent):
    TYPE: ClassVar[str] = "error"
    code: str | None = None
    error_type: str | None = None
    message: str | None = None
    param: str | None = None
    client_event_id: str | None = None

    def _fields(self) -> dict[str, Any]:
        err = {"type": self.error_type, "code": self.code, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        if self.client_event_id is not None:
            err["event_id"] = self.client_event_id
        return {"error": err}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "Error":
        err = obj.get("error") if isinstance(obj.get("error"), dict) else obj  # tolerate flat errors
        return cls(
            code=_opt_str(err, "code"), error_type=_opt_str(err, "type"), message=_opt_str(err, "message"),
            param=_opt_str(err, "param"), client_event_id=_opt_str(err, "event_id"),
            event_id=str(obj.get("event_id", "")),
        )


@dataclass(frozen=True)
class TranscriptDelta(ServerEvent):
    """Undocumented but observed assistant transcript (reference §4.2 note)."""

    TYPE: ClassVar[str] = "response.output_audio_transcript.delta"
    delta: str = ""
    response_id: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {"response_id": self.response_id, "delta": self.delta}

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "TranscriptDelta":
        return cls(delta=_opt_str(obj, "delta") or "", response_id=_opt_str(obj, "response_id"),
                   event_id=str(obj.get("event_id", "")))


@dataclass(frozen=True)
class UnknownEvent(ServerEvent):
    """An event type hydrad does not know; counted and logged at debug, never fatal."""

    TYPE: ClassVar[str] = "?"
    type: str = ""

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> "UnknownEvent":
        return cls(type=str(obj.get("type")), event_id=str(obj.get("event_id", "")))


EVENT_TYPES: dict[str, type[ServerEvent]] = {
    c.TYPE: c
    for c in (
        Warning_, SessionCreated, SessionConfigured, SessionUpdated, SpeechStarted, SpeechStopped,
        ItemAdded, ItemDone, ResponseCreated, AudioDelta, AudioDone, FunctionArgsDelta,
        FunctionArgsDone, ResponseDone, Error, TranscriptDelta,
    )
}


def load_json_object(frame: str | bytes, limit: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Size-check and JSON-decode one frame into an object with a string ``type``."""
    if len(frame) > limit:
        raise MalformedFrame(f"frame of {len(frame)} bytes exceeds the {limit}-byte limit", "too_large")
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"invalid JSON ({exc.__class__.__name__}: {str(exc)[:80]})", "json") from None
    if not isinstance(obj, dict):
        raise MalformedFrame(f"frame is a JSON {type(obj).__name__}, not an object", "json")
    if not isinstance(obj.get("type"), str):
        raise MalformedFrame("frame has no string 'type'", "missing_field")
    return obj


def parse_server_frame(frame: str | bytes, limit: int = MAX_FRAME_BYTES) -> ServerEvent:
    """Parse one server text frame. Raises :class:`MalformedFrame` with a reason."""
    obj = load_json_object(frame, limit)
    cls = EVENT_TYPES.get(obj["type"], UnknownEvent)
    return cls.decode(obj)
