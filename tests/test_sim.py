"""Conformance tests for ``hydrad sim`` against the protocol reference's simulator table (§8).

Every test talks to a real :class:`Simulator` over a raw trio-websocket client, feeding real
audio: speech is ``hydrad/data/hello.wav`` paced at real time in 20 ms appends, silence is
zeros. Timing-sensitive values (reply length, idle timeout, tool timeout) are shrunk so the
file runs in well under a minute.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import time
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import webrtcvad
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from hydrad.sim import ScenarioError, SimConfig, Simulator, load_scenario, response_f0, synthesize
from hydrad.sim.cli import build_parser, config_from_args
from hydrad.sim.session import _split
from hydrad.sim.vad import TurnDetector

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
FRAME = 640  # 20 ms of PCM16 at 16 kHz


def _load_wav(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return w.readframes(w.getnframes())


HELLO = _load_wav(ROOT / "hydrad" / "data" / "hello.wav")
SPEECH_SLICE = HELLO[: int(0.8 * RATE) * 2]  # 0.8 s, all voiced per webrtcvad
_ids = itertools.count(1)


def eid() -> str:
    return f"evt_test_{next(_ids)}"


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def dominant_hz(pcm: bytes, rate: int) -> float:
    """Independent of hydrad.sim.voice on purpose: plain FFT peak."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    spectrum[0] = 0
    return float(np.argmax(spectrum)) * rate / x.size


# ---------------------------------------------------------------------------- client harness


