"""Never send audio faster than real time.

The service closes sessions that stream faster than real time (reference §1.5). Capture is
clocked by the device, so in steady state frames arrive at real time anyway; this token
bucket guards the bursts after a stall: at most ``burst`` frames ahead of the wall clock.
"""

from __future__ import annotations


class Pacer:
    def __init__(self, frame_s: float, burst: int, now: float) -> None:
        self.frame_s = frame_s
        self.burst = burst
        self._tokens = float(burst)
        self._t = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next frame may go out (0 when it may go now)."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._t) / self.frame_s)
        self._t = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) * self.frame_s

    def take(self) -> None:
        self._tokens -= 1.0
