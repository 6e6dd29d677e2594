"""Barge-in stop time and added latency, hydrad vs a docs-pattern baseline, on real PortAudio
over virtual PulseAudio devices (no sound card needed). Not a test: it prints numbers.

    .venv/bin/python bench/barge_in.py [--n 30] [--turns 5] [--seed 1] [--json out.json]

One private PulseAudio (virtual speaker ``vspk`` and virtual mic ``vmic`` at 48 kHz mono, from
``tests/audio/``) and one in-process simulator per client. Each client gets the same script,
driven from the simulator's side so both see identical conditions:

1. latency phase: ``--turns`` normal turns (espeak utterance -> 1 s reply that plays out);
2. barge-in phase: a turn whose reply lasts 8 s, then ``--n`` times: wait a random
   0.5-1.5 s (seeded) after the reply's first delta left the simulator, play a short
   utterance into the mic; the simulator's VAD raises ``speech_started`` (the barge-in) and
   the utterance becomes the next turn, whose 8 s reply is cut the same way.

Measured, all on ``time.monotonic()`` (one clock for every process on the machine):

(a)/(b) stop time: the barge-in event received by the client (``speech_started`` frame:
    the daemon's timeline event / the baseline's log line) -> the last audible sample of the
    cut response in the speaker recording. The recording (``parec`` of ``vspk.monitor``) is
    anchored on chunk arrival times; the cut response is told from the next one by pitch
    (the simulator's reply n has fundamental ``response_f0(n)``).
(c) added latency: mic sample -> its frame on the socket (the virtual mic is recorded the
    same way and aligned with the audio the simulator received by cross-correlation; each
    frame's newest sample vs the frame's arrival at the simulator), and first delta sent by
    the simulator -> first audible sample of that response in the speaker recording.

A null sink renders a sample into its monitor before the instant PortAudio calls its DAC
time (by the sink's latency, measured 5-10 ms): "audible" here is the monitor's timeline,
which both clients share.

The baseline (``bench/baseline_client.py``) is a separate process: sounddevice
``OutputStream`` fed from a queue, drained on ``response.created`` (the docs' pattern), same
device latency setting and block size as hydrad.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.audio.vaudio import Recording, VirtualAudio, synth  # noqa: E402

SPEAKER_RATE = 48000
MIC_RATE = 16000
LONG_REPLY_S = 8.0
SHORT_REPLY_S = 1.0
UTTER = {"hello": "Hello there, what is the weather like today?", "stop": "Stop, please."}


# ---- recording analysis ------------------------------------------------------------------------

def _harmonic_energy(x: np.ndarray, f0s: list[float], rate: int, win: int, hop: int) -> np.ndarray:
    """energy[k, w]: power at the first 5 harmonics of f0s[k] in window w (Hann)."""
    n = (len(x) - win) // hop + 1
    if n <= 0:
        return np.zeros((len(f0s), 0))
    idx = np.arange(win)
    hann = np.hanning(win)
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:n] * hann
    out = np.zeros((len(f0s), n))
    for k, f0 in enumerate(f0s):
        for h in range(1, 6):
            basis = np.exp(-2j * np.pi * h * f0 * idx / rate)
            out[k] += np.abs(frames @ basis) ** 2
    return out


def last_sample_of(rec: Recording, f_cut: float, f_next: float, t_from: float, t_to: float,
                   thr: float = 1.0) -> float | None:
    """Monotonic end of the last audible sample of the response at pitch ``f_cut`` in
    ``[t_from, t_to)``, where the response at ``f_next`` may follow, after a gap (hydrad) or
    straight away (the baseline drains its queue when the next response is created)."""
    i0 = max(0, rec.i(t_from))
    seg = rec.x[i0: max(i0, rec.i(t_to))]
    win, hop = int(0.03 * rec.rate), int(0.0025 * rec.rate)
    e = _harmonic_energy(seg, [f_cut, f_next], rec.rate, win, hop)
    if not e.shape[1]:
        return None
    loud = np.array([np.abs(seg[w * hop + win // 4: w * hop + 3 * win // 4]).max() > 50
                     for w in range(e.shape[1])], bool)
    cut = loud & (e[0] > 3 * e[1])      # clearly the cut response
    nxt = loud & (e[1] > 3 * e[0])      # clearly the next one
    if not cut.any():
        return None
    w_last = int(np.flatnonzero(cut)[-1])
    later = np.flatnonzero(nxt[w_last + 1:])
    w_next = w_last + 1 + int(later[0]) if len(later) else None
    c_last = w_last * hop + win // 2
    end = w_next * hop + win if w_next is not None else len(seg)
    # a gap of digital silence (>= 5 ms) after the last clear window: the cut ends there
    quiet = np.abs(seg[c_last:end]) <= thr
    run = int(0.005 * rec.rate)
    if len(quiet) >= run:
        q = np.flatnonzero(np.convolve(quiet.astype(np.int32), np.ones(run, np.int32), "valid") == run)
        if len(q):
            return rec.t(i0 + c_last + int(q[0]))
    if w_next is None:
        return None
    # no gap: the next response follows at once; the switch lies between the two windows' centres
    return rec.t(i0 + (c_last + w_next * hop + win // 2) / 2)


def onset_after(rec: Recording, t_from: float, thr: float = 50.0) -> float | None:
    seg = rec.x[max(0, rec.i(t_from)):]
    loud = np.flatnonzero(np.abs(seg) > thr)
    return None if not len(loud) else rec.t(max(0, rec.i(t_from)) + int(loud[0]))


def mic_to_socket(mic: Recording, received: list[tuple[float, bytes]], plays: list[tuple[float, float]],
                  frame_n: int = 320) -> list[float]:
    """Per frame carrying an utterance: arrival at the simulator minus the mic time of the
    frame's newest sample. ``received``: (arrival, pcm) of every append; ``plays``: (start,
    duration) of each utterance played into the mic."""
    if not received:
        return []
    stream = np.frombuffer(b"".join(p for _, p in received), "<i2").astype(np.float64)
    starts = np.cumsum([0] + [len(p) // 2 for _, p in received])[:-1]
    arrivals = np.array([t for t, _ in received])
    out: list[float] = []
    for t_play, dur in plays:
        a, b = mic.i(t_play - 0.1), mic.i(t_play + dur + 0.2)
        ref = mic.x[max(0, a): b]
        if len(ref) < MIC_RATE // 2 or np.abs(ref).max() < 500:
            continue
        # candidate region of the received stream: frames that arrived from the utterance on
        j0 = int(np.searchsorted(arrivals, t_play - 0.2))
        j1 = int(np.searchsorted(arrivals, t_play + dur + 2.0))
        s0 = starts[j0] if j0 < len(starts) else len(stream)
        s1 = starts[j1] if j1 < len(starts) else len(stream)
        hay = stream[s0:s1]
        if len(hay) < len(ref):
            continue
        n = 1 << int(np.ceil(np.log2(len(hay) + len(ref))))
        c = np.fft.irfft(np.fft.rfft(hay, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(hay) - len(ref) + 1]
        lag = int(np.argmax(c))  # hay[lag + m] ~ ref[m]  =>  stream index s0 + lag + m ~ mic index a + m
        loud = np.flatnonzero(np.abs(ref) > 300)
        for j in range(j0, j1):
            if j >= len(starts):
                break
            s_new = starts[j] + len(received[j][1]) // 2 - 1       # newest sample of frame j
            m = s_new - s0 - lag                                   # its index in ref
            if 0 <= m < len(ref) and loud[0] <= m <= loud[-1]:
                out.append(arrivals[j] - mic.t(a + m))
    return out


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50_ms": _ms(pct(xs, 50)), "p99_ms": _ms(pct(xs, 99)), "min_ms": _ms(min(xs) if xs else None),
            "max_ms": _ms(max(xs) if xs else None), "mean_ms": _ms(float(np.mean(xs)) if xs else None)}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# ---- one run -------------------------------------------------------------------------------------

class Probe:
    """Audio the simulator received: (arrival monotonic, pcm) per append after configure."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []

    def install(self) -> None:
        from hydrad.protocol.audio import decode_pcm
        from hydrad.sim import session as sim_session

        orig = sim_session.SimSession._on_append
        probe = self

        def _on_append(self: Any, obj: dict[str, Any], event_id: str | None) -> None:
            t = time.monotonic()
            if self._configured:
                try:
                    probe.received.append((t, decode_pcm(obj.get("audio"), "audio")))
                except Exception:
                    pass
            orig(self, obj, event_id)

        sim_session.SimSession._on_append = _on_append  # type: ignore[method-assign]
        self._restore = (sim_session.SimSession, orig)

    def uninstall(self) -> None:
        cls, orig = self._restore
        cls._on_append = orig  # type: ignore[method-assign]


