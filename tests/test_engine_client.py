"""The daemon's side of the engine: whatever happens to the child, the client restarts it."""

from __future__ import annotations

import os
import signal

import trio

from hydrad.engine.client import EngineClient, EngineHandlers, EngineSpec


class Recorder(EngineHandlers):
    def __init__(self) -> None:
        self.states: list[str] = []
        self.captures = 0

    def on_capture(self, t_adc: float, pcm: bytes) -> None:
        self.captures += 1

    def on_state(self, state: str, detail: str | None) -> None:
        self.states.append(state)


async def wait_until(pred, timeout: float = 8.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_engine_killed_while_its_stdin_is_busy_is_restarted() -> None:
    h = Recorder()
    client = EngineClient(EngineSpec("null", {}, ping_s=0.2, hang_s=2.0), h)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        client.set_output_rate(24000)

        async def flood() -> None:  # the writer is always mid-send_all when the child dies
            pcm = bytes(4800)
            while True:
                await client.play("resp_1", pcm)
                await trio.sleep(0)

        nursery.start_soon(flood)
        for round_ in range(3):
            old = client.pid
            await trio.sleep(0.3)
            os.kill(old, signal.SIGKILL)
            await wait_until(lambda: client.state == "running" and client.pid not in (None, old))
        captures = h.captures
        await wait_until(lambda: h.captures > captures + 10)  # audio flows from the new engine
        assert client.restarts >= 3 and h.states.count("running") >= 4
        nursery.cancel_scope.cancel()
