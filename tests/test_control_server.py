"""The control socket server on real Unix sockets, with a fake controller."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from hydrad.config import config_from_dict
from hydrad.control import protocol as P
from hydrad.control.peercred import AllowList, PeerCred
from hydrad.control.server import ControlServer, ControlSocketError

from .test_control_support import (
    METRICS, NOBODY, FakeController, RawClient, check_response, control_config, serving, shared_dir,
)


# ------------------------------------------------------------------------ commands
async def test_every_command_round_trips(tmp_path: Path) -> None:
    fake = FakeController()
    async with serving(control_config(tmp_path / "c.sock"), fake):
        c = await RawClient.connect(tmp_path / "c.sock")
        r = await c.ask({"v": 1, "id": 1, "cmd": "ping"})
        assert r["ok"] and r["id"] == 1 and r["result"]["pong"] is True
        r = await c.ask({"v": 1, "id": "s", "cmd": "status"})
        assert r["id"] == "s" and r["result"]["state"] == "connected" and r["result"]["engine"]["pid"] == 1234
        r = await c.ask({"id": 3, "cmd": "mute"})
        assert r["result"] == {"muted": True} and fake.muted
        assert (await c.ask({"cmd": "status"}))["result"]["muted"] is True
        r = await c.ask({"id": 4, "cmd": "unmute"})
        assert r["result"] == {"muted": False} and not fake.muted
        r = await c.ask({"id": 5, "cmd": "metrics"})
        assert r["result"]["text"] == METRICS and r["result"]["content_type"].startswith("text/plain; version=0.0.4")
        # cancel when idle: a no-op that says so
        r = await c.ask({"id": 6, "cmd": "cancel"})
        assert r["result"]["in_flight"] is False and r["result"]["noop"] is True
        fake.in_flight = True
        r = await c.ask({"id": 7, "cmd": "cancel"})
        assert r["result"] == {"in_flight": True, "audible": True, "response_id": "resp_1", "flushed": True,
                               "noop": False}
        assert [s for name, s in fake.calls if name == "cancel"] == ["control", "control"]
        await c.aclose()


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    fake = FakeController()
    fake.cancel_delay = 0.2  # a slow command must not let later replies overtake it
    async with serving(control_config(tmp_path / "c.sock"), fake):
        c = await RawClient.connect(tmp_path / "c.sock")
        await c.send(b"".join(P.encode_request(cmd, i) for i, cmd in enumerate(["cancel", "ping", "status", "mute"]))
                     + b'\n \t\r\n{"id": 9, "cmd": "nope"}\n{"cmd": "ping", "id": 10}')
        ids = [(await c.reply())["id"] for _ in range(5)]
        assert ids == [0, 1, 2, 3, 9]  # blank lines get no reply; the unterminated tail waits ...
        await c.stream.send_eof()  # ... until EOF, then it is served too
        assert (await c.reply())["id"] == 10
        assert await c.eof()


async def test_controller_errors_stay_in_their_reply(tmp_path: Path) -> None:
    fake = FakeController()
    fake.fail = {"status", "cancel"}
    async with serving(control_config(tmp_path / "c.sock"), fake) as server:
        c = await RawClient.connect(tmp_path / "c.sock")
        r = await c.ask({"id": 1, "cmd": "status"})
        assert r["error"]["code"] == "internal" and "status exploded" in r["error"]["message"]
        r = await c.ask({"id": 2, "cmd": "cancel"})
        assert r["error"]["code"] == "internal"
        assert (await c.ask({"id": 3, "cmd": "ping"}))["ok"]  # same connection still works
        assert server.counters["errors.internal"] == 2 and server.counters["handler_errors"] == 0


async def test_slow_command_times_out_without_hurting_the_server(tmp_path: Path) -> None:
    fake = FakeController()
    fake.cancel_delay = 60
    async with serving(control_config(tmp_path / "c.sock"), fake, command_timeout_s=0.3):
        c = await RawClient.connect(tmp_path / "c.sock")
        r = await c.ask({"id": 1, "cmd": "cancel"})
        assert r["id"] == 1 and r["error"]["code"] == "timeout"
        assert (await c.ask({"id": 2, "cmd": "ping"}))["ok"]


async def test_metrics_unavailable_without_a_source(tmp_path: Path) -> None:
    async with serving(control_config(tmp_path / "c.sock"), FakeController(), metrics=None):
        c = await RawClient.connect(tmp_path / "c.sock")
        assert (await c.ask({"cmd": "metrics"}))["error"]["code"] == "unavailable"


# ------------------------------------------------------------------------ hostile input
async def test_oversized_line_gets_an_error_and_a_close(tmp_path: Path) -> None:
    cfg = control_config(tmp_path / "c.sock", max_line_bytes=1024)
    async with serving(cfg) as server:
        # Exactly at the limit is still a line (it is just not JSON).
        c = await RawClient.connect(cfg.socket)
        r = await c.ask("x" * 1024)
        assert r["error"]["code"] == "bad_json"
        await c.send(b"y" * 1025)  # no newline needed: the limit is crossed
        r = await c.reply()
        assert r["error"]["code"] == "line_too_long" and "1024" in r["error"]["message"]
        assert await c.eof()
        # A huge line sent fast, with a newline after it: also refused, server unaffected.
        c = await RawClient.connect(cfg.socket)
        with trio.move_on_after(5):
            try:
                await c.send(b"{" * 1_000_000 + b"\n")
            except trio.BrokenResourceError:
                pass
        assert (await c.reply())["error"]["code"] == "line_too_long"
        c = await RawClient.connect(cfg.socket)
        assert (await c.ask({"cmd": "ping"}))["ok"]
        assert server.counters["errors.line_too_long"] == 2


async def test_idle_timeout_defeats_slow_loris(tmp_path: Path) -> None:
    cfg = control_config(tmp_path / "c.sock", idle_timeout_s=0.6)
    async with serving(cfg) as server:
        # Silent client: dropped with a reply.
        t0 = trio.current_time()
        c = await RawClient.connect(cfg.socket)
        r = await c.reply(timeout=10)
        assert r["error"]["code"] == "idle_timeout"
        assert await c.eof()
        assert 0.5 <= trio.current_time() - t0 < 5
        # Dribbling a request one byte at a time, or sending blank lines, does not extend the deadline.
        for dribble in (b'{"cmd": "ping", "id": "' + b"a" * 100, b"\n" * 100):
            c = await RawClient.connect(cfg.socket)
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_dribble, c, dribble)  # would take 5 s
                r = await c.reply(timeout=10)
                elapsed = trio.current_time() - t0
                nursery.cancel_scope.cancel()
            assert r["error"]["code"] == "idle_timeout", r
            assert 0.5 <= elapsed < 4, elapsed
        # A client that keeps completing requests is not dropped.
        c = await RawClient.connect(cfg.socket)
        t0 = trio.current_time()
        while trio.current_time() - t0 < 1.5:
            assert (await c.ask({"cmd": "ping"}))["ok"]
            await trio.sleep(0.2)
        assert server.counters["idle_timeouts"] == 3


async def _dribble(c: RawClient, data: bytes) -> None:
    for b in data:
        try:
            await c.send(bytes([b]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(0.05)


async def test_connection_cap(tmp_path: Path) -> None:
    cfg = control_config(tmp_path / "c.sock", max_connections=3)
    async with serving(cfg) as server:
        held = [await RawClient.connect(cfg.socket) for _ in range(3)]
        for c in held:
            assert (await c.ask({"cmd": "ping"}))["ok"]
        extra = [await RawClient.connect(cfg.socket) for _ in range(5)]
        for c in extra:
            r = await c.reply()
            assert r["error"]["code"] == "busy" and "3" in r["error"]["message"]
            assert await c.eof()
        for c in held:  # the served connections are unaffected
            assert (await c.ask({"cmd": "status"}))["ok"]
        await held[0].aclose()
        with trio.fail_after(10):
            while server.active > 2:
                await trio.sleep(0.01)
        c = await RawClient.connect(cfg.socket)
        assert (await c.ask({"cmd": "ping"}))["ok"]
        assert server.counters["busy"] == 5 and server.active == 3


async def test_connection_flood_gets_busy_or_closed(tmp_path: Path) -> None:
    cfg = control_config(tmp_path / "c.sock", max_connections=2)
    async with serving(cfg) as server:
        held = [await RawClient.connect(cfg.socket) for _ in range(2)]
        for c in held:
            assert (await c.ask({"cmd": "ping"}))["ok"]
        with capture_logs() as logs:
            flood = [await RawClient.connect(cfg.socket) for _ in range(60)]
            outcomes = []
            for c in flood:
                line = await c.line()
                outcomes.append("closed" if line is None else check_response(line)["error"]["code"])
        # Logged, but not once per connection: a flood must not become a log flood.
        busy_logs = [e for e in logs if e["event"] == "control_connection_rejected"]
        assert 1 <= len(busy_logs) <= 5, len(busy_logs)
        assert set(outcomes) <= {"busy", "closed"} and outcomes.count("busy") >= 16, outcomes
        for c in flood:
            await c.aclose()
        for c in held:
            assert (await c.ask({"cmd": "ping"}))["ok"]
        assert server.active == 2


async def test_peer_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    big = "# x\n" * 50_000  # 200 kB per metrics reply
    cfg = control_config(tmp_path / "c.sock", idle_timeout_s=0.5)
    async with serving(cfg, metrics=lambda: big) as server:
        c = await RawClient.connect(cfg.socket)
        with trio.move_on_after(10):
            try:
                for _ in range(100):
                    await c.send(b'{"cmd": "metrics"}\n')
            except trio.BrokenResourceError:
                pass
        with trio.fail_after(10):
            while server.counters["send_timeouts"] < 1:
                await trio.sleep(0.05)
        other = await RawClient.connect(cfg.socket)
        assert (await other.ask({"cmd": "ping"}))["ok"]


async def test_abrupt_disconnects_are_harmless(tmp_path: Path) -> None:
    fake = FakeController()
    fake.cancel_delay = 0.3
    async with serving(control_config(tmp_path / "c.sock"), fake) as server:
        for payload in (b"", b'{"cmd": "ping"}\n', b'{"cmd": "cancel"}\n', b'{"cmd": "sta'):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(tmp_path / "c.sock"))
            s.sendall(payload)
            s.close()
        await trio.sleep(0.6)
        c = await RawClient.connect(tmp_path / "c.sock")
        assert (await c.ask({"cmd": "ping"}))["ok"]
        assert server.counters["handler_errors"] == 0


# ------------------------------------------------------------------------ fuzz
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    """One server in its own thread for every fuzz example (state carries over, as in a daemon)."""
    path = tmp_path_factory.mktemp("fuzz") / "c.sock"
    cfg = control_config(path, max_line_bytes=512, idle_timeout_s=30, max_connections=64)
    fake = FakeController()
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        server = ControlServer(cfg, fake, lambda: METRICS)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            box["server"], box["cancel"], box["token"] = server, nursery.cancel_scope, trio.lowlevel.current_trio_token()
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)
    box["path"], box["cfg"], box["examples"] = str(path), cfg, 0
    yield box
    trio.from_thread.run_sync(box["cancel"].cancel, trio_token=box["token"])
    thread.join(10)
    assert not thread.is_alive()


def _exchange(path: str, data: bytes, timeout: float = 10.0) -> tuple[list[bytes], bool]:
    """Send ``data`` then a ping sentinel; return the reply lines and whether the server closed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        try:
            s.sendall(data + b'\n{"id": "sentinel", "cmd": "ping"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        while b'"id":"sentinel"' not in buf:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return buf.split(b"\n")[:-1], True
            buf += chunk
        return buf.split(b"\n")[:-1], False
    finally:
        s.close()


def _expected(data: bytes, limit: int) -> tuple[list[Any], bool]:
    """What the server must answer to ``data + \\n + sentinel``: per line, a code or 'ok'; and closed?"""
    out: list[Any] = []
    for line in data.split(b"\n"):
        if len(line) > limit:
            return out + ["line_too_long"], True
        if not line.strip(b" \t\r"):
            continue
        try:
            req = P.parse_request(line)
            out.append(("ok", req.id, req.cmd))
        except P.RequestError as exc:
            out.append((exc.code, exc.req_id))
    return out + [("ok", "sentinel", "ping")], False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
request_objects = st.dictionaries(
    st.sampled_from(["v", "id", "cmd", "args"]) | st.text(max_size=5),
    st.sampled_from([*P.COMMANDS, "reboot", 1, 2, None, {}]) | json_values,
    max_size=5,
).map(lambda d: json.dumps(d).encode())
near_requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from([*P.COMMANDS, "Ping", "reboot", ""]) | json_values},
    optional={"v": st.sampled_from([1, 1, 2, "1", None, True]), "id": st.integers() | st.text(max_size=300) | json_values,
              "args": st.sampled_from([{}, None, [], {"x": 1}])},
).map(lambda d: json.dumps(d).encode())
lines = st.lists(
    near_requests | request_objects | st.binary(max_size=80) | st.text(max_size=60).map(str.encode)
    | st.sampled_from([b"", b" ", b"\r", b"{", b"}", b"\xff", b"null", b"[]", b"x" * 600]),
    max_size=6,
).map(b"\n".join)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=lines | st.binary(max_size=2000))
def test_fuzz_every_line_gets_a_well_formed_reply(fuzz_server: dict[str, Any], data: bytes) -> None:
    limit = fuzz_server["cfg"].max_line_bytes
    replies, closed = _exchange(fuzz_server["path"], data)
    expected, expect_closed = _expected(data, limit)
    fuzz_server["examples"] += 1
    assert closed == expect_closed, (data, replies)
    assert len(replies) == len(expected), (data, replies, expected)
    for line, exp in zip(replies, expected):
        obj = check_response(line)
        if exp[0] == "ok":
            assert obj["ok"] and obj["id"] == exp[1], (line, exp)
        elif exp == "line_too_long":
            assert obj["error"]["code"] == "line_too_long"
        else:
            assert not obj["ok"] and obj["error"]["code"] == exp[0] and obj["id"] == exp[1], (line, exp)


