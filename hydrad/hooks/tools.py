"""A :class:`~hydrad.session.tools.ToolProvider` built from the plugins' tool declarations.

The daemon (``Daemon._run_tool``) parses the arguments, validates them against the tool's
``parameters`` schema and applies ``plugins.tool_deadline_s`` before it calls :meth:`PluginTools.call`;
here the owning plugin's ``hydrad_call_tool`` runs (``def`` in a worker thread, ``async def``
as a trio task) and its result is JSON-encoded. Everything that goes wrong becomes a
:class:`~hydrad.session.tools.ToolError`, whose message the daemon sends to the model as the
error result, and is logged and counted under the plugin's name.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import structlog
import trio

from ..session.tools import ToolError, encode_result
from .manager import LoadedPlugin, Plugins, run_impl

log = structlog.get_logger("hydrad.plugins")


class PluginTools:
    """The tools of all loaded plugins; the first plugin in hook-call order owns a name."""

    def __init__(self, plugins: Plugins, *, max_threads: int = 8) -> None:
        self.plugins = plugins
        self._owners: dict[str, tuple[LoadedPlugin, Any]] = {}
        self._schemas: list[dict[str, Any]] = []
        for plugin in plugins:
            impl = plugins.impl_of(plugin, "hydrad_call_tool")
            for schema in plugin.tools:
                if impl is not None and schema["name"] not in self._owners:
                    self._owners[schema["name"]] = (plugin, impl)
                    self._schemas.append(schema)
        self.limiter = trio.CapacityLimiter(max_threads)
        #: per plugin: ``calls``, ``errors`` (raised or bad result), ``cancelled`` (deadline or turn cut)
        self.stats: dict[str, Counter[str]] = {p.name: Counter() for p in plugins}

    def schemas(self) -> list[dict[str, Any]]:
        """The tool schemas for ``session.configure`` (a new list; the schemas are shared)."""
        return list(self._schemas)

    def owner(self, name: str) -> str | None:
        """The name of the plugin that answers calls of tool ``name``."""
        entry = self._owners.get(name)
        return entry[0].name if entry else None

    async def call(self, name: str, arguments: dict[str, Any], call_id: str) -> str:
        entry = self._owners.get(name)
        if entry is None:
            raise ToolError(f"no tool named {name!r} is installed")
        plugin, impl = entry
        stats = self.stats.setdefault(plugin.name, Counter())
        stats["calls"] += 1
        kwargs = {"ctx": plugin.ctx, "name": name, "arguments": arguments, "call_id": call_id}
        t0 = time.perf_counter()
        try:
            result = await run_impl(impl, "hydrad_call_tool", self.limiter, **kwargs)
        except ToolError as exc:
            stats["errors"] += 1
            log.info("plugin_tool_error", plugin=plugin.name, tool=name, call_id=call_id, error=str(exc))
            raise
        except trio.Cancelled:
            stats["cancelled"] += 1
            log.warning("plugin_tool_cancelled", plugin=plugin.name, tool=name, call_id=call_id,
                        after_s=round(time.perf_counter() - t0, 3))
            raise
        except Exception as exc:  # noqa: BLE001 - a broken tool is an error result, not a crash
            stats["errors"] += 1
            log.error("plugin_tool_failed", plugin=plugin.name, tool=name, call_id=call_id,
                      error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            raise ToolError(f"tool {name!r} failed: {type(exc).__name__}: {exc}") from None
        try:
            return encode_result(result)
        except ToolError as exc:
            stats["errors"] += 1
            log.error("plugin_tool_bad_result", plugin=plugin.name, tool=name, call_id=call_id,
                      result_type=type(result).__name__, error=str(exc))
            raise ToolError(f"tool {name!r} returned a result that is not JSON-serialisable "
                            f"({type(result).__name__}): {str(exc).split(': ', 1)[-1]}") from None
