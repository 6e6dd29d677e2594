"""A scripted conversation on a fake clock, for the observers' tests and examples.

It drives the real :class:`~hydrad.session.conversation.Conversation` with server events the
way the daemon does, and plays the engine's part (first-audible, played counts, flush with a
fade), so the events it publishes are the real ones, with realistic timing. It also feeds the
recorder taps (mic frames every 20 ms, played chunks) when given a recorder.

The default script, on a 24 kHz session:

1. user speaks ("turn 1"), response ``resp_1`` with 2 s of audio, played to the end;
2. user speaks ("turn 2"), response ``resp_2`` calls the tool ``get_weather`` (350 ms), then
   ``resp_3`` narrates; 1.3 s into it the user barges in: ``speech_started`` flushes playback,
   the service cancels ``resp_3``, the interruption is discarded (noise).

So: 2 completed user turns (+1 discarded), 3 responses (2 completed, 1 cancelled), 1 barge-in,
1 tool call.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..events import Event, EventBus
from ..protocol import server_events as S
from ..session.conversation import (
    ArmDebounce, Conversation, Effect, Emit, Flush, Play, RunTool, Send, SetGate, SetOutputRate,
)

MIC_RATE = 16000
FRAME_S = 0.02


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def speech_like(seconds: float, rate: int, f0: float, amplitude: float = 0.35, seed: int = 1) -> np.ndarray:
    """A buzz with syllable-rate amplitude modulation: looks like speech in a waveform plot."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = sum(np.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 6))
    syll = np.clip(np.sin(2 * math.pi * 3.7 * t + seed) * 0.6 + 0.5, 0, 1) ** 1.5
    ramp = np.minimum(1, np.minimum(t, t[::-1] if n else t) / 0.05)
    x = amplitude * tone / 1.6 * syll * ramp
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


@dataclass(order=True)
class _Action:
    t: float
    seq: int
    fn: Callable[[], None] = field(compare=False)


