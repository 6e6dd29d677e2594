"""The webhook plugin against a real local HTTP server."""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import trio

import hydrad_webhook
from hydrad.config import config_from_dict
from hydrad.events import Event, EventBus
from hydrad.hooks import HookDispatcher, PluginError, load_plugins
from hydrad.sim import SimConfig


@dataclass
class Backend:
    """A real HTTP server on loopback (its own thread): records POSTs, answers as scripted."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: statuses to answer with, one per request, then 200
    statuses: list[int] = field(default_factory=list)
    #: seconds to wait before answering every request
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, ok_only: bool = True) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests if r["status"] < 300 or not ok_only]


@pytest.fixture
def backend() -> Iterator[Backend]:
    state = Backend()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(state.delay_s)
            with state.lock:
                status = state.statuses.pop(0) if state.statuses else 200
                state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body, "status": status})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/hydrad"
    yield state
    server.shutdown()
    server.server_close()


async def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    with trio.move_on_after(timeout):
        while not (v := pred()):
            await trio.sleep(0.02)
        return v
    raise AssertionError(f"timed out waiting for {what}")


async def run_plugin(nursery, table: dict) -> tuple[EventBus, HookDispatcher]:
    plugins = load_plugins(config_from_dict({"plugins": {"webhook": table, "hook_deadline_s": 2.0}}, "t"),
                           extra=[("webhook", hydrad_webhook.plugin)], entry_points=False)
    bus = EventBus()
    dispatcher = HookDispatcher(plugins, None, bus)
    await nursery.start(dispatcher.run)
    return bus, dispatcher


# ============================================================================ through the daemon


@pytest.fixture
def hydrad_plugins():
    return [("webhook", hydrad_webhook.plugin)]


@pytest.fixture
def hydrad_config(backend: Backend):
    return {"plugins": {"webhook": {"url": backend.url, "events": ["speech_started", "user_turn_done", "response_done"],
                                    "headers": {"Authorization": "Bearer t0ken"}}}}


@pytest.fixture
def hydrad_sim_config():
    return SimConfig(reply_s=2.0)


async def test_chosen_events_are_posted_in_order_as_json(hydrad, backend: Backend) -> None:
    await hydrad.say("hello", seconds=1.0)
    await hydrad.wait_for_event("response_done")
    await wait_for(lambda: len(backend.bodies()) >= 3, what="3 POSTs")
    bodies = backend.bodies()
    assert [b["type"] for b in bodies] == ["speech_started", "user_turn_done", "response_done"]
    assert [b["seq"] for b in bodies] == [1, 2, 3] and len({b["id"] for b in bodies}) == 3
    assert bodies[2]["data"]["status"] == "completed" and bodies[2]["data"]["metrics"]["heard_s"] > 1.5
    assert bodies[0]["data"] == hydrad.events_named("speech_started")[0].fields
    assert abs(bodies[0]["timestamp"] - time.time()) < 30
    req = backend.requests[0]
    assert req["path"] == "/hooks/hydrad" and req["headers"]["Authorization"] == "Bearer t0ken"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Idempotency-Key"] == bodies[0]["id"]


async def test_a_hanging_backend_never_disturbs_the_conversation(hydrad, backend: Backend) -> None:
    backend.delay_s = 4.0  # every POST hangs; the plugin's own queue fills and drops
    frames0, t0 = hydrad.daemon.counters["uplink_frames_sent"], time.monotonic()
    await hydrad.say("hello", seconds=1.0)
    done = await hydrad.wait_for_event("response_done")
    frames, elapsed = hydrad.daemon.counters["uplink_frames_sent"] - frames0, time.monotonic() - t0
    assert done.fields["status"] == "completed" and done.fields["metrics"]["heard_s"] == pytest.approx(2.0, abs=0.1)
    assert 0.9 * elapsed * 50 < frames < 1.1 * elapsed * 50 + 6
    assert hydrad.dispatcher.stats["webhook"].get("timeouts", 0) == 0  # the hook itself never waited


# ============================================================================ retries, queue, shutdown


async def test_retries_with_backoff_and_the_same_id(nursery, backend: Backend) -> None:
    backend.statuses = [503, 500]
    bus, dispatcher = await run_plugin(nursery, {"url": backend.url, "backoff_s": 0.1, "retries": 3})
    t = time.monotonic()
    bus.publish(Event("barge_in", {"response_id": "r1", "trigger": "speech_started"}))
    await wait_for(lambda: hydrad_webhook.plugin.stats["sent"], what="delivery")  # the client saw the 200
    took = time.monotonic() - t
    attempts = backend.bodies(ok_only=False)
    assert len(attempts) == 3 and len({a["id"] for a in attempts}) == 1
    assert 0.25 <= took < 5  # 0.1 + 0.2 s of backoff
    s = hydrad_webhook.plugin.stats
    assert s["sent"] == 1 and s["retries"] == 2 and s["failed"] == 0
    await dispatcher.aclose()


async def test_gives_up_after_retries_and_does_not_retry_a_4xx(nursery, backend: Backend) -> None:
    backend.statuses = [503, 503, 400]
    bus, dispatcher = await run_plugin(nursery, {"url": backend.url, "backoff_s": 0.01, "retries": 1})
    bus.publish(Event("speech_started", {"i": 1}))   # 503, 503: gives up
    bus.publish(Event("speech_started", {"i": 2}))   # 400: rejected at once
    bus.publish(Event("speech_started", {"i": 3}))   # 200
    await wait_for(lambda: hydrad_webhook.plugin.stats["sent"], what="the third event")
    assert [(r["body"]["data"]["i"], r["status"]) for r in backend.requests] == [(1, 503), (1, 503), (2, 400), (3, 200)]
    s = hydrad_webhook.plugin.stats
    assert s["failed"] == 1 and s["rejected"] == 1 and s["sent"] == 1
    await dispatcher.aclose()


async def test_bounded_queue_drops_the_oldest_and_publish_never_waits(nursery, backend: Backend) -> None:
    backend.delay_s = 0.5
    bus, dispatcher = await run_plugin(nursery, {"url": backend.url, "queue_size": 3, "timeout_s": 5})
    worst = 0.0
    for i in range(30):
        t = time.perf_counter()
        bus.publish(Event("speech_started", {"i": i}))
        worst = max(worst, time.perf_counter() - t)
        await trio.sleep(0.002)
    assert worst < 0.01
    await wait_for(lambda: hydrad_webhook.plugin.stats["sent"] >= 4, timeout=10, what="4 deliveries")
    sent = [b["data"]["i"] for b in backend.bodies()]
    assert sent == [0, 27, 28, 29]  # the first was in flight; of the rest only the newest 3 were kept
    assert hydrad_webhook.plugin.stats["dropped"] == 26
    await dispatcher.aclose()


async def test_shutdown_flushes_the_queue(nursery, backend: Backend) -> None:
    backend.delay_s = 0.1
    bus, dispatcher = await run_plugin(nursery, {"url": backend.url})
    for i in range(5):
        bus.publish(Event("response_done", {"i": i}))
    await dispatcher.aclose()  # the last events and session_disconnected would be lost without the flush
    assert [b["data"]["i"] for b in backend.bodies()] == [0, 1, 2, 3, 4]


async def test_unreachable_backend_is_retried_then_given_up(nursery) -> None:
    bus, dispatcher = await run_plugin(nursery, {"url": "http://127.0.0.1:9/nothing", "retries": 2, "backoff_s": 0.01,
                                                 "timeout_s": 1})
    bus.publish(Event("speech_started", {}))
    await wait_for(lambda: hydrad_webhook.plugin.stats["failed"] == 1, what="giving up")
    assert hydrad_webhook.plugin.stats["retries"] == 2
    await dispatcher.aclose()


# ============================================================================ settings


@pytest.mark.parametrize(("table", "message"), [
    ({"events": ["*"]}, "url = None: expected an http:// or https:// URL"),
    ({"url": "ftp://x"}, "url = 'ftp://x': expected an http:// or https:// URL"),
    ({"url": "http://x", "retries": -1}, "retries = -1: expected an integer from 0 to 100"),
    ({"url": "http://x", "events": []}, "events = []: expected a non-empty list"),
    ({"url": "http://x", "headers": {"X": 1}}, "headers: expected a table of string values"),
    ({"url": "http://x", "uri": "y"}, "unknown key(s) ['uri']"),
])
def test_bad_settings_are_reported_under_the_plugins_name(table: dict, message: str) -> None:
    with pytest.raises(PluginError) as exc:
        load_plugins(config_from_dict({"plugins": {"webhook": table}}, "t"))
    [problem] = exc.value.problems
    assert problem.startswith("[plugins.webhook]: ") and message in problem


def test_installed_through_its_entry_point() -> None:
    plugins = load_plugins(config_from_dict({}, "t"))
    assert plugins["webhook"].obj is hydrad_webhook.plugin and plugins["webhook"].dist == "hydrad-webhook"
