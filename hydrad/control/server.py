"""The control socket: a Unix stream socket speaking newline-delimited JSON (docs/control.md).

Everything a peer sends is hostile until proven otherwise. Each connection is served in
its own task and nothing it does can reach the session or the audio: a handler exception
is logged and ends that connection only; lines are bounded (``max_line_bytes``); a peer
that does not complete a request within ``idle_timeout_s`` is dropped (slow-loris), as is
one that stops reading replies; at most ``max_connections`` are served at once, the rest
get a ``busy`` reply and are closed; peers not on the allow-list (``SO_PEERCRED``) get a
``forbidden`` reply, are logged and closed.

Setting the socket up refuses anything unsafe with a :class:`ControlSocketError` that says
what to fix: a world-writable directory, a directory owned by another user, a path that
exists and is not a socket, a socket a live daemon answers on. A stale socket left by a
dead daemon is removed. The socket is bound with mode 0600 and only then given its group
and configured mode, so it is never reachable with looser permissions than configured.
"""

from __future__ import annotations

import collections
import errno
import grp
import inspect
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import structlog
import trio

from ..config import ControlConfig
from . import protocol as P
from .peercred import AllowList, PeerCred, peer_credentials

log = structlog.get_logger("hydrad.control")

#: errors from accept() that mean "out of resources for now", not "the listener is broken"
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN}
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class ControlSocketError(Exception):
    """The control socket cannot be set up safely; the message says why and what to do."""


class Controller(Protocol):
    """What the control socket drives (implemented by :class:`hydrad.pipeline.daemon.Daemon`).

    Methods may be plain or ``async``; each returns a JSON-able dict.
    """

    async def cancel(self, source: str) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def mute(self) -> Any: ...
    def unmute(self) -> Any: ...
    def ping(self) -> dict[str, Any]: ...


class _LineTooLong(Exception):
    pass


