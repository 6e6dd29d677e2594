"""Finding, loading, configuring and describing plugins; every problem reported before start-up.

Plugins come from two places, in this order:

1. the ``hydrad`` entry-point group of the installed distributions (sorted by entry-point
   name; the entry-point name is the plugin's name);
2. ``plugins.modules`` in the config (in the listed order; the module name is the plugin's name).

``plugins.disabled`` names plugins that are not even imported (so a broken plugin can be
switched off on a kiosk without uninstalling it). Each loaded plugin validates its own
``[plugins.<name>]`` table in ``hydrad_plugin_config``. All problems of all plugins are
collected and raised together as one :class:`PluginError` (a :class:`~hydrad.config.ConfigError`),
each line naming the plugin.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import re
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import pluggy
import structlog
import trio

from ..config import Config, ConfigError, PluginsConfig
from . import hookspecs
from .context import HookContext, Runtime

log = structlog.get_logger("hydrad.plugins")

ENTRY_POINT_GROUP = "hydrad"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_KEYS = {"type", "name", "description", "parameters"}
_SYNC_ONLY = ("hydrad_plugin_config", "hydrad_tools")
_ASYNC_ONLY = ("hydrad_serve",)


class PluginError(ConfigError):
    """Plugins that cannot be loaded or configured; ``problems`` has one line each, naming the plugin."""

    def __str__(self) -> str:
        return f"plugin problems ({self.source}):\n" + "\n".join(f"  - {p}" for p in self.problems)


@dataclass
class LoadedPlugin:
    """One registered plugin and everything hydrad knows about it."""

    name: str
    obj: Any
    #: ``entry point`` (installed distribution), ``module`` (``plugins.modules``) or ``object`` (registered by code, e.g. tests)
    kind: str
    #: where it came from, in words: ``entry point exec = hydrad_exec (hydrad-exec 0.1.0)``
    source: str
    ctx: HookContext
    dist: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    #: tool schemas as declared (validated, with ``"type": "function"``)
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: names this plugin declared but another plugin owns
    shadowed_tools: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Any:
        return self.ctx.settings


@dataclass
class DisabledPlugin:
    name: str
    kind: str
    source: str


class Plugins:
    """The loaded plugins of one daemon: what the dispatcher, the tool provider and
    ``hydrad plugins`` work from. Built by :func:`load_plugins`."""

    def __init__(self, pm: pluggy.PluginManager, config: PluginsConfig) -> None:
        self.pm = pm
        self.config = config
        self.loaded: list[LoadedPlugin] = []
        self.disabled: list[DisabledPlugin] = []
        self._by_name: dict[str, LoadedPlugin] = {}

    def __iter__(self) -> Iterator[LoadedPlugin]:
        return iter(self.loaded)

    def __len__(self) -> int:
        return len(self.loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> LoadedPlugin:
        return self._by_name[name]

    def _add(self, plugin: LoadedPlugin) -> None:
        self.loaded.append(plugin)
        self._by_name[plugin.name] = plugin

    @property
    def hook_deadline_s(self) -> float:
        return self.config.hook_deadline_s

    def impls(self, hook: str) -> list[tuple[LoadedPlugin, pluggy.HookImpl]]:
        """The implementations of ``hook`` in pluggy's call order (tryfirst first, then the
        plugin registered last first), each with its plugin."""
        caller = getattr(self.pm.hook, hook, None)
        if caller is None:
            return []
        out = []
        for impl in reversed(caller.get_hookimpls()):
            plugin = self._by_name.get(impl.plugin_name)
            if plugin is not None:
                out.append((plugin, impl))
        return out

    def impl_of(self, plugin: LoadedPlugin, hook: str) -> pluggy.HookImpl | None:
        for p, impl in self.impls(hook):
            if p is plugin:
                return impl
        return None

    def bind(self, runtime: Runtime | None) -> None:
        """Attach (or detach, with None) every plugin's context to a running daemon."""
        for plugin in self.loaded:
            plugin.ctx._bind(runtime)  # noqa: SLF001 - the manager owns the contexts