class Client:
    """A raw Hydra client: a reader task collecting frames and a real-time audio pump."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.raw: list[str] = []
        self.close_code: int | None = None
        self._changed = trio.Event()
        self._speech = bytearray()
        self._pumping = False

    # reading
    async def reader(self) -> None:
        try:
            while True:
                text = await self.ws.get_message()
                self.raw.append(text)
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = {"type": "<unparseable>", "text": text}
                self.frames.append((time.monotonic(), obj))
                self._poke()
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else 1006
            self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def types(self) -> list[str]:
        return [o["type"] for _, o in self.frames]

    def of(self, type_: str, where: Callable[[dict], bool] | None = None) -> list[dict]:
        return [o for _, o in self.frames if o["type"] == type_ and (where is None or where(o))]

    async def wait_for(self, type_: str, where: Callable[[dict], bool] | None = None, *,
                       count: int = 1, timeout: float = 10.0) -> dict:
        with trio.fail_after(timeout):
            while True:
                found = self.of(type_, where)
                if len(found) >= count:
                    return found[count - 1]
                if self.close_code is not None:
                    raise AssertionError(f"closed ({self.close_code}) while waiting for {type_}: {self.types()}")
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while self.close_code is None:
                await self._changed.wait()
        return self.close_code

    # writing
    async def send(self, type_: str | None = None, **fields: Any) -> str:
        event_id = fields.pop("event_id", None) or eid()
        frame = {"event_id": event_id, **fields}
        if type_ is not None:
            frame = {"type": type_, **frame}
        await self.ws.send_message(json.dumps(frame))
        return event_id

    async def configure(self, **session: Any) -> dict:
        await self.wait_for("session.created")
        await self.send("session.configure", session=session)
        return await self.wait_for("session.configured")

    async def barrier(self) -> None:
        """Round trip: a too-small append is answered with invalid_audio, in order."""
        marker = await self.send("input_audio_buffer.append", audio=b64(b"\0" * 40))
        await self.wait_for("error", lambda o: o["error"].get("event_id") == marker)

    def start_pump(self, nursery: trio.Nursery) -> None:
        self._pumping = True
        nursery.start_soon(self.pump)

    async def pump(self) -> None:
        """Stream 20 ms appends at real time forever: queued speech first, else silence."""
        self._pumping = True
        t0 = trio.current_time()
        for i in itertools.count(1):
            if self._speech:
                chunk = bytes(self._speech[:FRAME]).ljust(FRAME, b"\0")
                del self._speech[:FRAME]
            else:
                chunk = b"\0" * FRAME
            try:
                await self.ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": b64(chunk)}))
            except ConnectionClosed:
                return
            await trio.sleep_until(t0 + i * 0.02)

    def say(self, pcm: bytes) -> float:
        """Queue speech on the pump; returns its duration in seconds."""
        assert self._pumping, "start the pump first"
        self._speech += pcm
        return len(pcm) / (2 * RATE)

    def audio_of(self, response_id: str) -> bytes:
        return b"".join(base64.b64decode(o["delta"]) for o in self.of("response.output_audio.delta")
                        if o["response_id"] == response_id)


@asynccontextmanager
async def connect(sim: Simulator, *, pump: bool = False, configure: dict | None = None,
                  model: str | None = "hydra-v1.1", api_key: str | None = "test-key",
                  headers: list[tuple[str, str]] | None = None) -> AsyncIterator[Client]:
    async with open_websocket_url(sim.url(model=model, api_key=api_key), extra_headers=headers,
                                  max_message_size=16 * 2**20, connect_timeout=5, disconnect_timeout=2) as ws:
        async with trio.open_nursery() as nursery:
            client = Client(ws)
            nursery.start_soon(client.reader)
            if configure is not None:
                await client.configure(**configure)
                if pump:
                    client.start_pump(nursery)
            yield client
            nursery.cancel_scope.cancel()


@pytest.fixture
async def start_sim(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    sims: list[Simulator] = []

    async def start(**config: Any) -> Simulator:
        config.setdefault("reply_s", 0.5)
        sim = Simulator(SimConfig(**config))
        await nursery.start(sim.serve)
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        assert sim.errors == [], f"simulator crashed: {sim.errors!r}"


def compact(types: list[str]) -> list[str]:
    """Collapse runs of the same delta type so orders can be compared literally."""
    out: list[str] = []
    for t in types:
        if not (out and out[-1] == t and t.endswith(".delta")):
            out.append(t)
    return out


# ---------------------------------------------------------------------------- connection / §1


@pytest.mark.parametrize(("model", "rate", "warned"), [
    ("hydra-v1.1", 24000, False), ("hydra-v1.0", 48000, False), ("hydra", 48000, True), (None, 24000, False),
])
async def test_tags_rates_and_deprecation_warning(start_sim, model, rate, warned):
    sim = await start_sim()
    async with connect(sim, model=model, configure={}) as c:
        first = c.frames[0][1]
        if warned:
            assert first["type"] == "warning" and first["code"] == "model_deprecated"
            assert "hydra-v1.0" in first["message"]
            assert c.types()[:2] == ["warning", "session.created"]
        else:
            assert "warning" not in c.types()
            assert first["type"] == "session.created"
        created = c.of("session.created")[0]
        assert re.fullmatch(r"sv_[0-9a-f]{16}", created["event_id"])
        assert re.fullmatch(r"[0-9a-f-]{36}", created["session_id"])
        assert c.of("session.configured")[0]["session"]["output_audio_sample_rate"] == rate
    assert sim.sessions[0].model == (model or "hydra-v1.1")


async def test_unknown_tag_is_refused_before_upgrade(start_sim):
    sim = await start_sim()
    with pytest.raises(ConnectionRejected) as info:
        async with connect(sim, model="hydra-v9"):
            pass
    assert info.value.status_code == 400


@pytest.mark.parametrize("how", ["missing", "bad_query", "bad_bearer"])
async def test_auth_failures_are_http_401_before_upgrade(start_sim, how):
    sim = await start_sim(bad_keys=frozenset({"revoked"}))
    kwargs: dict[str, Any] = {
        "missing": {"api_key": None},
        "bad_query": {"api_key": "revoked"},
        "bad_bearer": {"api_key": None, "headers": [("Authorization", "Bearer revoked")]},
    }[how]
    with pytest.raises(HandshakeError) as info:
        async with connect(sim, **kwargs):
            pass
    assert isinstance(info.value, ConnectionRejected) and info.value.status_code == 401
    assert sim.sessions == [] and [r[1] for r in sim.rejections] == [401]


async def test_bearer_header_auth_is_accepted(start_sim):
    sim = await start_sim(valid_keys=frozenset({"good"}))
    async with connect(sim, api_key=None, headers=[("Authorization", "Bearer good")], configure={}) as c:
        assert c.types()[0] == "session.created"
    with pytest.raises(ConnectionRejected):
        async with connect(sim, api_key="other"):
            pass


async def test_capacity_server_full_then_1013(start_sim):
    sim = await start_sim(max_sessions=1)
    async with connect(sim, configure={}):
        async with connect(sim) as second:
            assert await second.wait_closed(5) == 1013
            assert second.types() == ["error"]
            assert second.frames[0][1]["error"]["code"] == "server_full"
    # the slot is free again once the first session closed
    with trio.fail_after(5):
        while sim.sessions[0].live:
            await trio.sleep(0.01)
    async with connect(sim, configure={}) as third:
        assert third.close_code is None
    assert [s.closed for s in sim.sessions[:2]] == [1000, 1013]


async def test_scripted_server_full_on_chosen_connections(start_sim):
    sim = await start_sim(server_full=frozenset({1}))
    async with connect(sim) as first:
        assert await first.wait_closed(5) == 1013
        assert first.of("error")[0]["error"]["code"] == "server_full"
    async with connect(sim, configure={}) as second:
        assert second.types()[:2] == ["session.created", "session.configured"]


async def test_idle_timeout_closes_1000_and_audio_keeps_it_open(start_sim):
    sim = await start_sim(idle_timeout_s=1.0)
    async with connect(sim, configure={}, pump=True) as streaming:
        await trio.sleep(1.6)
        assert streaming.close_code is None  # silence appends are traffic (§1.3)
    async with connect(sim, configure={}) as idle:
        t0 = time.monotonic()
        assert await idle.wait_closed(5) == 1000
        assert 0.8 <= time.monotonic() - t0 <= 3.0
        assert idle.types() == ["session.created", "session.configured"]  # no error before the close
    assert sim.sessions[-1].closed == 1000


async def test_cancelling_serve_tears_sessions_down():
    sim = Simulator(SimConfig())
    serve_scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with serve_scope:
            await sim.serve(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        async with connect(sim, configure={}) as c:
            serve_scope.cancel()
            t0 = time.monotonic()
            await c.wait_closed(3)
            assert time.monotonic() - t0 < 3
    assert not sim.sessions[0].live


# ---------------------------------------------------------------------------- configure / §2


async def test_configured_echo_has_audio_keys_and_ignores_extra_keys(start_sim):
    sim = await start_sim()
    async with connect(sim, configure={"instuctions": "typo", "voice": "aria", "tools": []}) as c:
        session = c.of("session.configured")[0]["session"]
        assert session["voice"] == "aria"
        assert "instuctions" not in session and session["instructions"]  # default persona
        assert session["generate_initial_response"] is False
        assert {k: session[k] for k in ("input_audio_format", "input_audio_sample_rate", "output_audio_format",
                                        "output_audio_sample_rate")} == {
            "input_audio_format": "pcm16", "input_audio_sample_rate": 16000,
            "output_audio_format": "pcm16", "output_audio_sample_rate": 24000}


async def test_omitted_voice_defaults_to_sterling(start_sim):
    sim = await start_sim()
    async with connect(sim, configure={}) as c:
        assert c.of("session.configured")[0]["session"]["voice"] == "sterling"


async def test_second_configure_is_silently_ignored(start_sim):
    sim = await start_sim()
    async with connect(sim, configure={"voice": "aria"}) as c:
        await c.send("session.configure", session={"voice": "maya", "instructions": "other"})
        await c.barrier()
        assert len(c.of("session.configured")) == 1
        assert [o["error"]["code"] for o in c.of("error")] == ["invalid_audio"]  # only the barrier's


@pytest.mark.parametrize("voice", ["wren", "vaughn", 7])
async def test_unknown_voice_is_an_error_and_configure_can_be_retried(start_sim, voice):
    sim = await start_sim()
    async with connect(sim) as c:
        await c.wait_for("session.created")
        bad = await c.send("session.configure", session={"voice": voice})
        err = (await c.wait_for("error"))["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request_error"
        assert err["param"] == "session.configure.session.voice" and err["event_id"] == bad
        assert c.of("session.configured") == []
        await c.send("session.configure", session={"voice": "sterling"})  # the default works on every tag
        assert (await c.wait_for("session.configured"))["session"]["voice"] == "sterling"


async def test_unknown_voice_legacy_fallback(start_sim):
    sim = await start_sim(voice_validation="legacy_fallback")
    async with connect(sim, configure={"voice": "wren"}) as c:
        assert c.of("session.configured")[0]["session"]["voice"] == "sterling"
        assert c.of("error") == []


@pytest.mark.parametrize(("honour", "expected"), [(False, 24000), (True, 16000)])
async def test_honour_output_rate(start_sim, honour, expected):
    sim = await start_sim(honour_output_rate=honour, reply_s=1.0)
    config = {"output_audio_sample_rate": 16000, "generate_initial_response": True}
    async with connect(sim, configure=config) as c:
        assert c.of("session.configured")[0]["session"]["output_audio_sample_rate"] == expected
        done = await c.wait_for("response.done")
        pcm = c.audio_of(done["response"]["id"])
        assert len(pcm) == 1.0 * expected * 2
        assert dominant_hz(pcm, expected) == pytest.approx(response_f0(1), rel=0.01)


async def test_session_update_rules(start_sim):
    sim = await start_sim()
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    async with connect(sim, configure={"tools": []}) as c:
        await c.send("session.update", session={"tools": [tool]})
        updated = await c.wait_for("session.updated")
        assert updated["session"] == {"tools": [tool]}
        await c.send("session.update", session={"tools": [tool]})  # no change -> no reply
        await c.send("session.update", session={})  # nothing to apply -> no reply
        bad = await c.send("session.update", session={"tools": [], "voice": "maya"})
        err = (await c.wait_for("error", lambda o: o["error"].get("event_id") == bad))["error"]
        assert err["code"] == "invalid_frame" and err["param"] == "session.update.session.voice"
        await c.barrier()
        assert len(c.of("session.updated")) == 1
        assert sim.sessions[0].configured["tools"] == [tool]  # the strict failure applied nothing


# ---------------------------------------------------------------------------- client frames / §3.1, §4


async def test_audio_before_configured_is_dropped_and_clock_starts_at_configure(start_sim):
    sim = await start_sim()
    async with connect(sim) as c:
        await c.wait_for("session.created")
        for i in range(0, len(SPEECH_SLICE), FRAME):  # speech, burst, before configure
            await c.send("input_audio_buffer.append", audio=b64(SPEECH_SLICE[i:i + FRAME]))
        await c.send("input_audio_buffer.append", audio="not base64!")  # not validated either
        await c.send("session.configure", session={})
        await c.wait_for("session.configured")
        async with trio.open_nursery() as n:
            c.start_pump(n)
            await trio.sleep(0.5)
            c.say(SPEECH_SLICE)
            started = await c.wait_for("input_audio_buffer.speech_started", timeout=5)
            n.cancel_scope.cancel()
        assert c.of("error") == []
        assert c.types().count("input_audio_buffer.speech_started") == 1
        # audio_start_ms counts only audio appended after session.configured (~0.5 s of silence)
        assert 350 <= started["audio_start_ms"] <= 900
    appends = sim.sessions[0].received_of("input_audio_buffer.append")
    assert len(appends) > 40 and all("audio" not in a for a in appends)


@pytest.mark.parametrize(("audio", "message"), [
    ("###not-base64###", "base64"),
    (b64(b"\0" * 641), "odd"),
    (b64(b"\0" * 40), "audio frame too small (40 bytes, need 320)"),
    (None, "audio"),
])
async def test_append_validation(start_sim, audio, message):
    sim = await start_sim()
    async with connect(sim, configure={}) as c:
        fields = {} if audio is None else {"audio": audio}
        sent = await c.send("input_audio_buffer.append", **fields)
        err = (await c.wait_for("error"))["error"]
        assert err == {**err, "type": "invalid_request_error", "code": "invalid_audio", "param": "audio",
                       "event_id": sent}
        assert message in err["message"]
        await c.send("input_audio_buffer.append", audio=b64(b"\0" * 640))  # session continues
        await c.barrier()
        assert len(c.of("error")) == 2 and c.close_code is None


@pytest.mark.parametrize("mode", ["ignore", "invalid_frame"])
async def test_unknown_client_type(start_sim, mode):
    sim = await start_sim(unknown_type=mode)
    async with connect(sim, configure={}) as c:
        sent = await c.send("input_audio_buffer.commit")
        await c.barrier()
        errors = [o["error"] for o in c.of("error") if o["error"]["code"] != "invalid_audio"]
        if mode == "ignore":
            assert errors == []
        else:
            assert len(errors) == 1 and errors[0]["code"] == "invalid_frame" and errors[0]["event_id"] == sent


async def test_missing_type_and_malformed_json(start_sim):
    sim = await start_sim()
    async with connect(sim, configure={}) as c:
        sent = await c.send(None, audio="AAAA")
        err = (await c.wait_for("error"))["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request_error"
        assert err["event_id"] == sent
        await c.ws.send_message('{"type": "response.create"')
        err2 = (await c.wait_for("error", count=2))["error"]
        assert err2["code"] == "invalid_frame"
        assert c.close_code is None


async def test_too_fast_input_is_ended(start_sim):
    sim = await start_sim(input_burst_s=1.0)
    async with connect(sim, configure={}) as c:
        with pytest.raises(ConnectionClosed):
            for _ in range(500):  # 10 s of audio in a burst: the server ends it after ~1 s
                await c.send("input_audio_buffer.append", audio=b64(b"\0" * FRAME))
        assert await c.wait_closed(5) == 1000
        err = c.of("error")[0]["error"]
        assert err["type"] == "invalid_request_error"
        assert err["message"] == "session ended: audio sent faster than real time"


# ---------------------------------------------------------------------------- turns / §5


async def test_normal_turn_event_order(start_sim):
    sim = await start_sim(reply_s=0.5)
    async with connect(sim, configure={}, pump=True) as c:
        await trio.sleep(0.2)
        c.say(HELLO)
        done = await c.wait_for("response.done", timeout=10)
        order = compact(c.types())
        assert order == [
            "session.created", "session.configured",
            "input_audio_buffer.speech_started", "conversation.item.added",
            "input_audio_buffer.speech_stopped", "conversation.item.done",
            "response.created", "conversation.item.added", "response.output_audio.delta",
            "response.output_audio.done", "conversation.item.done", "response.done",
        ]
        started = c.of("input_audio_buffer.speech_started")[0]
        stopped = c.of("input_audio_buffer.speech_stopped")[0]
        user_added, asst_added = c.of("conversation.item.added")
        user_done, asst_done = c.of("conversation.item.done")
        uid = started["item_id"]
        assert stopped["item_id"] == uid == user_added["item"]["id"] == user_done["item"]["id"]
        assert user_added["item"]["role"] == "user" and user_added["item"]["status"] == "in_progress"
        assert user_done["item"]["status"] == "completed"
        assert asst_added["item"]["role"] == "assistant" and asst_added["previous_item_id"] == uid
        assert asst_done["item"]["status"] == "completed"
        # espeak speech is voiced for ~2.46 s after ~0.2 s of lead-in silence (audio clock)
        assert 100 <= started["audio_start_ms"] <= 450
        assert 2100 <= stopped["audio_end_ms"] - started["audio_start_ms"] <= 2800
        response = done["response"]
        assert response["status"] == "completed" and "status_details" not in response
        assert response["id"] == c.of("response.created")[0]["response"]["id"]
        assert [i["id"] for i in response["output"]] == [asst_added["item"]["id"]]
        usage = response["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
        assert all(d["item_id"] == asst_added["item"]["id"] for d in c.of("response.output_audio.delta"))
    rec = sim.sessions[0]
    assert rec.responses[0].turn == 1 and rec.responses[0].status == "completed"
    sent_deltas = rec.sent_of("response.output_audio.delta")
    assert sent_deltas and all("delta" not in d and d["bytes"] > 0 for d in sent_deltas)


async def test_generate_initial_response_speaks_first(start_sim):
    sim = await start_sim()
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        await c.wait_for("response.done")
        assert compact(c.types()) == [
            "session.created", "session.configured", "response.created", "conversation.item.added",
            "response.output_audio.delta", "response.output_audio.done", "conversation.item.done", "response.done",
        ]
    assert sim.sessions[0].responses[0].turn == 0


async def test_reply_f0_encodes_response_number(start_sim):
    sim = await start_sim(reply_s=1.0)
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        first = await c.wait_for("response.done")
        await c.send("response.create")  # no pending tools: still makes a response
        second = await c.wait_for("response.done", count=2)
        for n, done in ((1, first), (2, second)):
            assert done["response"]["status"] == "completed"
            pcm = c.audio_of(done["response"]["id"])
            assert len(pcm) == 24000 * 2
            assert dominant_hz(pcm, 24000) == pytest.approx(response_f0(n), rel=0.01)
    assert [r.f0 for r in sim.sessions[0].responses] == [200.0, 240.0]


async def test_replies_stream_faster_than_real_time(start_sim):
    sim = await start_sim(reply_s=2.0, realtime_factor=5.0, delta_ms=100)
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        await c.wait_for("response.done")
        deltas = [(t, o) for t, o in c.frames if o["type"] == "response.output_audio.delta"]
        t_created = next(t for t, o in c.frames if o["type"] == "response.created")
        t_done = next(t for t, o in c.frames if o["type"] == "response.done")
        assert len(deltas) == 20
        assert all(len(base64.b64decode(o["delta"])) == 4800 for _, o in deltas)  # 100 ms at 24 kHz
        elapsed = t_done - t_created
        # 2 s of audio at 5x: ~0.38 s; generous bounds, still well under real time
        assert 0.15 < elapsed < 1.2
        assert deltas[-1][0] - deltas[0][0] > 0.15  # paced, not dumped


@pytest.mark.parametrize("extra_events", [False, True])
async def test_barge_in_cancels_the_inflight_response(start_sim, extra_events):
    sim = await start_sim(reply_s=6.0, realtime_factor=1.0, barge_in_extra_events=extra_events)
    async with connect(sim, configure={"generate_initial_response": True}, pump=True) as c:
        created = await c.wait_for("response.created")
        rid = created["response"]["id"]
        await c.wait_for("response.output_audio.delta", count=2)
        c.say(SPEECH_SLICE)
        done = await c.wait_for("response.done", timeout=5)
        assert done["response"]["id"] == rid
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "interrupted"
        assert [i["status"] for i in done["response"]["output"]] == ["incomplete"]
        await c.wait_for("response.created", count=2, timeout=5)  # the new turn is answered
        types = c.types()
        i_started = types.index("input_audio_buffer.speech_started")
        i_done = types.index("response.done")
        assert i_started < i_done
        after = c.frames[i_done + 1:]
        assert not any(o.get("response_id") == rid for _, o in after)  # nothing more of it
        assert after[0][1]["type"] == "conversation.item.added" and after[0][1]["item"]["role"] == "user"
        between = types[i_started + 1:i_done]
        if extra_events:
            assert between == ["response.output_audio.done", "conversation.item.done"]
            assert c.of("conversation.item.done")[0]["item"]["status"] == "incomplete"
        else:
            assert between == [] and "response.output_audio.done" not in types[:i_done]
        assert len(c.audio_of(rid)) < 6.0 * 24000 * 2
    assert [r.reason for r in sim.sessions[0].responses[:1]] == ["interrupted"]


async def test_barge_in_within_one_large_append(start_sim):
    """End of a turn and start of the next in one append: the new response is cancelled at once."""
    sim = await start_sim()
    async with connect(sim, configure={}) as c:
        audio = SPEECH_SLICE + b"\0" * (RATE * 2 * 8 // 10) + SPEECH_SLICE[: RATE * 2 * 3 // 10]
        await c.send("input_audio_buffer.append", audio=b64(audio))
        done = await c.wait_for("response.done", timeout=5)
        assert done["response"]["status"] == "cancelled" and done["response"]["output"] == []
        await c.barrier()
        rid = done["response"]["id"]
        assert compact(c.types())[2:] == [
            "input_audio_buffer.speech_started", "conversation.item.added",
            "input_audio_buffer.speech_stopped", "conversation.item.done", "response.created",
            "input_audio_buffer.speech_started", "response.done", "conversation.item.added", "error",
        ]
        assert not any(o.get("response_id") == rid for o in c.of("response.output_audio.delta"))


async def test_client_cancel_and_noop_cancels(start_sim):
    sim = await start_sim(reply_s=6.0, realtime_factor=1.0)
    async with connect(sim, configure={}) as c:
        await c.send("response.cancel")  # nothing in flight: silent no-op
        await c.barrier()
        assert "response.done" not in c.types()
        await c.send("response.create")
        rid = (await c.wait_for("response.created"))["response"]["id"]
        await c.wait_for("response.output_audio.delta")
        await c.send("response.cancel", response_id="resp_stale")  # another response: no-op
        await c.barrier()
        assert "response.done" not in c.types()
        await c.send("response.cancel", response_id=rid)
        done = await c.wait_for("response.done", timeout=3)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        await c.barrier()
        i_done = c.types().index("response.done")
        assert not any(o.get("response_id") == rid for _, o in c.frames[i_done + 1:])
        await c.send("response.cancel")  # idle again: nothing
        await c.barrier()
        assert len(c.of("response.done")) == 1


async def test_short_blip_is_discarded_and_not_counted_as_a_turn(start_sim):
    sim = await start_sim()
    sim.script(1, reply_s=0.3)
    blip = synthesize(3, 0.12, RATE)  # 120 ms of speech-like buzz
    async with connect(sim, configure={}, pump=True) as c:
        c.say(blip)
        discarded = await c.wait_for("conversation.item.done", timeout=5)
        assert discarded["item"]["role"] == "user" and discarded["item"]["status"] == "incomplete"
        assert compact(c.types())[2:] == [
            "input_audio_buffer.speech_started", "conversation.item.added",
            "input_audio_buffer.speech_stopped", "conversation.item.done",
        ]
        await trio.sleep(0.3)
        assert "response.created" not in c.types()
        c.say(SPEECH_SLICE)
        await c.wait_for("response.done", timeout=5)
    rec = sim.sessions[0]
    assert [(r.turn, r.n) for r in rec.responses] == [(1, 1)]
    assert dominant_hz(c.audio_of(rec.responses[0].id), 24000) == pytest.approx(response_f0(1), rel=0.01)


async def test_discard_without_speech_stopped_when_configured(start_sim):
    sim = await start_sim(discard_speech_stopped=False)
    async with connect(sim, configure={}, pump=True) as c:
        c.say(synthesize(1, 0.12, RATE))
        done = await c.wait_for("conversation.item.done", timeout=5)
        assert done["item"]["status"] == "incomplete"
        assert "input_audio_buffer.speech_stopped" not in c.types()
        assert c.types()[-3:] == ["input_audio_buffer.speech_started", "conversation.item.added",
                                  "conversation.item.done"]


# ---------------------------------------------------------------------------- tools / §4.6


WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def test_tool_call_round_trip(start_sim):
    sim = await start_sim()
    sim.script(1, tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}, "call_id": "call_x1"}],
               split=4, reply_s=0.4)
    async with connect(sim, configure={"tools": [WEATHER]}, pump=True) as c:
        c.say(SPEECH_SLICE)
        done_a = await c.wait_for("response.done", timeout=5)
        rid_a = done_a["response"]["id"]
        deltas = c.of("response.function_call_arguments.delta")
        assert len(deltas) == 4 and all(d["call_id"] == "call_x1" and d["response_id"] == rid_a for d in deltas)
        assert deltas[0]["name"] == "get_weather" and all("name" not in d for d in deltas[1:])
        args = "".join(d["delta"] for d in deltas)
        assert json.loads(args) == {"city": "Paris"}
        args_done = c.of("response.function_call_arguments.done")[0]
        assert (args_done["name"], args_done["arguments"], args_done["call_id"]) == ("get_weather", args, "call_x1")
        assert done_a["response"]["status"] == "completed"
        assert [(i["type"], i["call_id"], i["arguments"]) for i in done_a["response"]["output"]] == [
            ("function_call", "call_x1", args)]
        assert c.audio_of(rid_a) == b""
        assert compact(c.types()[c.types().index("response.created"):]) == [
            "response.created", "conversation.item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "conversation.item.done", "response.done",
        ]
        output = {"type": "function_call_output", "call_id": "call_x1", "output": '{"temp_c": 12}'}
        await c.send("conversation.item.create", item=output)
        await c.send("response.create")
        done_b = await c.wait_for("response.done", count=2, timeout=5)
        assert done_b["response"]["status"] == "completed"
        pcm = c.audio_of(done_b["response"]["id"])
        assert len(pcm) == int(0.4 * 24000) * 2
        assert dominant_hz(pcm, 24000) == pytest.approx(response_f0(2), rel=0.01)
        assert c.of("error") == []
    assert sim.sessions[0].tool_outputs == [output]
    assert [(r.kind, r.turn) for r in sim.sessions[0].responses] == [("tool_calls", 1), ("audio", 1)]


async def test_tool_response_timeout(start_sim):
    sim = await start_sim(tool_timeout_s=0.5)
    sim.script(1, tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}], split=2)
    async with connect(sim, configure={"tools": [WEATHER]}, pump=True) as c:
        c.say(SPEECH_SLICE)
        await c.wait_for("response.done", timeout=5)
        call_id = c.of("response.function_call_arguments.done")[0]["call_id"]
        t0 = time.monotonic()
        # the output alone is not enough: without response.create the turn times out (§4.6 step 7)
        await c.send("conversation.item.create",
                     item={"type": "function_call_output", "call_id": call_id, "output": "{}"})
        err = (await c.wait_for("error", timeout=5))["error"]
        assert err["code"] == "tool_response_timeout"
        assert 0.3 <= time.monotonic() - t0 <= 3.0
        assert len(c.of("response.created")) == 1 and c.close_code is None


# ---------------------------------------------------------------------------- scenario actions


async def test_transcripts_flag(start_sim):
    for flag in (False, True):
        sim = await start_sim(transcripts=flag)
        async with connect(sim, configure={"generate_initial_response": True}) as c:
            done = await c.wait_for("response.done")
            deltas = c.of("response.output_audio_transcript.delta")
            if flag:
                assert " ".join(d["delta"] for d in deltas) == "This is simulated reply number 1."
                assert all(d["response_id"] == done["response"]["id"] for d in deltas)
                assert len(deltas) > 1  # phrase-level
            else:
                assert deltas == []


async def test_keep_audio_records_what_the_service_heard(start_sim):
    for flag in (False, True):
        sim = await start_sim(keep_audio=flag)
        async with connect(sim, configure={}) as c:
            frames = [bytes([k]) * 640 for k in range(1, 4)]
            for pcm in frames:
                await c.send("input_audio_buffer.append", audio=b64(pcm))
            await c.barrier()  # the appends before it were handled
        rec = sim.sessions[-1]
        assert [pcm for _, pcm in rec.audio] == (frames if flag else [])
        assert all(t > 0 for t, _ in rec.audio)


async def test_scripted_failure(start_sim):
    sim = await start_sim()
    sim.script(0, error="internal_error")
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        done = (await c.wait_for("response.done"))["response"]
        assert done["status"] == "failed"
        assert done["status_details"]["error"]["code"] == "internal_error"
        assert "response.output_audio.delta" not in c.types()


@pytest.mark.parametrize(("close", "code"), [(1011, 1011), ("abrupt", 1006)])
async def test_scripted_close_mid_response(start_sim, close, code):
    sim = await start_sim(reply_s=3.0, realtime_factor=1.0)
    sim.script(0, close=close, after_ms=250)
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        assert await c.wait_closed(5) == code
        assert 1 <= len(c.of("response.output_audio.delta")) <= 10
        assert "response.done" not in c.types()
    assert sim.sessions[0].closed == code


async def test_raw_frames_and_send_raw_are_verbatim(start_sim):
    sim = await start_sim()
    sim.script(0, raw_frames=['{"type": "response.output_audio.delta", "delta": "!!"}', "not json"])
    async with connect(sim, configure={"generate_initial_response": True}) as c:
        await c.wait_for("response.done")
        i = c.types().index("response.created")
        assert c.raw[i + 1:i + 3] == ['{"type": "response.output_audio.delta", "delta": "!!"}', "not json"]
        await sim.send_raw('{"type":"mystery.event"}')
        await c.wait_for("mystery.event")
        assert c.raw[-1] == '{"type":"mystery.event"}'


@pytest.mark.parametrize(("how", "code"), [(1001, 1001), ("abrupt", 1006)])
async def test_disconnect_from_the_server_side(start_sim, how, code):
    sim = await start_sim()
    async with connect(sim, configure={}) as c:
        await sim.disconnect(how)
        assert await c.wait_closed(5) == code
    assert sim.sessions[0].closed == code
    with pytest.raises(RuntimeError):
        await sim.send_raw("{}")  # no longer live


async def test_a_crashing_session_is_closed_1011_and_recorded(nursery, monkeypatch):
    from hydrad.sim.session import SimSession

    def boom(self, obj, event_id):
        raise RuntimeError("simulated simulator bug")

    monkeypatch.setattr(SimSession, "_on_update", boom)
    sim = Simulator(SimConfig())
    await nursery.start(sim.serve)
    async with connect(sim, configure={}) as c:
        await c.send("session.update", session={"tools": []})
        assert await c.wait_closed(5) == 1011
    assert len(sim.errors) == 1 and sim.sessions[0].closed == 1011
    async with connect(sim, configure={}) as again:  # the server keeps serving
        assert again.close_code is None


# ---------------------------------------------------------------------------- units: config, VAD, voice, CLI


SCENARIO_TOML = """
reply_s = 1.5
transcripts = true
max_sessions = 2
server_full = [3]

