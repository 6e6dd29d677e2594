"""hydrad's plugin system: pluggy hooks for every turn event, tools for the model, safe dispatch.

What plugin authors import::

    from hydrad.hooks import hookimpl, ToolError

What ``hydrad/app.py`` wires::

    plugins = load_plugins(cfg)                     # PluginError (a ConfigError) names the plugin
    tools = PluginTools(plugins)                    # the daemon's ToolProvider
    daemon = Daemon(cfg, api_key, tools=tools, bus=bus)
    dispatcher = HookDispatcher(plugins, daemon, bus)
    await nursery.start(dispatcher.run)             # startup hooks ran; subscribed to the bus
    await nursery.start(daemon.run)

See ``docs/plugins.md``.
"""

from __future__ import annotations

from ..session.tools import ToolError
from .context import HookContext, NotRunning
from .dispatch import HookCall, HookDispatcher
from .hookspecs import hookimpl, hookspec
from .manager import LoadedPlugin, PluginError, Plugins, describe_plugins, format_plugins, load_plugins
from .tools import PluginTools

__all__ = [
    "HookCall", "HookContext", "HookDispatcher", "LoadedPlugin", "NotRunning", "PluginError", "PluginTools",
    "Plugins", "ToolError", "describe_plugins", "format_plugins", "hookimpl", "hookspec", "load_plugins",
]