def test_fuzz_left_the_server_healthy(fuzz_server: dict[str, Any]) -> None:
    """Runs after the fuzz (same module fixture): the server still answers and never crashed a handler."""
    replies, closed = _exchange(fuzz_server["path"], b'{"cmd": "status"}')
    assert not closed and [check_response(r)["ok"] for r in replies] == [True, True]
    server: ControlServer = fuzz_server["server"]
    assert server.counters["handler_errors"] == 0 and server.counters["errors.internal"] == 0
    assert server.counters["connections"] >= 1 and server.active <= 1
    print(f"fuzz: {fuzz_server['examples']} examples, counters {dict(server.counters)}")


# ------------------------------------------------------------------------ socket setup
async def start_server(cfg: Any) -> None:
    """Start a server the way app.py does (``nursery.start``); setup errors come out bare."""
    error: ControlSocketError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(ControlServer(cfg, FakeController()).run)
        except ControlSocketError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def test_socket_mode_group_and_new_dir(tmp_path: Path) -> None:
    path = tmp_path / "run" / "hydrad" / "control.sock"
    async with serving(control_config(path, group=str(NOBODY))):
        st_sock = os.lstat(path)
        assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o660
        assert st_sock.st_gid == NOBODY and st_sock.st_uid == os.geteuid()
        st_dir = os.stat(path.parent)
        assert stat.S_IMODE(st_dir.st_mode) == 0o750 and st_dir.st_gid == NOBODY
    assert not path.exists(), "the socket must be removed when the server stops"


