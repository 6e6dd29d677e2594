"""One simulated Hydra session: the per-connection state machine (reference §2-§6, §8).

Concurrency design. Every server frame goes through :meth:`SimSession._emit`, which encodes
it and puts it on an unbounded queue *synchronously*; a single writer task sends the queue in
order. Client frames are handled synchronously too (:meth:`_handle`). So every state change
("a response is in flight", "response.done was sent", "this response is cancelled") happens
in one step with no checkpoint in between, and event order on the wire is exactly emit order.
Two consequences the tests rely on:

* a response counts as *in flight* until its ``response.done`` is emitted; barge-in and
  ``response.cancel`` compare against that, never against what the socket has flushed;
* once a response is cancelled nothing more of it is emitted (runners re-check
  ``resp.finished`` after every await), and no frame is ever cut half-way, because the
  writer is the only task touching the socket and it is never cancelled mid-frame except at
  teardown.

Response runners, tool-timeout timers and the idle watchdog are child tasks of the session
nursery; the session ends (and every child is cancelled) when the writer has closed the
socket or the reader sees the peer close.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio
import trio_websocket

from hydrad.protocol import constants as C
from hydrad.protocol.audio import decode_pcm
from hydrad.protocol.errors import MalformedFrame
from hydrad.protocol.server_events import (
    AudioDelta, AudioDone, Error, FunctionArgsDelta, FunctionArgsDone, Item, ItemAdded, ItemDone,
    ResponseCreated, ResponseDone, ServerEvent, SessionConfigured, SessionCreated, SessionUpdated,
    SpeechStarted, SpeechStopped, TranscriptDelta, Warning_, load_json_object,
)

from .config import DEFAULT_INSTRUCTIONS, SimConfig, TurnAction
from .record import ResponseRecord, SimSessionRecord
from .vad import SpeechStartedEv, SpeechStoppedEv, TurnCompleted, TurnDetector, TurnDiscarded
from .voice import render, response_f0

log = logging.getLogger("hydrad.sim")

INVALID_REQUEST = C.ERR_INVALID_REQUEST  # used both as error.type and error.code (§4.4)
CLOSE_ABRUPT = 1006  # what the record shows for a TCP drop without a close frame
CLOSE_TIMEOUT_S = 2.0  # how long to wait for the client's close reply
MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 8000, 48000
SESSION_KEY_TYPES: dict[str, type | tuple[type, ...]] = {
    "instructions": str, "voice": str, "tools": list, "generate_initial_response": bool,
}
TOO_FAST_MESSAGE = "session ended: audio sent faster than real time"


def _hex_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


@dataclass
class _Close:
    """Writer command: close with a code, or drop the TCP connection (``"abrupt"``)."""

    code: int | str
    reason: str | None = None


@dataclass
class _Response:
    n: int
    id: str
    turn: int | None
    action: TurnAction
    record: ResponseRecord
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    created_sent: bool = False
    finished: bool = False
    items: list[Item] = field(default_factory=list)
    audio_item: Item | None = None
    audio_done: bool = False


@dataclass
class _PendingTools:
    """Response A's calls, waiting for outputs + ``response.create`` (§4.6 steps 6-7)."""

    turn: int | None
    action: TurnAction
    call_ids: tuple[str, ...]
    outputs: dict[str, str] = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class SimSession:
    """Drives one accepted WebSocket until either side closes it."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        config: SimConfig,
        record: SimSessionRecord,
        action_for: Callable[[int], TurnAction | None],
    ) -> None:
        self._ws = ws
        self._cfg = config
        self.record = record
        self._action_for = action_for
        self._tag = record.model
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[str, dict[str, Any]] | _Close](math.inf)
        self._nursery: trio.Nursery | None = None
        self._ending = False
        self._last_activity = trio.current_time()
        # session state
        self._configured = False
        self._output_rate = config.output_rate(self._tag)
        self._instructions = DEFAULT_INSTRUCTIONS
        self._tools: list[Any] = []
        self._vad: TurnDetector | None = None
        self._first_append_t: float | None = None
        self._appended_s = 0.0
        # conversation state
        self._last_item_id: str | None = None
        self._prev_item: dict[str, str | None] = {}  # item id -> previous_item_id when it was added
        self._user_speech_ms = 0
        self._turns = 0
        self._responses = 0
        self._inflight: _Response | None = None
        self._pending_tools: _PendingTools | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, full: bool) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if full:
                    self._emit(Error(code=C.ERR_SERVER_FULL, error_type="server_error",
                                     message="server at capacity, retry later"))
                    self._close(C.CLOSE_TRY_AGAIN_LATER, "server full")
                    return
                if self._tag in self._cfg.deprecated_tags:
                    self._emit(Warning_(code=C.WARN_MODEL_DEPRECATED,
                                        message=f"model '{self._tag}' is deprecated; use 'hydra-v1.0'"))
                self._emit(SessionCreated(session_id=self.record.session_id))
                nursery.start_soon(self._reader)
                nursery.start_soon(self._idle_watchdog)
        finally:
            self.record.live = False
            if self.record.closed is None and self._ws.closed is not None:
                self.record.closed = self._ws.closed.code

    def inject_raw(self, text: str) -> None:
        """Send ``text`` verbatim (tests of the client's malformed-frame handling)."""
        self._emit_raw(text)

    def disconnect(self, code: int | str = C.CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close from the server side: a close code, or ``"abrupt"`` for a TCP drop."""
        self._close(code, reason)

    def _close(self, code: int | str, reason: str | None = None) -> None:
        if self._ending:
            return
        self._ending = True
        self._out_send.send_nowait(_Close(code, reason))

    def _stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        async for item in self._out_recv:
            if isinstance(item, _Close):
                await self._do_close(item)
                self._stop()
                return
            text, summary = item
            try:
                await self._ws.send_message(text)
            except trio_websocket.ConnectionClosed as exc:
                self._peer_closed(exc)
                return
            self.record.log_sent(summary)
            self._last_activity = trio.current_time()

    async def _do_close(self, cmd: _Close) -> None:
        if cmd.code == "abrupt":
            self.record.closed = CLOSE_ABRUPT
            # trio-websocket has no public "drop the transport"; closing its stream sends a FIN
            # with no close frame, which the client sees as 1006.
            await self._ws._stream.aclose()  # noqa: SLF001
            return
        assert isinstance(cmd.code, int)
        self.record.closed = cmd.code
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self._ws.aclose(cmd.code, cmd.reason)

    def _peer_closed(self, exc: trio_websocket.ConnectionClosed) -> None:
        if self.record.closed is None:
            self.record.closed = exc.reason.code if exc.reason is not None else CLOSE_ABRUPT
        self._stop()

    async def _reader(self) -> None:
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self._peer_closed(exc)
                return
            self._last_activity = trio.current_time()
            if not self._ending:
                self._handle(message)

    async def _idle_watchdog(self) -> None:
        while True:
            deadline = self._last_activity + self._cfg.idle_timeout_s
            if trio.current_time() >= deadline:
                log.info("session %s idle for %.1f s: closing", self.record.session_id, self._cfg.idle_timeout_s)
                self._close(C.CLOSE_NORMAL, "idle timeout")
                return
            await trio.sleep_until(deadline)

    # ------------------------------------------------------------------ output

    def _emit(self, event: ServerEvent) -> None:
        if self._ending:
            return
        text = event.encode()
        if isinstance(event, AudioDelta):
            summary: dict[str, Any] = {
                "type": event.TYPE, "event_id": event.event_id, "response_id": event.response_id,
                "item_id": event.item_id, "bytes": len(event.pcm),
            }
        else:
            summary = json.loads(text)
        self._out_send.send_nowait((text, summary))

    def _emit_raw(self, text: str) -> None:
        if self._ending:
            return
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        summary = {"type": obj.get("type") if isinstance(obj, dict) else None, "raw": text[:500]}
        self._out_send.send_nowait((text, summary))

    def _error(self, code: str, message: str, *, param: str | None = None,
               event_id: str | None = None, error_type: str = INVALID_REQUEST) -> None:
        self._emit(Error(code=code, error_type=error_type, message=message, param=param, client_event_id=event_id))

    # ------------------------------------------------------------------ input

    def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.record.log_received({"type": None, "binary": len(message)})
            self._error(C.ERR_INVALID_FRAME, "binary frames are not supported; send JSON text frames")
            return
        try:
            obj = load_json_object(message)
        except MalformedFrame as exc:
            self._on_malformed(message, exc)
            return
        type_ = obj["type"]
        event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
        if type_ == "input_audio_buffer.append":
            self._on_append(obj, event_id)
            return
        self.record.log_received(obj)
        if type_ == "session.configure":
            self._on_configure(obj, event_id)
        elif type_ in ("session.update", "conversation.item.create", "response.create", "response.cancel"):
            if not self._configured:
                self._error(INVALID_REQUEST, f"{type_} before session.configure", event_id=event_id)
            elif type_ == "session.update":
                self._on_update(obj, event_id)
            elif type_ == "conversation.item.create":
                self._on_item_create(obj, event_id)
            elif type_ == "response.create":
                self._on_response_create(event_id)
            else:
                self._on_cancel(obj)
        elif self._cfg.unknown_type == "invalid_frame":
            self._error(C.ERR_INVALID_FRAME, f"unknown event type {type_!r}", param="type", event_id=event_id)

    def _on_malformed(self, message: str, exc: MalformedFrame) -> None:
        if exc.kind == "missing_field":  # a JSON object without a string type (probed: invalid_request_error)
            obj = json.loads(message)
            self.record.log_received(obj)
            event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
            self._error(INVALID_REQUEST, "missing required field 'type'", param="type", event_id=event_id)
        else:
            self.record.log_received({"type": None, "raw": message[:500]})
            self._error(C.ERR_INVALID_FRAME, exc.reason)

    def _on_configure(self, obj: dict[str, Any], event_id: str | None) -> None:
        if self._configured:
            return  # §2.3: later configures are ignored, no error
        session = obj.get("session")
        if not isinstance(session, dict):
            self._error(INVALID_REQUEST, "session.configure needs a 'session' object", param="session", event_id=event_id)
            return
        for key, typ in SESSION_KEY_TYPES.items():
            value = session.get(key)
            if value is not None and (not isinstance(value, typ) or (typ is not bool and isinstance(value, bool))):
                self._error(INVALID_REQUEST, f"session.{key} has the wrong type ({type(value).__name__})",
                            param=f"session.configure.session.{key}", event_id=event_id)
                return
        voice = session.get("voice")
        roster = C.VOICE_ROSTERS.get(self._tag, C.VOICES_V11 + C.VOICES_V10)
        if voice is None:
            voice = self._cfg.default_voice
        elif voice not in roster and voice != self._cfg.default_voice:
            if self._cfg.voice_validation == "error":
                # §9.6 choice: the configure is not applied; the client may send a corrected one.
                self._error(INVALID_REQUEST, f"unknown voice {voice!r} for model {self._tag}",
                            param="session.configure.session.voice", event_id=event_id)
                return
            voice = self._cfg.default_voice
        tools = session.get("tools") or []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                self._error(INVALID_REQUEST, f"tools[{i}] needs a string 'name'",
                            param=f"session.configure.session.tools[{i}]", event_id=event_id)
                return
        rate = self._cfg.output_rate(self._tag)
        requested = session.get("output_audio_sample_rate")
        if (self._cfg.honour_output_rate and isinstance(requested, int) and not isinstance(requested, bool)
                and MIN_OUTPUT_RATE <= requested <= MAX_OUTPUT_RATE):
            rate = requested
        self._output_rate = rate
        self._instructions = session.get("instructions") or DEFAULT_INSTRUCTIONS
        self._tools = list(tools)
        initial = bool(session.get("generate_initial_response"))
        effective = {
            "instructions": self._instructions,
            "voice": voice,
            "tools": self._tools,
            "generate_initial_response": initial,
            "input_audio_format": "pcm16",
            "input_audio_sample_rate": C.INPUT_RATE,
            "output_audio_format": "pcm16",
            "output_audio_sample_rate": rate,
        }
        self._configured = True
        self.record.configured = effective
        self._vad = TurnDetector(
            lambda: _hex_id("item"), mode=self._cfg.vad_mode, start_ms=self._cfg.vad_start_ms,
            end_silence_ms=self._cfg.vad_end_silence_ms, min_speech_ms=self._cfg.vad_min_speech_ms,
            silence_floor_dbfs=self._cfg.vad_silence_floor_dbfs,
        )
        self._emit(SessionConfigured(session=effective))
        if initial:
            self._start_response(turn=0, action=self._action_for(0) or TurnAction())

    def _on_update(self, obj: dict[str, Any], event_id: str | None) -> None:
        session = obj.get("session")
        if not isinstance(session, dict):
            self._error(C.ERR_INVALID_FRAME, "session.update needs a 'session' object", param="session", event_id=event_id)
            return
        unknown = sorted(k for k in session if k != "tools")
        if unknown:
            self._error(C.ERR_INVALID_FRAME, f"session.update may only change 'tools', not {unknown[0]!r}",
                        param=f"session.update.session.{unknown[0]}", event_id=event_id)
            return
        if "tools" not in session:
            return  # nothing to apply: no reply
        tools = session["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            self._error(C.ERR_INVALID_FRAME, "session.tools must be a list of tools with a string 'name'",
                        param="session.update.session.tools", event_id=event_id)
            return
        if tools == self._tools:
            return  # no-op: no session.updated
        self._tools = list(tools)  # replace, as the reference client assumes (§2.6)
        if self.record.configured is not None:
            self.record.configured["tools"] = self._tools
        self._emit(SessionUpdated(session={"tools": self._tools}))

    def _on_append(self, obj: dict[str, Any], event_id: str | None) -> None:
        audio = obj.get("audio")
        try:
            pcm = decode_pcm(audio, "audio")
        except MalformedFrame as exc:
            pcm, problem = None, exc.reason
        else:
            problem = None
        self.record.log_received({"type": obj["type"], "bytes": None if pcm is None else len(pcm), "event_id": event_id})
        if not self._configured:
            return  # §3.1: dropped silently, not validated, not queued
        if pcm is None:
            self._error(C.ERR_INVALID_AUDIO, problem or "invalid audio", param="audio", event_id=event_id)
            return
        if len(pcm) < self._cfg.min_append_bytes:
            self._error(C.ERR_INVALID_AUDIO, f"audio frame too small ({len(pcm)} bytes, need {self._cfg.min_append_bytes})",
                        param="audio", event_id=event_id)
            return
        if self._too_fast(len(pcm)):
            self._error(INVALID_REQUEST, TOO_FAST_MESSAGE, event_id=event_id)
            self._close(C.CLOSE_NORMAL, "audio sent faster than real time")
            return
        if self._cfg.keep_audio:
            self.record.audio.append((time.monotonic(), pcm))
        assert self._vad is not None
        events = self._vad.feed(pcm)
        for i, ev in enumerate(events):
            if isinstance(ev, SpeechStartedEv):
                self._on_speech_started(ev)
            elif isinstance(ev, SpeechStoppedEv):
                discard = i + 1 < len(events) and isinstance(events[i + 1], TurnDiscarded)
                if not discard or self._cfg.discard_speech_stopped:
                    self._emit(SpeechStopped(audio_end_ms=ev.audio_end_ms, item_id=ev.item_id))
            elif isinstance(ev, TurnCompleted):
                self._on_turn_done(ev.item_id, ev.speech_ms, completed=True)
            elif isinstance(ev, TurnDiscarded):
                self._on_turn_done(ev.item_id, ev.speech_ms, completed=False)

    def _too_fast(self, nbytes: int) -> bool:
        """§9.21: audio more than ``input_burst_s`` ahead of wall-clock since the first append."""
        limit = self._cfg.max_input_speed
        now = trio.current_time()
        if self._first_append_t is None:
            self._first_append_t = now
        self._appended_s += nbytes / (C.INPUT_RATE * C.SAMPLE_WIDTH)
        if limit is None:
            return False
        return self._appended_s - (now - self._first_append_t) * limit > self._cfg.input_burst_s

    def _on_speech_started(self, ev: SpeechStartedEv) -> None:
        self._emit(SpeechStarted(audio_start_ms=ev.audio_start_ms, item_id=ev.item_id))
        # §5.2 / §9.11 choice: speech_started, then the cancelled response.done, then the new user item.
        self._cancel_inflight(C.REASON_INTERRUPTED)
        prev = self._last_item_id
        self._prev_item[ev.item_id] = prev
        self._last_item_id = ev.item_id
        self._emit(ItemAdded(item=Item(id=ev.item_id, type="message", role="user", status="in_progress"),
                             previous_item_id=prev))

    def _on_turn_done(self, item_id: str, speech_ms: int, *, completed: bool) -> None:
        status = "completed" if completed else C.STATUS_INCOMPLETE
        self._emit(ItemDone(item=Item(id=item_id, type="message", role="user", status=status),
                            previous_item_id=self._prev_item.get(item_id)))
        if not completed:
            return
        self._user_speech_ms += speech_ms
        self._turns += 1
        if self._pending_tools is not None:  # a new user turn abandons an unanswered tool call
            self._pending_tools.scope.cancel()
            self._pending_tools = None
        self._start_response(turn=self._turns, action=self._action_for(self._turns) or TurnAction())

    def _on_item_create(self, obj: dict[str, Any], event_id: str | None) -> None:
        item = obj.get("item")
        if not isinstance(item, dict):
            self._error(INVALID_REQUEST, "conversation.item.create needs an 'item' object", param="item", event_id=event_id)
            return
        if item.get("type") != "function_call_output":
            return  # other items (e.g. messages) are accepted and have no effect here
        for key in ("call_id", "output"):
            if not isinstance(item.get(key), str):
                self._error(INVALID_REQUEST, f"function_call_output needs a string {key!r}",
                            param=f"item.{key}", event_id=event_id)
                return
        self.record.tool_outputs.append(item)
        pending = self._pending_tools
        if pending is not None and item["call_id"] in pending.call_ids:
            pending.outputs[item["call_id"]] = item["output"]

    def _on_response_create(self, event_id: str | None) -> None:
        if self._inflight is not None:
            self._error(INVALID_REQUEST, f"response {self._inflight.id} is already in progress", event_id=event_id)
            return
        pending = self._pending_tools
        if pending is not None:
            # Response B narrates, whether or not every output arrived (§4.6: an early
            # response.create makes the model narrate before all results are in).
            pending.scope.cancel()
            self._pending_tools = None
            narration = TurnAction(reply_s=pending.action.reply_s, transcript=pending.action.transcript)
            self._start_response(turn=pending.turn, action=narration)
        else:
            self._start_response(turn=None, action=TurnAction())

    def _on_cancel(self, obj: dict[str, Any]) -> None:
        resp = self._inflight
        target = obj.get("response_id")
        if resp is None or (target is not None and target != resp.id):
            return  # §5.3: nothing in flight (or a stale id, §9.15 choice): silent no-op
        self._cancel_inflight(C.REASON_CLIENT_CANCELLED)

    # ------------------------------------------------------------------ responses

    def _start_response(self, *, turn: int | None, action: TurnAction) -> None:
        if self._inflight is not None:
            self._cancel_inflight(C.REASON_INTERRUPTED)
        self._responses += 1
        n = self._responses
        kind = "tool_calls" if action.tool_calls else "audio"
        rec = ResponseRecord(n=n, id=_hex_id("resp"), turn=turn, kind=kind,
                             f0=response_f0(n) if kind == "audio" else None)
        self.record.responses.append(rec)
        resp = _Response(n=n, id=rec.id, turn=turn, action=action, record=rec)
        self._inflight = resp
        if self._cfg.response_delay_ms <= 0:
            self._emit_created(resp)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_response, resp)

    def _emit_created(self, resp: _Response) -> None:
        resp.created_sent = True
        self._emit(ResponseCreated(response_id=resp.id))
        for raw in resp.action.raw_frames:
            self._emit_raw(raw)

    def _finish(self, resp: _Response, status: str, reason: str | None = None) -> None:
        resp.finished = True
        resp.record.status, resp.record.reason = status, reason
        if self._inflight is resp:
            self._inflight = None

    def _cancel_inflight(self, reason: str) -> None:
        resp = self._inflight
        if resp is None:
            return
        resp.scope.cancel()
        self._finish(resp, C.STATUS_CANCELLED, reason)
        if not resp.created_sent:
            return  # still in the response delay: nothing visible to cancel
        if self._cfg.barge_in_extra_events and resp.audio_item is not None and not resp.audio_done:
            self._emit(AudioDone(response_id=resp.id, item_id=resp.audio_item.id))
            self._emit(ItemDone(item=replace(resp.audio_item, status=C.STATUS_INCOMPLETE),
                                previous_item_id=self._prev_of(resp.audio_item)))
        self._emit(ResponseDone(response_id=resp.id, status=C.STATUS_CANCELLED, reason=reason,
                                output=self._output_items(resp)))

    def _output_items(self, resp: _Response) -> tuple[Item, ...]:
        return tuple(i if i.status == "completed" else replace(i, status=C.STATUS_INCOMPLETE) for i in resp.items)

    def _prev_of(self, item: Item) -> str | None:
        return self._prev_item.get(item.id or "")

    def _add_item(self, resp: _Response, item: Item) -> Item:
        prev = self._last_item_id
        self._last_item_id = item.id
        self._prev_item[item.id or ""] = prev
        resp.items.append(item)
        self._emit(ItemAdded(item=item, previous_item_id=prev))
        return item

    def _complete_item(self, resp: _Response, item: Item, **changes: Any) -> None:
        done = replace(item, status="completed", **changes)
        resp.items[resp.items.index(item)] = done
        self._emit(ItemDone(item=done, previous_item_id=self._prev_of(item)))

    def _usage(self, output_ms: float) -> dict[str, int]:
        """Plausible token counts (the real service reports them "when available")."""
        input_tokens = len(self._instructions) // 4 + self._user_speech_ms // 40
        output_tokens = int(output_ms // 40)
        return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}

    async def _run_response(self, resp: _Response) -> None:
        with resp.scope:
            if resp.finished:  # cancelled before this task first ran (e.g. one big append held
                return         # the end of a turn and the start of the next)
            if not resp.created_sent:
                await trio.sleep(self._cfg.response_delay_ms / 1000)
                if resp.finished:
                    return
                self._emit_created(resp)
            action = resp.action
            deadline = None
            if action.error is not None or action.close is not None:
                deadline = trio.current_time() + action.after_ms / 1000
            if action.tool_calls:
                await self._stream_tool_calls(resp, deadline)
            else:
                await self._stream_audio(resp, deadline)

    async def _pace(self, t0: float, index: int) -> None:
        interval = self._cfg.delta_interval_s()
        if interval > 0:
            await trio.sleep_until(t0 + index * interval)
        else:
            await trio.lowlevel.checkpoint()

    def _scripted_stop(self, resp: _Response) -> None:
        """The turn's ``error``/``close`` fires: the response never completes."""
        action = resp.action
        if action.error is not None:
            self._finish(resp, C.STATUS_FAILED)
            self._emit(ResponseDone(response_id=resp.id, status=C.STATUS_FAILED, error_code=action.error,
                                    output=self._output_items(resp)))
        else:
            self._finish(resp, "closed")
        if action.close is not None:
            self._close(action.close, "scripted close")

    async def _stream_audio(self, resp: _Response, deadline: float | None) -> None:
        seconds = resp.action.reply_s if resp.action.reply_s is not None else self._cfg.reply_s
        rate = self._output_rate
        total = max(0, int(round(seconds * rate)))
        step = max(1, rate * self._cfg.delta_ms // 1000)  # samples per delta
        nchunks = -(-total // step)
        item = Item(id=_hex_id("item"), type="message", role="assistant", status="in_progress")
        resp.audio_item = self._add_item(resp, item)
        text = resp.action.transcript or f"This is simulated reply number {resp.n}."
        phrases = _phrases(text) if self._cfg.transcripts else []
        phrase_at = {round(j * nchunks / len(phrases)): p for j, p in enumerate(phrases)} if phrases else {}
        t0 = trio.current_time()
        for i in range(nchunks):
            if i:
                await self._pace(t0, i)
            if resp.finished:
                return
            if deadline is not None and trio.current_time() >= deadline:
                self._scripted_stop(resp)
                return
            chunk = render(resp.n, rate, total, i * step, step, self._cfg.voice_jitter)
            self._emit(AudioDelta(response_id=resp.id, item_id=item.id, pcm=chunk))
            resp.record.audio_bytes += len(chunk)
            if i in phrase_at:
                self._emit(TranscriptDelta(response_id=resp.id, delta=phrase_at[i]))
        if deadline is not None:
            if not nchunks:
                await trio.sleep_until(deadline)
                if resp.finished:
                    return
            self._scripted_stop(resp)
            return
        resp.audio_done = True
        self._emit(AudioDone(response_id=resp.id, item_id=item.id))
        self._complete_item(resp, item, text=text if self._cfg.transcripts else None)
        self._finish(resp, C.STATUS_COMPLETED)
        self._emit(ResponseDone(response_id=resp.id, status=C.STATUS_COMPLETED, output=self._output_items(resp),
                                usage=self._usage(seconds * 1000)))

    async def _stream_tool_calls(self, resp: _Response, deadline: float | None) -> None:
        """Response A of §4.6: argument deltas per call, then ``response.done``; no audio."""
        t0 = trio.current_time()
        index = 0
        call_ids: list[str] = []
        for spec in resp.action.tool_calls:
            call_id = spec.call_id or _hex_id("call")
            call_ids.append(call_id)
            arguments = spec.arguments_json()
            item = self._add_item(resp, Item(id=_hex_id("item"), type="function_call", status="in_progress",
                                             call_id=call_id, name=spec.name))
            for j, part in enumerate(_split(arguments, resp.action.split)):
                if index:
                    await self._pace(t0, index)
                index += 1
                if resp.finished:
                    return
                if deadline is not None and trio.current_time() >= deadline:
                    self._scripted_stop(resp)
                    return
                self._emit(FunctionArgsDelta(response_id=resp.id, call_id=call_id, delta=part,
                                             name=spec.name if j == 0 else None))
            self._emit(FunctionArgsDone(response_id=resp.id, call_id=call_id, name=spec.name, arguments=arguments))
            self._complete_item(resp, item, arguments=arguments)
        if deadline is not None:
            self._scripted_stop(resp)
            return
        self._finish(resp, C.STATUS_COMPLETED)
        self._emit(ResponseDone(response_id=resp.id, status=C.STATUS_COMPLETED, output=self._output_items(resp),
                                usage=self._usage(0)))
        pending = _PendingTools(turn=resp.turn, action=resp.action, call_ids=tuple(call_ids))
        self._pending_tools = pending
        assert self._nursery is not None
        self._nursery.start_soon(self._tool_timeout, pending)

    async def _tool_timeout(self, pending: _PendingTools) -> None:
        with pending.scope:
            await trio.sleep(self._cfg.tool_timeout_s)
            if self._pending_tools is pending:
                self._pending_tools = None
                missing = [c for c in pending.call_ids if c not in pending.outputs]
                what = f"no output for {missing}" if missing else "no response.create"
                self._error(C.ERR_TOOL_TIMEOUT,
                            f"tool response timeout after {self._cfg.tool_timeout_s:g} s ({what}); turn abandoned")


def _split(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` nearly equal pieces, cut wherever they fall (mid-token on purpose)."""
    parts = max(1, min(parts, len(text))) if text else 1
    bounds = [round(i * len(text) / parts) for i in range(parts + 1)]
    return [text[bounds[i]:bounds[i + 1]] for i in range(parts)]


def _phrases(text: str, words_per_phrase: int = 3) -> list[str]:
    """Phrase-level transcript deltas, as observed on the wire (§4.2 note)."""
    words = text.split()
    return [" ".join(words[i:i + words_per_phrase]) for i in range(0, len(words), words_per_phrase)]
