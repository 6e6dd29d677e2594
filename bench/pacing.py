"""Uplink pacing and barge-in cut on the wav backend, over 5 real runs (daemon + engine + simulator).

Usage: .venv/bin/python bench/pacing.py   (from the repository root)
Prints the uplink frame rate against the real-time 50 frames/s, its jitter, and the time from
the barge-in event to the engine being silent.
"""
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import running, HELLO, INTERRUPT
from hydrad.sim.config import SimConfig, TurnAction

async def main():
    stops, rates, jit = [], [], []
    for i in range(5):
        tmp = Path(tempfile.mkdtemp())
        sim = SimConfig(reply_s=1.0, turns={1: TurnAction(reply_s=5.0)})
        async with running(tmp, sim_config=sim, mic=[(HELLO, 0.2), (INTERRUPT, 4.8)]) as rig:
            b = await rig.wait_for(lambda: rig.events("barge_in"), what="barge")
            stops.append(b[0].fields["stop_ms"])
            await trio.sleep(1.0)
            fr = [t for t, f in rig.sim.sessions[0].received if f.get("type") == "input_audio_buffer.append"]
            fr = fr[10:]
            rates.append((len(fr) - 1) / (fr[-1] - fr[0]))
            gaps = [b - a for a, b in zip(fr, fr[1:])]
            jit.append(statistics.pstdev(gaps) * 1000)
    print("barge-in stop_ms (event -> engine silent):", stops, "median", statistics.median(stops))
    print("uplink rate frames/s:", [round(r, 3) for r in rates], "error % max", round(max(abs(r - 50) / 50 * 100 for r in rates), 3))
    print("inter-frame jitter ms (stdev):", [round(j, 2) for j in jit])
trio.run(main)