class ScriptedConversation:
    """Run the default script (see the module doc). ``events`` holds what was published."""

    def __init__(self, bus: EventBus | None = None, recorder: Any = None, *, clock: FakeClock | None = None,
                 output_rate: int = 24000, engine_latency_s: float = 0.12, echo: float = 0.0) -> None:
        self.clock = clock or FakeClock(1000.0)
        self.t0 = self.clock.t
        self.bus = bus or EventBus()
        self.recorder = recorder
        self.rate = output_rate
        self.latency = engine_latency_s
        self.echo = echo
        self.events: list[Event] = []
        self.sent: list[str] = []
        self.bus.subscribe(self.events.append)
        self.conv = Conversation({"instructions": "test"}, "hydra-v1.1", "immediate", 0.2, clock=self.clock)
        self._q: list[_Action] = []
        self._seq = itertools.count()
        self._speech: list[tuple[float, np.ndarray]] = []  # what the user says (mic), by start time
        self._engine_free_at = 0.0
        self._playing: dict[str, dict[str, Any]] = {}
        self._played_audio: list[tuple[float, np.ndarray]] = []  # (t, samples at output rate) for echo

    # ------------------------------------------------------------------ scheduling
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, _Action(self.t0 + t, next(self._seq), fn))

    def server(self, t: float, ev: S.ServerEvent) -> None:
        self.at(t, lambda: self.apply(self.conv.on_event(ev)))

    def apply(self, effects: list[Effect]) -> None:
        now = self.clock()
        for eff in effects:
            if isinstance(eff, Emit):
                self.bus.publish(eff.event)
            elif isinstance(eff, Send):
                self.sent.append(eff.kind)
            elif isinstance(eff, Play):
                self._engine_play(eff.response_id, eff.pcm)
            elif isinstance(eff, Flush):
                self._engine_flush(now)
            elif isinstance(eff, RunTool):
                self.bus.publish(Event("tool_call", {"call_id": eff.call_id, "name": eff.name,
                                                     "arguments": eff.arguments}, now))
                cid, started = eff.call_id, now
                self.at(now - self.t0 + 0.35, lambda: self.apply(self.conv.on_tool_result(
                    cid, '{"temperature_c": 21}', None, (self.clock() - started) * 1000)))
            elif isinstance(eff, ArmDebounce):
                tok = eff.token
                self.at(now - self.t0 + eff.delay_s, lambda: self.apply(self.conv.on_debounce(tok)))
            elif isinstance(eff, (SetGate, SetOutputRate)):
                pass

    # ------------------------------------------------------------------ the engine's part
    def _engine_play(self, rid: str, pcm: bytes) -> None:
        now = self.clock()
        if self.recorder is not None:
            self.recorder.on_play(rid, pcm, self.rate)
        p = self._playing.get(rid)
        n = len(pcm) // 2
        if p is None:
            start = max(now + self.latency, self._engine_free_at)
            p = self._playing[rid] = {"first": start, "end": start, "samples": 0, "cut": False, "gen": 0}
            first = start
            self.at(first - self.t0 + 0.005, lambda: self.apply(self.conv.on_played(rid, first, 0, self.rate, False)))
        if p["cut"]:
            return
        self._played_audio.append((p["end"], np.frombuffer(pcm, dtype="<i2")))
        p["end"] += n / self.rate
        p["samples"] += n
        self._engine_free_at = p["end"]
        p["gen"] += 1
        gen, end, total = p["gen"], p["end"], p["samples"]

        def drained() -> None:  # nothing more arrived before the buffer ran dry: done
            if p["gen"] == gen and not p["cut"]:
                self.apply(self.conv.on_played(rid, p["first"], total, self.rate, True))

        self.at(end - self.t0 + 0.01, drained)

    def _engine_flush(self, now: float) -> None:
        t_silent = now + 0.012  # a 10 ms fade plus a block
        for rid, p in self._playing.items():
            if p["cut"] or p["end"] <= now:
                continue
            p["cut"] = True
            heard = max(0, int((t_silent - p["first"]) * self.rate))
            dropped = max(0, p["samples"] - heard)
            p["samples"] = heard
            self._played_audio = [(t, a[: max(0, int((t_silent - t) * self.rate))]) if t + len(a) / self.rate > t_silent
                                  else (t, a) for t, a in self._played_audio]
            self._engine_free_at = t_silent

            def flushed(rid: str = rid, dropped: int = dropped, heard: int = heard, first: float = p["first"]) -> None:
                if self.recorder is not None:
                    self.recorder.on_flush(rid, t_silent, dropped)
                self.apply(self.conv.on_flushed(rid, dropped, now + 0.002, t_silent))
                self.apply(self.conv.on_played(rid, first, heard, self.rate, True))

            self.at(now - self.t0 + 0.015, flushed)

    # ------------------------------------------------------------------ the script
    def say(self, start: float, seconds: float, f0: float = 130.0, seed: int = 1) -> None:
        self._speech.append((self.t0 + start, speech_like(seconds, MIC_RATE, f0, seed=seed)))

    def respond(self, t: float, rid: str, seconds: float, chunk_s: float = 0.2, pace: float = 4.0,
                done: bool = True) -> float:
        """Deltas of ``seconds`` of audio from ``t``, ``pace`` times faster than real time."""
        audio = speech_like(seconds, self.rate, 210.0, 0.3, seed=len(rid))
        step = int(chunk_s * self.rate)
        k = 0
        for k, i in enumerate(range(0, len(audio), step)):
            pcm = audio[i:i + step].astype("<i2").tobytes()
            self.server(t + k * chunk_s / pace, S.AudioDelta(response_id=rid, pcm=pcm))
        end = t + (k + 1) * chunk_s / pace
        if done:
            self.server(end, S.AudioDone(response_id=rid))
            self.server(end + 0.05, S.ResponseDone(response_id=rid, status="completed"))
        return end

    def script_default(self) -> float:
        """Schedule the default script; returns its duration in seconds."""
        ms = 1000
        self.server(0.0, S.SessionCreated(session_id="sess_scripted"))
        self.at(0.0, lambda: self.bus.publish(Event("session_connected", {
            "session_id": "sess_scripted", "model": "hydra-v1.1", "url": "wss://example/x"}, self.clock())))
        self.server(0.05, S.SessionConfigured(session={"output_audio_sample_rate": self.rate, "voice": "aria"}))
        # Turn 1: speech 1.0-2.2 s (service audio clock from 0.05 s)
        self.say(1.0, 1.2)
        self.server(1.30, S.SpeechStarted(item_id="item_u1", audio_start_ms=int(0.95 * ms)))
        self.server(2.75, S.SpeechStopped(item_id="item_u1", audio_end_ms=int(2.15 * ms)))
        self.server(2.80, S.ItemDone(item=S.Item(id="item_u1", type="message", role="user", status="completed")))
        self.server(2.85, S.ResponseCreated(response_id="resp_1"))
        self.respond(3.10, "resp_1", 2.0)
        # Turn 2: speech 6.5-8.0 s, a tool call, then the narration, barged in on
        self.say(6.5, 1.5, f0=120.0, seed=2)
        self.server(6.80, S.SpeechStarted(item_id="item_u2", audio_start_ms=int(6.45 * ms)))
        self.server(8.55, S.SpeechStopped(item_id="item_u2", audio_end_ms=int(7.95 * ms)))
        self.server(8.60, S.ItemDone(item=S.Item(id="item_u2", type="message", role="user", status="completed")))
        self.server(8.65, S.ResponseCreated(response_id="resp_2"))
        self.server(8.80, S.FunctionArgsDone(response_id="resp_2", call_id="call_1", name="get_weather",
                                             arguments='{"city": "Pune"}'))
        self.server(8.85, S.ResponseDone(response_id="resp_2", status="completed"))
        # tool result at 9.15, debounce 0.2 -> response.create at 9.35; resp_3 created at 9.45
        self.server(9.45, S.ResponseCreated(response_id="resp_3"))
        self.respond(9.60, "resp_3", 4.0, done=False)
        # barge-in: the user talks over it at 11.1; the VAD reports it at 11.4
        self.say(11.1, 0.7, f0=150.0, seed=3)
        self.server(11.40, S.SpeechStarted(item_id="item_u3", audio_start_ms=int(11.05 * ms)))
        self.server(11.50, S.ResponseDone(response_id="resp_3", status="cancelled", reason="turn_detected"))
        self.server(12.30, S.SpeechStopped(item_id="item_u3", audio_end_ms=int(11.75 * ms)))
        self.server(12.35, S.ItemDone(item=S.Item(id="item_u3", type="message", role="user", status="incomplete")))
        return 16.0

    # ------------------------------------------------------------------ running
    def run(self, duration: float | None = None) -> list[Event]:
        """Schedule the default script (unless something is scheduled) and run it to the end."""
        if not self._q:
            duration = max(duration or 0.0, self.script_default())
        end = self.t0 + (duration or 16.0)
        rng = np.random.default_rng(7)
        t = self.t0
        while t < end or self._q:
            next_frame = t
            while self._q and self._q[0].t <= next_frame:
                a = heapq.heappop(self._q)
                self.clock.t = max(self.clock.t, a.t)
                a.fn()
            if t < end:
                self.clock.t = max(self.clock.t, t)
                if self.recorder is not None:
                    self.recorder.on_capture(t, self._mic_frame(t, rng))
                t = round(t + FRAME_S, 6)
            elif self._q:
                a = heapq.heappop(self._q)
                self.clock.t = max(self.clock.t, a.t)
                a.fn()
        return self.events

    def _mic_frame(self, t: float, rng: np.random.Generator) -> bytes:
        n = int(FRAME_S * MIC_RATE)
        frame = rng.normal(0, 60, n)
        for start, audio in self._speech:
            i = int(round((t - start) * MIC_RATE))
            if -n < i < len(audio):
                lo, hi = max(i, 0), min(i + n, len(audio))
                frame[lo - i:hi - i] += audio[lo:hi]
        if self.echo:
            for ts, a in self._played_audio:
                i = int(round((t - ts) * self.rate))
                m = int(n * self.rate / MIC_RATE)
                if -m < i < len(a):
                    seg = a[max(i, 0):max(i, 0) + m].astype(np.float64)
                    seg = np.interp(np.linspace(0, len(seg) - 1, n), np.arange(len(seg)), seg) if len(seg) > 1 else np.zeros(n)
                    frame += self.echo * seg
        return np.clip(frame, -32768, 32767).astype("<i2").tobytes()