async def test_group_by_name_and_unknown_group(tmp_path: Path) -> None:
    import grp

    name = grp.getgrgid(NOBODY).gr_name if _has_gid(NOBODY) else None
    if name:
        async with serving(control_config(tmp_path / "a.sock", group=name)):
            assert os.lstat(tmp_path / "a.sock").st_gid == NOBODY
    with pytest.raises(ControlSocketError, match="no such group"):
        await start_server(control_config(tmp_path / "b.sock", group="no-such-group-hydrad"))


def _has_gid(gid: int) -> bool:
    import grp

    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


async def test_refuses_world_writable_dir(tmp_path: Path) -> None:
    d = tmp_path / "ww"
    d.mkdir()
    os.chmod(d, 0o1777)
    with pytest.raises(ControlSocketError, match="world-writable"):
        await start_server(control_config(d / "c.sock"))
    assert not (d / "c.sock").exists()


async def test_refuses_dir_owned_by_another_user(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ControlSocketError, match="owned by uid 65534"):
        await start_server(control_config(d / "c.sock"))


async def test_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    for make in (lambda p: p.write_text("precious"), lambda p: p.mkdir(), lambda p: p.symlink_to("/etc/passwd")):
        p = tmp_path / f"c{id(make)}.sock"
        make(p)
        with pytest.raises(ControlSocketError, match="not a socket"):
            await start_server(control_config(p))
        assert os.path.lexists(p)