class _Manager(pluggy.PluginManager):
    """A pluggy manager that, like pytest's, also takes unmarked ``hydrad_*`` functions as hooks
    (forgetting ``@hookimpl`` must not make a hook silently never fire)."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if not name.startswith(hookspecs.PREFIX):
            return None
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None:
            return opts
        try:
            method = getattr(plugin, name)
        except Exception:  # noqa: BLE001
            return None
        if not inspect.isroutine(method):
            return None
        return {"wrapper": False, "hookwrapper": False, "optionalhook": False, "tryfirst": False,
                "trylast": False, "specname": None}


def call_impl(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one implementation with the subset of arguments it asked for."""
    return impl.function(*[kwargs[name] for name in impl.argnames])


def is_async(impl: pluggy.HookImpl) -> bool:
    fn = impl.function
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


async def run_impl(impl: pluggy.HookImpl, hook: str, limiter: Any, **kwargs: Any) -> Any:
    """Run one implementation off the pipeline: ``async def`` in this task, ``def`` in a worker
    thread (abandoned, not killed, if the caller's deadline passes). A ``def`` that returns an
    awaitable is a plugin bug, reported as such instead of silently never running."""
    if is_async(impl):
        return await call_impl(impl, **kwargs)
    result = await trio.to_thread.run_sync(
        functools.partial(call_impl, impl, **kwargs), limiter=limiter, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{hook} is a plain def but returned an awaitable; declare it async def")
    return result


# ============================================================================ loading


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _close_name(name: str, candidates: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_plugins(
    cfg: Config | PluginsConfig,
    *,
    extra: Sequence[Any] = (),
    entry_points: bool = True,
) -> Plugins:
    """Discover, import, register, configure and check every enabled plugin.

    ``extra`` adds plugins by object (a module, or ``(name, object)``), registered after the
    configured ones; the test kit uses it for the plugin under test. ``entry_points=False``
    skips the installed entry points (tests that want only ``extra``).

    Raises :class:`PluginError` listing every problem, each naming its plugin.
    """
    pcfg = cfg.plugins if isinstance(cfg, Config) else cfg
    source = cfg.source if isinstance(cfg, Config) else "config"
    pm = _Manager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm, pcfg)
    problems: list[str] = []
    disabled = set(pcfg.disabled)
    seen_disabled: set[str] = set()
    candidates: list[tuple[str, str, str, Any, str | None, str | None]] = []  # name, kind, source, obj, dist, version

    # ---------------------------------------------------------------- discovery and import
    if entry_points:
        by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in _entry_points():
            by_name.setdefault(ep.name, []).append(ep)
        for name, eps in by_name.items():
            ep = eps[0]
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            where = f"entry point {ep.name} = {ep.value}" + (f" ({dist} {version})" if dist else "")
            if len(eps) > 1:
                others = ", ".join(f"{e.value} ({e.dist.name if e.dist else '?'})" for e in eps)
                problems.append(f"plugin {name!r}: several installed distributions register this name: {others}")
                continue
            if name in disabled:
                seen_disabled.add(name)
                plugins.disabled.append(DisabledPlugin(name, "entry point", where))
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - report, with the plugin's name
                problems.append(f"plugin {name!r} ({where}): cannot be imported: {type(exc).__name__}: {exc}")
                continue
            candidates.append((name, "entry point", where, obj, dist, version))
    for module in pcfg.modules:
        where = f"module {module} (plugins.modules)"
        if module in disabled:
            seen_disabled.add(module)
            plugins.disabled.append(DisabledPlugin(module, "module", where))
            continue
        try:
            obj = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"plugin {module!r} ({where}): cannot be imported: {type(exc).__name__}: {exc}")
            continue
        candidates.append((module, "module", where, obj, None, None))
    for item in extra:
        if isinstance(item, tuple):
            name, obj = item
        else:
            obj = item
            name = getattr(obj, "__name__", None) if isinstance(obj, types.ModuleType) else None
            name = name or getattr(obj, "hydrad_plugin_name", None) or type(obj).__name__
        if name in disabled:
            seen_disabled.add(name)
            plugins.disabled.append(DisabledPlugin(name, "object", f"object {name}"))
            continue
        candidates.append((name, "object", f"object {name} (registered by code)", obj, None, None))

    for name in sorted(disabled - seen_disabled):
        known = [c[0] for c in candidates]
        problems.append(f"plugins.disabled: no plugin named {name!r} is installed or configured"
                        f"{_close_name(name, known)}; known: {', '.join(known) or 'none'}")

    # ---------------------------------------------------------------- registration and hook checks
    spec_names = set(hookspecs.hook_names())
    for name, kind, where, obj, dist, version in candidates:
        if name in plugins:
            problems.append(f"plugin {name!r} ({where}): a plugin of that name is already loaded "
                            f"({plugins[name].source})")
            continue
        if pm.is_registered(obj):
            other = pm.get_name(obj)
            problems.append(f"plugin {name!r} ({where}): the same object is already loaded as {other!r}")
            continue
        try:
            pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            problems.append(f"plugin {name!r} ({where}): {exc}")
            continue
        except ValueError as exc:
            problems.append(f"plugin {name!r} ({where}): {exc}")
            continue
        own: list[str] = []
        bad = False
        for caller in pm.get_hookcallers(obj) or []:
            hook = caller.name
            if caller.spec is None:
                problems.append(f"plugin {name!r}: {hook} is not a hydrad hook{_close_name(hook, spec_names)}")
                bad = True
                continue
            impl = next(i for i in caller.get_hookimpls() if i.plugin is obj)
            if impl.hookwrapper or impl.wrapper:
                problems.append(f"plugin {name!r}: {hook} cannot be a hook wrapper")
                bad = True
            elif hook in _SYNC_ONLY and is_async(impl):
                problems.append(f"plugin {name!r}: {hook} must be a plain def (it runs at load time)")
                bad = True
            elif hook in _ASYNC_ONLY and not is_async(impl):
                problems.append(f"plugin {name!r}: {hook} must be an async def")
                bad = True
            own.append(hook)
        if bad:
            pm.unregister(obj)
            continue
        order = {h: i for i, h in enumerate(hookspecs.hook_names())}
        own.sort(key=lambda h: order.get(h, len(order)))
        plugins._add(LoadedPlugin(name=name, obj=obj, kind=kind, source=where, ctx=HookContext(name),
                                  dist=dist, version=version, hooks=own))

    # ---------------------------------------------------------------- per-plugin settings
    tables = dict(pcfg.settings)
    known_names = {p.name for p in plugins} | {d.name for d in plugins.disabled} | {c[0] for c in candidates}
    for tname in sorted(tables):
        if tname not in known_names:
            problems.append(f"[plugins.{tname}]: no plugin named {tname!r} is installed or configured"
                            f"{_close_name(tname, known_names)}; loaded: {', '.join(p.name for p in plugins) or 'none'}")
    unconfigured: set[str] = set()
    for plugin in plugins:
        impl = plugins.impl_of(plugin, "hydrad_plugin_config")
        table = tables.get(plugin.name)
        if impl is None:
            if table:
                problems.append(f"[plugins.{plugin.name}]: plugin {plugin.name!r} takes no settings "
                                f"(it has no hydrad_plugin_config hook)")
            continue
        try:
            settings = call_impl(impl, table=dict(table or {}))
        except Exception as exc:  # noqa: BLE001 - the plugin's own validation message
            msg = str(exc) if isinstance(exc, (ValueError, TypeError, KeyError, LookupError)) and str(exc) else \
                f"{type(exc).__name__}: {exc}"
            problems.append(f"[plugins.{plugin.name}]: {msg}")
            unconfigured.add(plugin.name)
            continue
        plugin.ctx._set_settings(settings)  # noqa: SLF001

    # ---------------------------------------------------------------- tools
    declared_by: dict[str, list[dict[str, Any]]] = {}
    for plugin in plugins:  # load order, so problems read in a natural order
        impl = plugins.impl_of(plugin, "hydrad_tools")
        if impl is None or plugin.name in unconfigured:
            continue
        try:
            declared = call_impl(impl, ctx=plugin.ctx)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"plugin {plugin.name!r}: hydrad_tools raised {type(exc).__name__}: {exc}")
            continue
        schemas = _check_tools(plugin.name, declared, problems)
        if schemas and plugins.impl_of(plugin, "hydrad_call_tool") is None:
            problems.append(f"plugin {plugin.name!r}: declares tools but has no hydrad_call_tool hook")
            continue
        declared_by[plugin.name] = schemas
    owners: dict[str, str] = {}
    for plugin, _ in plugins.impls("hydrad_tools"):  # hook-call order decides who owns a name
        for schema in declared_by.get(plugin.name, []):
            tname = schema["name"]
            if tname in owners:
                plugin.shadowed_tools.append(tname)
                log.warning("plugin_tool_shadowed", tool=tname, plugin=plugin.name, owner=owners[tname])
                continue
            owners[tname] = plugin.name
            plugin.tools.append(schema)

    if problems:
        raise PluginError(problems, source)
    for plugin in plugins:
        log.info("plugin_loaded", plugin=plugin.name, source=plugin.source, hooks=len(plugin.hooks),
                 tools=[t["name"] for t in plugin.tools])
    return plugins


