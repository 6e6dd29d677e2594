"""Session-wide test settings."""

from __future__ import annotations

import sys

import pytest


def pytest_unconfigure(config: pytest.Config) -> None:
    """Skip livekit's native runtime teardown at exit. The echo-canceller tests load livekit
    in this process, and its atexit dispose aborts the interpreter now and then (a Rust
    panic that cannot unwind: exit 134 after every test passed, seen once in ~28 runs). The
    engine child ends with ``os._exit`` for the same reason (hydrad/engine/__main__.py)."""
    ffi = sys.modules.get("livekit.rtc._ffi_client")
    client = getattr(ffi, "FfiClient", None)
    if client is not None and hasattr(client, "_ffi_disposed"):
        client._ffi_disposed = True
