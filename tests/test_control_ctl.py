"""``hydrad ctl`` end to end, as a subprocess, against a real control socket."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from hydrad.control import client as C
from hydrad.control.ctl import build_parser, socket_path
from hydrad.control.ctl import main as ctl_inprocess

from .test_control_support import METRICS, NOBODY, FakeController, control_config, run_ctl, serving, shared_dir


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"expected a one-line reason, got {text!r}"
    return text.strip()


async def test_every_command_human_and_json(tmp_path: Path) -> None:
    fake = FakeController()
    sock = str(tmp_path / "c.sock")
    async with serving(control_config(sock), fake):
        r = await run_ctl(["ping", "--socket", sock])
        assert r.returncode == 0 and r.stdout.decode().startswith("pong (") and r.stderr == b""
        r = await run_ctl(["status", "--socket", sock])
        out = r.stdout.decode()
        assert r.returncode == 0 and "state:" in out and "connected" in out and "engine:" in out and "pid:" in out
        r = await run_ctl(["status", "--socket", sock, "--json"])
        obj = json.loads(r.stdout)
        assert r.returncode == 0 and obj["ok"] is True and obj["v"] == 1 and obj["result"]["session_id"] == "sess_1"
        r = await run_ctl(["mute", "-s", sock])
        assert r.returncode == 0 and "muted" in r.stdout.decode() and fake.muted
        r = await run_ctl(["unmute", "-s", sock, "--json"])
        assert r.returncode == 0 and json.loads(r.stdout)["result"] == {"muted": False} and not fake.muted
        r = await run_ctl(["metrics", "-s", sock])
        assert r.returncode == 0 and r.stdout.decode() == METRICS
        r = await run_ctl(["cancel", "-s", sock])
        assert r.returncode == 0 and r.stdout.decode().startswith("nothing to cancel")
        fake.in_flight = True
        r = await run_ctl(["cancel", "-s", sock])
        assert r.returncode == 0 and r.stdout.decode().strip() == \
            "cancelled response resp_1 (it was in flight; playback flushed)"
        assert [s for name, s in fake.calls if name == "cancel"] == ["control", "control"]


async def test_through_the_hydrad_command(tmp_path: Path) -> None:
    """``hydrad ctl`` as installed (cli.py delegates to ctl_main)."""
    sock = str(tmp_path / "c.sock")
    async with serving(control_config(sock)):
        with trio.fail_after(30):
            r = await trio.run_process([sys.executable, "-m", "hydrad.cli", "ctl", "status", "--socket", sock, "--json"],
                                       capture_stdout=True, capture_stderr=True, check=False, cwd="/")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"]["state"] == "connected"
    with trio.fail_after(30):
        r = await trio.run_process([sys.executable, "-m", "hydrad.cli", "ctl", "ping", "--socket", sock],
                                   capture_stdout=True, capture_stderr=True, check=False, cwd="/")
    assert r.returncode == C.EXIT_NOT_RUNNING and "not running" in one_line(r.stderr)


async def test_socket_from_env_and_config(tmp_path: Path) -> None:
    sock = str(tmp_path / "c.sock")
    conf = tmp_path / "hydrad.toml"
    conf.write_text(f'[control]\nsocket = "{sock}"\n')
    async with serving(control_config(sock)):
        r = await run_ctl(["ping", "--config", str(conf)])
        assert r.returncode == 0, r.stderr
        with trio.fail_after(30):
            r = await trio.run_process(
                [sys.executable, "-m", "hydrad.control.ctl", "ping"], env={**os.environ, "HYDRAD_CONTROL_SOCKET": sock},
                capture_stdout=True, capture_stderr=True, check=False, cwd="/")
        assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[control]\nsockt = 1\n")
    r = await run_ctl(["ping", "--config", str(bad)])
    assert r.returncode == C.EXIT_USAGE and "sockt" in one_line(r.stderr)


async def test_not_running(tmp_path: Path) -> None:
    r = await run_ctl(["status", "--socket", str(tmp_path / "nothing.sock")])
    assert r.returncode == C.EXIT_NOT_RUNNING and r.stdout == b""
    assert "not running" in one_line(r.stderr)
    # A stale socket file (a dead daemon's leftover): ECONNREFUSED, same exit.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    r = await run_ctl(["ping", "--socket", str(stale), "--json"])
    assert r.returncode == C.EXIT_NOT_RUNNING and "not running" in one_line(r.stderr)
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and obj["error"]["code"] == "not_running" and "not running" in obj["error"]["message"]


async def test_timeout_when_nobody_answers(tmp_path: Path) -> None:
    # Something listens but never accepts or answers (a wedged daemon).
    path = str(tmp_path / "wedged.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    try:
        t0 = trio.current_time()
        r = await run_ctl(["status", "--socket", path, "--timeout", "0.5"])
        assert r.returncode == C.EXIT_TIMEOUT and "timed out" in one_line(r.stderr)
        assert trio.current_time() - t0 < 20
    finally:
        s.close()


async def test_timeout_when_the_command_hangs(tmp_path: Path) -> None:
    fake = FakeController()
    fake.cancel_delay = 60
    sock = str(tmp_path / "c.sock")
    async with serving(control_config(sock), fake):
        r = await run_ctl(["cancel", "--socket", sock, "--timeout", "0.5"])
        assert r.returncode == C.EXIT_TIMEOUT and "timed out" in one_line(r.stderr)
        r = await run_ctl(["ping", "--socket", sock])  # the daemon is fine
        assert r.returncode == 0


async def test_daemon_error_and_busy_exit_1(tmp_path: Path) -> None:
    fake = FakeController()
    fake.fail = {"status"}
    sock = str(tmp_path / "c.sock")
    async with serving(control_config(sock, max_connections=1), fake):
        r = await run_ctl(["status", "--socket", sock])
        assert r.returncode == C.EXIT_ERROR and "internal" in one_line(r.stderr) and r.stdout == b""
        r = await run_ctl(["status", "--socket", sock, "--json"])
        assert r.returncode == C.EXIT_ERROR and json.loads(r.stdout)["error"]["code"] == "internal"
        held = await trio.open_unix_socket(sock)
        await held.send_all(b'{"cmd": "ping"}\n')
        await held.receive_some(4096)  # served: the one slot is taken
        r = await run_ctl(["ping", "--socket", sock])
        assert r.returncode == C.EXIT_ERROR and "busy" in one_line(r.stderr)
        await held.aclose()


async def test_refused_peer_exits_4() -> None:
    with shared_dir(group=NOBODY) as d:
        sock = str(d / "c.sock")
        async with serving(control_config(sock, group=str(NOBODY))) as server:
            r = await run_ctl(["status", "--socket", sock], uid=NOBODY)
            assert r.returncode == C.EXIT_REFUSED, r.stderr
            assert "not allowed" in one_line(r.stderr) and "65534" in r.stderr.decode()
            assert server.counters["refused"] == 1
            # The same user, once allowed, is served.
        async with serving(control_config(sock, group=str(NOBODY), allow_uids=(NOBODY,))):
            r = await run_ctl(["ping", "--socket", sock], uid=NOBODY)
            assert r.returncode == 0, r.stderr
    with shared_dir() as d:  # socket 0660 root:root: the file system refuses first
        sock = str(d / "c.sock")
        async with serving(control_config(sock)):
            r = await run_ctl(["ping", "--socket", sock], uid=NOBODY)
            assert r.returncode == C.EXIT_REFUSED and "permission denied" in one_line(r.stderr)


async def test_bad_reply_exits_6(tmp_path: Path) -> None:
    path = str(tmp_path / "imposter.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(4)

    async def imposter() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(4096)
            await conn.send(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(imposter)
        r = await run_ctl(["ping", "--socket", path])
    listener.close()
    assert r.returncode == C.EXIT_BAD_REPLY and "not" in one_line(r.stderr)


async def test_usage_errors() -> None:
    r = await run_ctl(["reboot"])
    assert r.returncode == C.EXIT_USAGE and b"invalid choice" in r.stderr
    r = await run_ctl(["ping", "--timeout", "0"])
    assert r.returncode == C.EXIT_USAGE
    r = await run_ctl(["--help"])
    assert r.returncode == 0 and b"cancel" in r.stdout and b"Exit status" in r.stdout


def test_socket_path_precedence(tmp_path: Path) -> None:
    p = build_parser()
    assert socket_path(p.parse_args(["ping", "-s", "/a"]), {"HYDRAD_CONTROL_SOCKET": "/b"}) == "/a"
    assert socket_path(p.parse_args(["ping"]), {"HYDRAD_CONTROL_SOCKET": "/b"}) == "/b"
    conf = tmp_path / "h.toml"
    conf.write_text('[control]\nsocket = "/c/d.sock"\n')
    assert socket_path(p.parse_args(["ping", "-c", str(conf)]), {}) == "/c/d.sock"


def test_in_process_main_writes_to_given_streams(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert ctl_inprocess(["ping", "-s", str(tmp_path / "none.sock")], stdout=out, stderr=err) == C.EXIT_NOT_RUNNING
    assert out.getvalue() == "" and err.getvalue().startswith("hydrad ctl ping: hydrad is not running")


async def test_round_trip_time(tmp_path: Path) -> None:
    """Measured, not a benchmark: the blocking client against the server, median of 200."""
    sock = str(tmp_path / "c.sock")
    async with serving(control_config(sock)):
        rtts = []
        for _ in range(200):
            reply = await trio.to_thread.run_sync(lambda: C.request(sock, "ping"))
            assert reply.response["ok"]
            rtts.append(reply.rtt_s)
        rtts.sort()
        print(f"ping round trip (connect+request+reply): median {rtts[100] * 1000:.2f} ms, "
              f"p95 {rtts[190] * 1000:.2f} ms")
        assert rtts[100] < 0.5


def test_client_still_reads_a_refusal_sent_before_it_spoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon may refuse and close before the request is written (EPIPE): the reply still counts."""
    import threading

    from hydrad.control import protocol as P

    path = str(tmp_path / "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.sendall(P.encode_error(None, "forbidden", "uid 1000 (gid 1000) is not allowed"))
        conn.close()

    t = threading.Thread(target=refuse)
    t.start()
    real_connect = C._connect

    def connect_then_wait(p: str, deadline: float) -> socket.socket:
        s = real_connect(p, deadline)
        t.join(5)  # the daemon has replied and closed before we send
        return s

    monkeypatch.setattr(C, "_connect", connect_then_wait)
    with pytest.raises(C.Refused) as info:
        C.call(path, "status")
    listener.close()
    assert info.value.exit_code == C.EXIT_REFUSED and "not allowed" in info.value.message
