"""What the test plugins saw: one :class:`Call` per hook call, in call order, from any thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hydrad.events import EVENT_NAMES

OBSERVERS = ("hydrad_event",) + tuple("hydrad_" + n for n in EVENT_NAMES)
LIFECYCLE = ("hydrad_startup", "hydrad_serve", "hydrad_shutdown")


@dataclass(frozen=True)
class Call:
    plugin: str
    hook: str
    event: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.monotonic)
    main_thread: bool = field(default_factory=lambda: threading.current_thread() is threading.main_thread())


CALLS: list[Call] = []
_lock = threading.Lock()


def record(call: Call) -> None:
    with _lock:
        CALLS.append(call)


def clear() -> None:
    with _lock:
        CALLS.clear()


def calls(plugin: str | None = None, hook: str | None = None) -> list[Call]:
    with _lock:
        return [c for c in CALLS if (plugin is None or c.plugin == plugin) and (hook is None or c.hook == hook)]


@dataclass(frozen=True)
class Settings:
    """``[plugins.testplugin]`` / ``[plugins.testplugin_async]``."""

    active: bool = False
    #: hooks that raise RuntimeError ("*" = every observer hook)
    raise_in: tuple[str, ...] = ()
    #: hooks that block for ``hang_s`` (sync: time.sleep in the worker thread; async: trio.sleep)
    hang_in: tuple[str, ...] = ()
    hang_s: float = 30.0
    #: event name on which the plugin calls ctx.request_cancel() (once)
    cancel_on: str | None = None
    #: event name on which the plugin calls ctx.mute() and records ctx.session_state()
    mute_on: str | None = None

    def raises(self, hook: str) -> bool:
        return hook in self.raise_in or ("*" in self.raise_in and hook in OBSERVERS)

    def hangs(self, hook: str) -> bool:
        return hook in self.hang_in or ("*" in self.hang_in and hook in OBSERVERS)


def parse_settings(table: dict[str, Any]) -> Settings:
    allowed = {"active", "raise_in", "hang_in", "hang_s", "cancel_on", "mute_on"}
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if not isinstance(table.get("active", False), bool):
        raise ValueError(f"active = {table['active']!r}: expected true or false")
    for key in ("raise_in", "hang_in"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} = {value!r}: expected a list of hook names")
    hang_s = table.get("hang_s", 30.0)
    if isinstance(hang_s, bool) or not isinstance(hang_s, (int, float)) or hang_s < 0:
        raise ValueError(f"hang_s = {hang_s!r}: expected a number >= 0")
    return Settings(active=table.get("active", False), raise_in=tuple(table.get("raise_in", [])),
                    hang_in=tuple(table.get("hang_in", [])), hang_s=float(hang_s),
                    cancel_on=table.get("cancel_on"), mute_on=table.get("mute_on"))
