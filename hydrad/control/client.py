"""A small blocking client for the control socket (used by ``hydrad ctl``; stdlib only).

``call(path, "status")`` returns the result object or raises a :class:`ControlError` whose
``exit_code`` and one-line message say what went wrong: the daemon is not running, it
refused us, it did not answer in time, or it answered with an error.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import protocol as P

#: exit statuses of ``hydrad ctl`` (docs/control.md)
EXIT_OK = 0
EXIT_ERROR = 1          # the daemon answered with an error (bad request, busy, internal, ...)
EXIT_USAGE = 2          # bad command line or config
EXIT_NOT_RUNNING = 3    # no socket, or nothing listening on it
EXIT_REFUSED = 4        # permission denied on the socket, or not on the allow-list
EXIT_TIMEOUT = 5        # no reply within --timeout
EXIT_BAD_REPLY = 6      # the reply does not follow the protocol (not a hydrad socket?)


class ControlError(Exception):
    exit_code = EXIT_ERROR

    def __init__(self, code: str, message: str, response: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: the daemon's error response, when there was one
        self.response = response


class NotRunning(ControlError):
    exit_code = EXIT_NOT_RUNNING


class Refused(ControlError):
    exit_code = EXIT_REFUSED


class Timeout(ControlError):
    exit_code = EXIT_TIMEOUT


class BadReply(ControlError):
    exit_code = EXIT_BAD_REPLY


class RemoteError(ControlError):
    """The daemon answered ``ok: false``."""


@dataclass
class Reply:
    response: dict[str, Any]
    #: connect + request + reply, in seconds
    rtt_s: float

    @property
    def result(self) -> Any:
        return self.response["result"]


_ids = itertools.count(1)


def _connect(path: str, deadline: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(path)
        return sock
    except FileNotFoundError:
        sock.close()
        raise NotRunning("not_running", f"hydrad is not running (no control socket at {path})") from None
    except ConnectionRefusedError:
        sock.close()
        raise NotRunning("not_running", f"hydrad is not running (nothing listens on {path})") from None
    except PermissionError:
        sock.close()
        raise Refused("permission_denied", f"permission denied on {path} (are you in the hydrad control group?)") from None
    except (socket.timeout, BlockingIOError):
        sock.close()
        raise Timeout("timeout", f"timed out connecting to {path}") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOTDIR:
            raise NotRunning("not_running", f"hydrad is not running (no control socket at {path})") from None
        raise NotRunning("not_running", f"cannot connect to {path}: {exc.strerror or exc}") from None


def _read_line(sock: socket.socket, deadline: float, limit: int = 64 * 1024 * 1024) -> bytes:
    buf = bytearray()
    while True:
        i = buf.find(b"\n")
        if i >= 0:
            return bytes(buf[:i])
        if len(buf) > limit:
            raise BadReply("bad_reply", "the daemon's reply is too long")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout("timeout", "timed out waiting for the daemon's reply")
        sock.settimeout(remaining)
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            raise Timeout("timeout", "timed out waiting for the daemon's reply") from None
        except ConnectionResetError:
            data = b""
        if not data:
            raise BadReply("bad_reply", "the daemon closed the connection without replying")
        buf += data


def request(path: str | os.PathLike[str], cmd: str, *, timeout: float = 5.0, req_id: Any = None) -> Reply:
    """Send one request and return the daemon's response (``ok`` true or false).

    Raises :class:`NotRunning`, :class:`Refused`, :class:`Timeout` or :class:`BadReply` when
    there is no usable response.
    """
    path = os.fspath(path)
    t0 = time.monotonic()
    deadline = t0 + timeout
    req_id = next(_ids) if req_id is None else req_id
    sock = _connect(path, deadline)
    try:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(P.encode_request(cmd, req_id))
        except socket.timeout:
            raise Timeout("timeout", "timed out sending the request") from None
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may have refused us already: its reply is waiting to be read
        line = _read_line(sock, deadline)
    finally:
        sock.close()
    rtt = time.monotonic() - t0
    try:
        response = P.parse_response(line)
    except P.ResponseError as exc:
        raise BadReply("bad_reply", str(exc)) from None
    return Reply(response, rtt)


def call(path: str | os.PathLike[str], cmd: str, *, timeout: float = 5.0) -> Any:
    """Send one request and return its result; an error response raises a :class:`ControlError`."""
    reply = request(path, cmd, timeout=timeout)
    raise_for_error(reply.response)
    return reply.result


def raise_for_error(response: dict[str, Any]) -> None:
    if response["ok"]:
        return
    code, message = response["error"]["code"], response["error"]["message"]
    cls: type[ControlError] = {"forbidden": Refused, "timeout": Timeout}.get(code, RemoteError)
    raise cls(code, f"hydrad refused the request: {message}" if code == "forbidden" else f"hydrad: {code}: {message}",
              response)