async def run_client(kind: str, va: VirtualAudio, utt: dict[str, Path], args: argparse.Namespace,
                     workdir: Path) -> dict[str, Any]:
    from hydrad.config import Secret, config_from_dict
    from hydrad.demo import Timeline
    from hydrad.events import EventBus
    from hydrad.pipeline.daemon import Daemon
    from hydrad.sim.config import SimConfig, TurnAction
    from hydrad.sim.server import Simulator

    K, N = args.turns, args.n
    turns = {k: TurnAction(reply_s=SHORT_REPLY_S) for k in range(1, K + 1)}
    turns.update({k: TurnAction(reply_s=LONG_REPLY_S) for k in range(K + 1, K + N + 2)})
    sim = Simulator(SimConfig(reply_s=LONG_REPLY_S, turns=turns))
    probe = Probe()
    probe.install()
    spk = va.record("vspk.monitor", rate=SPEAKER_RATE)
    mic = va.record("micfeed.monitor", rate=MIC_RATE)
    spk.wait_started()
    mic.wait_started()
    rng = random.Random(args.seed)
    delays = [rng.uniform(0.5, 1.5) for _ in range(N)]
    plays: list[tuple[str, float]] = []      # (utterance, monotonic start)
    out: dict[str, Any] = {"client": kind}
    timeline = Timeline()
    flushed: list[dict[str, Any]] = []
    events_path = workdir / f"{kind}-events.jsonl"
    daemon = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve)
            url = f"ws://127.0.0.1:{port}/waves/v1/s2s"
            proc = None
            if kind == "hydrad":
                bus = EventBus()
                bus.subscribe(timeline)
                cfg = config_from_dict({
                    "hydra": {"url": url},
                    "audio": {"backend": "sounddevice", "block_ms": args.block_ms,
                              "sounddevice": {"output_rate": SPEAKER_RATE},
                              **({"aec": args.aec} if args.aec else {})},
                    "control": {"enabled": False},
                }, "bench")
                daemon = Daemon(cfg, Secret("bench-key", "bench"), bus=bus)
                orig = daemon.on_flushed

                def on_flushed(info: dict[str, Any]) -> None:
                    flushed.append(info)
                    orig(info)

                daemon.on_flushed = on_flushed  # type: ignore[method-assign]
                await nursery.start(daemon.run)
            else:
                err = open(workdir / "baseline-stderr.txt", "wb")
                proc = await trio.lowlevel.open_process(
                    [sys.executable, str(REPO / "bench" / "baseline_client.py"), "--url", url,
                     "--events", str(events_path), "--block-ms", str(args.block_ms)], env=dict(os.environ),
                    stderr=err)

            def rec():
                return sim.sessions[0] if sim.sessions else None

            async def wait_for(pred: Any, timeout: float, what: str) -> Any:
                with trio.move_on_after(timeout):
                    while not (v := pred()):
                        await trio.sleep(0.005)
                    return v
                raise RuntimeError(f"{kind}: timed out waiting for {what}")

            def first_delta(n: int) -> float | None:
                r = rec()
                if r is None or len(r.responses) < n:
                    return None
                rid = r.responses[n - 1].id
                return next((t for t, o in r.sent if o.get("type") == "response.output_audio.delta"
                             and o.get("response_id") == rid), None)

            def done(n: int) -> bool:
                r = rec()
                return bool(r and len(r.responses) >= n and r.responses[n - 1].status)

            await wait_for(lambda: rec() is not None and rec().configured is not None, 15, "session.configured")
            await trio.sleep(1.0)
            # ---- latency phase
            for k in range(1, K + 1):
                plays.append(("hello", time.monotonic()))
                va.play_mic(utt["hello"])
                await wait_for(lambda k=k: done(k), 20, f"response {k}")
                await trio.sleep(SHORT_REPLY_S + 0.8)
            # ---- barge-in phase
            plays.append(("hello", time.monotonic()))
            va.play_mic(utt["hello"])
            for i in range(N):
                n = K + 1 + i
                t_d = await wait_for(lambda n=n: first_delta(n), 20, f"first delta of response {n}")
                await trio.sleep_until(trio.current_time() + max(0.0, t_d + delays[i] - time.monotonic()))
                plays.append(("stop", time.monotonic()))
                va.play_mic(utt["stop"])
                if not args.quiet:
                    print(f"  {kind}: barge-in {i + 1}/{N}", file=sys.stderr, flush=True)
            await wait_for(lambda: first_delta(K + N + 1), 20, "last response")
            await trio.sleep(2.0)
            if daemon is not None:
                out["device"] = daemon.engine.ready_info.get("output")
                out["aec"] = daemon.engine.ready_info.get("aec")
                out["uplink_latency_ms_self"] = list(daemon.uplink_latency_ms)
                out["engine_stats"] = daemon.engine.last_stats
                daemon.request_stop()
                with trio.move_on_after(5):
                    await daemon.stopped.wait()
            if proc is not None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        probe.uninstall()
        spk_rec = spk.stop()
        mic_rec = mic.stop()
    # ---- analysis
    r = sim.sessions[0]
    sent = r.sent
    resp = r.responses

    def t_first_delta(n: int) -> float | None:
        rid = resp[n - 1].id
        return next((t for t, o in sent if o.get("type") == "response.output_audio.delta" and o.get("response_id") == rid), None)

    if kind == "hydrad":
        speech_started = [e.t for e in timeline.named("speech_started")]
    else:
        log = [json.loads(ln) for ln in events_path.read_text().splitlines() if ln.strip()]
        speech_started = [e["t_recv"] for e in log if e["ev"] == "speech_started"]
        out["device"] = next((e for e in log if e["ev"] == "output_stream"), None)
        errs = (workdir / "baseline-stderr.txt").read_text(errors="replace")
        out["alsa_underrun_messages"] = errs.count("underrun occurred")
    barge_plays = [t for u, t in plays if u == "stop"]
    stops, daemon_part, engine_part, self_silent, bad = [], [], [], [], 0
    for i, t_play in enumerate(barge_plays):
        n = K + 1 + i  # the response being cut
        t_ev = next((t for t in speech_started if t > t_play), None)
        t_next = t_first_delta(n + 1) if len(resp) > n else None
        if t_ev is None or t_next is None or resp[n - 1].f0 is None or resp[n].f0 is None:
            bad += 1
            continue
        t_last = last_sample_of(spk_rec, resp[n - 1].f0, resp[n].f0, t_ev - 0.3, t_next + 1.5)
        if t_last is None:
            bad += 1
            continue
        stops.append(t_last - t_ev)
        if kind == "hydrad":
            fl = next((f for f in flushed if f.get("response_id") == resp[n - 1].id), None)
            if fl is not None:
                daemon_part.append(fl["t_received"] - t_ev)
                engine_part.append(t_last - fl["t_received"])
                self_silent.append(fl["t_silent"] - t_ev)
    out["stop"] = summary(stops)
    out["stop_all_ms"] = [round(s * 1000, 1) for s in stops]
    out["unmeasured_barge_ins"] = bad
    if kind == "hydrad":
        out["stop_event_to_engine"] = summary(daemon_part)
        out["stop_engine_to_silent"] = summary(engine_part)
        # the engine's own estimate on PortAudio's DAC timeline (FLUSHED t_silent)
        out["stop_dac_timeline_self"] = summary(self_silent)
    # (c) latency
    hello_plays = [(t, args.durations["hello"]) for u, t in plays if u == "hello"][:K]
    out["mic_to_socket"] = summary(mic_to_socket(mic_rec, probe.received, hello_plays))
    d2a = []
    for n in range(1, K + 1):
        t_d = t_first_delta(n)
        if t_d is None:
            continue
        t_on = onset_after(spk_rec, t_d - 0.05)
        if t_on is not None and t_on - t_d < 1.0:
            d2a.append(t_on - t_d)
    out["delta_to_audible"] = summary(d2a)
    if kind == "hydrad":
        # PortAudio DAC time (engine PLAYED first_audible) - the monitor's time of the same sample
        leads = []
        for e in timeline.named("response_audio_started"):
            n = next((i + 1 for i, x in enumerate(resp) if x.id == e.fields["response_id"]), None)
            if n is None or n > K or e.fields.get("first_audible") is None:
                continue
            t_on = onset_after(spk_rec, e.fields["first_audible"] - 0.1)
            if t_on is not None:
                leads.append(e.fields["first_audible"] - t_on)
        out["monitor_lead"] = summary(leads)
    if kind == "hydrad":
        self_ms = out.pop("uplink_latency_ms_self", [])
        out["uplink_t_adc_to_sent_self"] = {"n": len(self_ms), "p50_ms": round(float(np.median(self_ms)), 1) if self_ms else None}
    return out


