"""Device backends of the audio engine. ``create(name, ...)`` imports only the one asked for
(so the ``wav``/``null`` engine never imports sounddevice/PortAudio)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Backend, DeviceError, Host

_BACKENDS = {
    "null": ("hydrad.engine.backends.null", "NullBackend"),
    "wav": ("hydrad.engine.backends.wav", "WavBackend"),
    "sounddevice": ("hydrad.engine.backends.sounddevice", "SounddeviceBackend"),
}


def names() -> list[str]:
    return sorted(_BACKENDS)


def create(name: str, options: dict[str, Any], block_ms: float, host: Host) -> Backend:
    """Build (not open) the backend ``name``. Raises ValueError for an unknown name,
    DeviceError for unusable options."""
    try:
        module, cls = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(names())})") from None
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise DeviceError(f"backend {name!r} is not available: {exc}") from None
    return getattr(mod, cls)(options, block_ms, host)


__all__ = ["Backend", "DeviceError", "Host", "create", "names"]
