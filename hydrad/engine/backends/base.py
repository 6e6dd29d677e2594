"""The backend interface: how an audio device (real or simulated) plugs into the engine.

A backend owns the devices and the thread that drives them (PortAudio's callback thread, or
the clock thread of the simulated ``wav``/``null`` backends). The engine owns everything
else. The two talk through exactly two objects:

* the engine passes a :class:`Host` to the backend's constructor;
* the backend calls :meth:`Host.process` once per block, from its audio thread, and
  :meth:`Host.device_event` when a device fails.

``process`` must be callable from any thread, and may be called from two threads at once
when a backend runs separate input and output streams (``indata`` only from the input
callback, ``outdata`` only from the output callback): the engine keeps capture state and
playout state disjoint for that reason.

Lifecycle (all from the engine's control threads, never from the audio thread)::

    backend = create(name, options, block_ms=10, host=host)   # parses options, no I/O yet
    input_info, output_info = backend.open()   # opens devices; raises DeviceError
    backend.start()                            # process() calls begin
    backend.gate(True, t0)                     # optional: uplink gate opened at t0
    backend.close()                            # process() calls have ended when it returns
    backend.open(); backend.start()            # reopen after a fault (same object)

See docs/engine.md ("How a backend plugs in").
"""

from __future__ import annotations

import abc
from typing import Any, Protocol

import numpy as np

# Status bits passed to Host.process. The first five are PortAudio's PaStreamCallbackFlags
# values, so a sounddevice backend can pass ``int(status)`` straight through.
INPUT_UNDERFLOW = 0x01
INPUT_OVERFLOW = 0x02
OUTPUT_UNDERFLOW = 0x04
OUTPUT_OVERFLOW = 0x08
PRIMING_OUTPUT = 0x10

STATUS_NAMES = {
    INPUT_UNDERFLOW: "input_underflow",
    INPUT_OVERFLOW: "input_overflow",
    OUTPUT_UNDERFLOW: "output_underflow",
    OUTPUT_OVERFLOW: "output_overflow",
    PRIMING_OUTPUT: "priming_output",
}

# DEVICE states (see docs/engine.md)
OPEN = "open"
LOST = "lost"
REOPENING = "reopening"
UNAVAILABLE = "unavailable"


class DeviceError(RuntimeError):
    """A device could not be opened (or the backend's options are unusable)."""


class Host(Protocol):
    """What the engine offers to a backend."""

    def process(
        self,
        indata: np.ndarray | None,
        outdata: np.ndarray | None,
        t_adc: float,
        t_dac: float,
        status: int = 0,
    ) -> None:
        """One block. Called from the audio thread; never blocks, never raises.

        ``indata``: ``frames x channels`` (int16 or float32) at the input device rate, or None
        when this call carries no input (output-only stream).
        ``outdata``: ``frames x channels`` (int16 or float32) at the output device rate, to be
        filled completely (the engine writes silence where it has nothing), or None.
        ``t_adc``: ``time.monotonic()`` estimate of when ``indata[0]`` hit the ADC.
        ``t_dac``: ``time.monotonic()`` estimate of when ``outdata[0]`` will be heard.
        ``status``: OR of the status bits above (PortAudio callback flags).
        """

    def device_event(self, state: str, error: str | None = None) -> None:
        """A device fault (``LOST``), from any thread (the audio thread included). Non-blocking.

        The engine answers ``LOST`` by closing the backend and reopening it with backoff.
        """

    def count_late(self, n: int = 1) -> None:
        """The backend's clock missed ``n`` block deadlines (ticks skipped to resync)."""


class Backend(abc.ABC):
    """Base class of the engine's device backends."""

    #: the ``backend`` name in CONFIG
    name: str = ""

    def __init__(self, options: dict[str, Any], block_ms: float, host: Host) -> None:
        self.options = dict(options)
        self.block_ms = float(block_ms)
        self.host = host

    @abc.abstractmethod
    def open(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Open the devices; return ``(input_info, output_info)`` for READY.

        An info dict has at least ``name``, ``rate``, ``channels``, ``dtype`` and ``latency``
        (seconds). None means "no such device". Raises :class:`DeviceError`.
        """

    @abc.abstractmethod
    def start(self) -> None:
        """Start calling ``host.process``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop and release the devices. Idempotent. No ``process`` call runs after it returns."""

    def gate(self, open_: bool, t0: float) -> None:
        """The uplink gate opened (or closed) at monotonic ``t0``. Default: ignored."""

    def describe(self) -> dict[str, Any]:
        """Extra fields for STATS (optional)."""
        return {}