def _wav_seconds(path: Path) -> float:
    import wave
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="barge-in stop time and latency: hydrad vs a docs-pattern baseline")
    ap.add_argument("--n", type=int, default=30, help="barge-ins per client (>= 30 for the p99)")
    ap.add_argument("--turns", type=int, default=5, help="normal turns for the latency measurements")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--block-ms", type=int, default=10, choices=(5, 10, 20))
    ap.add_argument("--only", choices=("hydrad", "baseline"))
    ap.add_argument("--aec", choices=("off", "webrtc", "auto"),
                    help="hydrad's audio.aec (default: the daemon's default, auto = webrtc on these devices)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (utterances, baseline log)")
    args = ap.parse_args(argv)
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    workdir = Path(tempfile.mkdtemp(prefix="hydrad-bench."))
    va = VirtualAudio(rate=SPEAKER_RATE, directory=tempfile.mkdtemp(prefix="hva."))
    va.start()
    os.environ.update(va.env)  # the engine child and the baseline process use the virtual devices
    results: dict[str, Any] = {"command": "bench/barge_in.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                               "n": args.n, "turns": args.turns, "seed": args.seed, "block_ms": args.block_ms}
    try:
        utt = {k: synth(text, workdir / f"{k}.wav") for k, text in UTTER.items()}
        args.durations = {k: _wav_seconds(p) for k, p in utt.items()}
        for kind in ("hydrad", "baseline"):
            if args.only and kind != args.only:
                continue
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            results[kind] = trio.run(run_client, kind, va, utt, args, workdir)
    finally:
        va.cleanup()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(res: dict[str, Any]) -> None:
    h, b = res.get("hydrad"), res.get("baseline")
    print(f"\nbarge-in stop time (event received -> last audible sample), {res['n']} barge-ins per client:")
    for name, r in (("hydrad", h), ("baseline", b)):
        if r:
            s = r["stop"]
            print(f"  {name:9s} p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  (min {s['min_ms']}, max {s['max_ms']}, "
                  f"n {s['n']}, unmeasured {r['unmeasured_barge_ins']})")
    if h:
        print(f"  hydrad split: event -> FLUSH read by engine p50 {h['stop_event_to_engine']['p50_ms']} ms / p99 "
              f"{h['stop_event_to_engine']['p99_ms']} ms; engine -> silent p50 {h['stop_engine_to_silent']['p50_ms']} "
              f"/ p99 {h['stop_engine_to_silent']['p99_ms']} ms")
        d = h["stop_dac_timeline_self"]
        print(f"  hydrad on PortAudio's DAC timeline (engine's FLUSHED t_silent - event): p50 {d['p50_ms']} / "
              f"p99 {d['p99_ms']} ms (the monitor gets a sample "
              f"{h['monitor_lead']['p50_ms']} ms before its DAC time, p50)")
    if h and b and h["stop"]["p50_ms"] and b["stop"]["p50_ms"]:
        print(f"  ratio baseline/hydrad: p50 {b['stop']['p50_ms'] / h['stop']['p50_ms']:.1f}x, "
              f"p99 {b['stop']['p99_ms'] / h['stop']['p99_ms']:.1f}x")
    if h and h.get("device"):
        dev = h["device"]
        bound = res["block_ms"] + dev["latency"] * 1000
        ok = h["stop"]["p99_ms"] is not None and h["stop"]["p99_ms"] <= bound
        print(f"  goal p99 <= 1 block + reported output latency = {res['block_ms']} + {dev['latency'] * 1000:.0f} = "
              f"{bound:.0f} ms: {'met' if ok else 'NOT met'}")
    print("\nadded latency:")
    for name, r in (("hydrad", h), ("baseline", b)):
        if r:
            m, d = r["mic_to_socket"], r["delta_to_audible"]
            print(f"  {name:9s} mic sample -> frame at the server p50 {m['p50_ms']} / p99 {m['p99_ms']} ms (n {m['n']}); "
                  f"delta sent -> first audible p50 {d['p50_ms']} / max {d['max_ms']} ms (n {d['n']})")
    if h:
        print(f"  hydrad self-reported uplink (t_adc -> sent) p50 {h['uplink_t_adc_to_sent_self']['p50_ms']} ms")
        dev = h.get("device") or {}
        st = h.get("engine_stats") or {}
        print(f"\ndevice: hydrad {dev.get('name')} {dev.get('rate')} Hz, PortAudio output latency "
              f"{(dev.get('latency') or 0) * 1000:.1f} ms, measured DAC delay {st.get('dac_delay_ms')} ms; "
              f"underruns {st.get('underruns')}, status flags {st.get('status_flags')}")
        a = st.get("aec") or {}
        print(f"echo canceller: hydrad audio.aec {h.get('aec')}"
              + (f"; kept {a.get('kept_frames')} frames, double talk {a.get('double_talk_frames')} "
                 f"(cut {a.get('double_talk_cut_frames')}), gated {a.get('gated_frames')}, "
                 f"coupling {a.get('echo_coupling_db')} dB" if a else ""))
    if b and b.get("device"):
        print(f"        baseline OutputStream {b['device'].get('rate')} Hz, PortAudio output latency "
              f"{b['device'].get('latency', 0) * 1000:.1f} ms; ALSA underrun messages "
              f"{b.get('alsa_underrun_messages')}")


if __name__ == "__main__":
    sys.exit(main())
