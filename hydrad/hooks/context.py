"""The one object a plugin gets from hydrad: :class:`HookContext`.

Small and stable on purpose. A plugin can read its own settings, log under its own name,
read a snapshot of the session state and *request* a cancel, a mute or an unmute. Nothing
else of hydrad's internals is reachable from here, so the daemon can change behind it.

Every method is safe to call from any thread: from ``async def`` hooks (the trio thread),
from ``def`` hooks (worker threads), and from threads a plugin starts itself. Calls from
other threads are carried into the trio thread with the run's trio token.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import structlog
import trio

#: The keys of :meth:`HookContext.session_state`; nothing else of ``Daemon.status()`` leaks.
STATE_KEYS = ("state", "session_id", "turn_state", "muted", "model", "voice", "output_rate")


class Controller(Protocol):
    """What a context needs from the daemon (``hydrad.pipeline.daemon.Daemon`` is one)."""

    async def cancel(self, source: str = "programmatic") -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def mute(self) -> dict[str, Any]: ...
    def unmute(self) -> dict[str, Any]: ...
    def ping(self) -> dict[str, Any]: ...
    def metrics_text(self) -> str: ...


class NotRunning(RuntimeError):
    """A control request before the daemon runs (e.g. from ``hydrad_plugin_config``) or after it stopped."""


class Runtime:
    """What binds every context of one run to the daemon: the controller, the trio token, a nursery.

    Created by :class:`~hydrad.hooks.dispatch.HookDispatcher` when it starts; contexts work
    for settings and logging before that, and raise :class:`NotRunning` for control requests.
    """

    def __init__(self, controller: Controller | None, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.controller = controller
        self.token = token
        self.nursery = nursery
        self.closed = False

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the trio thread, from whichever thread we are on."""
        if self.closed:
            raise NotRunning("hydrad is not running")
        if trio.lowlevel.in_trio_run():
            return fn()
        try:
            return trio.from_thread.run_sync(fn, trio_token=self.token)
        except trio.RunFinishedError:
            raise NotRunning("hydrad is not running") from None


class HookContext:
    """Handed to every hook of one plugin (one context per plugin, for the life of the daemon).

    Attributes:
        plugin: the plugin's name (its entry-point name, or its module name).
        settings: what the plugin's ``hydrad_plugin_config`` returned (None without it).
        log: a structlog logger bound with ``plugin=<name>``.
    """

    __slots__ = ("_plugin", "_settings", "_log", "_runtime")

    def __init__(self, plugin: str, settings: Any = None) -> None:
        self._plugin = plugin
        self._settings = settings
        self._log = structlog.get_logger("hydrad.plugins").bind(plugin=plugin)
        self._runtime: Runtime | None = None

    def __repr__(self) -> str:
        return f"<HookContext plugin={self._plugin!r}>"

    @property
    def plugin(self) -> str:
        return self._plugin

    @property
    def settings(self) -> Any:
        return self._settings

    @property
    def log(self) -> Any:
        return self._log

    # ------------------------------------------------------------------ reading
    def session_state(self) -> dict[str, Any]:
        """A snapshot of the session: ``state`` (``connecting``, ``connected``, ``backoff``, ...),
        ``session_id``, ``turn_state`` (``idle``, ``listening``, ``thinking``, ``speaking``,
        ``tool``), ``muted``, ``model``, ``voice``, ``output_rate``. A fresh dict every call."""
        rt = self._require()
        status = rt.run_sync(rt.controller.status)
        return {k: status.get(k) for k in STATE_KEYS}

    def status(self) -> dict[str, Any]:
        """The full status, exactly what ``hydrad ctl status`` shows (engine, devices, last error...)."""
        rt = self._require()
        return rt.run_sync(rt.controller.status)

    def metrics_text(self) -> str:
        """The Prometheus text exposition, exactly what ``hydrad ctl metrics`` shows."""
        rt = self._require()
        return rt.run_sync(rt.controller.metrics_text)

    def ping(self) -> dict[str, Any]:
        """``{"pong": True, "t": ...}`` while the daemon's event loop answers."""
        rt = self._require()
        return rt.run_sync(rt.controller.ping)

    # ------------------------------------------------------------------ requests
    def request_cancel(self) -> None:
        """Ask hydrad to cancel the current response (if any) and cut playback.

        Returns at once; the cancel happens in the daemon shortly after and shows up as a
        ``cancel_requested`` event with ``source = "plugin"`` (followed by ``barge_in`` if
        something was audible). A request while nothing plays is harmless.
        """
        rt = self._require()
        try:
            rt.run_sync(lambda: rt.nursery.start_soon(self._do_cancel, rt))
        except RuntimeError as exc:  # the dispatcher's nursery is closing: hydrad is stopping
            if isinstance(exc, NotRunning):
                raise
            raise NotRunning("hydrad is stopping") from None

    async def _do_cancel(self, rt: Runtime) -> None:
        try:
            info = await rt.controller.cancel("plugin")
            self._log.info("plugin_cancel", **{k: v for k, v in info.items() if k in ("response_id", "in_flight", "flushed")})
        except Exception:  # noqa: BLE001 - a failed request must not take the dispatcher down
            self._log.exception("plugin_cancel_failed")

    def mute(self) -> None:
        """Mute the microphone (hydrad keeps streaming silence so the session stays healthy)."""
        rt = self._require()
        rt.run_sync(rt.controller.mute)
        self._log.info("plugin_mute")

    def unmute(self) -> None:
        """Unmute the microphone."""
        rt = self._require()
        rt.run_sync(rt.controller.unmute)
        self._log.info("plugin_unmute")

    # ------------------------------------------------------------------ hydrad's side
    def _require(self) -> Any:
        rt = self._runtime
        if rt is None or rt.closed:
            raise NotRunning(f"plugin {self._plugin!r}: control requests work only while hydrad runs")
        if rt.controller is None:
            raise NotRunning(f"plugin {self._plugin!r}: no daemon is attached (a dispatcher without a controller)")
        return rt

    def _bind(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

    def _set_settings(self, settings: Any) -> None:
        self._settings = settings
