"""Every control command is reachable from a plugin's context, from trio and from threads."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from hydrad.hooks import HookContext, NotRunning
from hydrad.hooks.context import Runtime


class FakeController:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def cancel(self, source: str = "programmatic") -> dict[str, Any]:
        self.calls.append(f"cancel:{source}")
        return {"in_flight": True, "flushed": True, "response_id": "r1"}

    def status(self) -> dict[str, Any]:
        self.calls.append("status")
        return {"state": "connected", "session_id": "s1", "engine": {"state": "running"}, "muted": False}

    def mute(self) -> dict[str, Any]:
        self.calls.append("mute")
        return {"muted": True}

    def unmute(self) -> dict[str, Any]:
        self.calls.append("unmute")
        return {"muted": False}

    def ping(self) -> dict[str, Any]:
        self.calls.append("ping")
        return {"pong": True}

    def metrics_text(self) -> str:
        self.calls.append("metrics")
        return "hydrad_up 1\n"


async def test_context_reaches_every_control_command_from_trio_and_threads() -> None:
    ctl = FakeController()
    ctx = HookContext("demo")
    with pytest.raises(NotRunning):
        ctx.ping()
    async with trio.open_nursery() as nursery:
        ctx._bind(Runtime(ctl, trio.lowlevel.current_trio_token(), nursery))
        assert ctx.status()["engine"] == {"state": "running"}
        assert ctx.session_state() == {"state": "connected", "session_id": "s1", "turn_state": None, "muted": False,
                                       "model": None, "voice": None, "output_rate": None}

        def from_thread() -> tuple[Any, ...]:
            ctx.mute()
            ctx.unmute()
            ctx.request_cancel()
            return ctx.ping(), ctx.metrics_text()

        pong, text = await trio.to_thread.run_sync(from_thread)
        assert pong == {"pong": True} and text == "hydrad_up 1\n"
        await trio.sleep(0.05)
    assert sorted(ctl.calls) == sorted(["status", "status", "mute", "unmute", "ping", "metrics", "cancel:plugin"])