async def test_removes_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a dead daemon's leftover: bound, nobody listening
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with serving(control_config(path)):
        c = await RawClient.connect(path)
        assert (await c.ask({"cmd": "ping"}))["ok"]
        # A second server on the same path must refuse, and must not take the socket away.
        with pytest.raises(ControlSocketError, match="already running"):
            await start_server(control_config(path))
        c = await RawClient.connect(path)
        assert (await c.ask({"cmd": "ping"}))["ok"]
    assert not path.exists()


async def test_socket_is_never_wider_than_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created under umask 0: the socket file is 0600 from the moment it exists until chmod."""
    seen: list[int] = []
    real_chmod = os.chmod

    def spy(path: Any, mode: int, *a: Any, **kw: Any) -> None:
        if str(path).endswith(".sock"):
            seen.append(stat.S_IMODE(os.lstat(path).st_mode))
        real_chmod(path, mode, *a, **kw)

    monkeypatch.setattr(os, "chmod", spy)
    old = os.umask(0)
    try:
        async with serving(control_config(tmp_path / "c.sock", mode=0o660)):
            assert stat.S_IMODE(os.lstat(tmp_path / "c.sock").st_mode) == 0o660
    finally:
        os.umask(old)
    assert seen == [0o600]


async def test_disabled_server_does_nothing(tmp_path: Path) -> None:
    cfg = control_config(tmp_path / "c.sock", enabled=False)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(ControlServer(cfg, FakeController()).run) is None
    assert not (tmp_path / "c.sock").exists()


def test_log_throttle() -> None:
    server = ControlServer(control_config("/nonexistent/c.sock"), FakeController())
    assert server._throttle("k") == 0
    assert server._throttle("k") is None and server._throttle("k") is None
    assert server._throttle("other") == 0
    last, skipped = server._log_gate["k"]
    server._log_gate["k"] = (last - 2.0, skipped)  # a second later
    assert server._throttle("k") == 2


def test_config_values_are_used(tmp_path: Path) -> None:
    cfg = config_from_dict({"control": {"socket": str(tmp_path / "x.sock"), "allow_uids": [1000], "allow_gids": [27],
                                        "max_connections": 2, "idle_timeout_s": 3.0, "max_line_bytes": 4096}}).control
    server = ControlServer(cfg, FakeController())
    assert server.path == tmp_path / "x.sock"
    assert server.allow.allows(PeerCred(1, 1000, 1000)) and server.allow.allows(PeerCred(1, 5, 27))
    assert not server.allow.allows(PeerCred(1, 5, 5))


# ------------------------------------------------------------------------ peers
def test_allow_list_rules() -> None:
    allow = AllowList.build([1000], [27], own_uid=999, own_gid=998)
    assert allow.allows(PeerCred(1, 0, 0))              # root
    assert allow.allows(PeerCred(1, 999, 5))            # the daemon's user
    assert allow.allows(PeerCred(1, 5, 998))            # the daemon's group (primary)
    assert allow.allows(PeerCred(1, 5, 5, (7, 998)))    # ... or supplementary
    assert allow.allows(PeerCred(1, 1000, 5))           # allow_uids
    assert allow.allows(PeerCred(1, 5, 5, (27,)))       # allow_gids, supplementary
    assert not allow.allows(PeerCred(1, 5, 5, (6, 7)))
    assert not allow.allows(PeerCred(1, 65534, 65534, None))


def _as_nobody(script: str, *, groups: list[int] = (), gid: int = NOBODY) -> list[str]:
    pre = (f"import os, socket, sys\nos.setgroups({list(groups)!r})\nos.setgid({gid})\nos.setuid({NOBODY})\n")
    return [sys.executable, "-c", pre + script]


_RAW_PING = """
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b'{"id": 1, "cmd": "ping"}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # refused before we spoke: the reply is waiting
buf = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    buf += d
    if buf.endswith(b"\\n"):
        break
