"""``testplugin``: every hydrad hook as a plain ``def`` (observer hooks run in worker threads).

Inert until ``[plugins.testplugin] active = true``. Records every call in
:data:`hydrad_testplugin.journal.CALLS`. Tools (sync): ``echo``, ``add``, ``boom`` (raises),
``refuse`` (raises ToolError), ``hang`` (sleeps ``hang_s``), ``not_json`` (returns a set),
``state`` (returns ``ctx.session_state()``).
"""

from __future__ import annotations

import time
from typing import Any

from hydrad.hooks import ToolError, hookimpl

from .journal import LIFECYCLE, OBSERVERS, Call, Settings, parse_settings, record

NAME = "testplugin"

TOOLS = [
    {"name": "echo", "description": "Repeat the text.",
     "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "add", "description": "Add two integers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False}},
    {"name": "boom", "description": "Always raises.", "parameters": {"type": "object"}},
    {"name": "refuse", "description": "Always refuses with a ToolError.", "parameters": {"type": "object"}},
    {"name": "hang", "description": "Blocks for hang_s.", "parameters": {"type": "object"}},
    {"name": "not_json", "description": "Returns a set.", "parameters": {"type": "object"}},
    {"name": "state", "description": "The session state.", "parameters": {"type": "object"}},
]


@hookimpl
def hydrad_plugin_config(table: dict[str, Any]) -> Settings:
    return parse_settings(table)


@hookimpl
def hydrad_tools(ctx: Any) -> list[dict[str, Any]]:
    return TOOLS if ctx.settings.active else []


@hookimpl
def hydrad_call_tool(ctx: Any, name: str, arguments: dict[str, Any], call_id: str) -> Any:
    record(Call(NAME, "hydrad_call_tool", None, {"name": name, "arguments": arguments, "call_id": call_id}))
    if name == "echo":
        return {"echo": arguments["text"]}
    if name == "add":
        return arguments["a"] + arguments["b"]
    if name == "boom":
        raise RuntimeError("kaboom")
    if name == "refuse":
        raise ToolError("the order system is offline")
    if name == "hang":
        time.sleep(ctx.settings.hang_s)
        return "late"
    if name == "not_json":
        return {1, 2}
    if name == "state":
        return ctx.session_state()
    raise AssertionError(f"not my tool: {name}")


def _observe(ctx: Any, hook: str, event: Any) -> None:
    s: Settings = ctx.settings
    if not s.active:
        return
    record(Call(NAME, hook, event.name if event is not None else None, dict(event.fields) if event is not None else {}))
    if event is not None and hook != "hydrad_event":
        if s.cancel_on == event.name:
            ctx.request_cancel()
        if s.mute_on == event.name:
            state_before = ctx.session_state()
            ctx.mute()
            record(Call(NAME, "mute", event.name, {"before": state_before, "after": ctx.session_state()}))
    if s.hangs(hook):
        time.sleep(s.hang_s)
    if s.raises(hook):
        raise RuntimeError(f"testplugin fails in {hook} on purpose")


def _make(hook: str) -> Any:
    if hook in LIFECYCLE:
        def lifecycle(ctx: Any) -> None:
            _observe(ctx, hook, None)
        lifecycle.__name__ = lifecycle.__qualname__ = hook
        return hookimpl(lifecycle)

    def observer(ctx: Any, event: Any) -> None:
        _observe(ctx, hook, event)
    observer.__name__ = observer.__qualname__ = hook
    return hookimpl(observer)


for _hook in OBSERVERS + ("hydrad_startup", "hydrad_shutdown"):
    globals()[_hook] = _make(_hook)
del _hook
