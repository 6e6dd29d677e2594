"""sd_notify against a real datagram socket standing in for systemd, and the readiness /
status / watchdog policy, on its own and on a real daemon (simulator + engine child)."""

from __future__ import annotations

import collections
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from hydrad.config import config_from_dict
from hydrad.pipeline.connection import SessionEnd
from hydrad.service.health import HealthPolicy, ServiceMonitor
from hydrad.service.notify import Notifier, parse_address, watchdog_usec
from hydrad.sim.config import SimConfig

from .harness import running
from .test_service_support import notify_listener


# ============================================================================ sd_notify

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_every_message_reaches_a_real_notify_socket(tmp_path: Path, abstract: bool) -> None:
    with notify_listener(tmp_path, abstract=abstract) as nl:
        env = {"NOTIFY_SOCKET": nl.env, "WATCHDOG_USEC": "5000000"}
        n = Notifier.from_environ(env)
        assert n.enabled and n.watchdog_usec == 5_000_000
        assert n.ready("connected to api (session s1)")
        assert n.status("reconnecting:\nclosed by the service with 1011")
        assert n.watchdog()
        assert n.reloading()
        assert n.stopping()
        with trio.fail_after(5):
            while len(nl.snapshot()) < 5:
                await trio.sleep(0.01)
        msgs = nl.snapshot()
        assert [m.text.split("\n")[0] for m in msgs] == ["READY=1", "STATUS=reconnecting: closed by the service with 1011",
                                                          "WATCHDOG=1", "RELOADING=1", "STOPPING=1"]
        assert msgs[0].fields == {"READY": "1", "STATUS": "connected to api (session s1)"}
        assert int(msgs[3].fields["MONOTONIC_USEC"]) == pytest.approx(time.monotonic() * 1e6, abs=10e6)
        # The kernel's credentials on each datagram name us: what NotifyAccess=main checks.
        assert {m.pid for m in msgs} == {os.getpid()}
        n.close()


def test_unset_notify_socket_is_a_silent_noop() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and not n.watchdog_enabled
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False
    assert n.errors == 0 and n.sent == []


def test_unset_environment_hides_the_socket_from_children(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    n = Notifier.from_environ(env, unset=True)
    assert n.address == "/run/systemd/notify" and n.watchdog_usec == 1000
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize("value, expected", [
    ("@/org/freedesktop/systemd1/notify/123", b"\0/org/freedesktop/systemd1/notify/123"),
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("", None), (None, None), ("vsock:2:1234", None), ("relative/path", None),
])
def test_parse_address(value: str | None, expected: Any) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # leaked from a parent: not ours
    ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "-5"}, None), ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None), ({}, None),
])
def test_watchdog_usec_parsing(env: dict[str, str], expected: int | None) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert watchdog_usec(env) == expected


