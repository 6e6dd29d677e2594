"""End to end over real PortAudio on virtual PulseAudio devices (marker ``audio``).

Speech (espeak-ng) is played into the virtual mic; the daemon's engine captures it with the
``sounddevice`` backend, the simulator answers with a buzz whose pitch names the response
(``response_f0(n)``), the engine plays it on the virtual speaker, and the speaker's monitor
is recorded with ``parec`` on a monotonic timeline (``tests/audio/vaudio.py``).

Timelines: the recording is anchored on chunk arrival times (never later than the audio by
more than the recorder's delivery delay); the engine's ``t_dac`` (PLAYED/FLUSHED) is
PortAudio's estimate of when a sample reaches the "DAC". A null sink renders a sample into
its monitor 5-15 ms before that instant (measured), so the barge-in test calibrates the
recording onto the DAC timeline with a response onset whose DAC time the engine reports,
and checks the bound there.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import trio

from hydrad.sim.config import SimConfig, TurnAction
from hydrad.sim.voice import response_f0

from .audio.fixtures import utterances, vaudio, vaudio_factory  # noqa: F401  (fixtures)
from .audio.rig import audio_daemon
from .audio.vaudio import active_spans, dominant_hz, longest_silence

pytestmark = [pytest.mark.audio, pytest.mark.slow]

RATE = 48000          # virtual speaker (sink) rate = the output device rate we ask PortAudio for
BLOCK_MS = 10
FADE_MS = 5


def _last_stats(rig) -> dict:
    assert rig.stats, "the engine sent no STATS"
    return rig.stats[-1]


async def test_turn_over_real_devices_right_pitch_no_dropped_blocks(vaudio_factory, utterances):  # noqa: F811
    va = vaudio_factory(rate=RATE)
    reply_s = 2.0
    async with audio_daemon(va, sim_config=SimConfig(reply_s=reply_s), sounddevice={"output_rate": RATE}) as rig:
        await rig.wait_for(lambda: rig.events("session_configured"), what="session.configured")
        out = rig.output_info()
        assert out["rate"] == RATE and out["stream"] == "duplex", out
        stats0 = _last_stats(rig) if rig.stats else None
        va.play_mic(utterances["hello"])
        done = await rig.wait_for(lambda: rig.events("response_done"), what="response_done")
        await rig.wait_for(lambda: any(p.get("done") for p in rig.played), what="playback drained")
        await trio.sleep(1.2)  # one more STATS after the turn
        rec = rig.recorder.snapshot()
        stats = _last_stats(rig)
    assert done[0].fields["status"] == "completed"
    assert not [d for d in rig.device if d.get("state") == "lost"], rig.device  # no fault, no reopen
    x = rec.x
    spans = [s for s in active_spans(x, RATE) if s[1] - s[0] > 0.2 * RATE]
    assert len(spans) == 1, f"expected one reply in the recording, got spans {spans}"
    a, b = spans[0]
    # the whole reply, at the right speed (a wrong device rate would stretch it) and pitch
    assert (b - a) / RATE == pytest.approx(reply_s, abs=0.02)
    seg = x[a + RATE // 10: b - RATE // 10]
    assert dominant_hz(seg, RATE) == pytest.approx(response_f0(1), rel=0.01)
    # no dropped block: no run of digital silence inside the reply (a lost 10 ms block = 480 zeros)
    assert longest_silence(x[a:b]) <= 3
    # the engine saw no gap either: no underrun, no PortAudio output underflow during the turn
    under0 = stats0["flags"]["output_underflow"] if stats0 else 0
    assert stats["underruns"] == 0 and stats["flags"]["output_underflow"] == under0, (stats0, stats)
    # the engine's first_audible (t_dac) matches the recording's onset: the monitor sees a sample
    # when the sink renders it, 5-15 ms before PortAudio's DAC time, never after
    first = next(p["first_audible"] for p in rig.played if p.get("first_audible"))
    lead = first - rec.t(a)
    assert -0.005 <= lead <= out["latency"] + 0.005, f"t_dac - recorded onset = {lead * 1000:.1f} ms"


async def test_barge_in_stops_within_one_block_plus_device_latency(vaudio_factory, utterances):  # noqa: F811
    va = vaudio_factory(rate=RATE)
    sim = SimConfig(reply_s=1.5, turns={1: TurnAction(reply_s=8.0)})
    async with audio_daemon(va, sim_config=sim, sounddevice={"output_rate": RATE},
                            audio={"block_ms": BLOCK_MS, "fade_ms": FADE_MS}) as rig:
        await rig.wait_for(lambda: rig.events("session_configured"), what="session.configured")
        va.play_mic(utterances["hello"])
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="reply audio")
        await trio.sleep(1.0)
        va.play_mic(utterances["stop"])
        barge = await rig.wait_for(lambda: rig.events("barge_in"), what="barge_in")
        await rig.wait_for(lambda: len(rig.events("response_done")) >= 2, what="second response")
        await rig.wait_for(lambda: len({p["response_id"] for p in rig.played if p.get("done")}) >= 2,
                           what="second response played")
        await trio.sleep(0.3)
        rec = rig.recorder.snapshot()
        out = rig.output_info()
        r1 = rig.sim.sessions[0].responses[0]
    assert barge[0].fields["response_id"] == r1.id
    assert not [d for d in rig.device if d.get("state") == "lost"], rig.device
    fl = next(f for f in rig.flushed if f.get("response_id") == r1.id)
    x, R = rec.x, RATE
    t_recv = fl["t_received"]
    i_recv = rec.i(t_recv)
    # calibrate the recording onto PortAudio's DAC timeline with response 1's onset: the engine
    # says its first sample reached the DAC at first_audible; the monitor saw it `lead` earlier
    r1_first = next(p["first_audible"] for p in rig.played if p["response_id"] == r1.id and p.get("first_audible"))
    onset = int(np.flatnonzero(np.abs(x) > 0.5)[0])
    lead = r1_first - rec.t(onset)
    assert -0.002 <= lead <= out["latency"], f"monitor lead {lead * 1000:.1f} ms: the timelines disagree"
    # response 1 was playing up to the flush ...
    before = x[i_recv - R // 2: i_recv]
    assert np.abs(before).max() > 1000 and dominant_hz(before, R) == pytest.approx(response_f0(1), rel=0.01)
    # ... and the recording goes (and stays) silent until response 2 starts
    r2_first = next(p["first_audible"] for p in rig.played if p["response_id"] != r1.id and p.get("first_audible"))
    i_r2 = rec.i(r2_first - lead) - int(0.005 * R)
    tail = x[i_recv: i_r2]
    loud = np.flatnonzero(np.abs(tail) > 0.5)
    assert len(loud), "nothing of response 1 after the flush reached the engine: the recording is suspect"
    i_stop = i_recv + int(loud[-1]) + 1     # one past the last audible sample of response 1
    assert i_r2 - i_stop > R // 2, "response 2 started too soon to check the silence"
    t_stop = rec.t(i_stop) + lead           # on the DAC timeline
    stop_ms = (t_stop - t_recv) * 1000
    bound_ms = BLOCK_MS + FADE_MS + out["latency"] * 1000
    detail = (f"silent {stop_ms:.1f} ms after the FLUSH reached the engine (bound: block {BLOCK_MS} + fade "
              f"{FADE_MS} + reported latency {out['latency'] * 1000:.0f} = {bound_ms:.0f} ms); engine t_silent "
              f"{(fl['t_silent'] - t_recv) * 1000:.1f} ms; monitor lead {lead * 1000:.1f} ms")
    assert stop_ms <= bound_ms + 2.0, detail
    # the engine stopped exactly where it says: the faded block was the last one (one block
    # more would be 10 ms off)
    assert abs(t_stop - fl["t_silent"]) <= 0.005, detail
    # no click: around the cut, no step bigger than the signal's own steepest step + peak / fade_n
    slope = np.abs(np.diff(x[i_recv - R // 5: i_recv])).max()
    peak = np.abs(x[i_recv - R // 5: i_recv]).max()
    fade_n = FADE_MS * R // 1000
    steps = np.abs(np.diff(x[i_stop - 3 * fade_n: i_stop + fade_n]))
    assert steps.max() <= slope + peak / fade_n + 2, f"click: step {steps.max():.0f} > {slope:.0f} + {peak / fade_n:.0f}"
    # and nothing of response 1's pitch anywhere later
    for a, b in active_spans(x[i_stop:], R):
        seg = x[i_stop + a: i_stop + b]
        if len(seg) > R // 4:
            assert dominant_hz(seg, R) != pytest.approx(response_f0(1), rel=0.02)


async def test_engine_sigkill_mid_reply_audio_back_within_2s_same_session(vaudio, utterances):  # noqa: F811
    # split streams (named devices) through the daemon; the reply streams at real time, so
    # deltas keep coming while the engine is dead and after it is back
    sim = SimConfig(reply_s=1.0, realtime_factor=1.0, turns={1: TurnAction(reply_s=6.0)})
    sd_opts = {"input_device": "virtual_mic", "output_device": "virtual_speaker"}
    async with audio_daemon(vaudio, sim_config=sim, sounddevice=sd_opts) as rig:
        await rig.wait_for(lambda: rig.events("session_configured"), what="session.configured")
        assert rig.output_info()["stream"] == "split"
        session_id = rig.daemon.conversation.session_id
        vaudio.play_mic(utterances["hello"])
        await rig.wait_for(lambda: rig.events("response_audio_started"), what="reply audio")
        await trio.sleep(0.8)
        old_pid = rig.daemon.engine.pid
        t_kill = time.monotonic()
        rig.daemon.engine.kill()  # SIGKILL
        await rig.wait_for(lambda: rig.daemon.engine.pid != old_pid and rig.daemon.engine.state == "running",
                           timeout=5, what="engine restart")
        t_cap = await rig.wait_for(lambda: next((t for t in rig.captures if t > t_kill + 0.05), None),
                                   timeout=5, what="capture after restart")
        await trio.sleep(2.5)
        rec = rig.recorder.snapshot()
        assert rig.daemon.conversation.session_id == session_id
        assert len(rig.sim.sessions) == 1 and rig.sim.sessions[0].live
    assert t_cap - t_kill < 2.0, f"capture resumed {t_cap - t_kill:.2f} s after the kill"
    # the speaker: the old stream dies with the engine (silence), the new engine plays the rest
    after = rec.segment(t_kill + 0.1, t_kill + 4.0)
    loud = np.flatnonzero(np.abs(after) > 100)
    assert len(loud), "no audio after the engine restart"
    t_audio = t_kill + 0.1 + loud[0] / rec.rate
    assert t_audio - t_kill < 2.0, f"playback resumed {t_audio - t_kill:.2f} s after the kill"
    seg = after[loud[0]: loud[0] + rec.rate // 2]
    assert dominant_hz(seg, rec.rate) == pytest.approx(response_f0(1), rel=0.01)
