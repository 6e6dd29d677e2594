"""What the simulator saw and did, per connection, for tests to assert on.

Audio is summarised (byte counts, not samples) so a long soak test does not hold every
appended frame in memory, unless ``SimConfig.keep_audio`` asks for the samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResponseRecord:
    """One response: ``n`` is its 1-based number in the session (it picks the reply's f0)."""

    n: int
    id: str
    turn: int | None  # user turn number, 0 for the greeting, None for a bare response.create
    kind: str  # "audio" or "tool_calls"
    f0: float | None
    status: str | None = None  # response.done status once sent
    reason: str | None = None
    audio_bytes: int = 0


@dataclass
class SimSessionRecord:
    """One WebSocket connection as the simulator saw it (including refused ones)."""

    connection: int  # 1-based connection number on this Simulator
    model: str
    session_id: str
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    sent: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)
    responses: list[ResponseRecord] = field(default_factory=list)
    #: the effective configuration echoed in session.configured (None until then)
    configured: dict[str, Any] | None = None
    #: close code (server- or client-initiated; 1006 for a TCP drop) or None while open
    closed: int | None = None
    #: True while the connection's handler is running
    live: bool = True
    #: (arrival monotonic, PCM16 16 kHz) of every accepted append, with ``keep_audio`` only
    audio: list[tuple[float, bytes]] = field(default_factory=list)

    def log_received(self, obj: dict[str, Any]) -> None:
        self.received.append((time.monotonic(), obj))

    def log_sent(self, obj: dict[str, Any]) -> None:
        self.sent.append((time.monotonic(), obj))

    def sent_types(self) -> list[str]:
        return [str(obj.get("type")) for _, obj in self.sent]

    def sent_of(self, type_: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.sent if obj.get("type") == type_]

    def received_of(self, type_: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.received if obj.get("type") == type_]
