"""The residual echo gate's rules: what of a 10 ms capture frame goes up after AEC3 (issues 7, 19).

Pure: :func:`decide` takes the frame's energies and returns a :class:`Verdict`; the canceller
(``hydrad.engine.aec.EchoCanceller``) measures, applies the verdict (mute, pass, or send what
the far-end copies leave) and keeps the counters. Nothing here touches AEC3, threads or
buffers, so every rule is tested on numbers alone (tests/test_echo_gate.py).

Energies are sums of squares over 10 ms at 16 kHz, PCM16 scale. The rules run only while the
far end is active (played within the gate's tail), in this order:

1. **leak**: AEC3 let more than a quiet remainder through (> -65 dBFS, under ``gate_db``
   taken out) and that is at least 3 dB more than its input (the capture restarted silent
   after a device reopen: what AEC3 leaves is its own echo estimate, never a user) or than
   what a delay line fitted to the far end leaves of the input (AEC3 lost the echo path after
   a step), but not 10 dB above the loudest echo the measured path makes (a user's voice
   that happens to fit the far end's, ``hydrad.engine.echo_coupling``). Muted.
2. **near**: AEC3 took less than 6 dB out and more than -55 dBFS is left: a user talking over
   the reply. Passed; the gate then stays open 200 ms (word edges).
3. **keep**: AEC3 took 6 dB or more out of a frame louder than -55 dBFS, what the far-end
   copies leave of it is more than -55 dBFS and 10 dB above the most echo they leave on
   this path (:mod:`hydrad.engine.echo_coupling` measures both at the start of each
   reply), and the frame is 3 dB above the loudest echo the path makes or the copies
   explained at least half of it on a path whose lag has not moved for 300 ms (after a host
   stall the playback is re-buffered, the lag steps and the fit misses 10-30 dB of the echo
   for a few frames: not kept): the frame holds a user. AEC3's suppressor has
   eaten one it cannot tell from an echo it never converged on (no echo path, or one too
   weak to converge on: a directional mic, a headset, a speaker facing away), or is still
   suppressing as double talk begins. What goes up instead (delayed as AEC3's output is):
   the microphone itself where the frame is 10 dB above any echo (**keep_mic**), else what
   the copies leave (**keep_rest**); the gate stays open as for **near**. Only once the
   path is measured (at the start of the first reply) and the far end is in the leak
   check's view (the copies need it: no keep without the leak check).
4. **held**: within 200 ms of **near** or **keep**: passed.
5. **residual**: AEC3 took ``gate_db`` or more out: what is left is residual echo (AEC3
   re-aligning after a small step leaks -55..-70 dBFS, enough for a server VAD). Muted.
6. otherwise **pass**.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hydrad.engine.echo_leak import bound_of

FRAME = 160                   # 10 ms at 16 kHz
APM_LATENCY = 128             # samples AEC3's output trails its input (8 ms, measured)
HOLD_FRAMES = 20              # the gate stays open this long after near-end speech
STEADY_FRAMES = 30            # a path that moved is trusted again after this long


def _energy_floor(dbfs: float) -> float:
    return FRAME * (32768.0 * 10.0 ** (dbfs / 20.0)) ** 2


NEAR_MIN_E = _energy_floor(-55.0)  # quieter is no user
LEAK_MIN_E = _energy_floor(-65.0)  # quieter output is no risk
LEAK_RATIO = 2.0              # AEC3 output 3 dB above its input, or the copies' rest: a leak
NEAR_RATIO = 10.0 ** (6.0 / 10.0)  # AEC3 took less than 6 dB out: near-end speech
KEEP_RATIO = 4.0              # AEC3 left 6 dB less than the copies do
KEEP_SHARE = 0.5              # the copies leave at most half of a frame the echo could fill
KEEP_OVER_ECHO = 10.0         # 10 dB above the loudest echo the path has made
ABOVE_ECHO = 2.0              # 3 dB above it: something else is in the frame


class Verdict(enum.Enum):
    PASS = "pass"             # AEC3's output goes up
    NEAR = "near"             # ... a user talking over the reply: the gate holds open
    KEEP_MIC = "keep_mic"     # AEC3 ate a user: the microphone goes up, the gate holds open
    KEEP_REST = "keep_rest"   # ... what the far-end copies leave of it goes up
    HELD = "held"             # AEC3's output goes up: within the hold
    LEAK = "leak"             # muted: AEC3 lost the echo path
    RESIDUAL = "residual"     # muted: residual echo

    @property
    def muted(self) -> bool:
        return self in (Verdict.LEAK, Verdict.RESIDUAL)

    @property
    def kept(self) -> bool:
        return self in (Verdict.KEEP_MIC, Verdict.KEEP_REST)

    @property
    def opens(self) -> bool:
        return self is Verdict.NEAR or self.kept


@dataclass(frozen=True, slots=True)
class Frame:
    """One 10 ms frame as the gate sees it.

    ``rest``: what the far-end copies leave of the newest 20 ms of capture (None: no leak
    check; a callable so the fit, the costly part, runs only where a rule needs it);
    ``rest_fast``: the same at the lag fitted last (cheaper: the keep rule's, on every frame).
    ``ceiling``: the loudest echo the path could put in the frame (0: none measured);
    ``rest_ceiling``: the most of it the far-end copies could leave; ``path_steady``: has
    the fitted lag not moved (nor the device reopened) for ``STEADY_FRAMES``, asked after
    the fit (which may find the move).
    ``path_known``: the far end has played long enough, in the fitter's view, for
    ``ceiling`` to mean something."""

    e_in: float               # the capture frame, before AEC3
    e_in_recent: float        # the larger of it and the previous one (AEC3 trails by 8 ms)
    e_out: float              # AEC3's output for it
    rest: Callable[[], np.ndarray] | None = None
    rest_fast: Callable[[], np.ndarray] | None = None
    ceiling: float = 0.0
    rest_ceiling: float = 0.0
    path_known: bool = False
    path_steady: Callable[[], bool] = lambda: True


def _e(x: np.ndarray) -> float:
    return float(np.dot(x, x))


def keeps(f: Frame) -> bool:
    """The **keep** rule: AEC3 took 6 dB or more out of a loud frame, what the far-end copies
    leave of it is 10 dB above the most echo they leave on this path, and either the frame
    is 3 dB above the loudest echo the path makes or the copies explained at least half of
    it (a user under the echo, found by fitting the echo out)."""
    if not (f.path_known and f.rest is not None and f.e_in > NEAR_MIN_E
            and f.e_out * KEEP_RATIO < f.e_in and f.e_in > KEEP_OVER_ECHO * f.rest_ceiling):
        return False
    e_rest = _e((f.rest_fast or f.rest)()[-FRAME:])
    if e_rest <= NEAR_MIN_E or e_rest <= KEEP_OVER_ECHO * f.rest_ceiling:
        return False
    # a frame the echo could fill: a user under it only if the copies explained most of it
    # on a path that has not just moved (a stall re-buffers the playback: the fit then
    # misses 10-30 dB of echo for a few frames)
    return f.e_in > ABOVE_ECHO * f.ceiling or (e_rest <= KEEP_SHARE * f.e_in and f.path_steady())


def leaks(f: Frame, gate_ratio: float) -> bool:
    """The **leak** rule."""
    if not (f.e_out > LEAK_MIN_E and f.e_out * gate_ratio > f.e_in):
        return False
    if f.path_known and f.e_out > KEEP_OVER_ECHO * f.ceiling:
        return False  # louder than any echo this path makes: the user
    if f.e_out > LEAK_RATIO * f.e_in_recent:
        return True
    if f.rest is None:
        return False
    return f.e_out > LEAK_RATIO * bound_of(f.rest())


def decide(f: Frame, gate_ratio: float, held: bool) -> Verdict:
    """The verdict on one far-end-active frame. ``gate_ratio``: ``gate_db`` as a power ratio
    (> 0); ``held``: the gate is within its hold."""
    if leaks(f, gate_ratio):
        return Verdict.LEAK
    if f.e_out * NEAR_RATIO > f.e_in and f.e_out > NEAR_MIN_E:
        return Verdict.NEAR
    if keeps(f):
        return Verdict.KEEP_MIC if f.e_in > KEEP_OVER_ECHO * f.ceiling else Verdict.KEEP_REST
    if held:
        return Verdict.HELD
    if f.e_out * gate_ratio <= f.e_in:
        return Verdict.RESIDUAL
    return Verdict.PASS


def double_talk(f: Frame) -> bool:
    """Does the frame hold a user talking over the reply (for the canceller's double-talk
    figures): loud, and 3 dB above any echo the measured path could put in it."""
    return f.path_known and f.e_in > NEAR_MIN_E and f.e_in > ABOVE_ECHO * f.ceiling
