"""Barge-in with the default canceller whatever the echo path (issue 19, marker ``audio``).

With the defaults on real devices (``audio.aec = "auto"``: WebRTC AEC3, the residual gate and
its leak check) a user who talked over the agent was not heard at all when the microphone
picked up little or none of the speaker: AEC3's suppressor, never converged on an echo that
is not there, took 30-75 dB out of the user's voice, and the gate muted the rest. Here the
daemon runs with the default configuration on the virtual devices, echo path absent, at
-40, -20 and -10 dB, and one that steps from -40 to -10 dB in the middle of a reply; in each,
``N_TRIALS`` times: a prompt, its reply, a real utterance 1 s into it. Asserted for every
path:

* every barge-in utterance is detected (``barge_in``), cuts the reply, becomes a user turn
  and gets its answer, which plays out in full;
* zero self-interruptions (a turn opened with nobody speaking, or a reply cut short other
  than by the user);
* the user's voice reaches the uplink at the level it was spoken: of the utterance's voiced
  20 ms frames (webrtcvad on the WAV played into the mic, above -40 dBFS) spoken while the
  agent still played (double talk: before the flush silenced the speaker), at least
  ``KEPT_MIN`` over the trials arrive at the simulator (``SimConfig.keep_audio``: what the
  service heard) no more than ``KEPT_DB`` under the same frame of the mic feed (and as many
  of the whole utterance's);
* the canceller's own double-talk figures (``double_talk_frames`` / ``..._cut_frames``)
  are there and agree in kind.

``aec = "off"`` is the control: it detects every barge-in with no echo path (the rig can
pass), so a failure with the defaults is the canceller's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soxr
import trio
import webrtcvad

from hydrad.sim.config import SimConfig

from .audio.fixtures import utterances, vaudio_factory  # noqa: F401  (fixtures)
from .audio.rig import AudioRig, audio_daemon
from .audio.vaudio import VirtualAudio, read_wav
from .test_aec_scene import frame_db
from .test_audio_echo import (  # noqa: F401
    RATE, Feeds, _all_played, _trace, echo_path, played_out, prompt, prompt_and_reply, self_interruptions)

pytestmark = [pytest.mark.audio, pytest.mark.slow]

N_TRIALS = 3
KEPT_DB = 10.0        # an uplink frame this much under the mic's is the user cut
KEPT_MIN = 0.9        # the share of voiced frames that must arrive uncut
STEP = (-40.0, -10.0)  # the stepping path: from, to (0.5 s into the second reply)
PATHS = {"none": None, "-40 dB": -40.0, "-20 dB": -20.0, "-10 dB": -10.0, "step": STEP[0]}


def _sim() -> SimConfig:
    # the simulator's speech-like voice (a strictly periodic buzz defeats AEC3's delay search,
    # tests/test_aec_voice.py), generated in real time so a barge-in cancels it on the server
    return SimConfig(reply_s=3.0, voice_jitter=0.2, realtime_factor=1.0, keep_audio=True)


@contextlib.contextmanager
def maybe_echo(va: VirtualAudio, gain_db: float | None) -> Iterator[object]:
    if gain_db is None:
        yield None
        return
    with echo_path(va, gain_db) as path:
        yield path


def _find(ref: np.ndarray, stream: np.ndarray) -> int:
    """Where ``ref`` starts in ``stream`` (cross-correlation)."""
    assert len(stream) >= len(ref), "the uplink stopped during the utterance"
    n = 1 << int(np.ceil(np.log2(len(stream) + len(ref))))
    c = np.fft.irfft(np.fft.rfft(stream, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(stream) - len(ref) + 1]
    return int(np.argmax(c))


def _stream(chunks: list[tuple[float, bytes]], t_from: float) -> tuple[np.ndarray, np.ndarray]:
    """(the samples of the chunks stamped from ``t_from`` on, each sample's chunk stamp plus
    its offset in the chunk)."""
    sel = [(t, p) for t, p in chunks if t >= t_from]
    x = np.frombuffer(b"".join(p for _, p in sel), "<i2").astype(np.float64)
    t = np.concatenate([tc + np.arange(len(p) // 2) / 16000 for tc, p in sel]) if sel else np.zeros(0)
    return x, t


def kept_share(wav: Path, rig: AudioRig, t_played: float, t_silent: float) -> tuple[float, int, float]:
    """(share of the utterance's voiced 20 ms frames spoken while the agent still played that
    reached the service at most ``KEPT_DB`` under the mic feed, how many such frames, the
    same share over the whole utterance).

    Voiced: webrtcvad (mode 2) on the WAV played into the mic, above -40 dBFS. The utterance
    is found by cross-correlation twice: in what the simulator heard (``keep_audio``: the
    levels that count) and in the engine's capture stream (``t_adc`` of every sample: when it
    was spoken); "while the agent played" is before the engine's FLUSHED ``t_silent``."""
    x, rate = read_wav(wav)
    ref = soxr.resample(x.astype(np.float64), rate, 16000) if rate != 16000 else x.astype(np.float64)
    horizon = len(ref) + 3 * 16000
    heard, _ = _stream(rig.sim.sessions[-1].audio, t_played - 0.2)
    heard = heard[:horizon]
    up = heard[_find(ref, heard):][: len(ref)]
    cap, t_adc = _stream(rig.capture_log, t_played - 0.5)
    cap, t_adc = cap[:horizon], t_adc[:horizon]
    t_ref = t_adc[_find(ref, cap):][: len(ref)]
    vad = webrtcvad.Vad(2)
    n20 = 320
    r16 = np.clip(np.round(ref), -32768, 32767).astype("<i2")
    k = len(ref) // n20
    voiced = np.array([vad.is_speech(r16[i * n20 : (i + 1) * n20].tobytes(), 16000) for i in range(k)])
    ref_db, up_db = frame_db(ref, n20)[:k], frame_db(up, n20)[:k]
    spoken = t_ref[: k * n20 : n20]
    sel = voiced & (ref_db > -40.0)
    kept = up_db > ref_db - KEPT_DB
    talk = sel & (spoken[:k] < t_silent)
    return (float(np.mean(kept[talk])) if talk.any() else float("nan"), int(talk.sum()),
            float(np.mean(kept[sel])))


