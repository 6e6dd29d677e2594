#!/usr/bin/env python3
"""Soak: a long scripted conversation against the simulator, with barge-ins, tool calls and
injected faults; reports turns completed, faults recovered, and RSS / fds / threads before and
after (a leak shows as growth).

    .venv/bin/python bench/soak.py                 # 300 turns (~17 min)
    .venv/bin/python bench/soak.py --turns 600
    .venv/bin/python bench/soak.py --short         # 24 turns, 4 faults (~85 s): what CI runs
    .venv/bin/python bench/soak.py --json out.json

Everything is real and in this process except the audio engine (a real child process, wav
backend): the simulator (``hydrad.sim``), the daemon (``hydrad.pipeline.daemon.Daemon``), the
WebSocket on loopback. The microphone is a schedule of utterances (the first 0.9 s of
``hydrad/data/hello.wav``), one per turn slot; the simulator's action for each user turn is
looked up by time, so the script stays aligned across reconnects (the simulator numbers turns
per session). Slots cycle through::

    normal · normal · tool call · normal · barge-in · normal · FAULT ·
    normal · tool call · barge-in · normal · FAULT

and the faults rotate through: close 1011 mid-reply, the simulator killed and restarted on the
same port, the engine SIGKILLed mid-reply, a TCP drop mid-reply (no close frame),
``internal_error`` + close, and a close followed by two ``server_full``/1013 refusals.

A fault counts as recovered when the daemon is back (a new configured session; for the engine:
a new engine process running, the session untouched) within ``--recovery-bound`` seconds.
``turns_completed`` counts user turns answered by a reply that played to its end, plus replies
cut by a scripted barge-in; turns scripted to fail and turns spoken while disconnected are not.

RSS, fds and threads are measured for this process (daemon + simulator: the simulator's
per-session records are trimmed as the soak runs so that they do not count as growth) and for
the engine child, after a warm-up (three cycles: every slot and fault kind has run once, so
lazy imports and first-use caches are in; a quarter of the run in ``--short``) and at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydrad.config import Secret, config_from_dict  # noqa: E402
from hydrad.events import Event, EventBus  # noqa: E402
from hydrad.pipeline.daemon import Daemon  # noqa: E402
from hydrad.session.tools import StaticTools  # noqa: E402
from hydrad.sim.config import SimConfig, ToolCallSpec, TurnAction  # noqa: E402
from hydrad.sim.server import Simulator  # noqa: E402

HELLO = ROOT / "hydrad" / "data" / "hello.wav"
UTTERANCE_S = 0.9
CYCLE = ["normal", "normal", "tool", "normal", "barge", "normal", "fault",
         "normal", "tool", "barge", "normal", "fault"]
FAULTS = ["close_1011", "sim_restart", "engine_kill", "tcp_drop", "internal_error", "server_full"]
SLOT_S = {"normal": 3.0, "tool": 4.0, "barge": 2.3, "fault": 4.5}
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Riga"]


# ---------------------------------------------------------------------------- resources

def proc_resources(pid: int) -> dict[str, int]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {"rss_kb": 0, "fds": 0, "threads": 0}
    values = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)}
    return {"rss_kb": int(values["VmRSS"].split()[0]), "fds": fds, "threads": int(values["Threads"])}


def live_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if rest[0] != "Z" and int(rest[1]) == pid:
                out.append(int(entry))
    return out


# ---------------------------------------------------------------------------- script

@dataclasses.dataclass
class Slot:
    index: int
    kind: str            # normal | tool | barge | fault
    start: float         # seconds after the mic opens
    fault: str | None = None

    def action(self) -> TurnAction:
        if self.kind == "tool":
            city = CITIES[self.index % len(CITIES)]
            return TurnAction(tool_calls=(ToolCallSpec("weather", {"city": city}),), reply_s=0.6)
        if self.kind == "barge":
            return TurnAction(reply_s=3.0)
        if self.kind == "fault" and self.fault in ("close_1011", "tcp_drop", "internal_error"):
            close: Any = "abrupt" if self.fault == "tcp_drop" else 1011
            error = "internal_error" if self.fault == "internal_error" else None
            return TurnAction(reply_s=2.0, close=close, error=error, after_ms=300)
        if self.kind == "fault" and self.fault == "engine_kill":
            return TurnAction(reply_s=2.0)
        return TurnAction(reply_s=0.6)


def build_script(turns: int) -> list[Slot]:
    slots, t, faults = [], 0.5, 0
    for i in range(turns):
        kind = CYCLE[i % len(CYCLE)]
        fault = None
        if kind == "fault":
            fault = FAULTS[faults % len(FAULTS)]
            faults += 1
        slots.append(Slot(i, kind, t, fault))
        t += SLOT_S[kind]
    return slots


class TimedScenario:
    """``Simulator.scenario`` stand-in: the action of the slot whose utterance is the latest."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.mic_t0: float | None = None

    def slot_at(self, t: float) -> Slot | None:
        """The slot whose utterance started last before monotonic time ``t``."""
        if self.mic_t0 is None:
            return None
        offset = t - self.mic_t0
        current = None
        for slot in self.slots:
            if slot.start <= offset:
                current = slot
            else:
                break
        return current

    def get(self, turn: int, default: Any = None) -> TurnAction | None:
        slot = self.slot_at(time.monotonic())
        return slot.action() if slot is not None else default


