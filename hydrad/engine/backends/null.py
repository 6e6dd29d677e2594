"""``null`` backend: silence in, output discarded, both at real time.

Options (all optional): ``input_rate`` (16000), ``input_channels`` (1), ``output_rate``
(24000), ``output_channels`` (1), plus the clock options of :mod:`.clock`
(``max_late_blocks``, ``simulate_open_failures``, ``simulate_loss_after``).
Blocks are float32 on both sides. Playout accounting works as with a real device.
"""

from __future__ import annotations

from .base import DeviceError
from .clock import ClockedBackend


class NullBackend(ClockedBackend):
    name = "null"

    def _open_devices(self) -> None:
        try:
            self.in_rate = int(self.options.get("input_rate", 16000))
            self.in_channels = int(self.options.get("input_channels", 1))
            self.out_rate = int(self.options.get("output_rate", 24000))
            self.out_channels = int(self.options.get("output_channels", 1))
        except (TypeError, ValueError) as exc:
            raise DeviceError(f"bad null backend option: {exc}") from None
        if min(self.in_rate, self.out_rate) < 1000 or min(self.in_channels, self.out_channels) < 1:
            raise DeviceError("null backend rates must be >= 1000 Hz and channels >= 1")