async def test_a_vanished_socket_is_counted_not_raised_and_a_new_one_is_used(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    n = Notifier(str(path))
    assert n.ready() is False and n.status("a") is False
    assert n.errors == 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        assert n.watchdog() is True
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()
        n.close()


def test_status_is_flattened_to_one_line() -> None:
    n = Notifier(None)
    n.status("a\nb\r\n  c")
    assert n.last_status == "a b c"


# ============================================================================ health policy (stub daemon)

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stub_daemon(**cfg: Any) -> SimpleNamespace:
    return SimpleNamespace(
        cfg=config_from_dict(cfg, "test"), state="connecting", gate_open=False, counters=collections.Counter(),
        engine=SimpleNamespace(state="running", restarts=0, pid=42, last_stats={}), sessions=0,
        configured_event=trio.Event(), last_end=None, conversation=None, muted=False, stopped=trio.Event())


def test_health_uplink_must_advance_while_connected() -> None:
    clock, d = Clock(), stub_daemon()
    m = ServiceMonitor(d, Notifier(None), HealthPolicy(uplink_stall_s=3.0), clock=clock)
    d.state, d.gate_open, d.sessions = "connected", True, 1
    for _ in range(10):  # streaming: fine
        clock.t += 0.5
        d.counters["uplink_frames_sent"] += 25
        d.engine.last_stats = {}
        assert m.check().ok
    clock.t += 2.9
    d.engine.last_stats = {}
    assert m.check().ok
    clock.t += 0.2
    d.engine.last_stats = {}
    h = m.check()
    assert not h.ok and "uplink stalled" in h.reasons[0]
    d.counters["uplink_frames_sent"] += 1
    assert m.check().ok
    # Not connected (backoff): the uplink is allowed to stand still.
    d.state, d.gate_open = "backoff", False
    clock.t += 5
    d.engine.last_stats = {}
    assert m.check().ok


def test_health_engine_must_answer_or_its_restart_loop_must_move() -> None:
    clock, d = Clock(), stub_daemon(pipeline={"engine_hang_s": 3.0})
    d.state = "auth_failed"  # a session-loop phase without a bound: only the engine matters here
    m = ServiceMonitor(d, Notifier(None), HealthPolicy(engine_stuck_s=30.0), clock=clock)
    assert m.check().ok  # first look at the engine
    clock.t += 7.9  # hang_s + 5 = 8 s without a STATS report
    assert m.check().ok
    clock.t += 0.2
    assert "engine running but silent" in m.check().reasons[0]
    d.engine.last_stats = {"new": 1}
    assert m.check().ok
    # Restarting every few seconds (no device): progress, healthy.
    for i in range(20):
        d.engine.state = "starting" if i % 2 else "restarting"
        d.engine.restarts += i % 2
        clock.t += 4
        assert m.check().ok
    # Stuck in one state with no restart for longer than engine_stuck_s: unhealthy.
    clock.t += 30.5
    assert any("engine stuck in 'starting'" in r for r in m.check().reasons)


def test_health_session_loop_phases_are_bounded_except_auth_failed() -> None:
    clock, d = Clock(), stub_daemon(hydra={"connect_timeout_s": 5.0},
                                    reconnect={"server_full_max_s": 60.0, "auth_retry_s": 600.0})
    m = ServiceMonitor(d, Notifier(None), clock=clock)
    d.state = "connecting"
    assert m.check().ok
    clock.t += 19.9  # 2 * 5 + 10
    d.engine.last_stats = {}
    assert m.check().ok
    clock.t += 0.2
    d.engine.last_stats = {}
    assert "session loop stuck in 'connecting'" in m.check().reasons[0]
    d.state = "backoff"
    d.counters["reconnects.network"] += 1
    assert m.check().ok
    clock.t += 69.9  # server_full_max_s + 10
    d.engine.last_stats = {}
    assert m.check().ok
    clock.t += 0.2
    d.engine.last_stats = {}
    assert not m.check().ok
    d.state = "auth_failed"  # waits for a reload or auth_retry_s by design: healthy
    clock.t += 500
    d.engine.last_stats = {}
    assert m.check().ok


def test_readiness_rules() -> None:
    clock, d = Clock(), stub_daemon()
    m = ServiceMonitor(d, Notifier(None), HealthPolicy(ready_bound_s=30), clock=clock)
    d.engine.state = "starting"
    assert m.readiness() is None
    d.engine.state = "running"
    assert m.readiness() is None  # still connecting
    d.state, d.last_end = "backoff", SessionEnd("network", None, "ConnectionRefusedError")
    assert m.readiness() == "service unreachable, retrying"
    d.state = "auth_failed"
    assert m.readiness() == "service unreachable, retrying"
    d.state = "connecting"
    d.configured_event.set()
    assert m.readiness() == "session configured"
    d2 = stub_daemon()
    m2 = ServiceMonitor(d2, Notifier(None), HealthPolicy(ready_bound_s=30), clock=clock)
    d2.engine.state = "restarting"
    clock.t += 29.9
    assert m2.readiness() is None
    clock.t += 0.2
    assert m2.readiness() == "readiness bound (30 s) reached"


def test_status_lines_say_what_is_wrong() -> None:
    d = stub_daemon(hydra={"url": "wss://api.smallest.ai/waves/v1/s2s"})
    m = ServiceMonitor(d, Notifier(None))
    d.state = "auth_failed"
    assert "API key refused" in m.status_line() and "systemctl reload hydrad" in m.status_line()
    d.state, d.last_end = "backoff", SessionEnd("server_full", 1013, "service at capacity (server_full / 1013)")
    assert "service busy (server_full / 1013)" in m.status_line()
    d.last_end = SessionEnd("closed", 1011, "closed by the service with 1011")
    assert m.status_line() == "reconnecting to api.smallest.ai: closed by the service with 1011"
    d.engine.state, d.engine.restarts = "restarting", 3
    assert m.status_line().endswith("audio engine restarting (restarts 3)")


# ============================================================================ a real daemon

def monitor_for(daemon: Any, env: str, period_s: float | None = 0.2, **policy: Any) -> ServiceMonitor:
    usec = int(period_s * 2e6) if period_s else None
    return ServiceMonitor(daemon, Notifier(parse_address(env), watchdog_usec=usec),
                          HealthPolicy(tick_s=0.05, **policy))


@pytest.mark.slow
async def test_real_daemon_ready_status_watchdog_stopping_sequence(tmp_path: Path) -> None:
    with notify_listener(tmp_path) as nl:
        async with running(tmp_path) as rig:
            monitor = monitor_for(rig.daemon, nl.env)
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                ready = await nl.wait_for("READY", "1")
                configured = rig.events("session_configured")
                assert configured and ready.t >= configured[0].t
                assert rig.daemon.engine.state == "running"
                assert ready.fields["STATUS"].startswith("connected to 127.0.0.1:")
                assert monitor.ready_reason == "session configured"
                await trio.sleep(2.0)
                t_stop = time.monotonic()
                rig.daemon.request_stop()
                with trio.fail_after(5):
                    await rig.daemon.stopped.wait()
            await trio.sleep(0.2)
            msgs = nl.snapshot()
            assert {m.pid for m in msgs} == {os.getpid()}
            assert len([m for m in msgs if m.fields.get("READY") == "1"]) == 1
            pings = [m.t for m in msgs if m.fields.get("WATCHDOG") == "1" and m.t < t_stop]
            after_ready = [t for t in pings if t > ready.t]
            assert len(after_ready) >= 7, f"{len(after_ready)} pings in 2 s at a 0.2 s period"
            gaps = [b - a for a, b in zip(after_ready, after_ready[1:])]
            assert max(gaps) < 0.6, f"watchdog gaps {gaps}"
            stopping = [i for i, m in enumerate(msgs) if m.fields.get("STOPPING") == "1"]
            assert len(stopping) == 1
            assert not any(m.fields.get("WATCHDOG") for m in msgs[stopping[0]:]), "a ping after STOPPING=1"
            assert msgs[stopping[0]].t - t_stop < 1.0
            print(f"\n[service] READY {ready.t - configured[0].t:.3f} s after session_configured; "
                  f"{len(after_ready)} pings in 2 s, max gap {max(gaps):.3f} s; STOPPING {msgs[stopping[0]].t - t_stop:.3f} s "
                  f"after the stop request")
            assert rig.sim.sessions[0].closed == 1000


@pytest.mark.slow
async def test_ready_while_the_service_is_unreachable(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    with notify_listener(tmp_path) as nl:
        async with running(tmp_path, overrides={"hydra": {"url": f"ws://127.0.0.1:{dead_port}/waves/v1/s2s"}}) as rig:
            monitor = monitor_for(rig.daemon, nl.env, ready_bound_s=30)
            async with trio.open_nursery() as nursery:
                t0 = time.monotonic()
                await nursery.start(monitor.run)
                ready = await nl.wait_for("READY", "1", timeout=10)
                assert ready.t - t0 < 5.0
                assert monitor.ready_reason == "service unreachable, retrying"
                assert ready.fields["STATUS"].startswith(f"reconnecting to 127.0.0.1:{dead_port}:")
                # Retrying is healthy: the watchdog keeps being fed.
                n = len(nl.with_key("WATCHDOG"))
                await trio.sleep(1.0)
                assert len(nl.with_key("WATCHDOG")) - n >= 3
                nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_ready_after_401_says_the_key_was_refused(tmp_path: Path) -> None:
    with notify_listener(tmp_path) as nl:
        async with running(tmp_path, sim_config=SimConfig(bad_keys=frozenset({"test-key"}))) as rig:
            monitor = monitor_for(rig.daemon, nl.env)
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                ready = await nl.wait_for("READY", "1", timeout=10)
                assert ready.fields["STATUS"].startswith("NOT CONNECTED: API key refused")
                assert monitor.health.ok
                nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_readiness_bound_when_the_connect_hangs(tmp_path: Path) -> None:
    held: list[trio.SocketStream] = []

    async def black_hole(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    with notify_listener(tmp_path) as nl:
        async with trio.open_nursery() as outer:
            listeners = await outer.start(trio.serve_tcp, black_hole, 0)
            port = listeners[0].socket.getsockname()[1]
            overrides = {"hydra": {"url": f"ws://127.0.0.1:{port}/waves/v1/s2s", "connect_timeout_s": 30.0}}
            async with running(tmp_path, overrides=overrides) as rig:
                monitor = monitor_for(rig.daemon, nl.env, ready_bound_s=1.5)
                async with trio.open_nursery() as nursery:
                    t0 = time.monotonic()
                    await nursery.start(monitor.run)
                    ready = await nl.wait_for("READY", "1", timeout=10)
                    assert 1.4 <= ready.t - t0 < 3.0
                    assert monitor.ready_reason == "readiness bound (1.5 s) reached"
                    assert rig.daemon.state == "connecting"
                    assert ready.fields["STATUS"].startswith("connecting to 127.0.0.1:")
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()


@pytest.mark.slow
async def test_watchdog_pings_stop_while_the_uplink_is_wedged_and_resume_after(tmp_path: Path) -> None:
    with notify_listener(tmp_path) as nl:
        async with running(tmp_path) as rig:
            monitor = monitor_for(rig.daemon, nl.env, uplink_stall_s=1.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                await nl.wait_for("READY", "1")
                await rig.wait_for(lambda: rig.daemon.counters["uplink_frames_sent"] > 20, what="uplink")
                await trio.sleep(0.5)
                # Wedge the uplink: the socket still answers pings, but no frame goes out.
                ws = rig.daemon.ws
                release = trio.Event()
                real_send = ws.send_message

                async def wedged(message: Any) -> None:
                    await release.wait()
                    await real_send(message)

                ws.send_message = wedged
                t_wedge = time.monotonic()
                await trio.sleep(3.0)
                pings = [m.t for m in nl.with_key("WATCHDOG")]
                last_before = max(t for t in pings if t < t_wedge + 3.0)
                # Stall threshold 1.0 s + one period 0.2 s + scheduling slack.
                assert last_before - t_wedge < 1.8, f"pinged {last_before - t_wedge:.2f} s into the wedge"
                assert time.monotonic() - last_before > 1.0
                assert any("UNHEALTHY: uplink stalled" in s for s in nl.statuses())
                assert monitor.withheld >= 3
                assert rig.daemon.state == "connected"  # the socket itself looks fine
                release.set()
                del ws.send_message
                t_release = time.monotonic()
                await trio.sleep(1.0)
                resumed = [t for t in (m.t for m in nl.with_key("WATCHDOG")) if t > t_release]
                assert resumed and resumed[0] - t_release < 0.6
                print(f"\n[service] uplink wedge: last ping {last_before - t_wedge:.2f} s into the wedge "
                      f"(stall bound 1.0 s + period 0.2 s); pings resumed {resumed[0] - t_release:.2f} s after release")
                assert monitor.health.ok and "UNHEALTHY" not in nl.statuses()[-1]
                nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_watchdog_pings_stop_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    with notify_listener(tmp_path) as nl:
        async with running(tmp_path) as rig:
            monitor = monitor_for(rig.daemon, nl.env)
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                await nl.wait_for("READY", "1")
                await trio.sleep(0.5)
                t_block = time.monotonic()
                time.sleep(1.5)  # a synchronous call wedges the whole daemon
                t_unblock = time.monotonic()
                await trio.sleep(0.8)
                pings = [m.t for m in nl.with_key("WATCHDOG")]
                assert not [t for t in pings if t_block + 0.1 < t < t_unblock], "pinged while the loop was blocked"
                assert [t for t in pings if t > t_unblock], "pings did not resume"
                nursery.cancel_scope.cancel()


async def test_reload_notifications_around_a_reload(tmp_path: Path) -> None:
    with notify_listener(tmp_path) as nl:
        d = stub_daemon()
        m = ServiceMonitor(d, Notifier(parse_address(nl.env)))
        m.reloading()  # before READY: systemd would ignore RELOADING=1, so it is not sent
        m.reloaded(True, "x")
        m.ready_sent = True
        m.reloading()
        m.reloaded(False, "hydra.url = \"http://x\": expected a ws:// or wss:// URL")
        with trio.fail_after(5):
            while len(nl.snapshot()) < 3:
                await trio.sleep(0.01)
        texts = [msg.text.split("\n")[0] for msg in nl.snapshot()]
        assert texts[0].startswith("STATUS=") and texts[1] == "RELOADING=1" and texts[2] == "READY=1"
        assert "reload rejected, old config kept: hydra.url" in nl.snapshot()[2].fields["STATUS"]
        m.notifier.close()
