"""The exec plugin against real subprocesses."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import structlog
import trio

import hydrad_exec
from hydrad.config import config_from_dict
from hydrad.events import Event, EventBus
from hydrad.hooks import HookDispatcher, PluginError, load_plugins

# A tiny program that appends what it got (stdin, $HYDRAD_EVENT, argv) as one JSON line to argv[1].
RECORDER = ("import json, os, sys, time; data = sys.stdin.read(); "
            "open(sys.argv[1], 'a').write(json.dumps({'stdin': data, 'event': os.environ.get('HYDRAD_EVENT'), "
            "'extra': os.environ.get('EXTRA'), 'args': sys.argv[2:], 'cwd': os.getcwd(), 't': time.monotonic()}) + '\\n')")


def recorder(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", RECORDER, str(out), *args]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def wait_for_lines(path: Path, n: int, timeout: float = 15.0) -> list[dict]:
    with trio.move_on_after(timeout):
        while len(lines(path)) < n:
            await trio.sleep(0.02)
        return lines(path)
    raise AssertionError(f"{path}: {len(lines(path))} of {n} lines after {timeout} s")


def ctx_for(table: dict):
    plugins = load_plugins(config_from_dict({"plugins": {"exec": table}}, "t"), extra=[("exec", hydrad_exec.plugin)],
                           entry_points=False)
    return plugins, plugins["exec"].ctx


# ============================================================================ through the daemon


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.jsonl"


@pytest.fixture
def hydrad_plugins():
    return [("exec", hydrad_exec.plugin)]


@pytest.fixture
def hydrad_config(out: Path, tmp_path: Path):
    return {"plugins": {"exec": {"commands": [
        {"events": ["speech_started", "user_turn_done"], "argv": recorder(out, "$HOME;echo pwned", "a b"),
         "env": {"EXTRA": "yes"}, "cwd": str(tmp_path)},
        {"events": ["response_done"], "shell": f"cat >> {tmp_path / 'shell.txt'}"},
    ]}}}


async def test_commands_run_on_their_events_with_the_event_as_json_on_stdin(hydrad, out: Path, tmp_path: Path) -> None:
    await hydrad.say("hello", seconds=1.0)
    await hydrad.wait_for_event("response_done")
    got = await wait_for_lines(out, 2)
    assert [g["event"] for g in got] == ["speech_started", "user_turn_done"]  # in event order
    first = json.loads(got[0]["stdin"])
    bus_event = hydrad.events_named("speech_started")[0]
    assert first["type"] == "speech_started" and first["data"] == bus_event.fields
    assert abs(first["timestamp"] - time.time()) < 30
    assert json.loads(got[1]["stdin"])["data"]["status"] == "completed"
    # argv runs without a shell: metacharacters and spaces arrive literally
    assert got[0]["args"] == ["$HOME;echo pwned", "a b"]
    assert got[0]["extra"] == "yes" and got[0]["cwd"] == str(tmp_path)
    # shell = "..." is the explicit opt-in to /bin/sh
    shell = tmp_path / "shell.txt"
    with trio.fail_after(10):
        while not shell.exists() or not shell.read_text().endswith("\n"):
            await trio.sleep(0.02)
    assert json.loads(shell.read_text().splitlines()[0])["type"] == "response_done"
    assert hydrad_exec.plugin.stats["ok"] >= 3 and hydrad_exec.plugin.stats["failed"] == 0


# ============================================================================ one command at a time


async def test_a_command_past_its_timeout_is_killed_and_a_failure_is_logged_with_stderr(tmp_path: Path) -> None:
    _, ctx = ctx_for({})
    pidfile = tmp_path / "pid"
    slow = hydrad_exec.Command(frozenset({"*"}), (sys.executable, "-c",
                               f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"),
                               None, timeout_s=0.5)
    t = time.monotonic()
    assert await hydrad_exec.plugin.run_one(ctx, slow, "speech_started", b"{}\n") is None
    assert time.monotonic() - t < 5
    pid = int(pidfile.read_text())
    with trio.fail_after(5):
        while True:  # reaped: the process is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await trio.sleep(0.05)
    failing = hydrad_exec.Command(frozenset({"*"}), (sys.executable, "-c", "import sys; sys.stderr.write('no led'); sys.exit(3)"),
                                  None, timeout_s=5)
    with structlog.testing.capture_logs() as logs:
        assert await hydrad_exec.plugin.run_one(ctx, failing, "speech_started", b"{}\n") == 3
        assert await hydrad_exec.plugin.run_one(ctx, hydrad_exec.Command(frozenset({"*"}), ("/nonexistent/led",), None, 5),
                                                "speech_started", b"{}\n") is None
    [status] = [e for e in logs if e["event"] == "exec_exit_status"]
    assert status["status"] == 3 and status["stderr"] == "no led" and status["plugin"] == "exec"
    [missing] = [e for e in logs if e["event"] == "exec_failed"]
    assert "FileNotFoundError" in missing["error"]


async def test_events_never_wait_for_commands_a_full_queue_drops_and_counts(tmp_path: Path, nursery) -> None:
    out = tmp_path / "slow.jsonl"
    slow = recorder(out)
    slow[2] = "import time; time.sleep(0.3); " + slow[2]
    plugins, _ = ctx_for({"commands": [{"events": ["speech_started"], "argv": slow, "queue_size": 2}]})
    bus = EventBus()
    dispatcher = HookDispatcher(plugins, None, bus)
    await nursery.start(dispatcher.run)
    worst = 0.0
    for i in range(10):
        t = time.perf_counter()
        bus.publish(Event("speech_started", {"i": i}))
        worst = max(worst, time.perf_counter() - t)
        await trio.sleep(0.005)
    assert worst < 0.01
    got = await wait_for_lines(out, 3)
    await trio.sleep(0.8)
    got = lines(out)
    assert hydrad_exec.plugin.stats["dropped"] == 10 - len(got) > 0
    seq = [json.loads(g["stdin"])["data"]["i"] for g in got]
    assert seq == sorted(seq) and seq[0] == 0  # in order, the oldest first
    await dispatcher.aclose()


async def test_shutdown_lets_queued_commands_finish(tmp_path: Path, nursery) -> None:
    out = tmp_path / "out.jsonl"
    plugins, _ = ctx_for({"commands": [{"events": ["session_disconnected"], "argv": recorder(out)}]})
    bus = EventBus()
    dispatcher = HookDispatcher(plugins, None, bus)
    await nursery.start(dispatcher.run)
    bus.publish(Event("session_disconnected", {"reason": "shutdown"}))
    await dispatcher.aclose()
    assert [g["event"] for g in lines(out)] == ["session_disconnected"]


# ============================================================================ settings


@pytest.mark.parametrize(("table", "message"), [
    ({"commands": [{"events": ["x"], "argv": ["a"], "shell": "a"}]}, "commands[0]: give exactly one of argv"),
    ({"commands": [{"events": ["x"]}]}, "commands[0]: give exactly one of argv"),
    ({"commands": [{"events": [], "argv": ["a"]}]}, "commands[0].events: expected a non-empty list"),
    ({"commands": [{"events": ["x"], "argv": "led on"}]}, "commands[0].argv: expected a non-empty list of strings"),
    ({"commands": [{"events": ["x"], "argv": ["a"], "timeout": 3}]}, "commands[0]: unknown key(s) ['timeout']"),
    ({"timeout_s": 0}, "timeout_s = 0: expected a number of seconds > 0"),
    ({"commands": {"events": ["x"]}}, "commands: expected a list of tables"),
])
def test_bad_settings_are_reported_under_the_plugins_name(table: dict, message: str) -> None:
    with pytest.raises(PluginError) as exc:
        load_plugins(config_from_dict({"plugins": {"exec": table}}, "t"))
    [problem] = exc.value.problems
    assert problem.startswith("[plugins.exec]: ") and message in problem


def test_installed_through_its_entry_point() -> None:
    plugins = load_plugins(config_from_dict({}, "t"))
    assert plugins["exec"].obj is hydrad_exec.plugin and plugins["exec"].dist == "hydrad-exec"
