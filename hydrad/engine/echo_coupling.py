"""How loud the echo path makes the far end at the microphone (issue 19).

The residual echo gate (``hydrad.engine.echo_gate``) must tell a user AEC3 suppressed from
the echo AEC3 removed. Neither AEC3 nor a fitted delay line can say how strong the echo path
is when there is none to converge on or fit, and a fit on double talk is fooled by the
user's own voice (a voiced vowel fits a stretch of the simulator's harmonic voice at half
its energy). The one stretch of capture that is echo alone, in a conversation, is the start
of every reply: the user has just stopped (the service waits for end-of-turn silence), and
whoever interrupts does so after the first syllables. So :class:`EchoCoupling` measures
there: over the first ``window_frames`` (400 ms) of each far-end burst that follows at
least ``quiet_frames`` (300 ms) of silence, the largest ratio of a capture frame's energy
to the loudest 10 ms of far end its echo can come from (:attr:`EchoCoupling.value`: the
path's peak power gain, reverberation, the noise floor and any user who talks that early
included), and the same ratio for what a delay line fitted to the far end leaves of the
frame (:attr:`EchoCoupling.rest_value`: how much echo the fit misses on this path: next
to nothing on a dry one, the reverberation in a room). Both err only high, towards
muting less of what AEC3 decides.

The values are the latest burst's (a speaker turned up or away shows from the next reply
on) and None until a first burst has been measured. Pure arithmetic on energies, no
threads: the canceller calls :meth:`EchoCoupling.frame` for each 10 ms capture frame.
"""

from __future__ import annotations


class EchoCoupling:
    """The echo path's peak power gain, measured at the start of each far-end burst.

    ``window_frames`` (40): capture frames measured from a burst's start; ``quiet_frames``
    (30): far-end silence that makes the next activity a new burst; ``min_far`` (energy of
    10 ms): frames whose far end is quieter say nothing of the path.
    """

    def __init__(self, *, window_frames: int = 40, quiet_frames: int = 30, min_far: float = 0.0) -> None:
        if window_frames < 1 or quiet_frames < 1 or min_far < 0.0:
            raise ValueError("window_frames and quiet_frames must be >= 1, min_far >= 0")
        self.window_frames = int(window_frames)
        self.quiet_frames = int(quiet_frames)
        self.min_far = float(min_far)
        self.value: float | None = None      # the latest burst's peak gain (None: none yet)
        self.rest_value: float | None = None # ... of what the fit leaves (None: not fitted)
        self.bursts = 0                      # bursts measured
        self._quiet = quiet_frames           # far-end-silent frames in a row
        self._left = 0                       # frames of the current burst's window still to measure
        self._peak: float | None = None      # largest ratio in the window so far
        self._rest_peak: float | None = None

    @property
    def measuring(self) -> bool:
        """Inside a burst's window: the caller should pass the fit's rest to :meth:`frame`."""
        return self._left > 0

    def frame(self, far_active: bool, e_in: float, far_peak: float, e_rest: float | None = None) -> None:
        """One 10 ms capture frame: is the far end playing now, the frame's energy, the
        loudest 10 ms of far end within the echo lags (0: none), and while
        :attr:`measuring` the energy of what the far-end copies leave of it (None: no fit)."""
        if not far_active:
            self._quiet += 1
            if self._left:       # the burst ended inside its window: what was measured counts
                self._close()
            return
        if self._quiet >= self.quiet_frames:
            self._left, self._peak, self._rest_peak = self.window_frames, None, None
        self._quiet = 0
        if not self._left:
            return
        if far_peak > self.min_far:  # > 0 as well: min_far >= 0
            ratio = e_in / far_peak
            if self._peak is None or ratio > self._peak:
                self._peak = ratio
            if e_rest is not None:
                ratio = e_rest / far_peak
                if self._rest_peak is None or ratio > self._rest_peak:
                    self._rest_peak = ratio
        self._left -= 1
        if not self._left:
            self._close()

    def _close(self) -> None:
        self._left = 0
        if self._peak is not None:
            self.value = self._peak
            self.rest_value = self._rest_peak
            self.bursts += 1

    def ceiling(self, far_peak: float) -> float:
        """The loudest echo the path could put in a frame whose far end peaks at
        ``far_peak`` (0 while unmeasured: callers check :attr:`value` first)."""
        return (self.value or 0.0) * far_peak

    def rest_ceiling(self, far_peak: float) -> float:
        """The loudest echo the fit could leave in such a frame (the plain ceiling where the
        rest was not measured)."""
        gain = self.rest_value if self.rest_value is not None else self.value
        return (gain or 0.0) * far_peak
