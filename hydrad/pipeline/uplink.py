"""The uplink task: mic frames -> ``input_audio_buffer.append``, paced, never silent.

The mic streams continuously, also while the agent speaks and while muted (zeros), because
the service's VAD needs the silence and its idle timer closes quiet sockets. When the engine
delivers nothing (restarting, no device), the uplink fills with silence at real time.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import trio

from ..protocol import client_frames as F
from .framequeue import DropOldestQueue
from .pacer import Pacer


async def run_uplink(
    queue: DropOldestQueue[tuple[float | None, bytes]],
    send: Callable[[str], Awaitable[Any]],
    *,
    frame_ms: int,
    burst: int,
    is_muted: Callable[[], bool],
    counters: Any,
    on_sent: Callable[[float | None, float], None] | None = None,
) -> None:
    frame_s = frame_ms / 1000
    silence = bytes(frame_ms * 32)  # 16 kHz * 2 bytes * ms
    pacer = Pacer(frame_s, burst, trio.current_time())
    filling = False
    while True:
        with trio.move_on_after(frame_s * (1.0 if filling else 3.0)) as scope:
            t_adc, pcm = await queue.get()
        if scope.cancelled_caught:
            t_adc, pcm = None, silence
            filling = True
            counters["uplink_silence_filled"] += 1
        else:
            filling = False
        wait = pacer.delay(trio.current_time())
        if wait > 0:
            await trio.sleep(wait)
            pacer.delay(trio.current_time())
        pacer.take()
        if is_muted():
            pcm = silence if len(pcm) == len(silence) else bytes(len(pcm))
            counters["uplink_frames_muted"] += 1
        await send(F.input_audio_append(pcm))
        counters["uplink_frames_sent"] += 1
        if on_sent is not None:
            on_sent(t_adc, time.monotonic())
