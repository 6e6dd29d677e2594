"""``testplugin_async``: the same recorder with every hook ``async def`` (run as trio tasks).

Inert until ``[plugins.testplugin_async] active = true``. Tools (async): ``slow_async``
(sleeps ``delay_s``), ``hang_async`` (sleeps forever), ``boom_async`` (raises).
"""

from __future__ import annotations

from typing import Any

import trio

from hydrad.hooks import hookimpl

from .journal import LIFECYCLE, OBSERVERS, Call, Settings, parse_settings, record

NAME = "testplugin_async"


class AsyncRecorder:
    @hookimpl
    def hydrad_plugin_config(self, table: dict[str, Any]) -> Settings:
        return parse_settings(table)

    @hookimpl
    def hydrad_tools(self, ctx: Any) -> list[dict[str, Any]]:
        if not ctx.settings.active:
            return []
        return [
            {"name": "slow_async", "description": "Sleeps, then answers.",
             "parameters": {"type": "object", "properties": {"delay_s": {"type": "number", "minimum": 0}},
                            "required": ["delay_s"]}},
            {"name": "hang_async", "description": "Never answers.", "parameters": {"type": "object"}},
            {"name": "boom_async", "description": "Raises.", "parameters": {"type": "object"}},
        ]

    @hookimpl
    async def hydrad_call_tool(self, ctx: Any, name: str, arguments: dict[str, Any], call_id: str) -> Any:
        record(Call(NAME, "hydrad_call_tool", None, {"name": name, "arguments": arguments, "call_id": call_id}))
        if name == "slow_async":
            await trio.sleep(arguments["delay_s"])
            return {"slept": arguments["delay_s"]}
        if name == "hang_async":
            await trio.sleep_forever()
        if name == "boom_async":
            raise ValueError("async kaboom")
        raise AssertionError(f"not my tool: {name}")

    @hookimpl
    async def hydrad_serve(self, ctx: Any) -> None:
        if not ctx.settings.active:
            return
        record(Call(NAME, "hydrad_serve"))
        try:
            await trio.sleep_forever()
        finally:
            record(Call(NAME, "serve_cancelled"))


async def _observe(ctx: Any, hook: str, event: Any) -> None:
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
        await trio.sleep(s.hang_s)
    if s.raises(hook):
        raise RuntimeError(f"testplugin_async fails in {hook} on purpose")


def _make(hook: str) -> Any:
    if hook in LIFECYCLE:
        async def lifecycle(self: Any, ctx: Any) -> None:
            await _observe(ctx, hook, None)
        lifecycle.__name__ = lifecycle.__qualname__ = hook
        return hookimpl(lifecycle)

    async def observer(self: Any, ctx: Any, event: Any) -> None:
        await _observe(ctx, hook, event)
    observer.__name__ = observer.__qualname__ = hook
    return hookimpl(observer)


for _hook in OBSERVERS + ("hydrad_startup", "hydrad_shutdown"):
    setattr(AsyncRecorder, _hook, _make(_hook))
del _hook

plugin = AsyncRecorder()