async def quiet(rig: AudioRig, settle_s: float = 1.0, timeout_s: float = 15.0) -> None:
    """Wait until no new reply has started for ``settle_s`` and everything has played out:
    the VAD may split an utterance with a pause in it into two turns (two answers), and the
    next trial must not take the second answer for its prompt's reply."""
    with trio.fail_after(timeout_s):
        while True:
            n = len(rig.events("response_audio_started"))
            await trio.sleep(settle_s)
            if len(rig.events("response_audio_started")) == n and _all_played(rig):
                return


async def barge_in_trials(rig: AudioRig, va: VirtualAudio, prompt_wav: Path, stop_wav: Path,
                          feeds: Feeds, step: object | None = None) -> dict[str, list]:
    """``N_TRIALS`` prompt -> reply -> barge-in 1 s into it -> answer played out."""
    res: dict[str, list] = {"detected": [], "answered": [], "kept": [], "talk": [], "whole": [], "cut": []}
    rig.log_captures = True
    for j in range(N_TRIALS):
        n_audio, n_barge = await prompt_and_reply(rig, va, feeds, prompt_wav, f"trial {j}")
        reply_id = rig.events("response_audio_started")[n_audio].fields.get("response_id")
        if step is not None and j == 1:
            await trio.sleep(0.5)
            step.set_gain(STEP[1])  # type: ignore[attr-defined]
            await trio.sleep(0.5)
        else:
            await trio.sleep(1.0)
        t_fed = time.monotonic()
        feeds.play(va, stop_wav)
        with trio.move_on_after(3.0):
            while not [e for e in rig.events("barge_in")[n_barge:] if e.t >= t_fed]:
                await trio.sleep(0.02)
        res["detected"].append(bool([e for e in rig.events("barge_in")[n_barge:] if e.t >= t_fed]))
        res["cut"].append(any(e.fields.get("response_id") == reply_id and e.fields.get("status") != "completed"
                              for e in rig.events("response_done")))
        await rig.wait_for(lambda n=n_audio: len(rig.events("response_audio_started")) > n + 1,
                           timeout=20, what=f"trial {j}: answer audio")
        answer_id = rig.events("response_audio_started")[n_audio + 1].fields.get("response_id")
        res["answered"].append(await played_out(rig, answer_id, f"trial {j}: answer"))
        flushed = [f for f in rig.flushed if f["_t"] >= t_fed]   # the barge-in's flush
        assert flushed, (f"trial {j}: nothing flushed after the barge-in (reply {reply_id}): "
                         f"{rig.flushed}\n{_trace(rig, feeds)}")
        kept, talk, whole = kept_share(stop_wav, rig, t_fed, float(flushed[0]["t_silent"]))
        res["kept"].append(round(kept, 3))
        res["talk"].append(talk)
        res["whole"].append(round(whole, 3))
        await quiet(rig)
    return res


