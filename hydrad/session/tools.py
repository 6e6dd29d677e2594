"""The tool interface the session calls, and argument assembly for streamed tool calls.

The plugin layer implements :class:`ToolProvider` on top of pluggy; the core ships
:class:`StaticTools` so the session can be tested (and used) without plugins.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol


class ToolError(Exception):
    """A tool failure that is reported to the model as an error result (the turn goes on)."""


class ToolProvider(Protocol):
    def schemas(self) -> list[dict[str, Any]]:
        """Hydra tool schemas (``{"type": "function", "name", "description", "parameters"}``)."""

    async def call(self, name: str, arguments: dict[str, Any], call_id: str) -> str:
        """Run a tool; return its result as a JSON string, or raise :class:`ToolError`."""


def encode_result(result: Any) -> str:
    """Tool results travel as JSON strings; anything else is a clear error, not a crash."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"tool result is not JSON-serialisable: {exc}") from None


def error_result(message: str) -> str:
    return json.dumps({"error": message})


ToolFunc = Callable[..., Any] | Callable[..., Awaitable[Any]]


@dataclass
class StaticTools:
    """A fixed set of Python callables as tools; sync or async; called with keyword arguments."""

    functions: dict[str, tuple[dict[str, Any], ToolFunc]] = field(default_factory=dict)

    def add(self, schema: dict[str, Any], func: ToolFunc) -> None:
        self.functions[schema["name"]] = ({"type": "function", **schema}, func)

    def schemas(self) -> list[dict[str, Any]]:
        return [schema for schema, _ in self.functions.values()]

    async def call(self, name: str, arguments: dict[str, Any], call_id: str) -> str:
        if name not in self.functions:
            raise ToolError(f"unknown tool {name!r}")
        result = self.functions[name][1](**arguments)
        if inspect.isawaitable(result):
            result = await result
        return encode_result(result)


@dataclass
class PendingCall:
    """A tool call being streamed: argument deltas are concatenated per ``call_id``."""

    call_id: str
    response_id: str
    name: str | None = None
    parts: list[str] = field(default_factory=list)
    started: bool = False  # set when its ``.done`` arrived and the tool was started (runs once)

    def arguments_text(self, final: str | None) -> str:
        return final if final is not None else "".join(self.parts)


def parse_arguments(text: str) -> dict[str, Any]:
    """Arguments arrive as a JSON string; an object is required (tools take keyword arguments)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ToolError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def validate_arguments(schema: dict[str, Any] | None, arguments: dict[str, Any]) -> None:
    """Check arguments against the tool's JSON schema (``parameters``); ToolError says what is wrong."""
    if not schema:
        return
    import jsonschema

    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "arguments"
        raise ToolError(f"invalid arguments at {where}: {exc.message}") from None
    except jsonschema.SchemaError as exc:
        raise ToolError(f"the tool's own schema is invalid: {exc.message}") from None
