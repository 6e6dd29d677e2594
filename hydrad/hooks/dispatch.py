"""Calling observer hooks without ever blocking the pipeline.

:meth:`HookDispatcher.sink` is an :class:`~hydrad.events.EventBus` sink: it runs inside the
daemon's ``bus.publish`` call, on the audio path, so all it does is put ``(hooks, event)`` on
each interested plugin's bounded queue with ``send_nowait`` (a few microseconds; measured in
``tests/test_plugins_dispatch.py``). When a plugin's queue is full (it is stuck or much too
slow) the event is dropped *for that plugin only* and counted.

Each plugin has one worker task in the dispatcher's nursery that takes its queue in order,
so a plugin sees events in the order they happened; plugins run independently of each other.
The worker awaits ``async def`` hooks directly and runs ``def`` hooks in a worker thread
(``trio.to_thread.run_sync``, one :class:`trio.CapacityLimiter` shared by all plugins so
hung threads cannot multiply without bound). Every call has the deadline
``plugins.hook_deadline_s``; a call past it is abandoned (a thread cannot be killed: it is left
to finish on its own, holding its limiter token until then), counted and logged. An exception
is logged with the plugin's name and counted; the worker goes on with the next event.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pluggy
import structlog
import trio

from ..events import EVENT_NAMES, Event, EventBus
from . import hookspecs
from .context import Controller, Runtime
from .manager import LoadedPlugin, Plugins, call_impl, run_impl

log = structlog.get_logger("hydrad.plugins")


@dataclass(frozen=True)
class HookCall:
    """One finished hook call, for monitors (the test kit, metrics)."""

    plugin: str
    hook: str
    event: Event | None
    outcome: str  # "ok", "error", "timeout"
    error: str | None
    duration_s: float
    t: float  # time.monotonic() when the call ended


class _Worker:
    def __init__(self, plugin: LoadedPlugin, queue_size: int) -> None:
        self.plugin = plugin
        self.send, self.recv = trio.open_memory_channel[tuple[tuple[tuple[str, pluggy.HookImpl], ...], Event]](queue_size)
        self.busy = False


class HookDispatcher:
    """Delivers bus events to the plugins' observer hooks and runs their life-cycle hooks.

    Usage (``hydrad/app.py``)::

        dispatcher = HookDispatcher(plugins, daemon, bus)
        await nursery.start(dispatcher.run)   # startup hooks done, subscribed to the bus
        await nursery.start(daemon.run)
        ...                                   # on the way out, after the daemon stopped:
        await dispatcher.aclose()             # drain queues, shutdown hooks, serve tasks cancelled

    ``controller`` is what ``ctx.request_cancel()`` / ``mute()`` / ``unmute()`` /
    ``session_state()`` drive (the :class:`~hydrad.pipeline.daemon.Daemon`); it may be None
    (plugin contexts then only log and read settings).
    """

    def __init__(
        self,
        plugins: Plugins,
        controller: Controller | None = None,
        bus: EventBus | None = None,
        *,
        deadline_s: float | None = None,
        queue_size: int = 256,
        max_threads: int = 8,
    ) -> None:
        self.plugins = plugins
        self.controller = controller
        self.bus = bus
        self.deadline_s = deadline_s if deadline_s is not None else plugins.hook_deadline_s
        self.queue_size = queue_size
        self.limiter = trio.CapacityLimiter(max_threads)
        #: per plugin: ``calls``, ``errors``, ``timeouts``, ``dropped`` (queue full), ``serve_errors``
        self.stats: dict[str, Counter[str]] = {p.name: Counter() for p in plugins}
        #: callables ``(HookCall) -> None`` told about every finished hook call (must not block)
        self.monitors: list[Callable[[HookCall], None]] = []
        self._workers: dict[str, _Worker] = {}
        self._routes: dict[str, list[tuple[_Worker, tuple[tuple[str, pluggy.HookImpl], ...]]]] = {}
        self._generic: dict[str, pluggy.HookImpl] = {}
        self._specific: dict[str, dict[str, pluggy.HookImpl]] = {}
        self._nursery: trio.Nursery | None = None
        self._runtime: Runtime | None = None
        self._stop = trio.Event()
        self._closed = trio.Event()
        self._accepting = False
        self._drop_logged: set[str] = set()

    # ================================================================ the bus sink (hot path)
    def sink(self, event: Event) -> None:
        """Hand ``event`` to every plugin that observes it. Synchronous and never blocks."""
        if not self._accepting:
            return
        routes = self._routes.get(event.name)
        if routes is None:
            routes = self._route(event.name)
        for worker, impls in routes:
            try:
                worker.send.send_nowait((impls, event))
            except trio.WouldBlock:
                self._dropped(worker.plugin.name, event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _dropped(self, plugin: str, event: Event) -> None:
        self.stats[plugin]["dropped"] += 1
        if plugin not in self._drop_logged:  # once per plugin per run; the counter has the rest
            self._drop_logged.add(plugin)
            log.warning("plugin_events_dropped", plugin=plugin, event_name=event.name, queue_size=self.queue_size,
                        hint="the plugin's hooks are slower than the events arrive")

    def _route(self, name: str) -> list[tuple[_Worker, tuple[tuple[str, pluggy.HookImpl], ...]]]:
        routes = []
        hook = hookspecs.event_hook(name)
        for plugin_name, worker in self._workers.items():
            impls: list[tuple[str, pluggy.HookImpl]] = []
            specific = self._specific.get(plugin_name, {}).get(hook)
            if specific is not None:
                impls.append((hook, specific))
            generic = self._generic.get(plugin_name)
            if generic is not None:
                impls.append((hookspecs.GENERIC_HOOK, generic))
            if impls:
                routes.append((worker, tuple(impls)))
        self._routes[name] = routes
        return routes

    # ================================================================ life cycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`aclose` (or cancellation): start-up hooks, serve tasks, delivery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._runtime = Runtime(self.controller, trio.lowlevel.current_trio_token(), nursery)
                self.plugins.bind(self._runtime)
                self._build_workers()
                for worker in self._workers.values():
                    nursery.start_soon(self._work, worker)
                await self._lifecycle("hydrad_startup")
                serve_scope = trio.CancelScope()
                nursery.start_soon(self._serve_all, serve_scope)
                self._accepting = True
                if self.bus is not None:
                    self.bus.subscribe(self.sink)
                task_status.started(self)
                await self._stop.wait()
                # Orderly stop: no new events; deliver what is queued (bounded); shutdown hooks; cancel.
                self._unsubscribe()
                for worker in self._workers.values():
                    worker.send.close()
                with trio.move_on_after(self.deadline_s + 1.0):
                    while any(w.busy or w.recv.statistics().current_buffer_used for w in self._workers.values()):
                        await trio.sleep(0.01)
                await self._lifecycle("hydrad_shutdown")
                serve_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            self._unsubscribe()
            if self._runtime is not None:
                self._runtime.closed = True
            self.plugins.bind(None)
            self._closed.set()

    def _unsubscribe(self) -> None:
        self._accepting = False
        if self.bus is not None:
            self.bus.unsubscribe(self.sink)

    def request_stop(self) -> None:
        """Begin the orderly stop (see :meth:`aclose`); returns at once."""
        self._stop.set()

    async def aclose(self) -> None:
        """Stop taking events, deliver the queued ones, run ``hydrad_shutdown``, cancel ``hydrad_serve``.

        Bounded: at most about two hook deadlines. Call it after the daemon stopped, so the
        last events (``session_disconnected``) reach the plugins.
        """
        self._stop.set()
        if self._nursery is not None:
            await self._closed.wait()

    def _build_workers(self) -> None:
        for hook in hookspecs.observer_hooks():
            for plugin, impl in self.plugins.impls(hook):
                if hook == hookspecs.GENERIC_HOOK:
                    self._generic[plugin.name] = impl
                else:
                    self._specific.setdefault(plugin.name, {})[hook] = impl
                if plugin.name not in self._workers:
                    self._workers[plugin.name] = _Worker(plugin, self.queue_size)
        self._routes.clear()
        for name in EVENT_NAMES:  # precomputed: the publish path only looks up
            self._route(name)

    async def _work(self, worker: _Worker) -> None:
        ctx = worker.plugin.ctx
        async for impls, event in worker.recv:
            worker.busy = True
            try:
                # Each plugin gets its own copy: a plugin changing it affects no other plugin and
                # no other observer (the timeline keeps events). Copied here, off the publish path.
                mine = Event(event.name, copy.deepcopy(event.fields), event.t)
                for hook, impl in impls:
                    await self._call(worker.plugin, hook, impl, {"ctx": ctx, "event": mine}, event)
            finally:
                worker.busy = False

    async def _lifecycle(self, hook: str) -> None:
        """Run ``hook`` for every plugin concurrently, each with the deadline."""
        impls = self.plugins.impls(hook)
        if not impls:
            return
        async with trio.open_nursery() as nursery:
            for plugin, impl in impls:
                nursery.start_soon(self._call, plugin, hook, impl, {"ctx": plugin.ctx}, None)

    async def _serve_all(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for plugin, impl in self.plugins.impls("hydrad_serve"):
                    nursery.start_soon(self._serve, plugin, impl)

    async def _serve(self, plugin: LoadedPlugin, impl: pluggy.HookImpl) -> None:
        try:
            await call_impl(impl, ctx=plugin.ctx)
        except Exception as exc:  # noqa: BLE001 - one plugin's background task must not stop the others
            self.stats[plugin.name]["serve_errors"] += 1
            log.error("plugin_serve_failed", plugin=plugin.name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    # ================================================================ one call
    async def _call(self, plugin: LoadedPlugin, hook: str, impl: pluggy.HookImpl, kwargs: dict[str, Any],
                    event: Event | None) -> None:
        stats = self.stats.setdefault(plugin.name, Counter())
        stats["calls"] += 1
        t0 = time.perf_counter()
        outcome, error = "ok", None
        with trio.move_on_after(self.deadline_s) as scope:
            try:
                await run_impl(impl, hook, self.limiter, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a broken plugin is logged, counted and skipped
                outcome, error = "error", f"{type(exc).__name__}: {exc}"
                stats["errors"] += 1
                log.error("plugin_hook_failed", plugin=plugin.name, hook=hook, error=error,
                          event_name=event.name if event else None, exc_info=exc)
        if scope.cancelled_caught:
            outcome, error = "timeout", f"still running after {self.deadline_s} s"
            stats["timeouts"] += 1
            log.warning("plugin_hook_timeout", plugin=plugin.name, hook=hook, deadline_s=self.deadline_s,
                        event_name=event.name if event else None)
        if self.monitors:
            call = HookCall(plugin.name, hook, event, outcome, error, time.perf_counter() - t0, time.monotonic())
            for monitor in list(self.monitors):
                try:
                    monitor(call)
                except Exception:  # noqa: BLE001
                    log.exception("hook_monitor_failed")

    # ================================================================ reporting
    def totals(self) -> dict[str, int]:
        """Sums over all plugins: ``calls``, ``errors``, ``timeouts``, ``dropped``, ``serve_errors``."""
        out: Counter[str] = Counter()
        for c in self.stats.values():
            out.update(c)
        return dict(out)

