"""``hydrad demo``: a whole conversation offline, in one process, in about 15 seconds.

The embedded simulator plays Hydra; the daemon runs with the ``wav`` engine backend, its mic
fed by two bundled utterances (the second one talks over the agent's first reply), and its
speaker written to ``<out>/speaker.wav``. Turn 2 makes the model call a tool. The timeline
printed at the end shows what happened and how fast.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from .config import RecordingConfig, Secret, config_from_dict
from .events import Event, EventBus
from .observe.recorder import Recorder
from .observe.timeline import render_timeline
from .pipeline.daemon import Daemon
from .session.tools import StaticTools
from .sim.config import SimConfig, ToolCallSpec, TurnAction
from .sim.server import Simulator

DATA = Path(__file__).parent / "data"
MIC_SCHEDULE = [("hello.wav", 0.3), ("interrupt.wav", 5.0)]


class Timeline:
    """Collects the events of a run and renders them for a person (also used by tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.t0: float | None = None

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def render(self, t0: float, out: TextIO) -> None:
        def ms(t: float) -> str:
            return f"{(t - t0) * 1000:8.0f} ms"

        lines = {
            "session_configured": lambda f: f"session configured  (output {f.get('output_rate')} Hz)",
            "speech_started": lambda f: "user starts speaking" + ("  << over the agent" if f.get("during_response") else ""),
            "speech_stopped": lambda f: "user stops speaking",
            "user_turn_done": lambda f: f"user turn {f.get('status')}",
            "response_created": lambda f: f"response {f.get('response_id')} created",
            "response_audio_started": lambda f: f"first audible sample of {f.get('response_id')}"
                                                 + (f"  (end of speech -> heard: {f['latency_ms']:.0f} ms)" if f.get("latency_ms") is not None else ""),
            "barge_in": lambda f: f"BARGE-IN ({f.get('trigger')}): {f.get('response_id')} cut after "
                                  f"{(f.get('heard_s') or 0):.2f} s heard; silent {f.get('stop_ms')} ms after the event",
            "tool_call": lambda f: f"tool call {f.get('name')}({f.get('arguments')})",
            "tool_result": lambda f: f"tool result -> {f.get('output')}" + (f"  ERROR {f['error']}" if f.get("error") else "")
                                     + f"  ({f.get('duration_ms')} ms)",
            "response_done": lambda f: f"response {f.get('response_id')} done: {f.get('status')}"
                                       + (f" ({f['reason']})" if f.get("reason") else "")
                                       + ("  [cut by barge-in]" if f.get("metrics", {}).get("cut_by_barge_in") else ""),
            "cancel_requested": lambda f: f"cancel requested by {f.get('source')}",
            "service_error": lambda f: f"service error {f.get('code')}: {f.get('message')}",
        }
        print("\nConversation timeline (time since the microphone opened)", file=out)
        print("-" * 78, file=out)
        for e in self.events:
            if e.name in lines and e.t >= t0 - 1:
                print(f"{ms(e.t)}  {lines[e.name](e.fields)}", file=out)
        print("-" * 78, file=out)
        print("Per response:", file=out)
        print(f"  {'response':<20} {'status':<22} {'speech->1st delta':>17} {'speech->heard':>13} {'audio':>7} {'heard':>7}",
              file=out)
        for e in self.named("response_done"):
            m: dict[str, Any] = e.fields.get("metrics", {})
            status = f"{e.fields.get('status')}" + (f"/{e.fields['reason']}" if e.fields.get("reason") else "")
            status += ", cut" if m.get("cut_by_barge_in") else ""
            d1 = m.get("end_of_speech_to_first_delta_ms")
            da = m.get("end_of_speech_to_first_audible_ms")
            print(f"  {e.fields.get('response_id'):<20} {status:<22} {_fmt(d1):>17} {_fmt(da):>13} "
                  f"{m.get('response_audio_s', 0):>6.2f}s {m.get('heard_s', 0):>6.2f}s", file=out)


def _conversation_complete(timeline: Timeline) -> bool:
    """A barge-in happened, and the narration after the tool result was heard to its end."""
    if not timeline.named("barge_in") or not timeline.named("tool_result"):
        return False
    t_tool = timeline.named("tool_result")[-1].t
    return any(e.t > t_tool and e.fields.get("status") == "completed" and e.fields["metrics"].get("heard_samples")
               and not e.fields["metrics"].get("cut_by_barge_in") for e in timeline.named("response_done"))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def demo_tools() -> StaticTools:
    tools = StaticTools()

    def get_time(timezone: str = "UTC") -> dict[str, str]:
        now = dt.datetime.now(dt.timezone.utc)
        return {"timezone": timezone, "time": now.strftime("%H:%M"), "date": now.strftime("%Y-%m-%d")}

    tools.add({"name": "get_time", "description": "Current time and date.",
               "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}, get_time)
    return tools


def demo_sim_config() -> SimConfig:
    return SimConfig(
        reply_s=2.0,
        turns={
            1: TurnAction(reply_s=4.0),
            2: TurnAction(tool_calls=(ToolCallSpec("get_time", {"timezone": "UTC"}),), split=3),
        },
    )


async def run_demo(out_dir: str = "demo-out", quiet: bool = False, *, timeout_s: float = 40.0) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    speaker = out / "speaker.wav"
    speaker.unlink(missing_ok=True)
    recording = out / "recording"
    shutil.rmtree(recording, ignore_errors=True)
    bus = EventBus()
    timeline = Timeline()
    bus.subscribe(timeline)
    sim = Simulator(demo_sim_config())
    ok = False
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        cfg = config_from_dict({
            "hydra": {"url": f"ws://127.0.0.1:{port}/waves/v1/s2s"},
            "audio": {"backend": "wav", "wav": {
                "mic": [{"path": str(DATA / name), "at": at} for name, at in MIC_SCHEDULE],
                "speaker": str(speaker), "speaker_rate": 24000}},
            "control": {"enabled": False},
        }, "hydrad demo")
        if not quiet:
            print(f"hydrad demo: simulator on ws://127.0.0.1:{port}, speaker -> {speaker}", file=sys.stderr)
        daemon = Daemon(cfg, Secret("demo-key", "demo"), tools=demo_tools(), bus=bus,
                        engine_options={"t0_speaker": time.monotonic()})
        recorder = Recorder(RecordingConfig(enabled=True, dir=str(recording), keep_turns=10))
        bus.subscribe(recorder)
        await nursery.start(recorder.run)
        daemon.recorder = recorder
        await nursery.start(daemon.run)
        with trio.move_on_after(timeout_s):
            while not _conversation_complete(timeline):
                await trio.sleep(0.1)
            ok = True
        await trio.sleep(0.3)
        daemon.request_stop()
        with trio.move_on_after(5):
            await daemon.stopped.wait()
        nursery.cancel_scope.cancel()
    recorder.close()
    t0 = daemon.mic_t0 or (timeline.events[0].t if timeline.events else 0.0)
    timeline.render(t0, sys.stdout)
    picture = render_timeline(recording, out / "timeline.png", title="hydrad demo")
    print(f"\nspeaker audio: {speaker}\ntimeline picture: {picture}", file=sys.stdout)
    if not ok:
        print("hydrad demo: the conversation did not complete in time", file=sys.stderr)
        return 1
    return 0
