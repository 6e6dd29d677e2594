"""Test doubles for the service tests: a stand-in for systemd's notify socket, a TCP proxy that
can stall, and process/resource probes. No tests here (shared by test_service*/test_faults*)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import trio

_UCRED = struct.Struct("iII")  # pid, uid, gid


@dataclass
class NotifyMessage:
    t: float            # time.monotonic() when received
    pid: int | None     # sender pid from SCM_CREDENTIALS, as systemd checks it (NotifyAccess=main)
    text: str

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.split("\n") if "=" in line)


class NotifyListener:
    """An ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for systemd's notify socket.

    It reads in its own thread, so its timestamps stay right even if the trio loop under
    test is blocked. ``env`` is the value to put in ``$NOTIFY_SOCKET``.
    """

    def __init__(self, tmp_path: Path | None = None, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"hydrad-test-notify-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            assert tmp_path is not None
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[NotifyMessage] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notify-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(cdata[:_UCRED.size])[0]
            with self._lock:
                self.messages.append(NotifyMessage(time.monotonic(), pid, data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    # ------------------------------------------------------------------ queries
    def snapshot(self) -> list[NotifyMessage]:
        with self._lock:
            return list(self.messages)

    def with_key(self, key: str, value: str | None = None) -> list[NotifyMessage]:
        return [m for m in self.snapshot() if key in m.fields and (value is None or m.fields[key] == value)]

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.snapshot() if "STATUS" in m.fields]

    async def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> NotifyMessage:
        with trio.move_on_after(timeout):
            while True:
                found = self.with_key(key, value)
                if found:
                    return found[0]
                await trio.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {[m.text for m in self.snapshot()]}")


@contextlib.contextmanager
def notify_listener(tmp_path: Path | None = None, *, abstract: bool = False) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path, abstract=abstract)
    try:
        yield listener
    finally:
        listener.close()


# ---------------------------------------------------------------------------- TCP proxy

class StallingProxy:
    """A TCP proxy on loopback that forwards to ``upstream_port`` until told to stall.

    ``stall()`` freezes every *current* connection (nothing is read or forwarded any more, the
    sockets stay open: a dead NAT entry or a wedged middlebox); new connections are forwarded
    normally, so the client can recover by reconnecting.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port: int | None = None
        self.connections = 0
        self._frozen: set[int] = set()
        self._stalled_at: float | None = None
        self._stall_events: dict[int, trio.Event] = {}
        self._scopes: dict[int, trio.CancelScope] = {}

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def stall(self) -> float:
        """Freeze the live connections; returns the monotonic time of the stall."""
        self._stalled_at = time.monotonic()
        for n, ev in self._stall_events.items():
            self._frozen.add(n)
            ev.set()
        return self._stalled_at

    def release(self) -> None:
        """Close the frozen connections (so their fds do not count as the client's)."""
        for n in list(self._frozen):
            scope = self._scopes.get(n)
            if scope is not None:
                scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        n = self.connections
        with trio.CancelScope() as scope:
            self._scopes[n] = scope
            await self._serve_one(n, client)
        self._scopes.pop(n, None)

    async def _serve_one(self, n: int, client: trio.SocketStream) -> None:
        stalled = trio.Event()
        self._stall_events[n] = stalled
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream:
            async with trio.open_nursery() as nursery:
                async def watch_stall() -> None:
                    await stalled.wait()
                    nursery.cancel_scope.cancel()

                async def both_ways() -> None:
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        pumps.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                    nursery.cancel_scope.cancel()  # both directions ended

                nursery.start_soon(watch_stall)
                nursery.start_soon(both_ways)
            if n in self._frozen:
                # Stalled: keep both sockets open and read nothing, until the test ends.
                with trio.move_on_after(120):
                    await trio.sleep_forever()
        self._stall_events.pop(n, None)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()  # one side died: end this connection


# ---------------------------------------------------------------------------- resource probes

@dataclass
class Resources:
    rss_kb: int
    fds: int
    threads: int
    children: list[int] = field(default_factory=list)


def resources(pid: int | None = None) -> Resources:
    """RSS, open fds, threads and live child pids of a process (default: this one), from /proc."""
    pid = os.getpid() if pid is None else pid
    status = Path(f"/proc/{pid}/status").read_text()
    values = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)}
    rss = int(values.get("VmRSS", "0 kB").split()[0])
    threads = int(values.get("Threads", "0"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Resources(rss, fds, threads, child_pids(pid))


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def pids_with_env(marker: str) -> list[int]:
    """Live processes whose environment contains ``marker`` (to find leaked grandchildren)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes():
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------- workarounds
