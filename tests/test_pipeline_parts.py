"""Small pipeline parts: pacing, backoff, the drop-oldest mic queue."""

from __future__ import annotations

import trio

from hydrad.pipeline.backoff import Backoff
from hydrad.pipeline.framequeue import DropOldestQueue
from hydrad.pipeline.pacer import Pacer


def test_pacer_never_lets_more_than_burst_ahead_of_real_time() -> None:
    pacer = Pacer(0.02, burst=5, now=0.0)
    sent, t = 0, 0.0
    for _ in range(200):  # a backlog offered all at once at t=0..: only the burst passes immediately
        if pacer.delay(t) == 0:
            pacer.take()
            sent += 1
    assert sent == 5
    t = 1.0
    while pacer.delay(t) == 0:
        pacer.take()
        sent += 1
    assert sent == 5 + 5  # tokens are capped at the burst, whatever the idle time


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(1.0, 30.0)
    delays = [b.next() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])
    assert b.next(cap=60.0) <= 60.0
    b.reset()
    assert b.next() <= 1.0


async def test_drop_oldest_queue_keeps_the_live_edge() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    dropped = [q.put_nowait(i) for i in range(5)]
    assert dropped == [False, False, False, True, True] and q.dropped == 2
    assert [await q.get() for _ in range(3)] == [2, 3, 4]
    async with trio.open_nursery() as n:
        got: list[int] = []

        async def consumer() -> None:
            got.append(await q.get())

        n.start_soon(consumer)
        await trio.sleep(0.01)
        q.put_nowait(9)
    assert got == [9]


async def test_supervisor_restarts_a_failing_task_with_backoff(autojump_clock) -> None:
    from hydrad.pipeline.supervisor import supervise

    runs: list[float] = []
    failures: list[str] = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise RuntimeError("boom")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervise("flaky", flaky, backoff=Backoff(1.0, 8.0),
                                             on_failure=lambda name, exc: failures.append(name)))
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert len(runs) == 4 and failures == ["flaky"] * 3
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert 0.5 <= gaps[0] <= 1.0 and 1.0 <= gaps[1] <= 2.0 and 2.0 <= gaps[2] <= 4.0  # jittered, doubling
