"""The turn state machine of one Hydra session: server events and engine reports in, effects out.

Sans-IO on purpose: no trio, no sockets, no clock reads except through ``clock``. The pipeline
feeds it and carries out its effects; tests drive it directly with event sequences.

The rules it encodes (protocol reference §5, docs/session.md):

* the mic gate opens on ``session.configured`` and never before;
* barge-in: queued playback is flushed on ``speech_started`` while a response is in flight or
  audible (policy ``immediate``), on a ``response.created`` that arrives before the previous
  response's audio is done, on a ``response.done`` ``cancelled`` whose audio is still audible,
  and at once after our own ``response.cancel``; deltas of a flushed response are dropped;
* discarded user turns (user item ``incomplete``) are reported and otherwise ignored;
* tool calls: argument deltas are assembled per ``call_id``; each call runs once; one
  ``function_call_output`` per call; exactly one ``response.create`` after the last output of
  the turn, debounced, and only once the tool response itself is done; a barge-in or cancel
  abandons the turn (outputs still posted, no ``response.create``);
* ``response_done`` fires when the user has really finished hearing the response (server done
  *and* local playback drained or flushed), carrying the turn's metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ..events import Event
from ..protocol import client_frames as F
from ..protocol import constants as C
from ..protocol import server_events as S
from .tools import PendingCall


# ----------------------------------------------------------------------------- effects

@dataclass(frozen=True)
class Send:
    frame: str
    kind: str  # the client frame type, for logs and counters


@dataclass(frozen=True)
class Play:
    response_id: str
    pcm: bytes


@dataclass(frozen=True)
class Flush:
    response_id: str | None
    trigger: str


@dataclass(frozen=True)
class SetOutputRate:
    rate: int


@dataclass(frozen=True)
class SetGate:
    open: bool


@dataclass(frozen=True)
class RunTool:
    call_id: str
    name: str
    arguments: str  # raw JSON text; parsed and validated by the tool runner


@dataclass(frozen=True)
class ArmDebounce:
    token: int
    delay_s: float


@dataclass(frozen=True)
class Duck:
    gain: float  # playback gain; 1.0 restores


@dataclass(frozen=True)
class ArmGuard:
    token: int
    window_s: float


@dataclass(frozen=True)
class Emit:
    event: Event


Effect = Union[Send, Play, Flush, SetOutputRate, SetGate, RunTool, ArmDebounce, Duck, ArmGuard, Emit]


@dataclass
class Guard:
    """A speech start during playback under the ``guard`` policy, waiting for evidence."""

    token: int
    item_id: str | None
    targets: list["ResponseState"]
    t: float


# ----------------------------------------------------------------------------- state

@dataclass
class ResponseState:
    response_id: str
    created_t: float
    user_item_id: str | None
    speech_stopped_t: float | None
    user_speech_ms: float | None = None
    server_done: bool = False
    status: str | None = None
    reason: str | None = None
    audio_done: bool = False
    flushed: bool = False
    received_samples: int = 0
    dropped_deltas: int = 0
    first_delta_t: float | None = None
    first_audible_t: float | None = None
    heard_samples: int = 0
    device_rate: int | None = None
    playback_drained: bool = True  # nothing queued yet
    barge_in: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reported: bool = False

    @property
    def has_audio(self) -> bool:
        return self.received_samples > 0

    @property
    def audible(self) -> bool:
        """Audio of this response is queued or playing locally."""
        return self.has_audio and not self.flushed and not self.playback_drained


@dataclass
class ToolTurn:
    response_id: str
    calls: dict[str, PendingCall] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    outputs_posted: int = 0
    debounce_token: int = 0
    debounce_elapsed: bool = False
    abandoned: bool = False
    create_sent: bool = False


class Conversation:
    """One session's turn tracking. Create a new one per WebSocket connection."""

    def __init__(
        self,
        configure_session: dict[str, Any],
        model: str,
        barge_in_policy: str = "immediate",
        tool_debounce_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        guard_window_s: float = 1.0,
        duck_gain: float = 0.3,
    ) -> None:
        self.configure_session = configure_session
        self.model = model
        self.policy = barge_in_policy
        self.tool_debounce_s = tool_debounce_s
        self.clock = clock
        self.guard_window_s = guard_window_s
        self.duck_gain = duck_gain
        #: the pending echo-guard decision (policy ``guard``), None when nothing is being decided
        self.guard: Guard | None = None
        self._guard_counter = 0
        self.session_id: str | None = None
        self.configured = False
        self.configure_sent = False
        self.output_rate = C.FALLBACK_OUTPUT_RATE.get(model, 24000)
        self.effective: dict[str, Any] = {}
        self.responses: dict[str, ResponseState] = {}
        self.order: list[str] = []
        self.current_user_item: str | None = None
        self.user_speaking = False
        self.speech_started_t: float | None = None
        self.speech_stopped_t: float | None = None
        self._speech_start_ms: int | None = None
        #: (audio_start_ms, audio_end_ms) of the last user turn, from the service's clock
        self.last_user_audio_ms: tuple[int, int] | None = None
        self.tool_turn: ToolTurn | None = None
        self._debounce_counter = 0
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _emit(self, name: str, **fields: Any) -> Emit:
        return Emit(Event(name, fields, self.clock()))

    @property
    def in_flight(self) -> ResponseState | None:
        """The response the service is still producing (created, no ``response.done`` yet)."""
        for rid in reversed(self.order):
            r = self.responses[rid]
            if not r.server_done:
                return r
        return None

    def audible(self) -> list[ResponseState]:
        return [self.responses[rid] for rid in self.order if self.responses[rid].audible]

    def state_name(self) -> str:
        """A one-word summary for status: idle, listening, thinking, speaking, tool."""
        if self.audible():
            return "speaking"
        if self.user_speaking:
            return "listening"
        if self.tool_turn and not self.tool_turn.abandoned and not self.tool_turn.create_sent:
            return "tool"
        if self.in_flight is not None:
            return "thinking"
        return "idle"

    def _cuttable(self) -> list[ResponseState]:
        """What a cut applies to: responses audible here or still being produced, not yet flushed, each once."""
        flight = self.in_flight
        found = self.audible() + ([flight] if flight is not None else [])
        return [r for r in {id(r): r for r in found}.values() if not r.flushed]

    def _flush(self, trigger: str, targets: list[ResponseState]) -> list[Effect]:
        """Cut every target: mark flushed (late deltas dropped) and tell the engine once."""
        if not targets:
            return []
        now = self.clock()
        for r in targets:
            r.flushed = True
            r.barge_in = {"trigger": trigger, "t": now, "heard_samples": None, "stop_ms": None}
        self._count(f"barge_in.{trigger}")
        return [Flush(targets[-1].response_id, trigger)]

    def _abandon_tool_turn(self) -> None:
        if self.tool_turn is not None:
            self.tool_turn.abandoned = True

    # ------------------------------------------------------------------ server events
    def on_event(self, ev: S.ServerEvent) -> list[Effect]:
        handler = getattr(self, "_on_" + type(ev).__name__, None)
        if handler is None:
            self._count("events.unknown")
            return []
        return handler(ev)

    def _on_Warning_(self, ev: S.Warning_) -> list[Effect]:
        return [self._emit("service_warning", code=ev.code, message=ev.message)]

    def _on_SessionCreated(self, ev: S.SessionCreated) -> list[Effect]:
        if self.configure_sent:  # a second session.created on one socket: ignore, configure is one-shot
            self._count("events.duplicate_session_created")
            return []
        self.session_id = ev.session_id
        self.configure_sent = True
        return [Send(F.session_configure(self.configure_session), "session.configure")]

    def _on_SessionConfigured(self, ev: S.SessionConfigured) -> list[Effect]:
        if self.configured:
            return []
        self.configured = True
        self.effective = ev.session
        self.output_rate = ev.output_rate or C.FALLBACK_OUTPUT_RATE.get(self.model, 24000)
        return [
            SetOutputRate(self.output_rate),
            SetGate(True),
            self._emit("session_configured", session_id=self.session_id, config=ev.session, output_rate=self.output_rate),
        ]

    def _on_SessionUpdated(self, ev: S.SessionUpdated) -> list[Effect]:
        self.effective = {**self.effective, **ev.session}
        return []

    def _on_SpeechStarted(self, ev: S.SpeechStarted) -> list[Effect]:
        self.user_speaking = True
        self.current_user_item = ev.item_id
        self.speech_started_t = self.clock()
        self._speech_start_ms = ev.audio_start_ms
        out: list[Effect] = []
        busy = self._cuttable()
        out.append(self._emit("speech_started", item_id=ev.item_id, audio_start_ms=ev.audio_start_ms,
                              during_response=bool(busy)))
        if busy and self.policy == "immediate":
            self._abandon_tool_turn()
            out += self._flush("speech_started", busy)
        elif busy and self.policy == "guard" and self.guard is None:
            self._guard_counter += 1
            self.guard = Guard(self._guard_counter, ev.item_id, busy, self.clock())
            out += [Duck(self.duck_gain), ArmGuard(self._guard_counter, self.guard_window_s),
                    self._emit("guard_decision", decision="pending", item_id=ev.item_id,
                               response_id=busy[-1].response_id)]
        return out

    # ------------------------------------------------------------------ echo guard
    def on_guard_evidence(self, speech_ms: float) -> list[Effect]:
        """The mic carried ``speech_ms`` of speech energy since the guard started: a real barge-in."""
        return self._guard_confirm(speech_ms, "speech_energy") if self.guard is not None else []

    def _guard_confirm(self, speech_ms: float | None, why: str) -> list[Effect]:
        g = self.guard
        assert g is not None
        self.guard = None
        self._count("barge_in.confirmed")
        self._abandon_tool_turn()
        targets = [r for r in g.targets if not r.flushed]
        return [Duck(1.0), *self._flush("speech_started", targets),
                self._emit("guard_decision", decision="confirmed", reason=why, item_id=g.item_id,
                           speech_ms=None if speech_ms is None else round(speech_ms, 1),
                           decided_ms=round((self.clock() - g.t) * 1000, 1))]

    def on_guard_timeout(self, token: int) -> list[Effect]:
        return self._guard_false_alarm("timeout") if self.guard is not None and self.guard.token == token else []

    def _guard_false_alarm(self, why: str) -> list[Effect]:
        g = self.guard
        assert g is not None
        self.guard = None
        self._count("barge_in.false")
        out: list[Effect] = [Duck(1.0), self._emit("guard_decision", decision="false_alarm", reason=why,
                                                   item_id=g.item_id, decided_ms=round((self.clock() - g.t) * 1000, 1))]
        # The service may already have cancelled the response (it cannot tell echo from a user):
        # what was received keeps playing, and its books close when it drains.
        return out

    def _on_SpeechStopped(self, ev: S.SpeechStopped) -> list[Effect]:
        self.user_speaking = False
        self.speech_stopped_t = self.clock()
        start = self._speech_start_ms
        if start is not None and ev.audio_end_ms >= start:
            self.last_user_audio_ms = (start, ev.audio_end_ms)
        return [self._emit("speech_stopped", item_id=ev.item_id, audio_end_ms=ev.audio_end_ms)]

    def _on_ItemAdded(self, ev: S.ItemAdded) -> list[Effect]:
        return []

    def _on_ItemDone(self, ev: S.ItemDone) -> list[Effect]:
        item = ev.item
        if item.role != "user" or item.type not in (None, "message"):
            return []
        self.user_speaking = False
        if item.status == C.STATUS_INCOMPLETE:
            self._count("turns.discarded")
            out: list[Effect] = [self._emit("user_turn_done", item_id=item.id, status="discarded")]
            if self.guard is not None and self.guard.item_id == item.id:
                out += self._guard_false_alarm("discarded")
            return out
        self._count("turns.user")
        return [self._emit("user_turn_done", item_id=item.id, status="completed", text=item.text)]

    def _on_ResponseCreated(self, ev: S.ResponseCreated) -> list[Effect]:
        out: list[Effect] = []
        if ev.response_id in self.responses:
            self._count("events.duplicate_response_created")
            return out
        if self.guard is not None:  # the service took the speech for a real turn
            out += self._guard_confirm(None, "response_created")
        # The docs' rule: a new response before the previous one's audio is done cuts the old one;
        # so does one whose audio still plays although the service cancelled it.
        stale = [r for r in self.responses.values() if not r.flushed and (
            r.has_audio and not r.audio_done and not r.server_done or r.audible and r.status == C.STATUS_CANCELLED)]
        out += self._flush("response_created", stale)
        is_narration = self.tool_turn is not None and self.tool_turn.create_sent
        self.responses[ev.response_id] = ResponseState(
            ev.response_id, self.clock(), self.current_user_item, self.speech_stopped_t,
            float(self.last_user_audio_ms[1] - self.last_user_audio_ms[0]) if self.last_user_audio_ms else None)
        self.order.append(ev.response_id)
        if len(self.order) > 64:  # bounded memory over a long session
            for rid in self.order[:-64]:
                self.responses.pop(rid, None)
            self.order = self.order[-64:]
        if is_narration:
            self.tool_turn = None
        out.append(self._emit("response_created", response_id=ev.response_id))
        return out

    def _on_AudioDelta(self, ev: S.AudioDelta) -> list[Effect]:
        r = self.responses.get(ev.response_id)
        if r is None:
            self._count("deltas.unknown_response")
            return []
        if r.flushed or r.server_done and r.status == C.STATUS_CANCELLED:
            r.dropped_deltas += 1
            self._count("deltas.dropped_late")
            return []
        if not ev.pcm:
            return []
        if r.first_delta_t is None:
            r.first_delta_t = self.clock()
        r.received_samples += len(ev.pcm) // 2
        r.playback_drained = False
        self._count("deltas.played")
        return [Play(ev.response_id, ev.pcm)]

    def _on_AudioDone(self, ev: S.AudioDone) -> list[Effect]:
        r = self.responses.get(ev.response_id)
        if r is not None:
            r.audio_done = True
        return []

    def _on_FunctionArgsDelta(self, ev: S.FunctionArgsDelta) -> list[Effect]:
        turn = self._tool_turn_for(ev.response_id)
        call = turn.calls.setdefault(ev.call_id, PendingCall(ev.call_id, ev.response_id))
        call.name = call.name or ev.name
        call.parts.append(ev.delta)
        return []

    def _on_FunctionArgsDone(self, ev: S.FunctionArgsDone) -> list[Effect]:
        turn = self._tool_turn_for(ev.response_id)
        call = turn.calls.setdefault(ev.call_id, PendingCall(ev.call_id, ev.response_id))
        if call.started:
            self._count("tools.duplicate_done")
            return []
        call.name = ev.name or call.name
        if not call.name:
            self._count("tools.nameless")
            return [self._emit("service_error", code="tool_call_without_name", type="client",
                               message=f"tool call {ev.call_id} has no name", param=None)]
        call.started = True
        turn.pending.add(ev.call_id)
        turn.debounce_elapsed = False
        r = self.responses.get(ev.response_id)
        args = call.arguments_text(ev.arguments)
        if r is not None:
            r.tool_calls.append({"call_id": ev.call_id, "name": call.name, "started": self.clock()})
        return [RunTool(ev.call_id, call.name, args)]

    def _tool_turn_for(self, response_id: str) -> ToolTurn:
        """The tool turn a call belongs to: a new one unless the current one is still open for it."""
        t = self.tool_turn
        finished = t is None or t.create_sent
        other_idle_response = t is not None and t.response_id != response_id and not t.pending
        if finished or other_idle_response:
            self.tool_turn = ToolTurn(response_id)
        return self.tool_turn

    def _on_ResponseDone(self, ev: S.ResponseDone) -> list[Effect]:
        r = self.responses.get(ev.response_id)
        if r is None:
            self._count("responses.unknown_done")
            return []
        if r.server_done:
            return []
        r.server_done = True
        r.status, r.reason = ev.status, ev.reason
        out: list[Effect] = []
        if ev.status == C.STATUS_CANCELLED and r.audible and not (self.guard and r in self.guard.targets):
            out += self._flush("response_cancelled", [r])
        if ev.status == C.STATUS_FAILED:
            out.append(self._emit("service_error", code=ev.error_code or "response_failed", type="response",
                                  message=f"response {r.response_id} failed", param=None))
        out += self._maybe_response_create()
        out += self._maybe_report(r)
        return out

    def _on_Error(self, ev: S.Error) -> list[Effect]:
        self._count(f"errors.{ev.code}")
        out: list[Effect] = [self._emit("service_error", code=ev.code, type=ev.error_type, message=ev.message,
                                        param=ev.param, event_id=ev.client_event_id)]
        if ev.code == C.ERR_TOOL_TIMEOUT:
            self._abandon_tool_turn()
        return out

    def _on_TranscriptDelta(self, ev: S.TranscriptDelta) -> list[Effect]:
        return []

    def _on_UnknownEvent(self, ev: S.UnknownEvent) -> list[Effect]:
        self._count("events.unknown")
        return []

    # ------------------------------------------------------------------ local requests
    def request_cancel(self, source: str) -> tuple[list[Effect], dict[str, Any]]:
        """Cancel what the user hears and what the service is producing.

        Sends ``response.cancel`` only when a response is in flight (it is a silent no-op on
        the service otherwise), and flushes local playback either way.
        """
        flight = self.in_flight
        audible = self.audible()
        out: list[Effect] = []
        if flight is not None and not flight.flushed:
            out.append(Send(F.response_cancel(flight.response_id), "response.cancel"))
        targets = self._cuttable()
        self._abandon_tool_turn()
        out += self._flush("cancel", targets)
        named = flight or (audible[-1] if audible else None)
        info = {"in_flight": flight is not None, "audible": bool(audible),
                "response_id": named.response_id if named else None}
        out.append(self._emit("cancel_requested", source=source, response_id=info["response_id"],
                              in_flight=info["in_flight"]))
        return out, info

    def on_tool_result(self, call_id: str, output: str, error: str | None, duration_ms: float) -> list[Effect]:
        turn = self.tool_turn
        out: list[Effect] = [Send(F.function_call_output(call_id, output), "conversation.item.create"),
                             self._emit("tool_result", call_id=call_id, output=output, error=error,
                                        duration_ms=round(duration_ms, 1))]
        if turn is None or call_id not in turn.pending:
            return out
        turn.pending.discard(call_id)
        turn.outputs_posted += 1
        r = self.responses.get(turn.response_id)
        if r is not None:
            for c in r.tool_calls:
                if c["call_id"] == call_id:
                    c["duration_ms"] = round(duration_ms, 1)
                    c["error"] = error
        if not turn.pending:
            self._debounce_counter += 1
            turn.debounce_token = self._debounce_counter
            turn.debounce_elapsed = False
            out.append(ArmDebounce(turn.debounce_token, self.tool_debounce_s))
        return out

    def on_debounce(self, token: int) -> list[Effect]:
        turn = self.tool_turn
        if turn is None or token != turn.debounce_token:
            return []
        turn.debounce_elapsed = True
        return self._maybe_response_create()

    def _maybe_response_create(self) -> list[Effect]:
        turn = self.tool_turn
        if turn is None or turn.create_sent or turn.abandoned or turn.pending or not turn.debounce_elapsed:
            return []
        r = self.responses.get(turn.response_id)
        if r is not None and not r.server_done:
            return []  # the tool response may still emit calls; wait for its response.done
        turn.create_sent = True
        self._count("tools.response_create")
        return [Send(F.response_create(), "response.create")]

    # ------------------------------------------------------------------ engine reports
    def on_played(self, response_id: str, first_audible: float | None, samples: int, rate: int, done: bool) -> list[Effect]:
        r = self.responses.get(response_id)
        if r is None:
            return []
        out: list[Effect] = []
        r.heard_samples = max(r.heard_samples, samples)
        r.device_rate = rate
        if first_audible is not None and r.first_audible_t is None:
            r.first_audible_t = first_audible
            base = r.speech_stopped_t
            latency = round((first_audible - base) * 1000, 1) if base is not None and base < first_audible else None
            out.append(self._emit("response_audio_started", response_id=response_id, first_audible=first_audible,
                                  latency_ms=latency))
        if done:
            r.playback_drained = True
            out += self._maybe_barge_in(r)
            out += self._maybe_report(r)
        return out

    def on_flushed(self, response_id: str | None, dropped_samples: int, t_received: float, t_silent: float) -> list[Effect]:
        """The engine confirmed a flush: record when the cut response went silent."""
        out: list[Effect] = []
        for r in self.responses.values():
            if r.flushed and r.barge_in is not None and r.barge_in.get("stop_ms") is None:
                r.barge_in["stop_ms"] = round((t_silent - r.barge_in["t"]) * 1000, 1)
                r.barge_in["dropped_samples"] = dropped_samples
                if r.first_audible_t is None:  # the engine never played any of it: nothing more will come
                    r.playback_drained = True
                out += self._maybe_barge_in(r)
                out += self._maybe_report(r)
        return out

    def _maybe_barge_in(self, r: ResponseState) -> list[Effect]:
        """``barge_in`` needs both the flush confirmation and the final played count."""
        b = r.barge_in
        if b is None or b.get("stop_ms") is None or b.get("reported") or not r.playback_drained:
            return []
        b["reported"] = True
        return [self._emit(
            "barge_in", response_id=r.response_id, trigger=b["trigger"], heard_samples=r.heard_samples,
            heard_s=round(r.heard_samples / r.device_rate, 3) if r.device_rate else 0.0,
            dropped_samples=b["dropped_samples"], stop_ms=b["stop_ms"],
        )]

    def on_playback_lost(self) -> list[Effect]:
        """The engine died: whatever it had queued is gone; close the books on it."""
        out: list[Effect] = []
        for r in list(self.responses.values()):
            if not r.playback_drained:
                r.playback_drained = True
                out += self._maybe_barge_in(r)
                out += self._maybe_report(r)
        return out

    def on_disconnected(self, reason: str, code: int | None) -> list[Effect]:
        """The socket is gone: a reconnect is a new session; flush anything still queued."""
        out: list[Effect] = [SetGate(False)]
        targets = [r for r in self.audible() if not r.flushed]
        out += self._flush("disconnect", targets)
        for r in self.responses.values():
            if not r.server_done:
                r.server_done, r.status, r.reason = True, "incomplete", "disconnected"
        out.append(self._emit("session_disconnected", session_id=self.session_id, reason=reason, code=code))
        return out

    # ------------------------------------------------------------------ turn report
    def _maybe_report(self, r: ResponseState) -> list[Effect]:
        if r.reported or not r.server_done:
            return []
        if r.has_audio and not r.playback_drained:
            return []
        if r.barge_in is not None and r.has_audio and not r.barge_in.get("reported"):
            return []
        r.reported = True
        return [self._emit("response_done", response_id=r.response_id, status=r.status, reason=r.reason,
                           metrics=self.turn_metrics(r))]

    def turn_metrics(self, r: ResponseState) -> dict[str, Any]:
        def ms(a: float | None, b: float | None) -> float | None:
            return round((b - a) * 1000, 1) if a is not None and b is not None else None

        rate = self.output_rate or 24000
        return {
            "user_item_id": r.user_item_id,
            "user_speech_ms": r.user_speech_ms,
            "end_of_speech_to_first_delta_ms": ms(r.speech_stopped_t, r.first_delta_t),
            "end_of_speech_to_first_audible_ms": ms(r.speech_stopped_t, r.first_audible_t),
            "response_audio_s": round(r.received_samples / rate, 3),
            "heard_samples": r.heard_samples,
            "heard_s": round(r.heard_samples / r.device_rate, 3) if r.device_rate else 0.0,
            "status": r.status,
            "reason": r.reason,
            "barge_in_trigger": r.barge_in["trigger"] if r.barge_in else None,
            "barge_in_stop_ms": r.barge_in.get("stop_ms") if r.barge_in else None,
            "cut_by_barge_in": r.barge_in is not None,
            "late_deltas_dropped": r.dropped_deltas,
            "tool_calls": [{k: v for k, v in c.items() if k != "started"} for c in r.tool_calls],
        }
