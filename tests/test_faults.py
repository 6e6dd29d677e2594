"""Fault injection against the real simulator and real processes: each fault is injected for
real, recovery is timed against its bound, and nothing may leak (fds, threads, processes).

Not here (already covered elsewhere): the engine SIGKILLed / SIGSTOPped (tests/test_e2e.py),
the control socket flooded (tests/test_control_*), a hanging plugin (tests/test_plugins_*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest
import trio

from hydrad.config import Secret
from hydrad.sim.config import SimConfig, TurnAction
from hydrad.sim.server import Simulator

from .harness import HELLO, active_spans, daemon_at, read_wav
from .test_service_support import (
    StallingProxy, notify_listener, pids_with_env, resources,
)

pytestmark = pytest.mark.slow

SIM_PATH = "/waves/v1/s2s"


def report(name: str, **values: Any) -> None:
    """Measured figures, printed (``pytest -s``) for docs/benchmarks.md."""
    print(f"\n[fault] {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in values.items()))


# ============================================================================ in-process rig

def sim_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}{SIM_PATH}"


def appends(record: Any) -> int:
    return sum(1 for _, f in record.received if f.get("type") == "input_audio_buffer.append")


def assert_no_leak(before: Any, after: Any, engine_pids: tuple[int | None, int | None], what: str) -> None:
    # Sockets of the dead session are closed; a few fds of slack for trio/the simulator's own
    # listener (re-bound in some tests) and the speaker file being reopened.
    assert after.fds <= before.fds + 3, f"{what}: fds {before.fds} -> {after.fds}"
    assert after.threads <= before.threads + 1, f"{what}: threads {before.threads} -> {after.threads}"
    assert engine_pids[0] == engine_pids[1], f"{what}: the engine was restarted ({engine_pids})"
    assert len(after.children) <= len(before.children), f"{what}: children {before.children} -> {after.children}"


# ============================================================================ the service goes away

async def test_simulator_killed_mid_reply_reconnects_within_the_backoff_bound(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=8.0)}, realtime_factor=1.0))
    async with trio.open_nursery() as outer:
        scope_box: dict[str, trio.CancelScope] = {}

        async def serve(port: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                scope_box["scope"] = scope
                await sim.serve(port=port, task_status=task_status)

        port = await outer.start(serve, 0)
        async with daemon_at(tmp_path, sim_url(port), mic=[(HELLO, 0.3)]) as rig:
            d = rig.daemon
            await rig.wait_for(lambda: rig.events("response_audio_started"), what="the reply playing")
            await trio.sleep(0.5)
            before = resources()
            engine_pid = d.engine.pid
            t_kill = time.monotonic()
            scope_box["scope"].cancel()  # the service dies mid-reply: every connection is torn down
            await rig.wait_for(lambda: d.state != "connected", timeout=5, what="the loss detected")
            t_detect = rig.last_seen
            await trio.sleep(1.0)  # down for a while: refused connection attempts, backing off
            t_restart = time.monotonic()
            await outer.start(serve, port)
            await rig.wait_for(lambda: d.state == "connected" and len(sim.sessions) == 2, timeout=10,
                                      what="a new configured session")
            t_up = rig.last_seen
            await rig.wait_for(lambda: appends(sim.sessions[1]) > 25, what="audio on the new session")
            after = resources()
            # Backoff bound: max_s (0.5 s) + connect + handshake.
            assert t_detect - t_kill < 1.0
            assert t_up - t_restart < 0.5 + 1.5, f"reconnected {t_up - t_restart:.2f} s after the restart"
            assert d.last_end is not None and d.last_end.kind in ("network", "closed")
            # Nothing of the dead session's reply plays on: playback was flushed at the disconnect.
            await trio.sleep(0.3)
            x, rate = read_wav(rig.speaker)
            cut = int((t_detect - rig.t0 + 0.1) * rate)
            late = x[cut: int((t_up - rig.t0) * rate)]
            assert len(late) > rate // 2 and np.abs(late).max() == 0, "the dead session's reply kept playing"
            assert rig.events("session_disconnected")
            assert d.conversation.session_id == sim.sessions[1].session_id
            assert d.conversation.state_name() == "idle"
            assert_no_leak(before, after, (engine_pid, d.engine.pid), "simulator killed")
            report("simulator killed mid-reply", detect_s=t_detect - t_kill, reconnect_after_restart_s=t_up - t_restart,
                   fds=f"{before.fds}->{after.fds}", threads=f"{before.threads}->{after.threads}")
        outer.cancel_scope.cancel()


async def test_stalled_tcp_connection_is_detected_by_ping_within_the_bound(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(reply_s=1.0))
    interval, timeout = 0.5, 1.0
    async with trio.open_nursery() as outer:
        sim_port = await outer.start(sim.serve)
        proxy = StallingProxy(sim_port)
        port = await outer.start(proxy.serve)
        overrides = {"hydra": {"ping_interval_s": interval, "ping_timeout_s": timeout}}
        async with daemon_at(tmp_path, sim_url(port), overrides=overrides) as rig:
            d = rig.daemon
            await rig.wait_for(lambda: d.state == "connected", what="connected")
            await rig.wait_for(lambda: d.counters["uplink_frames_sent"] > 50, what="audio flowing")
            before = resources()
            engine_pid = d.engine.pid
            t_stall = proxy.stall()
            await rig.wait_for(lambda: d.counters["ping_timeouts"] >= 1, timeout=10, what="ping timeout")
            t_detect = rig.last_seen
            await rig.wait_for(lambda: d.state == "connected" and len(sim.sessions) == 2, timeout=10,
                                      what="reconnected through a fresh connection")
            t_up = rig.last_seen
            await rig.wait_for(lambda: appends(sim.sessions[1]) > 25, what="audio on the new session")
            proxy.release()  # the test's own sockets of the frozen connection
            await rig.wait_for(lambda: not sim.sessions[0].live, timeout=5, what="the simulator's old session closed")
            after = resources()
            # Bound: the stall starts somewhere in a ping interval; the pong is late after timeout.
            assert t_detect - t_stall <= interval + timeout + 0.7, f"detected after {t_detect - t_stall:.2f} s"
            assert t_detect - t_stall >= timeout - 0.05
            # Then: close handshake attempt (<= 2 s, nobody answers), backoff (<= 0.5 s), handshake.
            assert t_up - t_detect < 2.0 + 0.5 + 1.5
            assert d.counters["ping_timeouts"] == 1 and d.last_end.kind == "network"
            assert proxy.connections == 2
            assert_no_leak(before, after, (engine_pid, d.engine.pid), "tcp stall")
            report("tcp stall", detect_s=t_detect - t_stall, bound_s=interval + timeout,
                   reconnected_after_detect_s=t_up - t_detect, fds=f"{before.fds}->{after.fds}")
        outer.cancel_scope.cancel()


async def test_server_full_backs_off_with_jitter_up_to_its_own_cap(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(server_full=True))
    initial, cap, max_s = 0.2, 1.6, 0.3
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        connected_at: list[float] = []

        async def watch() -> None:
            seen = 0
            while True:
                if len(sim.sessions) > seen:
                    connected_at.extend([time.monotonic()] * (len(sim.sessions) - seen))
                    seen = len(sim.sessions)
                await trio.sleep(0.005)

        outer.start_soon(watch)
        overrides = {"reconnect": {"initial_s": initial, "max_s": max_s, "server_full_max_s": cap}}
        async with daemon_at(tmp_path, sim_url(port), overrides=overrides) as rig:
            d = rig.daemon
            await rig.wait_for(lambda: len(sim.sessions) >= 7, timeout=30, what="seven refused sessions")
            assert d.state in ("backoff", "connecting", "handshaking")
            assert d.last_end.kind == "server_full" and d.last_error["code"] == "server_full"
            assert all(r.closed == 1013 for r in sim.sessions[:6])
            gaps = [b - a for a, b in zip(connected_at, connected_at[1:])][:6]
            for i, gap in enumerate(gaps):
                base = min(cap, initial * 2 ** i)
                # Full jitter in [base/2, base], plus the connection's own time (slack on a busy box).
                assert base / 2 - 0.02 <= gap <= base + 0.8, f"gap {i} = {gap:.3f} s, base {base} s: {gaps}"
            assert max(gaps) > max_s + 0.3, "server_full must use its own cap, not reconnect.max_s"
            # Capacity comes back: the next attempt gets in, within one capped delay.
            sim.config = dataclasses.replace(sim.config, server_full=False)
            t_free = time.monotonic()
            await rig.wait_for(lambda: d.state == "connected", timeout=10, what="a session once not full")
            t_up = rig.last_seen
            assert t_up - t_free < cap + 1.0
            report("server_full + 1013", gaps_s=" ".join(f"{g:.2f}" for g in gaps), connected_after_free_s=t_up - t_free)
        outer.cancel_scope.cancel()


async def test_401_is_never_retried_in_a_loop_and_a_reload_retries_once(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(bad_keys=frozenset({"test-key"}), valid_keys=frozenset({"good-key"})))
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        async with daemon_at(tmp_path, sim_url(port), overrides={"reconnect": {"auth_retry_s": 600.0}}) as rig:
            d = rig.daemon
            await rig.wait_for(lambda: d.state == "auth_failed", what="auth_failed")
            await trio.sleep(3.0)
            assert [status for _, status, _ in sim.rejections] == [401], "a 401 was retried"
            assert sim.sessions == []
            assert d.last_error["code"] == "http_401" and d.status()["state"] == "auth_failed"
            # A new key (what SIGHUP does): exactly one new attempt, which succeeds.
            d.reload(d.cfg, Secret("good-key", "reload"))
            await rig.wait_for(lambda: d.state == "connected", timeout=5, what="connected with the new key")
            assert len(sim.rejections) == 1 and len(sim.sessions) == 1
        outer.cancel_scope.cancel()


async def test_401_with_a_short_retry_interval_is_paced_by_it(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(bad_keys=frozenset({"test-key"})))
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        async with daemon_at(tmp_path, sim_url(port), overrides={"reconnect": {"auth_retry_s": 1.0}}) as rig:
            await rig.wait_for(lambda: sim.rejections, what="the first 401")
            await trio.sleep(3.5)
            times = [t for t, _, _ in sim.rejections]
            assert 3 <= len(times) <= 5, f"{len(times)} attempts in 3.5 s with auth_retry_s = 1"
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert min(gaps) >= 0.95, f"401 retried after {min(gaps):.2f} s"
            assert rig.daemon.state == "auth_failed"
            report("401", attempts_in_3_5s=len(times), min_gap_s=min(gaps))
        outer.cancel_scope.cancel()


# ============================================================================ real `hydrad run` processes

HYDRAD = [sys.executable, "-m", "hydrad.cli"]


def write_run_config(tmp_path: Path, port: int, *, extra: str = "", mic_at: float | None = 0.5) -> Path:
    mic = f'mic = [{{ path = "{HELLO}", at = {mic_at} }}]' if mic_at is not None else "mic = []"
    path = tmp_path / "hydrad.toml"
    path.write_text(f"""
