"""The simulator's jittered voice: what the echo tests need from the agent's "speech"."""

from __future__ import annotations

import numpy as np
import pytest
import webrtcvad

from hydrad.engine.aec import make_canceller
from hydrad.sim import voice
from hydrad.sim.config import SimConfig
from hydrad.sim.config import ScenarioError

from . import test_aec_scene as scene_mod


def test_jittered_voice_is_chunk_consistent_speech_at_its_pitch() -> None:
    whole = voice.render(3, 24000, 48000, 0, 48000, 0.2)
    parts = b"".join(voice.render(3, 24000, 48000, i, 2400, 0.2) for i in range(0, 48000, 2400))
    assert whole == parts
    assert voice.dominant_frequency(whole, 24000) == pytest.approx(voice.response_f0(3), rel=0.02)
    pcm = voice.synthesize(5, 3.0, 16000, 0.2)
    vad = webrtcvad.Vad(2)
    frames = [pcm[i:i + 640] for i in range(0, len(pcm) - 639, 640)]
    assert sum(vad.is_speech(f, 16000) for f in frames) / len(frames) > 0.9
    assert voice.synthesize(5, 1.0, 16000) != voice.synthesize(5, 1.0, 16000, 0.2)


def test_voice_jitter_is_validated() -> None:
    with pytest.raises(ScenarioError):
        SimConfig(voice_jitter=0.7)
    assert SimConfig.from_mapping({"voice_jitter": 0.2}).voice_jitter == 0.2


@pytest.mark.parametrize("jitter, cancelled", [(0.0, False), (0.2, True)])
def test_the_canceller_locks_onto_every_reply_pitch_only_when_the_voice_is_aperiodic(
        monkeypatch: pytest.MonkeyPatch, jitter: float, cancelled: bool) -> None:
    monkeypatch.setattr(scene_mod, "far_signal", lambda kind, n, seconds, rate: np.frombuffer(
        voice.synthesize(n, seconds, rate, jitter), "<i2").astype(np.float64))
    false_frames = []
    for n in range(1, 11):
        scene = scene_mod.build_scene(voices=(n, n), near_at=None, seconds=6.0, far_spans=((0.5, 5.5),))
        # AEC3 itself: the gate's leak check would hide its failure (a delay line fits a
        # periodic far end at any lag: with it, a strictly periodic voice gives <= 11 frames)
        out = scene_mod.drive(make_canceller("webrtc", leak_check=False), scene)
        false_frames.append(scene_mod.false_vad(scene, out)[0])
    if cancelled:
        assert max(false_frames) <= 10, false_frames
    else:  # a strictly periodic voice defeats the delay search for most pitches
        assert sum(f > 100 for f in false_frames) >= 5, false_frames
