"""pytest fixtures for the virtual-audio tests (``tests/test_audio*.py`` import them).

* ``vaudio_factory(rate=16000, channels=1)``: starts a private PulseAudio (virtual speaker
  ``vspk``, virtual mic ``vmic``) and exports its environment (``PULSE_SERVER`` ...,
  ``XDG_CONFIG_HOME`` for the named ALSA PCMs) for this test, so every child process (the
  daemon's engine) uses it. Stopped by PID at teardown. If PulseAudio cannot start the test
  FAILS with the server's log: CI installs everything (``.ci/setup``), so a missing sound
  server is a broken machine, not a reason to skip.
* ``vaudio``: one such server at 16 kHz mono.
* ``utterances``: deterministic test speech (espeak-ng + ``sox -D``), synthesised once per run.

The pytest process itself never imports sounddevice: PortAudio reads the ALSA/PulseAudio
configuration once, at initialisation, so device-level work happens in child processes
that start after the server is up.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .vaudio import VirtualAudio, VirtualAudioError, synth

UTTERANCES = {
    # a user turn: ~1.6 s of speech
    "hello": "Hello there, what is the weather like today?",
    # a barge-in: short and loud enough for the VAD at once
    "stop": "Wait, stop. Tell me something else instead.",
}


@pytest.fixture
def vaudio_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., VirtualAudio]]:
    made: list[VirtualAudio] = []

    def make(rate: int = 16000, channels: int = 1, export: bool = True) -> VirtualAudio:
        # short path: the server's unix socket path must fit in sun_path (108 bytes)
        va = VirtualAudio(rate, channels, directory=tempfile.mkdtemp(prefix="hva."))
        made.append(va)
        try:
            va.start()
        except (VirtualAudioError, OSError) as exc:
            pytest.fail(f"virtual audio devices unavailable: the private PulseAudio did not start "
                        f"({exc}). Run `bash .ci/setup` (it installs pulseaudio, pulseaudio-utils, "
                        f"libasound2-plugins, libportaudio2).", pytrace=False)
        if export:
            for k, v in va.env.items():
                monkeypatch.setenv(k, v)
        return va

    yield make
    for va in made:
        va.cleanup()


@pytest.fixture
def vaudio(vaudio_factory: Callable[..., VirtualAudio]) -> VirtualAudio:
    return vaudio_factory()


@pytest.fixture(scope="session")
def utterances(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("utterances")
    try:
        return {k: synth(text, d / f"{k}.wav") for k, text in UTTERANCES.items()}
    except (VirtualAudioError, OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot synthesise test speech: {exc}", pytrace=False)
