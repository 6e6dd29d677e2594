"""Opening the Hydra WebSocket and classifying why a session ended.

The reconnect policy (reference §6.1) depends on *why* a session ended, so every way out of
a session is mapped to one of a few classes here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

import trio
import trio_websocket

from ..config import Config, Secret
from ..protocol import constants as C

#: The service's audio deltas can be large; the protocol layer enforces its own limit and
#: counts oversize frames, so the socket itself must not close on them.
MAX_MESSAGE_SIZE = 32 * 1024 * 1024


def session_url(cfg: Config, api_key: Secret | None) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The URL (with ``model`` always explicit) and extra headers for the configured auth style."""
    parts = urlsplit(cfg.hydra.url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("model", "api_key")]
    query.append(("model", cfg.hydra.model))
    headers: list[tuple[bytes, bytes]] = []
    if api_key is not None:
        if cfg.hydra.auth == "bearer":
            headers.append((b"Authorization", b"Bearer " + api_key.reveal().encode()))
        else:
            query.append(("api_key", api_key.reveal()))
    return urlunsplit(parts._replace(query=urlencode(query))), headers


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    query = [(k, "***" if k == "api_key" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def open_session_socket(cfg: Config, api_key: Secret | None) -> Any:
    url, headers = session_url(cfg, api_key)
    return trio_websocket.open_websocket_url(
        url, extra_headers=headers, max_message_size=MAX_MESSAGE_SIZE,
        connect_timeout=cfg.hydra.connect_timeout_s, disconnect_timeout=2.0, message_queue_size=64,
    )


@dataclass(frozen=True)
class SessionEnd:
    """Why a session ended: ``kind`` drives the reconnect policy."""

    kind: str  # auth | server_full | internal_error | closed | network | shutdown | idle
    code: int | None
    detail: str

    @property
    def fatal(self) -> bool:
        return self.kind == "auth"


def classify(exc: BaseException | None, close_code: int | None, last_error_code: str | None) -> SessionEnd:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        status = getattr(exc, "status_code", None)
        if status == 401:
            return SessionEnd("auth", 401, "HTTP 401 at upgrade: the API key was refused")
        return SessionEnd("network", status, f"upgrade refused with HTTP {status}")
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return SessionEnd("network", None, "connect timed out")
    if close_code == C.CLOSE_TRY_AGAIN_LATER or last_error_code == C.ERR_SERVER_FULL:
        return SessionEnd("server_full", close_code, "service at capacity (server_full / 1013)")
    if last_error_code == C.ERR_INTERNAL:
        return SessionEnd("internal_error", close_code, "service internal_error")
    if close_code is not None:
        return SessionEnd("closed", close_code, f"closed by the service with {close_code}")
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError)):
        return SessionEnd("network", None, f"{type(exc).__name__}: {exc}")
    return SessionEnd("network", None, repr(exc) if exc else "connection lost")
