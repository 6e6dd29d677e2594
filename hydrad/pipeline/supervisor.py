"""Restart a failing task with backoff: one failure never takes the daemon down."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import structlog
import trio

from .backoff import Backoff

log = structlog.get_logger("hydrad.supervisor")


async def supervise(
    name: str,
    fn: Callable[[], Awaitable[Any]],
    *,
    backoff: Backoff | None = None,
    on_failure: Callable[[str, BaseException], None] | None = None,
    healthy_after_s: float = 10.0,
) -> None:
    """Run ``fn`` forever; when it raises, log it, wait (with backoff) and run it again.

    A task that returns normally is restarted too: these tasks are meant to live as long as
    the daemon. Cancellation passes through untouched.
    """
    backoff = backoff or Backoff(0.1, 5.0)
    while True:
        started = trio.current_time()
        try:
            await fn()
            log.warning("task_returned", task=name)
        except Exception as exc:  # noqa: BLE001 - the supervisor's whole job
            log.exception("task_failed", task=name, error=repr(exc))
            if on_failure is not None:
                on_failure(name, exc)
        if trio.current_time() - started > healthy_after_s:
            backoff.reset()
        await trio.sleep(backoff.next())