# ---------------------------------------------------------------------------- bookkeeping

class Stats:
    """Bus sink: counts, and the timestamps the fault bookkeeping needs (no event is kept).

    Each response is attributed to the slot whose utterance preceded its ``response_created``;
    a slot is *completed* when one of its responses played to the end with audio heard, or
    was cut by the user (a barge-in).
    """

    def __init__(self, scenario: TimedScenario) -> None:
        self.scenario = scenario
        self.counts: dict[str, int] = {}
        self.slot_of: dict[str, int] = {}
        self.completed_slots: set[int] = set()
        self.completed_replies = 0
        self.barge_ins = 0
        self.configured_at: list[float] = []
        self.disconnected_at: list[float] = []
        self.tool_errors = 0

    def __call__(self, event: Event) -> None:
        self.counts[event.name] = self.counts.get(event.name, 0) + 1
        f = event.fields
        rid = f.get("response_id")
        if event.name == "response_created" and rid:
            slot = self.scenario.slot_at(event.t)
            if slot is not None:
                self.slot_of[rid] = slot.index
        elif event.name == "response_done" and f.get("status") == "completed":
            metrics = f.get("metrics") or {}
            if (metrics.get("heard_samples") or 0) > 0:
                self.completed_replies += 1
                if rid in self.slot_of:
                    self.completed_slots.add(self.slot_of[rid])
            self.slot_of.pop(rid, None)
        elif event.name == "response_done":
            if rid in self.slot_of and not (event.fields.get("status") == "cancelled"):
                self.slot_of.pop(rid, None)
        elif event.name == "barge_in" and f.get("trigger") == "speech_started":
            self.barge_ins += 1
            if rid in self.slot_of:
                self.completed_slots.add(self.slot_of.pop(rid))
        elif event.name == "session_configured":
            self.configured_at.append(event.t)
        elif event.name == "session_disconnected":
            self.disconnected_at.append(event.t)
        elif event.name == "tool_result" and f.get("error"):
            self.tool_errors += 1


@dataclasses.dataclass
class FaultRecord:
    kind: str
    slot: int
    injected_at: float | None = None
    recovered_at: float | None = None

    @property
    def recovery_s(self) -> float | None:
        if self.injected_at is None or self.recovered_at is None:
            return None
        return self.recovered_at - self.injected_at


