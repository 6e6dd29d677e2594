"""Jittered exponential backoff (full jitter), as the protocol reference §6.1 asks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float
    cap: float
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self, cap: float | None = None) -> float:
        """The next delay: uniform in [base/2, base] where base doubles per failure up to ``cap``."""
        cap = self.cap if cap is None else cap
        base = min(cap, self.initial * self.factor ** self.attempt)
        self.attempt += 1
        return self.rng.uniform(base / 2, base)

    def reset(self) -> None:
        self.attempt = 0
