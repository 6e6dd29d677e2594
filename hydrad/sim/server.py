"""The simulator's WebSocket server: handshake checks, capacity, one task per connection.

Everything that happens before the upgrade lives here (path, auth -> HTTP 401, model tag,
capacity); everything after it is :class:`~hydrad.sim.session.SimSession`. The serve task
owns all connection tasks (trio-websocket runs handlers in a nursery inside ``serve``), so
cancelling ``serve`` tears every session down.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import trio
import trio_websocket

from .config import SimConfig, TurnAction
from .record import SimSessionRecord
from .session import SimSession

log = logging.getLogger("hydrad.sim")

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
DISCONNECT_TIMEOUT_S = 2.0


class Simulator:
    """A local Hydra endpoint. ``sessions`` records every accepted connection, in order.

    Run-time control for tests: :meth:`script` (change a turn's action), :meth:`send_raw`
    (inject a frame), :meth:`disconnect` (close a live session), or assign a new
    ``config`` (applies to later connections).
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        #: turn number -> action; starts as the config's ``turns`` and may be changed live.
        self.scenario: dict[int, TurnAction] = dict(self.config.turns)
        self.sessions: list[SimSessionRecord] = []
        #: upgrades refused before the WebSocket opened: ``(t_monotonic, http_status, reason)``
        self.rejections: list[tuple[float, int, str]] = []
        #: simulator bugs: exceptions that ended a session (it is closed with 1011 and the
        #: server keeps serving); tests should assert this stays empty.
        self.errors: list[Exception] = []
        self.port: int | None = None
        self.host: str | None = None
        self._connections = 0
        self._live: dict[int, SimSession] = {}  # connection number -> session, capacity-counted

    # ------------------------------------------------------------------ control

    def script(self, turn: int, **action: Any) -> TurnAction:
        """Set the action for a turn (keys as in a scenario file; turn 0 = greeting)."""
        parsed = TurnAction.from_mapping(action, f"turn {turn}")
        self.scenario[turn] = parsed
        return parsed

    def url(self, model: str | None = "hydra-v1.1", api_key: str | None = "sim-key") -> str:
        """The URL a client should use (only valid once ``serve`` has started)."""
        if self.port is None:
            raise RuntimeError("the simulator is not serving yet")
        query = {k: v for k, v in (("model", model), ("api_key", api_key)) if v is not None}
        path = self.config.path or "/"
        return f"ws://{self.host}:{self.port}{path}" + (f"?{urlencode(query)}" if query else "")

    def _session(self, index: int) -> SimSession:
        record = self.sessions[index]
        session = self._live.get(record.connection)
        if session is None or not record.live:
            raise RuntimeError(f"session {index} ({record.session_id}) is not live")
        return session

    async def send_raw(self, text: str, session: int = -1) -> None:
        """Send ``text`` verbatim on a live session (index into ``sessions``)."""
        self._session(session).inject_raw(text)
        await trio.lowlevel.checkpoint()

    async def disconnect(self, code: int | str = 1000, session: int = -1) -> None:
        """Close a live session with ``code``, or drop its TCP connection with ``"abrupt"``."""
        self._session(session).disconnect(code)
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ serving

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; ``task_status.started(bound_port)`` once listening."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                trio_websocket.serve_websocket, self._handle, host, port, None,
                max_message_size=MAX_MESSAGE_SIZE, connect_timeout=CONNECT_TIMEOUT_S,
                disconnect_timeout=DISCONNECT_TIMEOUT_S,
            ))
            self.host, self.port = host, server.port
            log.info("hydrad sim listening on ws://%s:%d", host, server.port)
            task_status.started(server.port)

    async def _reject(self, request: trio_websocket.WebSocketRequest, status: int, reason: str) -> None:
        self.rejections.append((time.monotonic(), status, reason))
        log.info("refusing upgrade: HTTP %d (%s)", status, reason)
        await request.reject(status, body=reason.encode())

    def _api_key(self, request: trio_websocket.WebSocketRequest, query: dict[str, list[str]]) -> str | None:
        keys = [k for k in query.get("api_key", []) if k]
        if keys:
            return keys[0]
        for name, value in request.headers:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        return None

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        cfg = self.config
        self._connections += 1
        number = self._connections
        target = urlsplit(request.path)
        if cfg.path is not None and target.path.rstrip("/") != cfg.path.rstrip("/"):
            await self._reject(request, 404, f"no endpoint at {target.path}")
            return
        query = parse_qs(target.query)
        key = self._api_key(request, query)
        if key is None and cfg.require_key:
            await self._reject(request, 401, "missing api key")
            return
        if key is not None and (key in cfg.bad_keys or (cfg.valid_keys is not None and key not in cfg.valid_keys)):
            await self._reject(request, 401, "invalid api key")
            return
        tag = (query.get("model") or [cfg.default_tag])[0]
        if tag not in cfg.accepted_tags:
            await self._reject(request, 400, f"unknown model {tag!r}")
            return
        try:
            ws = await request.accept()
        except trio_websocket.ConnectionClosed:
            return
        record = SimSessionRecord(connection=number, model=tag, session_id=str(uuid.uuid4()))
        self.sessions.append(record)
        full = cfg.is_server_full(number) or (cfg.max_sessions is not None and len(self._live) >= cfg.max_sessions)
        session = SimSession(ws, cfg, record, lambda turn: self.scenario.get(turn))
        if not full:
            self._live[number] = session
        log.info("connection %d: session %s model=%s%s", number, record.session_id, tag, " (full)" if full else "")
        try:
            await session.run(full=full)
        except Exception as exc:  # noqa: BLE001 - one broken session must not stop the server
            log.exception("session %s crashed", record.session_id)
            self.errors.append(exc)
            record.closed = record.closed or 1011
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await ws.aclose(1011, "simulator error")
        finally:
            self._live.pop(number, None)
            log.info("connection %d closed (%s)", number, record.closed)
