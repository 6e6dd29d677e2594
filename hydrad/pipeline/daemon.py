"""The daemon: one supervisor nursery owning the engine, the session loop and playback.

It carries out the effects the :class:`~hydrad.session.conversation.Conversation` asks for,
implements the reconnect policy, and is the ``Controller`` that the control socket and the
plugin contexts drive (``cancel``, ``status``, ``mute``, ``unmute``, ``ping``).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import structlog
import trio
import trio_websocket

from ..config import Config, Secret
from ..engine.client import EngineClient, EngineHandlers, EngineSpec
from ..events import Event, EventBus
from ..protocol import constants as C
from ..protocol import server_events as S
from ..protocol.errors import MalformedFrame
from ..session.conversation import (
    ArmDebounce, ArmGuard, Conversation, Duck, Effect, Emit, Flush, Play, RunTool, Send, SetGate, SetOutputRate,
)
from .guard import EnergyMeter
from ..session.tools import StaticTools, ToolError, ToolProvider, error_result, parse_arguments, validate_arguments
from .backoff import Backoff
from .connection import SessionEnd, classify, open_session_socket, redact_url, session_url
from .framequeue import DropOldestQueue
from .supervisor import supervise
from .uplink import run_uplink

log = structlog.get_logger("hydrad")


def engine_spec(cfg: Config) -> EngineSpec:
    a = cfg.audio
    if a.backend == "wav":
        options: dict[str, Any] = {
            "mic": [{"path": m.path, "at": m.at} for m in a.wav.mic],
            "speaker": a.wav.speaker, "speaker_rate": a.wav.speaker_rate,
        }
    elif a.backend == "sounddevice":
        sd = a.sounddevice
        options = {"input_device": sd.input_device, "output_device": sd.output_device, "input_rate": sd.input_rate,
                   "output_rate": sd.output_rate, "input_channels": sd.input_channels, "latency": sd.latency,
                   "aec": "webrtc" if a.aec == "auto" else a.aec, "aec_gate_db": a.aec_gate_db,
                   "aec_noise_suppression": a.aec_noise_suppression, "aec_high_pass_filter": a.aec_high_pass_filter,
                   "aec_leak_check": a.aec_leak_check}
    else:
        options = {}
    options.update({"output_volume": a.output_volume, "mic_gain": a.mic_gain})
    return EngineSpec(a.backend, options, a.frame_ms, a.block_ms, a.fade_ms,
                      cfg.pipeline.engine_ping_s, cfg.pipeline.engine_hang_s)


def configure_payload(cfg: Config, tools: list[dict[str, Any]]) -> dict[str, Any]:
    s = cfg.session
    payload: dict[str, Any] = {"instructions": s.instructions, "tools": tools,
                               "generate_initial_response": s.generate_initial_response}
    if s.voice:
        payload["voice"] = s.voice
    if s.request_output_rate:
        payload["output_audio_sample_rate"] = s.request_output_rate
    return payload


class Daemon(EngineHandlers):
    def __init__(
        self, cfg: Config, api_key: Secret | None = None, *, tools: ToolProvider | None = None,
        bus: EventBus | None = None, engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.tools: ToolProvider = tools or StaticTools()
        self.bus = bus or EventBus()
        spec = engine_spec(cfg)
        if engine_options:
            spec = EngineSpec(**{**spec.__dict__, "options": {**spec.options, **engine_options}})
        self.engine = EngineClient(spec, self)
        self.counters: collections.Counter[str] = collections.Counter()
        self.conversation: Conversation | None = None
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.muted = False
        self.gate_open = False
        self.mic_t0: float | None = None
        self.state = "starting"
        self.last_error: dict[str, Any] | None = None
        self.last_end: SessionEnd | None = None
        self.started_at = time.monotonic()
        self.sessions = 0
        self.configured_event = trio.Event()
        self._uplink_q: DropOldestQueue[tuple[float | None, bytes]] = DropOldestQueue(cfg.pipeline.uplink_queue_frames)
        self._play_send, self._play_recv = trio.open_memory_channel[tuple[str, bytes]](cfg.pipeline.playback_queue)
        self._session_nursery: trio.Nursery | None = None
        self._session_scope: trio.CancelScope | None = None
        self._stop = trio.Event()
        #: set once the graceful shutdown finished (mic stopped, response cancelled, socket closed)
        self.stopped = trio.Event()
        self._flush_acked = 0
        self._flush_ack_lot = trio.lowlevel.ParkingLot()
        self._last_flush_seq = 0
        self._reconfigure = trio.Event()
        self.uplink_latency_ms: collections.deque[float] = collections.deque(maxlen=500)
        self._meter = EnergyMeter(cfg.barge_in.guard_threshold_dbfs)
        #: the engine's echo-canceller stats from its latest STATS (None: off, system, or not yet)
        self.aec_stats: dict[str, Any] | None = None
        #: the debug recorder's taps (hydrad.observe.recorder.Recorder), when recording is on
        self.recorder: Any = None

    # ================================================================ lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.engine.run)
            nursery.start_soon(supervise, "playback", self._playback_task)
            nursery.start_soon(supervise, "session", self._session_loop)
            task_status.started(self)
            await self._stop.wait()
            await self._graceful_shutdown()
            nursery.cancel_scope.cancel()

    def request_stop(self) -> None:
        self._stop.set()

    async def _graceful_shutdown(self) -> None:
        """Stop the mic, cancel the response, flush, close with 1000, stop the engine."""
        log.info("shutdown_started")
        self.state = "stopping"
        with trio.move_on_after(3) as scope:
            scope.shield = True
            self._set_gate(False)
            conv = self.conversation
            if conv is not None:
                effects, _ = conv.request_cancel("shutdown")
                await self._apply(conv, effects)
            if self.ws is not None and not self.ws.closed:
                with trio.move_on_after(1.5):
                    await self.ws.aclose(code=C.CLOSE_NORMAL, reason="hydrad shutting down")
            await self.engine.stop()
        self.stopped.set()
        log.info("shutdown_done")

    # ================================================================ sessions
    async def _session_loop(self) -> None:
        rc = self.cfg.reconnect
        backoff = Backoff(rc.initial_s, rc.max_s)
        internal_retried = False
        while True:
            b = self.cfg.barge_in
            conv = Conversation(configure_payload(self.cfg, self.tools.schemas()), self.cfg.hydra.model,
                                b.policy, self.cfg.session.tool_debounce_ms / 1000,
                                guard_window_s=b.guard_window_ms / 1000, duck_gain=b.duck_gain)
            t0 = time.monotonic()
            end = await self._one_session(conv)
            self.last_end = end
            await self._apply(conv, conv.on_disconnected(end.detail, end.code))
            if end.kind == "shutdown":
                await trio.sleep_forever()
            healthy = conv.configured and time.monotonic() - t0 >= rc.healthy_after_s
            log.warning("session_ended", kind=end.kind, code=end.code, detail=end.detail, session_id=conv.session_id,
                        healthy=healthy)
            self.counters[f"reconnects.{end.kind}"] += 1
            if healthy:
                backoff.reset()
            if end.kind == "auth":
                self.state = "auth_failed"
                self.last_error = {"code": "http_401", "message": end.detail, "t": time.time()}
                log.error("auth_failed", detail=end.detail, retry_in_s=rc.auth_retry_s,
                          hint="fix the API key; hydrad retries on SIGHUP reload or after hydra auth_retry_s")
                with trio.move_on_after(rc.auth_retry_s):
                    await self._reconfigure.wait()
                self._reconfigure = trio.Event()
                continue
            if end.kind == "internal_error" and not internal_retried:
                internal_retried = True
                delay = 0.0
            elif end.kind == "server_full":
                delay = backoff.next(cap=rc.server_full_max_s)
            else:
                delay = backoff.next()
            if healthy:
                internal_retried = False
            self.state = "backoff"
            log.info("reconnect_scheduled", in_s=round(delay, 2), kind=end.kind)
            await trio.sleep(delay)

    async def _one_session(self, conv: Conversation) -> SessionEnd:
        self.state = "connecting"
        url, _ = session_url(self.cfg, self.api_key)
        close_code: int | None = None
        last_error: list[str | None] = [None]
        exc_seen: BaseException | None = None
        try:
            async with open_session_socket(self.cfg, self.api_key) as ws:
                self.ws, self.conversation = ws, conv
                self.sessions += 1
                self.state = "handshaking"
                log.info("socket_open", url=redact_url(url))
                async with trio.open_nursery() as sn:
                    self._session_nursery = sn
                    self._session_scope = sn.cancel_scope
                    sn.start_soon(self._downlink, ws, conv, last_error, sn.cancel_scope)
                    sn.start_soon(self._handshake_watchdog, conv, sn.cancel_scope)
                    sn.start_soon(self._keepalive, ws, sn.cancel_scope)
                    sn.start_soon(supervise, "uplink", lambda: self._uplink(ws, conv))
                close_code = int(ws.closed.code) if ws.closed is not None else None
        except trio_websocket.ConnectionClosed as exc:
            close_code = int(exc.reason.code) if exc.reason else None
            exc_seen = exc
        except (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError) as exc:
            exc_seen = exc
        finally:
            self.ws = None
            self._session_nursery = None
        if self._stop.is_set():
            return SessionEnd("shutdown", close_code, "shutdown")
        return classify(exc_seen, close_code, last_error[0])

    async def _handshake_watchdog(self, conv: Conversation, scope: trio.CancelScope) -> None:
        with trio.move_on_after(self.cfg.hydra.connect_timeout_s):
            while not conv.configured:
                await trio.sleep(0.05)
            return
        log.warning("handshake_timeout", configured=conv.configured, session_id=conv.session_id)
        scope.cancel()

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        """Detect a dead connection by WebSocket ping/pong instead of hanging on it."""
        h = self.cfg.hydra
        while True:
            await trio.sleep(h.ping_interval_s)
            with trio.move_on_after(h.ping_timeout_s) as ping_scope:
                try:
                    await ws.ping()
                except (trio_websocket.ConnectionClosed, ValueError, trio.BrokenResourceError):
                    return
            if ping_scope.cancelled_caught:
                log.warning("ping_timeout", timeout_s=h.ping_timeout_s)
                self.counters["ping_timeouts"] += 1
                scope.cancel()
                return

    async def _downlink(self, ws: trio_websocket.WebSocketConnection, conv: Conversation,
                        last_error: list[str | None], scope: trio.CancelScope) -> None:
        try:
            while True:
                message = await ws.get_message()
                effects = self._on_frame(conv, message, last_error)
                if effects:
                    await self._apply(conv, effects)
        except trio_websocket.ConnectionClosed:
            scope.cancel()

    def _on_frame(self, conv: Conversation, message: str | bytes, last_error: list[str | None]) -> list[Effect]:
        """Parse, count and log one server frame; returns what the conversation wants done."""
        try:
            ev = S.parse_server_frame(message)
        except MalformedFrame as exc:
            self.counters[f"malformed_frames.{exc.kind}"] += 1
            log.warning("malformed_frame", kind=exc.kind, reason=exc.reason, size=len(message))
            self.bus.publish(Event("malformed_frame", {"kind": exc.kind, "reason": exc.reason}))
            return []
        self.counters["frames_received"] += 1
        if isinstance(ev, S.UnknownEvent):
            self.counters["unknown_events"] += 1
            log.debug("unknown_event", type=ev.type)
        elif isinstance(ev, S.AudioDelta):
            self.counters["deltas_received"] += 1
        elif isinstance(ev, S.Error):
            last_error[0] = ev.code
            self.last_error = {"code": ev.code, "message": ev.message, "t": time.time()}
            log.warning("service_error", code=ev.code, type=ev.error_type, message=ev.message, param=ev.param,
                        event_id=ev.client_event_id)
        elif isinstance(ev, S.Warning_):
            log.warning("service_warning", code=ev.code, message=ev.message)
        elif isinstance(ev, S.SessionCreated):
            structlog.contextvars.bind_contextvars(session_id=ev.session_id)
            self.bus.publish(Event("session_connected", {"session_id": ev.session_id, "model": self.cfg.hydra.model,
                                                         "url": redact_url(self.cfg.hydra.url)}))
            log.info("session_created", session_id=ev.session_id)
        try:
            effects = conv.on_event(ev)
        except Exception:  # noqa: BLE001 - one bad event must not end the session
            self.counters["event_handler_errors"] += 1
            log.exception("event_handler_failed", type=type(ev).__name__)
            return []
        if isinstance(ev, S.SessionConfigured) and conv.configured:
            self.state = "connected"
            self.configured_event.set()
            log.info("session_configured", output_rate=conv.output_rate, voice=ev.session.get("voice"))
        return effects

    async def _uplink(self, ws: trio_websocket.WebSocketConnection, conv: Conversation) -> None:
        while not self.gate_open:
            await trio.sleep(0.01)

        async def send(frame: str) -> None:
            try:
                await ws.send_message(frame)
            except trio_websocket.ConnectionClosed:
                await trio.sleep_forever()  # the downlink sees the close and ends the session

        def on_sent(t_adc: float | None, t_sent: float) -> None:
            if t_adc is not None:
                self.uplink_latency_ms.append((t_sent - t_adc) * 1000)

        await run_uplink(self._uplink_q, send, frame_ms=self.cfg.audio.frame_ms,
                         burst=self.cfg.pipeline.uplink_burst_frames, is_muted=lambda: self.muted,
                         counters=self.counters, on_sent=on_sent)

    # ================================================================ effects
    async def _apply(self, conv: Conversation, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, Send):
                await self._send(eff)
            elif isinstance(eff, Play):
                await self._play_send.send((eff.response_id, eff.pcm))
            else:
                self._apply_now(conv, [eff])

    def _apply_now(self, conv: Conversation, effects: list[Effect]) -> None:
        """Carry out effects that need no waiting (from engine callbacks too)."""
        for eff in effects:
            if isinstance(eff, Emit):
                self.bus.publish(eff.event)
            elif isinstance(eff, Flush):
                self._last_flush_seq = self.engine.flush(eff.trigger)
                log.info("playback_flushed", trigger=eff.trigger, response_id=eff.response_id)
            elif isinstance(eff, Duck):
                self.engine.duck(eff.gain)
            elif isinstance(eff, SetOutputRate):
                self.engine.set_output_rate(eff.rate)
            elif isinstance(eff, SetGate):
                self._set_gate(eff.open)
            elif isinstance(eff, ArmGuard):
                self._meter.reset()
                self._start_session_task(self._guard_timer, conv, eff)
            elif isinstance(eff, RunTool):
                self._start_session_task(self._run_tool, conv, eff)
            elif isinstance(eff, ArmDebounce):
                self._start_session_task(self._debounce, conv, eff)
            else:  # Send and Play need awaiting: only _apply may carry them
                raise TypeError(f"{type(eff).__name__} cannot be applied without awaiting")

    def _start_session_task(self, fn: Any, *args: Any) -> None:
        if self._session_nursery is not None:
            self._session_nursery.start_soon(fn, *args)

    async def _guard_timer(self, conv: Conversation, eff: ArmGuard) -> None:
        await trio.sleep(eff.window_s)
        if conv is self.conversation:
            self._apply_now(conv, conv.on_guard_timeout(eff.token))

    async def _send(self, eff: Send) -> None:
        ws = self.ws
        if ws is None:
            self.counters["frames_unsent"] += 1
            return
        try:
            await ws.send_message(eff.frame)
            self.counters[f"frames_sent.{eff.kind}"] += 1
        except trio_websocket.ConnectionClosed:
            self.counters["frames_unsent"] += 1

    def _set_gate(self, open_: bool) -> None:
        if open_ and self.mic_t0 is None:
            self.mic_t0 = time.monotonic()
        self.gate_open = open_
        if not open_:
            self._uplink_q.clear()
        self.engine.gate(open_, self.mic_t0 or time.monotonic())

    async def _run_tool(self, conv: Conversation, eff: RunTool) -> None:
        t0 = time.monotonic()
        error: str | None = None
        self.bus.publish(Event("tool_call", {"call_id": eff.call_id, "name": eff.name, "arguments": eff.arguments}))
        try:
            args = parse_arguments(eff.arguments)
            schema = next((s for s in self.tools.schemas() if s.get("name") == eff.name), None)
            if schema is None:
                raise ToolError(f"no tool named {eff.name!r} is installed")
            validate_arguments(schema.get("parameters"), args)
            with trio.fail_after(self.cfg.plugins.tool_deadline_s):
                output = await self.tools.call(eff.name, args, eff.call_id)
        except ToolError as exc:
            error = str(exc)
        except trio.TooSlowError:
            error = f"tool {eff.name!r} timed out after {self.cfg.plugins.tool_deadline_s} s"
        except Exception as exc:  # noqa: BLE001 - a broken tool must not end the conversation
            error = f"tool {eff.name!r} failed: {type(exc).__name__}: {exc}"
            log.exception("tool_failed", tool=eff.name, call_id=eff.call_id)
        if error is not None:
            self.counters["tool_errors"] += 1
            log.warning("tool_error", tool=eff.name, call_id=eff.call_id, error=error)
            output = error_result(error)
        if conv is self.conversation:
            await self._apply(conv, conv.on_tool_result(eff.call_id, output, error, (time.monotonic() - t0) * 1000))

    async def _debounce(self, conv: Conversation, eff: ArmDebounce) -> None:
        await trio.sleep(eff.delay_s)
        if conv is self.conversation:
            await self._apply(conv, conv.on_debounce(eff.token))

    # ================================================================ playback
    async def _playback_task(self) -> None:
        async for response_id, pcm in self._play_recv:
            conv = self.conversation
            r = conv.responses.get(response_id) if conv is not None else None
            if r is None or r.flushed:
                self.counters["playback_chunks_dropped_flushed"] += 1
                continue
            if self.recorder is not None and conv is not None:
                self.recorder.on_play(response_id, pcm, conv.output_rate)
            await self.engine.play(response_id, pcm)

    # ================================================================ engine handlers
    def on_capture(self, t_adc: float, pcm: bytes) -> None:
        if self.recorder is not None:
            self.recorder.on_capture(t_adc, pcm)
        if not self.gate_open:
            self.counters["capture_frames_gated"] += 1
            return
        conv = self.conversation
        if conv is not None and conv.guard is not None and not self.muted:
            speech_ms = self._meter.feed(pcm)
            if speech_ms >= self.cfg.barge_in.guard_ms:
                self._apply_now(conv, conv.on_guard_evidence(speech_ms))
        if self._uplink_q.put_nowait((t_adc, pcm)):
            self.counters["uplink_frames_dropped.backlog"] += 1

    def on_played(self, info: dict[str, Any]) -> None:
        conv = self.conversation
        if conv is not None:
            self._apply_now(conv, conv.on_played(str(info.get("response_id")), info.get("first_audible"),
                                         int(info.get("samples", 0)), int(info.get("rate", 0) or 0), bool(info.get("done"))))

    def on_flushed(self, info: dict[str, Any]) -> None:
        if self.recorder is not None:
            self.recorder.on_flush(info.get("response_id"), info.get("t_silent"), int(info.get("dropped_samples", 0)))
        self._flush_acked = max(self._flush_acked, int(info.get("seq", 0)))
        self._flush_ack_lot.unpark_all()
        conv = self.conversation
        if conv is not None:
            self._apply_now(conv, conv.on_flushed(info.get("response_id"), int(info.get("dropped_samples", 0)),
                                          float(info.get("t_received", 0.0)), float(info.get("t_silent", 0.0))))

    def on_stats(self, info: dict[str, Any]) -> None:
        # the engine's echo canceller (None when audio.aec is off/system or the backend has none)
        self.aec_stats = info.get("aec")

    def on_device(self, info: dict[str, Any]) -> None:
        log.warning("audio_device", **{k: v for k, v in info.items() if k != "event"})
        self.bus.publish(Event("engine_state", {"state": f"device_{info.get('state')}", "detail": info.get("error")}))

    def on_state(self, state: str, detail: str | None) -> None:
        log.info("engine_state", state=state, pid=self.engine.pid)
        self.bus.publish(Event("engine_state", {"state": state, "detail": detail}))
        if state == "restarting":
            self.aec_stats = None  # the next engine reports its own
        if state == "restarting" and self.conversation is not None:
            self._apply_now(self.conversation, self.conversation.on_playback_lost())

    # ================================================================ controller
    async def cancel(self, source: str = "programmatic") -> dict[str, Any]:
        """Cancel the response (if any) and flush; returns after the engine confirmed the flush."""
        conv = self.conversation
        if conv is None:
            return {"in_flight": False, "audible": False, "response_id": None, "flushed": False}
        effects, info = conv.request_cancel(source)
        before = self._last_flush_seq
        await self._apply(conv, effects)
        flushed = False
        if self._last_flush_seq != before:
            with trio.move_on_after(1.0):
                while self._flush_acked < self._last_flush_seq:
                    await self._flush_ack_lot.park()
                flushed = True
        return {**info, "flushed": flushed}

    def observe_gauges(self) -> dict[str, float]:
        """Live queue depths for the metrics (hydrad.observe.metrics.Metrics.for_daemon)."""
        return {"uplink_backlog_frames": len(self._uplink_q),
                "playback_queue_chunks": self._play_send.statistics().current_buffer_used,
                "muted": 1 if self.muted else 0}

    def mute(self) -> dict[str, Any]:
        self.muted = True
        return {"muted": True}

    def unmute(self) -> dict[str, Any]:
        self.muted = False
        return {"muted": False}

    def metrics_text(self) -> str:
        """Prometheus text; the metrics component replaces this when it runs (see app.py)."""
        return ""

    def ping(self) -> dict[str, Any]:
        return {"pong": True, "t": time.time()}

    def status(self) -> dict[str, Any]:
        conv = self.conversation
        return {
            "state": self.state,
            "session_id": conv.session_id if conv else None,
            "model": self.cfg.hydra.model,
            "voice": (conv.effective.get("voice") if conv and conv.effective else self.cfg.session.voice),
            "output_rate": conv.output_rate if conv and conv.configured else None,
            "turn_state": conv.state_name() if conv else "idle",
            "muted": self.muted,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "sessions": self.sessions,
            "engine": self.engine.status(),
            "echo": self._echo_status(),
            "last_error": self.last_error,
            "last_session_end": self.last_end.__dict__ if self.last_end else None,
            "config_source": self.cfg.source,
        }

    def _echo_status(self) -> dict[str, Any] | None:
        """The canceller's view from the latest engine STATS (issue 7 observability)."""
        a = self.aec_stats
        if not a:
            return None
        return {
            "mode": a.get("aec"),
            "erle_db": a.get("erle_db"),                       # median over far-end-active frames
            "residual_echo_dbfs": a.get("residual_echo_dbfs"),
            "delay_ms": a.get("delay_ms"),                     # hint given to AEC3
            "path_delay_ms": a.get("path_delay_ms"),           # t_dac - t_adc estimate
            "predelay_ms": a.get("predelay_ms"),
            "gate_db": a.get("gate_db"),                       # residual echo gate threshold
            "gated_frames": a.get("gated_frames"),             # 10 ms frames it muted, cumulative
            "leak_frames": a.get("leak_frames"),               # ... of which AEC3 had lost the path
            "kept_frames": a.get("kept_frames"),               # the user AEC3 suppressed, sent instead
            "coupling_db": a.get("echo_coupling_db"),          # echo path's peak gain (reply start)
            "double_talk_frames": a.get("double_talk_frames"),  # the user over the agent, cumulative
            "double_talk_cut_frames": a.get("double_talk_cut_frames"),  # ... sent 10 dB+ under the mic
            "resyncs": a.get("resyncs"),                       # streams put back in step (frames lost)
            "capture_us_mean": a.get("capture_us_mean"),
            "worker_latency_us_max": a.get("worker_latency_us_max"),
            "errors": a.get("errors"),
        }

    def reload(self, cfg: Config, api_key: Secret | None) -> None:
        """Take a new config for the next session (a running session is not torn down)."""
        self.cfg, self.api_key = cfg, api_key
        self._reconfigure.set()