@pytest.mark.parametrize("path", list(PATHS))
async def test_barge_in_is_heard_whatever_the_echo_path(vaudio_factory, prompt, utterances, path):  # noqa: F811
    va = vaudio_factory(rate=RATE)
    feeds = Feeds()
    with maybe_echo(va, PATHS[path]) as echo:
        async with audio_daemon(va, sim_config=_sim(), sounddevice={"output_rate": RATE}) as rig:
            await rig.wait_for(lambda: rig.events("session_configured"), what="session.configured")
            assert rig.daemon.engine.ready_info.get("aec") == "webrtc", rig.daemon.engine.ready_info
            res = await barge_in_trials(rig, va, prompt, utterances["stop"], feeds,
                                        step=echo if path == "step" else None)
            await trio.sleep(1.1)
            aec = next(s["aec"] for s in reversed(rig.stats) if s.get("aec"))
            echo = rig.daemon.status()["echo"]  # what `hydrad ctl status` shows
            bad = self_interruptions(rig, feeds)
            trace = _trace(rig, feeds) if bad or not all(res["detected"]) else ""
    print(f"\necho path {path}: {res}; kept {aec.get('kept_frames')} frames, gated {aec.get('gated_frames')} "
          f"(leak {aec.get('leak_frames')}), double talk {aec.get('double_talk_frames')} "
          f"cut {aec.get('double_talk_cut_frames')}, ERLE {aec.get('erle_db')}")
    assert aec["errors"] == 0 and aec["worker_failures"] == 0, aec
    assert not bad, f"{len(bad)} self-interruption(s): {bad}\n{trace}"
    assert all(res["detected"]), f"barge-in detected {res['detected']}: the canceller removes the user\n{trace}"
    assert all(res["cut"]), f"the reply was not cut: {res['cut']}"
    assert all(res["answered"]), f"answers played in full: {res['answered']}"
    kept = sum(k * n for k, n in zip(res["kept"], res["talk"])) / sum(res["talk"])
    assert sum(res["talk"]) >= 3 * N_TRIALS, res["talk"]   # the speaker goes silent 80-250 ms into the user
    assert kept >= KEPT_MIN, f"voiced frames reaching the uplink uncut during double talk: {kept:.2f} ({res})"
    assert min(res["whole"]) >= KEPT_MIN, f"voiced frames reaching the uplink uncut: {res['whole']}"
    assert aec["double_talk_frames"] > 0 and 0 <= aec["double_talk_cut_frames"] <= aec["double_talk_frames"], aec
    # the canceller's own figure agrees in kind with the one measured against the mic feed
    assert aec["double_talk_cut_frames"] <= 0.2 * aec["double_talk_frames"], aec
    assert echo is not None and echo["kept_frames"] == aec["kept_frames"], (echo, aec)
    assert echo["double_talk_frames"] == aec["double_talk_frames"] and echo["coupling_db"] == aec["echo_coupling_db"]
    if PATHS[path] is not None and path != "step":
        assert abs(aec["echo_coupling_db"] - PATHS[path]) < 6.0, aec   # the path as the rig sets it


async def test_control_without_a_canceller_every_barge_in_is_heard(vaudio_factory, prompt, utterances):  # noqa: F811
    """``aec = "off"`` with no echo path: the rig itself passes every barge-in through."""
    va = vaudio_factory(rate=RATE)
    feeds = Feeds()
    async with audio_daemon(va, sim_config=_sim(), sounddevice={"output_rate": RATE},
                            audio={"aec": "off"}) as rig:
        await rig.wait_for(lambda: rig.events("session_configured"), what="session.configured")
        res = await barge_in_trials(rig, va, prompt, utterances["stop"], feeds)
        bad = self_interruptions(rig, feeds)
    print(f"\naec off, no echo path: {res}")
    assert not bad and all(res["detected"]) and all(res["answered"]), (bad, res)
    assert min(res["whole"]) >= 0.95 and min(res["kept"]) >= 0.95, res
