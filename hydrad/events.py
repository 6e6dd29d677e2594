"""The event vocabulary every observer consumes (hooks, metrics, timeline, recorder, logs).

The session publishes; sinks are synchronous, non-blocking callables. A sink that must do
I/O hands the event to its own task. See docs/architecture.md for the names and fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

EVENT_NAMES = (
    "session_connected", "session_configured", "session_disconnected",
    "speech_started", "speech_stopped", "user_turn_done",
    "response_created", "response_audio_started", "response_done",
    "barge_in", "tool_call", "tool_result", "cancel_requested",
    "service_error", "service_warning", "malformed_frame", "engine_state", "guard_decision",
)


@dataclass(frozen=True)
class Event:
    name: str
    fields: dict[str, Any]
    t: float = field(default_factory=time.monotonic)


Sink = Callable[[Event], None]


class EventBus:
    """Fan-out to sinks; a sink that raises is reported once per failure and never stops the others."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self.sink_errors = 0

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def publish(self, event: Event) -> None:
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - an observer must never break the pipeline
                self.sink_errors += 1
                import structlog

                structlog.get_logger("hydrad.events").exception("event_sink_failed", sink=repr(sink), event_name=event.name)
