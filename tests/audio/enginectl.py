"""The engine driver of ``tests/engine_driver.py``, defaulting to the sounddevice backend,
for engine-level tests on the virtual devices."""

from __future__ import annotations

from typing import Any

from ..engine_driver import REPO, EngineProc as _EngineProc

__all__ = ["REPO", "EngineProc"]


class EngineProc(_EngineProc):
    backend = "sounddevice"

    def config(self, options: dict[str, Any] | None = None, *, wait: bool = True,  # type: ignore[override]
               **extra: Any) -> dict[str, Any]:
        return super().config(None, options, wait=wait, **extra)

    def play(self, rid: str, pcm: Any, chunk: int = 2400) -> None:  # 50 ms PLAYs at 48 kHz
        super().play(rid, pcm, chunk)
