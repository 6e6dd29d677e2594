"""The control socket driving a real daemon (wav engine child) against the real simulator."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest
import trio

from hydrad.control.server import ControlServer
from hydrad.observe.metrics import Metrics
from hydrad.sim.config import SimConfig

from .harness import HELLO, Rig, active_spans, running
from .test_control_support import RawClient, check_response, control_config, run_ctl

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def controlled(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Rig, ControlServer, str]]:
    sock = str(tmp_path / "run" / "control.sock")
    async with running(tmp_path, **kw) as rig:
        metrics = Metrics.for_daemon(rig.daemon)
        rig.daemon.bus.subscribe(metrics)
        server = ControlServer(control_config(sock, idle_timeout_s=2.0, max_connections=8), rig.daemon,
                               metrics.metrics_text)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            try:
                yield rig, server, sock
            finally:
                nursery.cancel_scope.cancel()


def appends(rig: Rig) -> list[float]:
    return [t for t, f in rig.sim.sessions[0].received if f.get("type") == "input_audio_buffer.append"]


async def test_cancel_during_a_reply_stops_the_audio_before_replying(tmp_path: Path) -> None:
    sim = SimConfig(reply_s=6.0, realtime_factor=1.5)
    async with controlled(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)]) as (rig, server, sock):
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="reply audio")
        await trio.sleep(0.8)
        c = await RawClient.connect(sock)
        t_sent = time.monotonic()
        r = await c.ask({"v": 1, "id": "c1", "cmd": "cancel"})
        t_reply = time.monotonic()
        assert r["ok"] and r["id"] == "c1", r
        res = r["result"]
        assert res["in_flight"] is True and res["flushed"] is True and res["noop"] is False
        r1 = rig.sim.sessions[0].responses[0]
        assert res["response_id"] == r1.id
        assert t_reply - t_sent < 2.0
        # The service was told, and the cancel fired the event with source "control".
        await rig.wait_for(lambda: rig.sim.sessions[0].received_of("response.cancel"), what="response.cancel")
        assert rig.sim.sessions[0].received_of("response.cancel")[0]["response_id"] == r1.id
        cancels = rig.events("cancel_requested")
        assert [e.fields["source"] for e in cancels] == ["control"] and cancels[0].fields["in_flight"] is True
        done = await rig.wait_for(lambda: rig.events("response_done"), what="response_done")
        assert done[0].fields["status"] == "cancelled"
        # The speaker went silent before the reply was sent (the reply waits for the flush ack),
        # and stayed silent: a 6 s reply was cut after ~1 s.
        await trio.sleep(1.0)
        x, rate = rig.speaker_audio()
        spans = [s for s in active_spans(x, rate) if s[1] - s[0] > 0.05]
        assert len(spans) == 1, spans
        last_audible = spans[0][1]
        assert spans[0][1] - spans[0][0] < 2.5
        assert last_audible <= (t_reply - rig.t0) + 0.02, (last_audible, t_reply - rig.t0)
        assert last_audible >= (t_sent - rig.t0) - 0.1  # it was playing when we asked
        assert np.abs(x[rig.sample_at(t_reply, rate) + rate // 50:]).max() == 0
        print(f"cancel: request -> reply {1000 * (t_reply - t_sent):.1f} ms; last audible sample "
              f"{1000 * (t_reply - rig.t0 - last_audible):.1f} ms before the reply")
        # The session carries on.
        assert len(rig.sim.sessions) == 1 and rig.daemon.status()["state"] == "connected"


async def test_cancel_when_idle_is_a_noop_that_says_so(tmp_path: Path) -> None:
    async with controlled(tmp_path) as (rig, server, sock):
        await rig.wait_for(lambda: rig.daemon.status()["state"] == "connected", what="connected")
        r = await run_ctl(["cancel", "--socket", sock, "--json"])
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)["result"]
        assert res["noop"] is True and res["in_flight"] is False and res["audible"] is False
        assert res["response_id"] is None and res["flushed"] is False
        r = await run_ctl(["cancel", "--socket", sock])
        assert r.returncode == 0 and r.stdout.decode().startswith("nothing to cancel")
        await trio.sleep(0.3)
        assert rig.sim.sessions[0].received_of("response.cancel") == []
        assert [e.fields["source"] for e in rig.events("cancel_requested")] == ["control", "control"]


async def test_status_mute_metrics_ping_through_hydrad_ctl(tmp_path: Path) -> None:
    async with controlled(tmp_path, mic=[(HELLO, 2.0)]) as (rig, server, sock):
        await rig.wait_for(lambda: rig.daemon.status()["state"] == "connected", what="connected")
        r = await run_ctl(["mute", "--socket", sock])
        assert r.returncode == 0 and rig.daemon.muted
        r = await run_ctl(["status", "--socket", sock, "--json"])
        st = json.loads(r.stdout)["result"]
        assert r.returncode == 0 and st["state"] == "connected" and st["muted"] is True
        assert st["session_id"] == rig.sim.sessions[0].session_id and st["engine"]["backend"] == "wav"
        r = await run_ctl(["status", "--socket", sock])
        assert r.returncode == 0 and f"session_id: {st['session_id']}" in " ".join(r.stdout.decode().split())
        # Muted across the whole utterance: the stream goes on (silence), the service hears no speech.
        n0 = len(appends(rig))
        await trio.sleep(4.5)
        n1 = len(appends(rig))
        assert n1 - n0 >= 150, "the microphone stream must keep flowing while muted"
        assert not rig.sim.sessions[0].sent_of("input_audio_buffer.speech_started")
        r = await run_ctl(["unmute", "--socket", sock, "--json"])
        assert r.returncode == 0 and json.loads(r.stdout)["result"]["muted"] is False and not rig.daemon.muted
        r = await run_ctl(["ping", "--socket", sock])
        assert r.returncode == 0 and r.stdout.startswith(b"pong")
        r = await run_ctl(["metrics", "--socket", sock])
        assert r.returncode == 0
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(r.stdout.decode())}
        assert families, "no metrics"
        sent = [s for f in families.values() for s in f.samples if "frames_sent" in s.name]
        assert sent and max(s.value for s in sent) > 0, sorted(families)


async def test_hostile_clients_do_not_disturb_the_session_or_the_audio(tmp_path: Path) -> None:
    """Garbage, oversized lines, slow-loris and a connection flood during a reply: it plays out whole."""
    sim = SimConfig(reply_s=3.0, realtime_factor=1.0)
    async with controlled(tmp_path, sim_config=sim, mic=[(HELLO, 0.2)]) as (rig, server, sock):
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="reply audio")
        lag = [0.0]
        finished: set[str] = set()

        async def loop_lag() -> None:
            """The daemon shares this event loop: nothing the clients do may stall it."""
            while True:
                t = time.monotonic()
                await trio.sleep(0.01)
                lag[0] = max(lag[0], time.monotonic() - t - 0.01)

        async with trio.open_nursery() as nursery:
            async def garbage() -> None:
                c = await RawClient.connect(sock)
                for line in (b"\xff\xfe", b"{", b"[]", b'{"cmd": 1}', b'{"cmd": "reboot"}', b'{"cmd":"ping","v":9}',
                             b"null", b'{"cmd": "status", "args": {"x": 1}}', b"\x00" * 100):
                    await c.send(line + b"\n")
                    assert not (await c.reply())["ok"]
                await c.send(b"z" * 70000)
                assert (await c.reply())["error"]["code"] == "line_too_long"
                finished.add("garbage")

            async def loris() -> None:
                c = await RawClient.connect(sock)
                with trio.move_on_after(3):
                    for b in b'{"cmd": "status"' * 10:
                        try:
                            await c.send(bytes([b]))
                        except trio.BrokenResourceError:
                            break
                        await trio.sleep(0.1)
                line = await c.line()
                assert line is not None and check_response(line)["error"]["code"] == "idle_timeout"
                finished.add("loris")

            async def flood() -> None:
                conns = []
                for _ in range(40):
                    conns.append(await RawClient.connect(sock))
                await trio.sleep(0.5)
                for c in conns:
                    await c.aclose()
                finished.add("flood")

            nursery.start_soon(garbage)
            nursery.start_soon(loris)
            nursery.start_soon(flood)
            nursery.start_soon(loop_lag)
            await trio.sleep(3.5)  # the loris is dropped after 2 s; everything is done by now
            nursery.cancel_scope.cancel()
        print(f"event loop lag during the hostile phase: max {lag[0] * 1000:.1f} ms")
        assert finished == {"garbage", "loris", "flood"} and lag[0] < 0.5
        done = await rig.wait_for(lambda: rig.events("response_done"), what="response_done")
        assert done[0].fields["status"] == "completed"
        assert done[0].fields["metrics"]["heard_s"] == pytest.approx(3.0, abs=0.05)
        assert rig.events("barge_in") == [] and rig.events("cancel_requested") == []
        assert len(rig.sim.sessions) == 1 and rig.sim.sessions[0].live
        # Every sample of the reply reached the speaker (summed: a loaded CI machine may underrun,
        # which splits the audio but loses none of it).
        await trio.sleep(0.3)
        x, rate = rig.speaker_audio()
        assert sum(e - s for s, e in active_spans(x, rate)) == pytest.approx(3.0, abs=0.06)
        assert server.counters["handler_errors"] == 0 and server.counters["busy"] >= 1
        c = await RawClient.connect(sock)
        assert (await c.ask({"cmd": "status"}))["result"]["state"] == "connected"
