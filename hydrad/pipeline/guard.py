"""Speech energy on the (echo-cancelled) mic, for the barge-in guard.

Deliberately simple: the canceller has already removed the echo, so what is left above a
level is the user. The guard only needs "how many ms of loud frames since it started".
"""

from __future__ import annotations

import numpy as np


class EnergyMeter:
    def __init__(self, threshold_dbfs: float) -> None:
        self.threshold = 32768.0 * 10 ** (threshold_dbfs / 20)
        self.speech_ms = 0.0

    def reset(self) -> None:
        self.speech_ms = 0.0

    def feed(self, pcm: bytes) -> float:
        """Add one 16 kHz PCM16 frame; returns the ms of speech energy counted so far."""
        x = np.frombuffer(pcm, "<i2").astype(np.float32)
        if len(x) and float(np.sqrt(np.mean(x * x))) > self.threshold:
            self.speech_ms += len(x) / 16.0
        return self.speech_ms
