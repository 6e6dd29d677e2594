"""``exec``: run a command on chosen events with the event as JSON on stdin.

Hooks used: ``hydrad_plugin_config`` (validate the table), ``hydrad_startup`` (make one
bounded queue per command), ``hydrad_event`` (queue the event; never waits),
``hydrad_serve`` (one runner per command: run its queue in order, each with a timeout),
``hydrad_shutdown`` (let the queued commands finish, bounded by the hook deadline).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from hydrad.hooks import hookimpl

STDERR_TAIL = 500


@dataclass(frozen=True)
class Command:
    events: frozenset[str]
    argv: tuple[str, ...] | None
    shell: str | None
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    queue_size: int = 32

    def matches(self, event_name: str) -> bool:
        return "*" in self.events or event_name in self.events

    @property
    def label(self) -> str:
        return self.shell if self.shell is not None else " ".join(self.argv or ())


@dataclass(frozen=True)
class Settings:
    commands: tuple[Command, ...] = ()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} = {value!r}: expected a number of seconds > 0")
    return float(value)


def parse_settings(table: dict[str, Any]) -> Settings:
    unknown = set(table) - {"timeout_s", "commands"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: commands, timeout_s")
    default_timeout = _number(table.get("timeout_s", 5.0), "timeout_s")
    raw = table.get("commands", [])
    if not isinstance(raw, list):
        raise ValueError("commands: expected a list of tables ([[plugins.exec.commands]])")
    commands = []
    for i, c in enumerate(raw):
        where = f"commands[{i}]"
        if not isinstance(c, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(c) - {"events", "argv", "shell", "timeout_s", "env", "cwd", "queue_size"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             "allowed: argv, cwd, env, events, queue_size, shell, timeout_s")
        events = c.get("events")
        if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
            raise ValueError(f"{where}.events: expected a non-empty list of event names (or [\"*\"])")
        argv, shell = c.get("argv"), c.get("shell")
        if (argv is None) == (shell is None):
            raise ValueError(f"{where}: give exactly one of argv (a list, run without a shell) or shell (a string)")
        if argv is not None and (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)):
            raise ValueError(f"{where}.argv: expected a non-empty list of strings")
        if shell is not None and (not isinstance(shell, str) or not shell.strip()):
            raise ValueError(f"{where}.shell: expected a non-empty string")
        env = c.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError(f"{where}.env: expected a table of string values")
        cwd = c.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ValueError(f"{where}.cwd: expected a path string")
        queue_size = c.get("queue_size", 32)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or not 1 <= queue_size <= 10000:
            raise ValueError(f"{where}.queue_size = {queue_size!r}: expected an integer from 1 to 10000")
        commands.append(Command(frozenset(events), tuple(argv) if argv else None, shell,
                                _number(c.get("timeout_s", default_timeout), f"{where}.timeout_s"),
                                dict(env), cwd, queue_size))
    return Settings(tuple(commands))


def event_json(event: Any) -> bytes:
    """The stdin line: ``{"type", "data", "timestamp"}`` (Wyoming's event shape) + newline."""
    payload = {"type": event.name, "data": event.fields, "timestamp": time.time() - (time.monotonic() - event.t)}
    return (json.dumps(payload, default=str, separators=(",", ":")) + "\n").encode()


class ExecPlugin:
    """One instance per process (the entry point's object); state is reset on every start-up."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._queues: list[tuple[Command, trio.MemorySendChannel[tuple[str, bytes]], trio.MemoryReceiveChannel[tuple[str, bytes]]]] = []
        self._idle = trio.Event()

    @hookimpl
    def hydrad_plugin_config(self, table: dict[str, Any]) -> Settings:
        return parse_settings(table)

    @hookimpl
    async def hydrad_startup(self, ctx: Any) -> None:
        self.stats = Counter()
        self._queues = []
        for command in ctx.settings.commands:
            send, recv = trio.open_memory_channel[tuple[str, bytes]](command.queue_size)
            self._queues.append((command, send, recv))
        self._idle = trio.Event()
        if not self._queues:
            self._idle.set()
            ctx.log.info("exec_not_configured", hint="add [[plugins.exec.commands]] to run commands on events")

    @hookimpl
    async def hydrad_event(self, ctx: Any, event: Any) -> None:
        data: bytes | None = None
        for command, send, _ in self._queues:
            if not command.matches(event.name):
                continue
            data = data or event_json(event)
            try:
                send.send_nowait((event.name, data))
            except trio.WouldBlock:
                self.stats["dropped"] += 1
                ctx.log.warning("exec_queue_full", command=command.label, event_name=event.name)
            except trio.ClosedResourceError:
                pass

    @hookimpl
    async def hydrad_serve(self, ctx: Any) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for command, _, recv in self._queues:
                    nursery.start_soon(self._runner, ctx, command, recv)
        finally:
            self._idle.set()

    @hookimpl
    async def hydrad_shutdown(self, ctx: Any) -> None:
        for _, send, _ in self._queues:
            send.close()
        await self._idle.wait()  # the dispatcher's hook deadline bounds this

    async def _runner(self, ctx: Any, command: Command, recv: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        async for event_name, data in recv:
            await self.run_one(ctx, command, event_name, data)

    async def run_one(self, ctx: Any, command: Command, event_name: str, data: bytes) -> int | None:
        """Run ``command`` once with ``data`` on stdin; returns the exit status (None on timeout)."""
        env = {**os.environ, **command.env, "HYDRAD_EVENT": event_name}
        args: Any = command.shell if command.shell is not None else list(command.argv or ())
        t0 = time.monotonic()
        self.stats["runs"] += 1
        result = None
        with trio.move_on_after(command.timeout_s) as scope:
            try:
                result = await trio.run_process(
                    args, stdin=data, capture_stdout=True, capture_stderr=True, check=False,
                    shell=command.shell is not None, env=env, cwd=command.cwd,
                )
            except OSError as exc:
                self.stats["failed"] += 1
                ctx.log.error("exec_failed", command=command.label, event_name=event_name,
                              error=f"{type(exc).__name__}: {exc}")
                return None
        took_ms = round((time.monotonic() - t0) * 1000, 1)
        if scope.cancelled_caught or result is None:
            self.stats["timeouts"] += 1
            ctx.log.warning("exec_timeout", command=command.label, event_name=event_name, timeout_s=command.timeout_s)
            return None
        if result.returncode != 0:
            self.stats["failed"] += 1
            ctx.log.warning("exec_exit_status", command=command.label, event_name=event_name,
                            status=result.returncode, stderr=result.stderr.decode(errors="replace")[-STDERR_TAIL:],
                            took_ms=took_ms)
        else:
            self.stats["ok"] += 1
            ctx.log.debug("exec_done", command=command.label, event_name=event_name, took_ms=took_ms)
        return result.returncode


plugin = ExecPlugin()

__all__ = ["Command", "ExecPlugin", "Settings", "event_json", "parse_settings", "plugin"]