[turns.1]
tool_calls = [{ name = "get_weather", arguments = { city = "Paris" } }]
split = 5

[turns.2]
close = 1011
after_ms = 300
"""


def test_load_scenario_toml_and_json(tmp_path):
    toml_file = tmp_path / "s.toml"
    toml_file.write_text(SCENARIO_TOML)
    cfg = load_scenario(toml_file)
    assert (cfg.reply_s, cfg.transcripts, cfg.max_sessions, cfg.server_full) == (1.5, True, 2, frozenset({3}))
    assert cfg.turns[1].tool_calls[0].arguments_json() == '{"city":"Paris"}' and cfg.turns[1].split == 5
    assert (cfg.turns[2].close, cfg.turns[2].after_ms) == (1011, 300)
    json_file = tmp_path / "s.json"
    json_file.write_text(json.dumps({"idle_timeout_s": 1, "turns": [{"turn": 3, "error": "internal_error"}]}))
    cfg2 = load_scenario(json_file)
    assert cfg2.idle_timeout_s == 1.0 and cfg2.turns[3].error == "internal_error"
    for bad in ({"reply_sec": 1}, {"turns": {"1": {"clsoe": 1000}}}, {"voice_validation": "maybe"},
                {"turns": {"1": {"close": "soon"}}}, {"transcripts": "yes"}):
        json_file.write_text(json.dumps(bad))
        with pytest.raises(ScenarioError):
            load_scenario(json_file)


def test_documented_scenario_example_loads(tmp_path):
    doc = (ROOT / "docs" / "simulator.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert blocks, "docs/simulator.md should contain a TOML scenario example"
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block)
        assert isinstance(load_scenario(path), SimConfig)


def _vad_events(chunks: list[bytes]) -> list[Any]:
    ids = itertools.count()
    det = TurnDetector(lambda: f"item_{next(ids)}")
    return [ev for chunk in chunks for ev in det.feed(chunk)]


def test_vad_rechunks_any_append_size():
    audio = b"\0" * 6400 + HELLO + b"\0" * 32000
    steady = _vad_events([audio[i:i + 640] for i in range(0, len(audio), 640)])
    sizes, odd, i = itertools.cycle([320, 960, 1282, 646, 1280, 2]), [], 0
    while i < len(audio):
        n = next(sizes)
        odd.append(audio[i:i + n])
        i += n
    assert _vad_events(odd) == steady
    kinds = [type(e).__name__ for e in steady]
    assert kinds == ["SpeechStartedEv", "SpeechStoppedEv", "TurnCompleted"]
    assert steady[0].audio_start_ms == 200


@pytest.mark.parametrize(("speech", "kind", "ms"), [
    (synthesize(3, 0.12, RATE), "TurnDiscarded", 120),
    (HELLO[: int(0.2 * RATE) * 2], "TurnDiscarded", 200),
    (synthesize(3, 0.3, RATE), "TurnCompleted", 300),
])
def test_vad_measures_speech_not_webrtcvad_hangover(speech, kind, ms):
    events = _vad_events([b"\0" * 3200 + speech + b"\0" * 32000])
    assert [type(e).__name__ for e in events] == ["SpeechStartedEv", "SpeechStoppedEv", kind]
    assert events[0].audio_start_ms == 100 and events[2].speech_ms == ms
    assert events[1].audio_end_ms == 100 + ms  # speech_stopped is not delayed by the hangover


def test_voice_is_speech_like_with_fades_and_peak():
    pcm = synthesize(4, 1.0, 24000)
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert 20 * math.log10(np.abs(x).max() / 32767) == pytest.approx(-10, abs=0.5)
    assert abs(x[0]) < 50 and abs(x[-1]) < 50  # 5 ms fades
    assert dominant_hz(pcm, 24000) == pytest.approx(response_f0(4), rel=0.01)
    assert [response_f0(n) for n in (1, 2, 10, 11)] == [200, 240, 560, 200]
    vad = webrtcvad.Vad(2)
    speech16 = synthesize(7, 1.0, RATE)
    voiced = [vad.is_speech(speech16[i:i + FRAME], RATE) for i in range(0, len(speech16) - FRAME + 1, FRAME)]
    assert sum(voiced) >= 0.9 * len(voiced)


@given(st.text(max_size=60), st.integers(min_value=1, max_value=12))
def test_split_reassembles(text, parts):
    pieces = _split(text, parts)
    assert "".join(pieces) == text
    assert len(pieces) == (min(parts, len(text)) if text else 1)


def test_cli_flags_override_scenario(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO_TOML)
    args = build_parser().parse_args(["--scenario", str(path), "--reply-s", "0.7", "--transcripts",
                                      "--no-input-speed-guard", "--bad-key", "nope", "--unknown-type", "ignore"])
    cfg = config_from_args(args)
    assert (cfg.reply_s, cfg.transcripts, cfg.max_input_speed, cfg.bad_keys, cfg.unknown_type) == (
        0.7, True, None, frozenset({"nope"}), "ignore")
    assert cfg.max_sessions == 2 and build_parser().parse_args([]).port == 8765