print(buf.decode().strip())
s.settimeout(2.0)
try:
    print("EOF" if s.recv(65536) == b"" else "DATA")
except ConnectionResetError:
    print("RESET")
except socket.timeout:
    print("OPEN")
"""


async def _run(argv: list[str]) -> str:
    with trio.fail_after(30):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


async def test_peer_not_on_allow_list_is_refused_and_logged() -> None:
    # The socket is reachable by "nobody" through its group (0660, group nobody), as an operator's
    # would be; the allow-list is what refuses it.
    with shared_dir(group=NOBODY) as d, capture_logs() as logs:
        async with serving(control_config(d / "c.sock", group=str(NOBODY))) as server:
            out = (await _run(_as_nobody(_RAW_PING + "", groups=[]) + [str(d / "c.sock")])).splitlines()
            reply = check_response(out[0].encode())
            assert reply["error"]["code"] == "forbidden" and "uid 65534" in reply["error"]["message"]
            assert out[1] == "EOF"
            assert server.counters["refused"] == 1
            assert not any(name == "ping" for name, _ in server.controller.calls)
    refused = [e for e in logs if e["event"] == "control_peer_refused"]
    assert len(refused) == 1 and refused[0]["peer_uid"] == NOBODY and refused[0]["log_level"] == "warning"


async def test_allow_listed_uid_and_supplementary_gid_are_served() -> None:
    with shared_dir(group=NOBODY) as d:
        many = list(range(20000, 20300))  # more groups than getsockopt() reads through Python (256)
        for kw, groups in (({"allow_uids": (NOBODY,)}, []), ({"allow_gids": (4242,)}, [4242]),
                           ({"allow_gids": (20299,)}, many)):
            path = d / "c.sock"
            async with serving(control_config(path, group=str(NOBODY), **kw)) as server:
                out = (await _run(_as_nobody(_RAW_PING, groups=groups) + [str(path)])).splitlines()
                reply = check_response(out[0].encode())
                assert reply["ok"] and reply["result"]["pong"], (kw, reply)
                assert out[1] == "OPEN"  # an allowed peer may go on asking
                assert server.counters["refused"] == 0


async def test_filesystem_permissions_apply_before_the_allow_list() -> None:
    with shared_dir() as d:  # dir 0755, socket 0660 root:root: nobody cannot even connect
        async with serving(control_config(d / "c.sock", allow_uids=(NOBODY,))) as server:
            out = await _run(_as_nobody(_RAW_PING) + [str(d / "c.sock")])
            assert out.strip() == "EACCES"
            assert server.counters["connections"] == 0