class _Reply(Exception):
    """Carries an error reply out of a command handler."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_group(group: str | None) -> int | None:
    """``control.group`` (a name or a number) -> gid; None when not configured."""
    if group is None or group == "":
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlSocketError(f"control.group = {group!r}: no such group") from None


class ControlServer:
    """Serve ``controller`` on ``cfg.socket`` until cancelled.

    ``metrics_text`` renders the Prometheus text exposition for ``metrics``; when None the
    controller's own ``metrics_text()`` is used if it has one.
    """

    def __init__(
        self, cfg: ControlConfig, controller: Controller, metrics_text: Callable[[], str] | None = None, *,
        command_timeout_s: float = 10.0, reject_timeout_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.controller = controller
        self.metrics_text = metrics_text if metrics_text is not None else getattr(controller, "metrics_text", None)
        self.path = Path(cfg.socket)
        self.allow = AllowList.build(cfg.allow_uids, cfg.allow_gids)
        self.command_timeout_s = command_timeout_s
        self.reject_timeout_s = reject_timeout_s
        #: requests.<cmd>, errors.<code>, connections, refused, busy, idle_timeouts, ... (for metrics)
        self.counters: collections.Counter[str] = collections.Counter()
        #: connections being served now (at most ``cfg.max_connections``)
        self.active = 0
        self._rejecting = 0
        self._ident: tuple[int, int] | None = None
        self._log_gate: dict[str, tuple[float, int]] = {}
        self._handlers: dict[str, Callable[[], Awaitable[Any]]] = {
            "ping": self._cmd_ping, "status": self._cmd_status, "cancel": self._cmd_cancel,
            "mute": self._cmd_mute, "unmute": self._cmd_unmute, "metrics": self._cmd_metrics,
        }
        assert set(self._handlers) == set(P.COMMANDS)

    # ================================================================ lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Set the socket up, report started, serve until cancelled, remove the socket.

        Raises :class:`ControlSocketError` before reporting started if the socket cannot be
        set up safely (``nursery.start`` re-raises it in the caller).
        """
        if not self.cfg.enabled:
            log.info("control_disabled")
            task_status.started(None)
            return
        gid = resolve_group(self.cfg.group)
        self._prepare_dir(gid)
        await self._remove_stale_socket()
        sock = self._bind(gid)
        listener = trio.socket.from_stdlib_socket(sock)
        try:
            log.info("control_listening", path=str(self.path), mode=oct(self.cfg.mode), group=self.cfg.group,
                     allow=self.allow.describe(), max_connections=self.cfg.max_connections)
            task_status.started(self)
            async with trio.open_nursery() as nursery:
                await self._accept_loop(listener, nursery)
        finally:
            listener.close()
            self._unlink_own_socket()

    # ================================================================ socket setup
    def _prepare_dir(self, gid: int | None) -> None:
        d = self.path.parent
        if not d.exists():
            try:
                os.makedirs(d, mode=0o750)
                os.chmod(d, 0o750)
                if gid is not None:
                    os.chown(d, -1, gid)
            except OSError as exc:
                raise ControlSocketError(f"cannot create the control socket directory {str(d)!r}: {exc.strerror}") from None
            log.info("control_dir_created", dir=str(d), mode="0o750", gid=gid)
        try:
            st = os.stat(d)
        except OSError as exc:
            raise ControlSocketError(f"control socket directory {str(d)!r}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ControlSocketError(f"control socket directory {str(d)!r} is not a directory")
        if st.st_mode & stat.S_IWOTH:
            raise ControlSocketError(
                f"control socket directory {str(d)!r} is world-writable (mode {oct(stat.S_IMODE(st.st_mode))}): "
                "anyone could replace the socket; use a directory only hydrad can write, e.g. /run/hydrad "
                "(systemd RuntimeDirectory=hydrad)")
        if st.st_uid not in (0, os.geteuid()):
            raise ControlSocketError(
                f"control socket directory {str(d)!r} is owned by uid {st.st_uid}: anyone who owns it could replace "
                "the socket; it must be owned by root or by the user hydrad runs as")

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketError(f"control socket {str(self.path)!r}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(
                f"control socket path {str(self.path)!r} exists and is not a socket; refusing to replace it "
                "(remove it or set control.socket to another path)")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with trio.move_on_after(2.0) as scope:
                await probe.connect(str(self.path))
            if scope.cancelled_caught:
                raise ControlSocketError(
                    f"a process holds the control socket {str(self.path)!r} but does not accept connections; "
                    "refusing to replace it (is another hydrad running?)")
        except ConnectionRefusedError:
            # Nobody listens: a dead daemon's socket. Remove it only if it is still the same file.
            try:
                if os.lstat(self.path).st_ino == st.st_ino:
                    os.unlink(self.path)
                    log.info("control_stale_socket_removed", path=str(self.path))
            except FileNotFoundError:
                pass
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketError(f"control socket {str(self.path)!r} exists and cannot be probed "
                                     f"({exc.strerror}); refusing to replace it") from None
        finally:
            probe.close()
        raise ControlSocketError(f"another daemon is listening on the control socket {str(self.path)!r} "
                                 "(is hydrad already running?)")

    def _bind(self, gid: int | None) -> socket.socket:
        path = str(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                # On Linux the socket file takes the unbound socket's mode (minus the umask):
                # it is created 0600, never briefly wider than configured.
                os.fchmod(sock.fileno(), 0o600)
            except OSError:
                pass
            try:
                sock.bind(path)
            except OSError as exc:
                raise ControlSocketError(f"cannot bind the control socket {path!r}: {exc.strerror}") from None
            st = os.lstat(path)
            self._ident = (st.st_dev, st.st_ino)
            try:
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, self.cfg.mode)
            except OSError as exc:
                self._unlink_own_socket()
                raise ControlSocketError(f"cannot set group {self.cfg.group!r} / mode {oct(self.cfg.mode)} on "
                                         f"the control socket {path!r}: {exc.strerror}") from None
            if self.cfg.mode & 0o007:
                log.warning("control_socket_world_accessible", path=path, mode=oct(self.cfg.mode),
                            hint="the allow-list still applies, but 0660 with a group is the safe setting")
            sock.listen(min(128, max(16, self.cfg.max_connections * 2)))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unlink_own_socket(self) -> None:
        """Remove the socket file if it is still the one this server created."""
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        self._ident = None

    # ================================================================ connections
    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    self.counters["accept_errors"] += 1
                    log.error("control_accept_failed", error=exc.strerror, hint="out of file descriptors or memory")
                    await trio.sleep(0.1)
                    continue
                if exc.errno in _ACCEPT_SKIP:
                    continue
                # Unexpected: keep the daemon (and its audio) running; the socket is secondary.
                self.counters["accept_errors"] += 1
                log.error("control_accept_failed", error=exc.strerror or repr(exc))
                await trio.sleep(1.0)
                continue
            self.counters["connections"] += 1
            stream = trio.SocketStream(sock)
            if self.active >= self.cfg.max_connections:
                self.counters["busy"] += 1
                if self._rejecting >= max(16, self.cfg.max_connections):
                    # A flood: do not spend a task on each; just close.
                    await trio.aclose_forcefully(stream)
                    continue
                self._rejecting += 1
                nursery.start_soon(self._reject_busy, stream)
                continue
            self.active += 1
            nursery.start_soon(self._serve, stream)

    async def _reject_busy(self, stream: trio.SocketStream) -> None:
        try:
            suppressed = self._throttle("busy")
            if suppressed is not None:
                log.warning("control_connection_rejected", reason="busy", active=self.active,
                            max_connections=self.cfg.max_connections, suppressed=suppressed)
            await self._send_final(stream, P.encode_error(
                None, "busy", f"too many control connections (limit {self.cfg.max_connections}); try again later"))
        except _PEER_GONE:
            pass
        except Exception:  # noqa: BLE001 - a connection must never take the server down
            log.exception("control_connection_failed")
        finally:
            self._rejecting -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        peer: PeerCred | None = None
        try:
            try:
                peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("control_peer_unknown", error=exc.strerror)
                self.counters["refused"] += 1
                await self._send_final(stream, P.encode_error(None, "forbidden", "cannot read the peer's credentials"))
                return
            if not self.allow.allows(peer):
                self.counters["refused"] += 1
                suppressed = self._throttle(f"refused.{peer.uid}")
                if suppressed is not None:
                    log.warning("control_peer_refused", peer_pid=peer.pid, peer_uid=peer.uid, peer_gid=peer.gid,
                                peer_groups=list(peer.groups or ())[:32], allow=self.allow.describe(),
                                suppressed=suppressed)
                await self._send_final(stream, P.encode_error(
                    None, "forbidden", f"uid {peer.uid} (gid {peer.gid}) is not allowed to use this control socket"))
                return
            log.debug("control_connected", peer_pid=peer.pid, peer_uid=peer.uid)
            await self._session(stream, peer)
        except _PEER_GONE:
            pass
        except Exception:  # noqa: BLE001 - a connection must never take the server down
            self.counters["handler_errors"] += 1
            log.exception("control_connection_failed", peer_uid=peer.uid if peer else None)
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    def _throttle(self, key: str, interval_s: float = 1.0) -> int | None:
        """At most one log line per ``key`` per interval: None to stay quiet, else how many were skipped."""
        now = time.monotonic()
        last, skipped = self._log_gate.get(key, (-1e9, 0))
        if now - last < interval_s:
            self._log_gate[key] = (last, skipped + 1)
            return None
        if len(self._log_gate) > 1024:
            self._log_gate.clear()
        self._log_gate[key] = (now, 0)
        return skipped

    async def _send_final(self, stream: trio.SocketStream, data: bytes) -> None:
        """Send a last error reply, then shut down and drain a little before the caller closes.

        Closing a Unix socket with unread input makes the peer's next read fail with
        ECONNRESET, even after our reply; draining briefly lets a well-behaved client read
        the reply and a clean EOF. Bounded in time and bytes: a hostile peer gains nothing.
        """
        with trio.move_on_after(self.reject_timeout_s):
            try:
                await stream.send_all(data)
                await stream.send_eof()
                drained = 0
                while drained < 65536:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except (*_PEER_GONE, OSError):
                pass

    async def _send(self, stream: trio.SocketStream, data: bytes, timeout: float) -> bool:
        """Send one reply; False if the peer did not take it in time (the caller closes)."""
        with trio.move_on_after(timeout):
            await stream.send_all(data)
            return True
        return False

    async def _read_line(self, stream: trio.SocketStream, buf: bytearray) -> bytes | None:
        """The next line (without its newline); the unterminated tail at EOF; None at a clean EOF."""
        limit = self.cfg.max_line_bytes
        scanned = 0
        while True:
            i = buf.find(b"\n", scanned, limit + 1)
            if i >= 0:
                line = bytes(buf[:i])
                del buf[: i + 1]
                return line
            if len(buf) > limit:
                raise _LineTooLong
            scanned = len(buf)
            data = await stream.receive_some(65536)
            if not data:
                if buf:
                    line = bytes(buf)
                    buf.clear()
                    return line
                return None
            buf += data

    async def _session(self, stream: trio.SocketStream, peer: PeerCred) -> None:
        cfg = self.cfg
        buf = bytearray()
        deadline = trio.current_time() + cfg.idle_timeout_s
        while True:
            line: bytes | None = None
            with trio.move_on_at(deadline) as idle:
                try:
                    line = await self._read_line(stream, buf)
                except _LineTooLong:
                    self.counters["errors.line_too_long"] += 1
                    log.warning("control_line_too_long", peer_uid=peer.uid, limit=cfg.max_line_bytes)
                    await self._send_final(stream, P.encode_error(
                        None, "line_too_long", f"request line longer than {cfg.max_line_bytes} bytes; closing"))
                    return
            if idle.cancelled_caught:
                self.counters["idle_timeouts"] += 1
                log.info("control_idle_timeout", peer_uid=peer.uid, timeout_s=cfg.idle_timeout_s)
                await self._send_final(stream, P.encode_error(
                    None, "idle_timeout", f"no complete request within {cfg.idle_timeout_s} s; closing"))
                return
            if line is None:
                return
            if not line.strip(b" \t\r"):
                continue  # blank lines are ignored (and do not extend the idle deadline)
            reply = await self._handle_line(line, peer)
            if not await self._send(stream, reply, cfg.idle_timeout_s):
                self.counters["send_timeouts"] += 1
                log.info("control_peer_not_reading", peer_uid=peer.uid)
                return
            deadline = trio.current_time() + cfg.idle_timeout_s

    async def _handle_line(self, line: bytes, peer: PeerCred) -> bytes:
        try:
            req = P.parse_request(line)
        except P.RequestError as exc:
            self.counters[f"errors.{exc.code}"] += 1
            log.debug("control_bad_request", code=exc.code, reason=exc.message, peer_uid=peer.uid, size=len(line))
            return P.encode_error(exc.req_id, exc.code, exc.message)
        self.counters[f"requests.{req.cmd}"] += 1
        t0 = time.monotonic()
        try:
            with trio.move_on_after(self.command_timeout_s) as scope:
                result = await self._handlers[req.cmd]()
            if scope.cancelled_caught:
                raise _Reply("timeout", f"{req.cmd!r} did not finish within {self.command_timeout_s} s")
            reply = P.encode_ok(req.id, result)
        except _Reply as exc:
            self.counters[f"errors.{exc.code}"] += 1
            log.warning("control_command_failed", cmd=req.cmd, code=exc.code, reason=exc.message, peer_uid=peer.uid)
            return P.encode_error(req.id, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a failing command must not take the server down
            self.counters["errors.internal"] += 1
            log.exception("control_command_failed", cmd=req.cmd, code="internal", peer_uid=peer.uid)
            return P.encode_error(req.id, "internal", f"{req.cmd!r} failed: {type(exc).__name__}: {exc}")
        ms = round((time.monotonic() - t0) * 1000, 2)
        level = log.info if req.cmd in ("cancel", "mute", "unmute") else log.debug
        level("control_command", cmd=req.cmd, id=req.id if isinstance(req.id, int) else None, ms=ms,
              peer_pid=peer.pid, peer_uid=peer.uid,
              **({k: result.get(k) for k in ("in_flight", "response_id")} if req.cmd == "cancel" else {}))
        return reply

    # ================================================================ commands
    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.controller, name, None)
        if fn is None:
            raise _Reply("unavailable", f"this daemon has no {name!r}")
        out = fn(*args, **kwargs)
        if inspect.isawaitable(out):
            out = await out
        return out

    async def _cmd_ping(self) -> dict[str, Any]:
        out = await self._call("ping")
        return {"pong": True, **(out if isinstance(out, dict) else {})}

    async def _cmd_status(self) -> dict[str, Any]:
        out = await self._call("status")
        if not isinstance(out, dict):
            raise _Reply("internal", "status returned no object")
        return out

    async def _cmd_cancel(self) -> dict[str, Any]:
        out = await self._call("cancel", source="control")
        out = dict(out) if isinstance(out, dict) else {}
        out.setdefault("in_flight", False)
        out.setdefault("audible", False)
        out.setdefault("response_id", None)
        out.setdefault("flushed", False)
        out["noop"] = not (out["in_flight"] or out["audible"])
        return out

    async def _cmd_mute(self) -> dict[str, Any]:
        out = await self._call("mute")
        return out if isinstance(out, dict) else {"muted": True}

    async def _cmd_unmute(self) -> dict[str, Any]:
        out = await self._call("unmute")
        return out if isinstance(out, dict) else {"muted": False}

    async def _cmd_metrics(self) -> dict[str, Any]:
        if self.metrics_text is None:
            raise _Reply("unavailable", "this daemon exposes no metrics")
        text = self.metrics_text()
        if inspect.isawaitable(text):
            text = await text
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            raise _Reply("internal", "metrics did not render as text")
        return {"content_type": P.METRICS_CONTENT_TYPE, "text": text}