def _check_tools(plugin: str, declared: Any, problems: list[str]) -> list[dict[str, Any]]:
    if declared is None:
        return []
    if not isinstance(declared, (list, tuple)):
        problems.append(f"plugin {plugin!r}: hydrad_tools must return a list of tool schemas, "
                        f"got {type(declared).__name__}")
        return []
    import jsonschema

    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(declared):
        where = f"plugin {plugin!r}: tool #{i + 1}"
        if not isinstance(tool, dict):
            problems.append(f"{where}: expected a dict {{name, description, parameters}}, got {type(tool).__name__}")
            continue
        name = tool.get("name")
        if isinstance(name, str):
            where = f"plugin {plugin!r}: tool {name!r}"
        extra = set(tool) - TOOL_KEYS
        if extra:
            problems.append(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(TOOL_KEYS)}")
            continue
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            problems.append(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 _ -, got {name!r}")
            continue
        if name in names:
            problems.append(f"{where}: declared twice")
            continue
        if tool.get("type", "function") != "function":
            problems.append(f"{where}: type must be 'function', got {tool.get('type')!r}")
            continue
        if not isinstance(tool.get("description", ""), str):
            problems.append(f"{where}: description must be a string")
            continue
        params = tool.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                problems.append(f"{where}: parameters must be a JSON schema object, got {type(params).__name__}")
                continue
            try:
                jsonschema.validators.validator_for(params).check_schema(params)
            except jsonschema.SchemaError as exc:
                problems.append(f"{where}: parameters is not a valid JSON schema: {exc.message}")
                continue
            if params.get("type", "object") != "object":
                problems.append(f"{where}: parameters must describe an object (tools take named arguments)")
                continue
        names.add(name)
        out.append({"type": "function", **{k: v for k, v in tool.items() if k != "type"}})
    return out


# ============================================================================ describing


def describe_plugins(plugins: Plugins) -> list[dict[str, Any]]:
    """What ``hydrad plugins`` prints: one dict per plugin, loaded ones first in load order.

    Keys: ``name``, ``enabled``, ``kind`` (``entry point``, ``module``, ``object``),
    ``source`` (where from, in words), ``dist``/``version`` (the distribution, for entry
    points), ``hooks`` (hook names implemented), ``tools`` (tool names it owns),
    ``shadowed_tools`` (declared but owned by another plugin), ``configured`` (it has a
    ``hydrad_plugin_config`` hook).
    """
    out: list[dict[str, Any]] = []
    for p in plugins:
        out.append({
            "name": p.name, "enabled": True, "kind": p.kind, "source": p.source, "dist": p.dist,
            "version": p.version, "hooks": list(p.hooks), "tools": [t["name"] for t in p.tools],
            "shadowed_tools": list(p.shadowed_tools), "configured": "hydrad_plugin_config" in p.hooks,
        })
    for d in plugins.disabled:
        out.append({"name": d.name, "enabled": False, "kind": d.kind, "source": d.source, "dist": None,
                    "version": None, "hooks": [], "tools": [], "shadowed_tools": [], "configured": False})
    return out


def format_plugins(rows: list[dict[str, Any]]) -> str:
    """``hydrad plugins`` as text: one block per row of :func:`describe_plugins`."""
    if not rows:
        return "no plugins installed or configured"
    width = max(10, *(len(r["name"]) for r in rows))
    pad = " " * (width + 1)
    out = []
    for r in rows:
        out.append(f"{r['name']:<{width}} {r['source']}" + ("" if r["enabled"] else "  [disabled]"))
        if r["hooks"]:
            out.append(f"{pad}hooks: {' '.join(r['hooks'])}")
        if r["tools"]:
            out.append(f"{pad}tools: {' '.join(r['tools'])}")
        if r["shadowed_tools"]:
            out.append(f"{pad}shadowed tools (owned by another plugin): {' '.join(r['shadowed_tools'])}")
    return "\n".join(out)
