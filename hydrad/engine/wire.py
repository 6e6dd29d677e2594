"""The framed pipe protocol between the daemon and its audio-engine child process.

Both directions use the same framing on a byte stream (the child's stdin and stdout)::

    +--------+----------------+-------------------+
    | kind:1 | length:4 (LE)  | payload: length   |
    +--------+----------------+-------------------+

Payloads are JSON objects, except the audio kinds:

* ``PLAY`` (daemon -> engine): ``id_len:1 | response_id (utf-8) | PCM16 LE mono`` at the rate
  last set with ``OUTPUT_FORMAT``.
* ``CAPTURE`` (engine -> daemon): ``t_adc:f64 LE | PCM16 LE mono 16 kHz``, exactly one uplink
  frame; ``t_adc`` is the ``time.monotonic()`` instant its first sample hit the ADC.

Every timestamp in this protocol is ``time.monotonic()`` (CLOCK_MONOTONIC), which is shared
between processes on Linux, so the daemon can compare engine times with its own.
See docs/engine.md for the meaning of each message. This module has no I/O of its own.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("<BI")
ADC_TIME = struct.Struct("<d")
#: A frame larger than this is a protocol violation (the biggest legitimate one is a PLAY of a
#: large delta: 4 MiB of base64 decodes to 3 MiB).
MAX_PAYLOAD = 8 * 1024 * 1024


class Kind(enum.IntEnum):
    # daemon -> engine
    CONFIG = 1          # {"backend", "options", "frame_ms", "block_ms", "fade_ms", ...}; first message, once
    OUTPUT_FORMAT = 2   # {"rate"}: the session's output rate for following PLAYs
    PLAY = 3            # binary, see module doc
    FLUSH = 4           # {"seq", "reason"} -> FLUSHED
    GATE = 5            # {"open": bool, "t0": monotonic}: uplink gate; wav mic schedules run from t0
    DUCK = 6            # {"gain": float}: scale playback (the echo guard ducks while it decides)
    PING = 7            # {"seq"} -> PONG
    STOP = 8            # {}: drain nothing, close devices, exit 0
    # engine -> daemon
    READY = 64          # {"pid", "backend", "input", "output"}: devices open (or not), see docs
    CAPTURE = 65        # binary, see module doc
    PLAYED = 66         # {"response_id", "first_audible", "samples", "rate", "done"}
    FLUSHED = 67        # {"seq", "response_id", "dropped_samples", "t_received", "t_silent"}
    STATS = 68          # {"underruns", "overruns", "buffer_ms", "callbacks", "status_flags", ...}
    DEVICE = 69         # {"state": "open"|"lost"|"reopening"|"unavailable", "error": str|None}
    LOG = 70            # {"level", "event", ...}: the engine's log lines, re-emitted by the daemon
    PONG = 71           # {"seq", "t"}


BINARY_KINDS = frozenset({Kind.PLAY, Kind.CAPTURE})


class WireError(ValueError):
    """The byte stream is not a valid engine frame sequence (the peer is broken: restart it)."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    payload: bytes

    def json(self) -> dict[str, Any]:
        obj = json.loads(self.payload)
        if not isinstance(obj, dict):
            raise WireError(f"{self.kind.name} payload is not a JSON object")
        return obj


def encode(kind: Kind, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"{kind.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(kind: Kind, obj: dict[str, Any] | None = None) -> bytes:
    return encode(kind, json.dumps(obj or {}, separators=(",", ":")).encode())


def encode_play(response_id: str, pcm: bytes) -> bytes:
    rid = response_id.encode()
    if len(rid) > 255:  # never truncate: a changed id would not match in PLAYED reports
        raise WireError(f"response id of {len(rid)} bytes exceeds 255")
    return encode(Kind.PLAY, bytes([len(rid)]) + rid + pcm)


def decode_play(payload: bytes) -> tuple[str, bytes]:
    if not payload:
        raise WireError("empty PLAY payload")
    n = payload[0]
    if len(payload) < 1 + n or (len(payload) - 1 - n) % 2:
        raise WireError("PLAY payload is truncated or has an odd PCM byte count")
    try:
        rid = payload[1 : 1 + n].decode()
    except UnicodeDecodeError:
        raise WireError("PLAY response id is not UTF-8") from None
    return rid, payload[1 + n :]


def encode_capture(t_adc: float, pcm: bytes) -> bytes:
    return encode(Kind.CAPTURE, ADC_TIME.pack(t_adc) + pcm)


def decode_capture(payload: bytes) -> tuple[float, bytes]:
    if len(payload) < ADC_TIME.size or (len(payload) - ADC_TIME.size) % 2:
        raise WireError("CAPTURE payload is truncated or has an odd PCM byte count")
    return ADC_TIME.unpack_from(payload)[0], payload[ADC_TIME.size :]


def _parse_header(buf: bytes | bytearray) -> tuple[Kind, int]:
    """Validate a header before any payload is awaited: garbage fails here, not after 8 MiB."""
    kind, length = HEADER.unpack_from(buf)
    if length > MAX_PAYLOAD:
        raise WireError(f"frame length {length} exceeds {MAX_PAYLOAD}")
    try:
        return Kind(kind), length
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None


class Decoder:
    """Incremental decoder: feed bytes as they arrive, iterate complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            k, length = _parse_header(self._buf)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Message(k, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out


def read_message(stream: Any) -> Message | None:
    """Blocking read of one message from a binary file object; None at a clean EOF.

    The header is validated before the payload is read, so garbage cannot make the reader
    wait for megabytes that will never come; a frame cut off by EOF is an error, not an end.
    """
    header = _read_exact(stream, HEADER.size)
    if header is None:
        return None
    k, length = _parse_header(header)
    payload = _read_exact(stream, length) if length else b""
    if payload is None:
        raise WireError(f"{k.name} frame truncated by end of stream")
    return Message(k, payload)


def _read_exact(stream: Any, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