[hydra]
url = "{sim_url(port)}"
ping_interval_s = 1.0
ping_timeout_s = 2.0
[audio]
backend = "wav"
[audio.wav]
{mic}
speaker = "{tmp_path / 'speaker.wav'}"
[control]
enabled = false
[reconnect]
initial_s = 0.1
max_s = 0.5
{extra}
""")
    return path


@contextlib.asynccontextmanager
async def hydrad_run(tmp_path: Path, config: Path, *, stdout: Any = None, argv0: list[str] | None = None,
                     env: dict[str, str] | None = None) -> AsyncIterator[tuple[trio.Process, str]]:
    """``hydrad run --config config`` as a real child process; yields it and its env marker."""
    marker = f"HYDRAD_TEST_MARKER={uuid.uuid4().hex}"
    full_env = {**os.environ, "HYDRA_API_KEY": "test-key", marker.split("=")[0]: marker.split("=")[1], **(env or {})}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        if env is None or name not in env:
            full_env.pop(name, None)
    log = stdout if stdout is not None else open(tmp_path / "hydrad.log", "wb")
    proc = await trio.lowlevel.open_process([*(argv0 or HYDRAD), "run", "--config", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT, env=full_env)
    try:
        yield proc, marker
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in pids_with_env(marker):
            os.kill(pid, signal.SIGKILL)
        if stdout is None:
            log.close()


def log_tail(tmp_path: Path) -> str:
    try:
        return (tmp_path / "hydrad.log").read_text(errors="replace")[-3000:]
    except OSError:
        return ""


async def test_sigterm_exits_0_within_seconds_and_closes_with_1000(tmp_path: Path) -> None:
    sim = Simulator(SimConfig(reply_s=6.0, realtime_factor=1.0))
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        async with hydrad_run(tmp_path, write_run_config(tmp_path, port)) as (proc, marker):
            with trio.move_on_after(30):
                while not (sim.sessions and sim.sessions[0].responses and appends(sim.sessions[0]) > 100):
                    await trio.sleep(0.05)
            assert sim.sessions and sim.sessions[0].responses, log_tail(tmp_path)
            await trio.sleep(0.5)  # mid-reply: the agent is talking
            engine = [p for p in pids_with_env(marker) if p != proc.pid]
            assert engine, "no engine child found"
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            t_exit = time.monotonic()
            assert proc.returncode == 0, f"exit status {proc.returncode}\n{log_tail(tmp_path)}"
            assert t_exit - t_term < 5.0
            rec = sim.sessions[0]
            await trio.sleep(0.2)
            assert rec.closed == 1000, f"closed with {rec.closed}"
            assert rec.received_of("response.cancel"), "the in-flight response was not cancelled"
            assert pids_with_env(marker) == [], "a process of the daemon outlived it"
            assert len(sim.sessions) == 1
            report("SIGTERM", exit_s=t_exit - t_term, close_code=rec.closed)
        outer.cancel_scope.cancel()


async def test_sigterm_while_never_connected_exits_0(tmp_path: Path) -> None:
    """SIGTERM while the key is refused: nothing was ever connected, the shutdown must still be clean."""
    sim = Simulator(SimConfig(bad_keys=frozenset({"test-key"})))
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        for attempt in range(5):  # the race needs the writer runnable at stop (trio shuffles): try a few times
            async with hydrad_run(tmp_path, write_run_config(tmp_path, port)) as (proc, marker):
                with trio.move_on_after(15):
                    while len(sim.rejections) <= attempt:
                        await trio.sleep(0.05)
                await trio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                assert proc.returncode == 0, f"exit status {proc.returncode}\n{log_tail(tmp_path)}"
                # Since the engine client survives any error, the race shows as a "failed" engine
                # that is killed (and restarted) in the middle of the shutdown.
                log = (tmp_path / "hydrad.log").read_text(errors="replace")
                assert "BusyResourceError" not in log and "engine_failed" not in log, log_tail(tmp_path)
        outer.cancel_scope.cancel()


async def test_disk_full_log_target_does_not_kill_audio(tmp_path: Path) -> None:
    """stdout and stderr on /dev/full (every write fails with ENOSPC): the conversation goes on."""
    sim = Simulator(SimConfig(reply_s=1.0))
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        with open("/dev/full", "wb") as full:
            argv0 = HYDRAD
            async with hydrad_run(tmp_path, write_run_config(tmp_path, port), stdout=full, argv0=argv0) as (proc, _):
                with trio.move_on_after(30):
                    while proc.returncode is None and not (sim.sessions and any(
                            r.status == "completed" for r in sim.sessions[0].responses)):
                        await trio.sleep(0.05)
                assert proc.returncode is None, f"hydrad died with status {proc.returncode} writing logs to /dev/full"
                n0, t0 = appends(sim.sessions[0]), time.monotonic()
                await trio.sleep(2.0)
                rate = (appends(sim.sessions[0]) - n0) / (time.monotonic() - t0)
                assert rate > 45, f"uplink at {rate:.1f} frames/s"
                x, sr = read_wav(tmp_path / "speaker.wav")
                spans = [s for s in active_spans(x, sr) if s[1] - s[0] > 0.5]
                assert spans, "the reply was not played"
                assert proc.returncode is None
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                assert proc.returncode == 0
        outer.cancel_scope.cancel()


async def test_hydrad_run_speaks_sd_notify_and_reloads(tmp_path: Path) -> None:
    """A real ``hydrad run`` under a stand-in systemd: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""
    sim = Simulator(SimConfig(bad_keys=frozenset({"test-key"}), valid_keys=frozenset({"good-key"})))
    key_file = tmp_path / "api-key"
    key_file.write_text("test-key\n")
    async with trio.open_nursery() as outer:
        port = await outer.start(sim.serve)
        config = write_run_config(tmp_path, port, mic_at=None)
        config.write_text(config.read_text().replace("[hydra]\n", f'[hydra]\napi_key_file = "{key_file}"\n', 1))
        with notify_listener(tmp_path) as nl:
            env = {"NOTIFY_SOCKET": nl.env, "WATCHDOG_USEC": "1000000", "HYDRA_API_KEY": ""}
            async with hydrad_run(tmp_path, config, env=env) as (proc, marker):
                ready = await nl.wait_for("READY", "1", timeout=20)
                assert ready.pid == proc.pid
                assert ready.fields["STATUS"].startswith("NOT CONNECTED: API key refused"), ready.fields
                await trio.sleep(2.0)
                assert len(sim.rejections) == 1, "401 retried in a loop"
                assert len(nl.with_key("WATCHDOG")) >= 3
                # The engine child must not have inherited the notify socket.
                engine = [p for p in pids_with_env(marker) if p != proc.pid]
                assert engine and all(b"NOTIFY_SOCKET" not in Path(f"/proc/{p}/environ").read_bytes() for p in engine)
                key_file.write_text("good-key\n")
                proc.send_signal(signal.SIGHUP)
                await nl.wait_for("RELOADING", "1", timeout=5)
                with trio.move_on_after(10):
                    while not any(s.startswith("connected to") for s in nl.statuses()):
                        await trio.sleep(0.05)
                assert any(s.startswith("connected to") for s in nl.statuses()), nl.statuses()
                assert len(sim.sessions) == 1
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                assert proc.returncode == 0
                msgs = nl.snapshot()
                stop = [i for i, m in enumerate(msgs) if m.fields.get("STOPPING") == "1"]
                assert len(stop) == 1 and not any("WATCHDOG" in m.fields for m in msgs[stop[0]:])
                assert {m.pid for m in msgs} == {proc.pid}
                assert sim.sessions[0].closed == 1000
        outer.cancel_scope.cancel()


# ============================================================================ soak

async def test_short_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = await trio.run_process(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "soak.py"), "--short", "--json", str(out)],
        capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    import json

    r = json.loads(out.read_text())
    # Turns scripted to fail do not complete; each fault may cost one more (spoken while down).
    assert r["turns_completed"] >= r["turns_scripted"] - r["turns_scripted_to_fail"] - r["faults_injected"], r
    assert r["faults_recovered"] == r["faults_injected"] >= 3, r
    assert r["barge_ins"] >= 2 and r["tool_calls"] >= 2, r
    assert r["fds"]["after"] - r["fds"]["before"] <= 3, r
    assert r["threads"]["after"] - r["threads"]["before"] <= 1, r
    assert r["leaked_processes"] == [], r
    print("\n[soak --short] " + json.dumps({k: r[k] for k in ("turns_scripted", "turns_completed", "faults_injected",
                                                             "faults_recovered", "rss_kb", "fds", "threads")}))
