"""``clock``: a current time and date tool for the kiosk's timezone.

The reference example of a hydrad tool plugin: three hooks, all plain functions.

* :func:`hydrad_plugin_config` validates ``[plugins.clock]`` and returns the settings
  (they come back as ``ctx.settings``);
* :func:`hydrad_tools` declares the tool's JSON schema (sent to the model in ``session.configure``);
* :func:`hydrad_call_tool` answers a call: the arguments are already validated against the
  schema; the return value is JSON-encoded for the model; :class:`~hydrad.hooks.ToolError`
  becomes an error result the model can talk about.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Any, Callable

from hydrad.hooks import ToolError, hookimpl

TOOL_NAME = "current_time"


@dataclass(frozen=True)
class Settings:
    timezone: str | None  # None: not configured, no tool
    hour_format: str = "24h"
    #: the clock (tests replace it); returns an aware UTC datetime
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)


def _zone(name: str) -> dt.tzinfo:
    if name == "local":
        local = dt.datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    return zoneinfo.ZoneInfo(name)


@hookimpl
def hydrad_plugin_config(table: dict[str, Any]) -> Settings:
    unknown = set(table) - {"timezone", "hour_format"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: hour_format, timezone")
    if not table:
        return Settings(timezone=None)
    tz = table.get("timezone")
    if not isinstance(tz, str) or not tz:
        raise ValueError(f"timezone = {tz!r}: expected an IANA timezone name such as 'Europe/Berlin', or 'local'")
    try:
        _zone(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone = {tz!r}: not a known IANA timezone (e.g. 'Europe/Berlin', 'America/New_York')") from None
    hour_format = table.get("hour_format", "24h")
    if hour_format not in ("24h", "12h"):
        raise ValueError(f"hour_format = {hour_format!r}: expected '24h' or '12h'")
    return Settings(timezone=tz, hour_format=hour_format)


@hookimpl
def hydrad_tools(ctx: Any) -> list[dict[str, Any]]:
    if ctx.settings.timezone is None:
        ctx.log.info("clock_not_configured", hint="add [plugins.clock] timezone = ... to offer the current_time tool")
        return []
    return [{
        "name": TOOL_NAME,
        "description": (f"The current local time, date and weekday. The kiosk is in {ctx.settings.timezone}; "
                        "pass another IANA timezone only when the user asks about another place."),
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA timezone, e.g. Asia/Tokyo"}},
            "additionalProperties": False,
        },
    }]


@hookimpl
def hydrad_call_tool(ctx: Any, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    settings: Settings = ctx.settings
    tz_name = arguments.get("timezone") or settings.timezone
    try:
        zone = _zone(tz_name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown timezone {tz_name!r}; use an IANA name such as 'Asia/Tokyo'") from None
    return describe(settings.now().astimezone(zone), tz_name, settings.hour_format)


def describe(now: dt.datetime, tz_name: str, hour_format: str = "24h") -> dict[str, Any]:
    offset = now.strftime("%z")
    clock = f"{now.hour}:{now.minute:02d}" if hour_format == "24h" else \
        f"{(now.hour % 12) or 12}:{now.minute:02d} {'AM' if now.hour < 12 else 'PM'}"
    return {
        "timezone": tz_name,
        "iso": now.isoformat(timespec="seconds"),
        "date": now.date().isoformat(),
        "time": now.strftime("%H:%M"),
        "weekday": now.strftime("%A"),
        "utc_offset": f"{offset[:3]}:{offset[3:]}" if offset else "+00:00",
        "spoken": f"It is {clock} on {now.strftime('%A')}, {now.strftime('%B')} {now.day}, {now.year}.",
    }
