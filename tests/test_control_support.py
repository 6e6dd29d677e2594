"""Shared pieces of the control-socket tests (no tests here).

A fake controller, a ``ControlServer`` running in a tmp dir on a real Unix socket, a raw
trio client that speaks bytes (so tests can send anything), and a way to run the client
as another user (tests run as root; the child drops to ``nobody``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import trio

from hydrad.config import ControlConfig
from hydrad.control import protocol as P
from hydrad.control.server import ControlServer

NOBODY = 65534
METRICS = "# HELP hydrad_frames_sent_total Frames sent.\n# TYPE hydrad_frames_sent_total counter\nhydrad_frames_sent_total 42.0\n"


class FakeController:
    """Records what the server asked for; ``cancel`` can be told to hang or to raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.muted = False
        self.in_flight = False
        self.cancel_delay = 0.0
        self.fail: set[str] = set()

    async def cancel(self, source: str) -> dict[str, Any]:
        self.calls.append(("cancel", source))
        if "cancel" in self.fail:
            raise RuntimeError("cancel exploded")
        await trio.sleep(self.cancel_delay)
        was, self.in_flight = self.in_flight, False
        return {"in_flight": was, "audible": was, "response_id": "resp_1" if was else None, "flushed": was}

    def status(self) -> dict[str, Any]:
        self.calls.append(("status", None))
        if "status" in self.fail:
            raise ValueError("status exploded")
        return {"state": "connected", "session_id": "sess_1", "muted": self.muted, "turn_state": "idle",
                "engine": {"state": "running", "pid": 1234}, "uptime_s": 1.5}

    def mute(self) -> dict[str, Any]:
        self.calls.append(("mute", None))
        self.muted = True
        return {"muted": True}

    def unmute(self) -> dict[str, Any]:
        self.calls.append(("unmute", None))
        self.muted = False
        return {"muted": False}

    def ping(self) -> dict[str, Any]:
        self.calls.append(("ping", None))
        return {"pong": True, "t": time.time()}


def control_config(path: Path | str, **kw: Any) -> ControlConfig:
    return ControlConfig(socket=str(path), **kw)


@contextlib.asynccontextmanager
async def serving(cfg: ControlConfig, controller: Any | None = None, metrics: Any = lambda: METRICS,
                  **kw: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(cfg, controller if controller is not None else FakeController(), metrics, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


class RawClient:
    """Bytes in, lines out, over a real Unix socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, path: Path | str) -> "RawClient":
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self, timeout: float = 10.0) -> bytes | None:
        """The next line (without ``\\n``), or None at EOF."""
        with trio.fail_after(timeout):
            while b"\n" not in self.buf:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.buf += data
        i = self.buf.index(b"\n")
        out = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return out

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await self.line(timeout)
        assert line is not None, "connection closed without a reply"
        return check_response(line)

    async def ask(self, obj: dict[str, Any] | str, timeout: float = 10.0) -> dict[str, Any]:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        await self.send(data.encode() + b"\n")
        return await self.reply(timeout)

    async def eof(self, timeout: float = 10.0) -> bool:
        """True if the server closes the connection (after any pending lines) within ``timeout``."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return True
                if not data:
                    return True
                self.buf += data
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def check_response(line: bytes) -> dict[str, Any]:
    """Assert ``line`` is one well-formed version-1 response and return it."""
    assert line.isascii(), line[:200]
    assert b"\n" not in line and b"\r" not in line
    obj = json.loads(line)
    assert isinstance(obj, dict) and obj["v"] == P.VERSION and isinstance(obj["ok"], bool), obj
    assert "id" in obj
    if obj["ok"]:
        assert set(obj) == {"v", "id", "ok", "result"}, obj
    else:
        assert set(obj) == {"v", "id", "ok", "error"}, obj
        assert set(obj["error"]) == {"code", "message"}, obj
        assert obj["error"]["code"] in P.ERROR_CODES, obj
        assert isinstance(obj["error"]["message"], str) and obj["error"]["message"], obj
    return obj


# ------------------------------------------------------------------------ other users
@contextlib.contextmanager
def shared_dir(group: int | None = None) -> Iterator[Path]:
    """A socket directory another user can reach (the pytest tmp dirs are root-only).

    Mode 0755 (or 0750 with ``group``): not world-writable, so the server accepts it.
    """
    d = Path(tempfile.mkdtemp(prefix="hydrad-ctl-", dir="/tmp"))
    try:
        if group is not None:
            os.chown(d, -1, group)
            os.chmod(d, 0o750)
        else:
            os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: runs ctl_main as another user: everything is imported first (the interpreter lives under
#: /root, which the unprivileged child cannot read), then groups, gid and uid are dropped.
_AS_USER = """
import json, os, sys
from hydrad.control.ctl import ctl_main
import hydrad.config, hydrad.control.client, hydrad.control.protocol
import locale, gettext
uid, gid, groups, argv = json.loads(sys.argv[1])
hydrad.control.ctl.build_parser().parse_args(argv)  # argparse imports lazily too
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
assert os.getuid() == uid and os.geteuid() == uid
sys.exit(ctl_main(argv))
"""


def ctl_command(argv: list[str], *, uid: int | None = None, gid: int = NOBODY, groups: list[int] = ()) -> list[str]:
    """The command line that runs ``hydrad ctl ARGV`` in a fresh interpreter (optionally as ``uid``)."""
    if uid is None:
        return [sys.executable, "-c", "import sys; from hydrad.control.ctl import ctl_main; sys.exit(ctl_main(sys.argv[1:]))",
                *argv]
    return [sys.executable, "-c", _AS_USER, json.dumps([uid, gid, list(groups), argv])]


async def run_ctl(argv: list[str], timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(ctl_command(argv, **kw), capture_stdout=True, capture_stderr=True, check=False,
                                      cwd="/")