def make_utterance(dir_: Path) -> Path:
    with wave.open(str(HELLO)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    n = int(UTTERANCE_S * rate)
    cut = x[:n].copy()
    fade = int(0.01 * rate)
    cut[-fade:] *= np.linspace(1, 0, fade)
    path = dir_ / "utterance.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(cut.astype("<i2").tobytes())
    return path


# ---------------------------------------------------------------------------- the run

async def soak(turns: int, recovery_bound: float, workdir: Path, progress: bool,
               trace: bool = False) -> dict[str, Any]:
    slots = build_script(turns)
    utterance = make_utterance(workdir)
    scenario = TimedScenario(slots)
    sim = Simulator(SimConfig(reply_s=0.6, realtime_factor=4.0))
    sim.scenario = scenario  # type: ignore[assignment]
    stats = Stats(scenario)
    bus = EventBus()
    bus.subscribe(stats)
    tools = StaticTools()
    tools.add({"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}},
              lambda city: {"city": city, "temp_c": 12})
    faults: list[FaultRecord] = []
    t_start = time.monotonic()

    async with trio.open_nursery() as outer:
        box: dict[str, trio.CancelScope] = {}

        async def serve(port: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                box["scope"] = scope
                await sim.serve(port=port, task_status=task_status)

        port = await outer.start(serve, 0)
        cfg = config_from_dict({
            "hydra": {"url": f"ws://127.0.0.1:{port}/waves/v1/s2s", "ping_interval_s": 1.0, "ping_timeout_s": 2.0},
            "audio": {"backend": "wav", "wav": {"mic": [{"path": str(utterance), "at": s.start} for s in slots],
                                                "speaker": str(workdir / "speaker.wav")}},
            "control": {"enabled": False},
            "reconnect": {"initial_s": 0.2, "max_s": 2.0, "server_full_max_s": 2.0},
        }, "soak")
        daemon = Daemon(cfg, Secret("soak-key", "soak"), tools=tools, bus=bus, engine_options={"speaker": None})
        await outer.start(daemon.run)
        with trio.fail_after(20):
            while daemon.mic_t0 is None:
                await trio.sleep(0.01)
        mic_t0 = scenario.mic_t0 = daemon.mic_t0

        async def at(offset: float) -> None:
            await trio.sleep_until(trio.current_time() + max(0.0, mic_t0 + offset - time.monotonic()))

        def trim_sim_records() -> None:
            """The simulator keeps a record per connection: drop closed ones (test harness
            memory, not the daemon's) and bound the live ones' frame logs."""
            closed = [r for r in sim.sessions[:-2] if not r.live]
            for rec in closed:
                sim.sessions.remove(rec)
            for rec in sim.sessions:
                del rec.received[:-50]
                del rec.sent[:-50]

        async def wait_until(pred: Any, bound: float) -> float | None:
            with trio.move_on_after(bound):
                while not pred():
                    await trio.sleep(0.01)
                return time.monotonic()
            return None

        before: dict[str, Any] = {}
        # "Before" is taken once every kind of slot and fault has run (lazy imports, first-use
        # caches), or after a quarter of a short run.
        warmup = min(3 * len(CYCLE), turns // 4)
        for slot in slots:
            await at(slot.start)
            trim_sim_records()
            if slot.index == warmup:
                before = {"self": proc_resources(os.getpid()), "engine": proc_resources(daemon.engine.pid or 0),
                          "engine_pid": daemon.engine.pid, "t": time.monotonic()}
                if trace:
                    import tracemalloc

                    before["trace"] = tracemalloc.take_snapshot()
            if progress:
                print(f"[{time.monotonic() - t_start:7.1f} s] slot {slot.index:4d} {slot.kind:6s} {slot.fault or ''} "
                      f"state={daemon.state} replies={stats.completed_replies} barge={stats.barge_ins}",
                      file=sys.stderr)
            if slot.kind != "fault":
                continue
            rec = FaultRecord(slot.fault or "?", slot.index)
            faults.append(rec)
            n_conf = len(stats.configured_at)
            n_disc = len(stats.disconnected_at)
            if slot.fault in ("close_1011", "tcp_drop", "internal_error"):
                await wait_until(lambda: len(stats.disconnected_at) > n_disc, 8.0)
                if len(stats.disconnected_at) > n_disc:
                    rec.injected_at = stats.disconnected_at[n_disc]
            elif slot.fault == "server_full":
                await at(slot.start + 2.2)
                n = sim.sessions[-1].connection if sim.sessions else 0  # the latest connection number
                sim.config = dataclasses.replace(sim.config, server_full=frozenset({n + 1, n + 2}))
                rec.injected_at = time.monotonic()
                try:
                    await sim.disconnect(1011)
                except RuntimeError:
                    rec.injected_at = None
            elif slot.fault == "sim_restart":
                await at(slot.start + 2.2)
                box["scope"].cancel()
                rec.injected_at = time.monotonic()
                await trio.sleep(0.5)
                await outer.start(serve, port)
            elif slot.fault == "engine_kill":
                await wait_until(lambda: stats.counts.get("response_audio_started", 0) and daemon.engine.pid, 3.0)
                await at(slot.start + 2.0)
                old = daemon.engine.pid
                if old:
                    os.kill(old, signal.SIGKILL)
                    rec.injected_at = time.monotonic()
                    rec.recovered_at = await wait_until(
                        lambda: daemon.engine.state == "running" and daemon.engine.pid not in (None, old), recovery_bound)
                    if len(stats.configured_at) != n_conf:  # the session must have survived
                        rec.recovered_at = None
                continue
            if rec.injected_at is not None:
                t_inj = rec.injected_at
                rec.recovered_at = await wait_until(
                    lambda: any(t > t_inj for t in stats.configured_at) and daemon.state == "connected", recovery_bound)
                if rec.recovered_at is not None:
                    rec.recovered_at = min(t for t in stats.configured_at if t > t_inj)
            if slot.fault == "server_full":
                sim.config = dataclasses.replace(sim.config, server_full=False)

        await at(slots[-1].start + SLOT_S[slots[-1].kind] + 1.0)
        trim_sim_records()
        after = {"self": proc_resources(os.getpid()), "engine": proc_resources(daemon.engine.pid or 0),
                 "engine_pid": daemon.engine.pid}
        growth: list[str] = []
        if trace and "trace" in before:
            import gc
            import tracemalloc

            gc.collect()
            stats_ = tracemalloc.take_snapshot().compare_to(before["trace"], "lineno")
            growth = [str(st) for st in stats_[:15]]
        elapsed = time.monotonic() - t_start
        counters = dict(daemon.counters)
        engine_restarts = daemon.engine.restarts
        daemon.request_stop()
        with trio.move_on_after(10):
            await daemon.stopped.wait()
        clean_stop = daemon.stopped.is_set()
        outer.cancel_scope.cancel()

    await trio.sleep(0.5)
    leaked = live_children(os.getpid())
    # Faults that hit the reply itself; sim_restart/server_full/engine_kill strike after it or let it finish.
    scripted_fault_turns = sum(1 for s in slots if s.fault in ("close_1011", "tcp_drop", "internal_error"))
    recoveries = [f.recovery_s for f in faults if f.recovery_s is not None]
    b, a = before.get("self", {}), after["self"]
    return {
        "turns_scripted": len(slots),
        "turns_scripted_to_fail": scripted_fault_turns,
        "turns_completed": len(stats.completed_slots),
        "replies_completed": stats.completed_replies,
        "barge_ins": stats.barge_ins,
        "tool_calls": stats.counts.get("tool_call", 0),
        "tool_errors": stats.tool_errors,
        "sessions": len(stats.configured_at),
        "faults_injected": len(faults),
        "faults_recovered": sum(1 for f in faults if f.recovery_s is not None),
        "faults": [{"kind": f.kind, "slot": f.slot, "recovery_s": None if f.recovery_s is None else round(f.recovery_s, 3)}
                   for f in faults],
        "recovery_s": {"max": round(max(recoveries), 3) if recoveries else None,
                       "mean": round(sum(recoveries) / len(recoveries), 3) if recoveries else None},
        "rss_kb": {"before": b.get("rss_kb"), "after": a["rss_kb"]},
        "fds": {"before": b.get("fds"), "after": a["fds"]},
        "threads": {"before": b.get("threads"), "after": a["threads"]},
        "engine": {"before": before.get("engine"), "after": after["engine"], "restarts": engine_restarts,
                   "note": "different processes when an engine_kill fault ran"},
        "uplink_frames_sent": counters.get("uplink_frames_sent", 0),
        "uplink_frames_dropped": counters.get("uplink_frames_dropped.backlog", 0),
        "warmup_slots": warmup,
        "measured_over_s": round(time.monotonic() - before["t"], 1) if before else None,
        "elapsed_s": round(elapsed, 1),
        "clean_stop": clean_stop,
        "leaked_processes": leaked,
        "events": dict(sorted(stats.counts.items())),
        **({"python_heap_growth_top": growth} if trace else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=300)
    p.add_argument("--short", action="store_true", help="24 turns, 4 faults (CI)")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--recovery-bound", type=float, default=15.0, help="seconds a fault may take to recover")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tracemalloc", action="store_true", help="report where the Python heap grew (slower)")
    args = p.parse_args(argv)
    turns = 24 if args.short else args.turns
    with tempfile.TemporaryDirectory(prefix="hydrad-soak-") as tmp:
        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start(5)
        result = trio.run(soak, turns, args.recovery_bound, Path(tmp), not args.quiet, args.tracemalloc)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (result["faults_recovered"] == result["faults_injected"] and not result["leaked_processes"]
          and result["clean_stop"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
