"""Client -> server frames: built by the daemon, parsed by the simulator.

Every frame the daemon builds carries a unique ``event_id`` so that ``error.event_id`` can be
matched to the frame that caused it (reference §6.3).
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

from .audio import encode_pcm

_counter = itertools.count(1)
_prefix = secrets.token_hex(3)


def client_event_id() -> str:
    """``evt_<process prefix>_<n>``: unique per process, readable in logs, cheap on the hot path."""
    return f"evt_{_prefix}_{next(_counter)}"


def _frame(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, "event_id": client_event_id(), **fields}, separators=(",", ":"))


def session_configure(session: dict[str, Any]) -> str:
    return _frame("session.configure", session=session)


def session_update(tools: list[dict[str, Any]]) -> str:
    return _frame("session.update", session={"tools": tools})


def input_audio_append(pcm: bytes) -> str:
    return _frame("input_audio_buffer.append", audio=encode_pcm(pcm))


def function_call_output(call_id: str, output: str) -> str:
    return _frame("conversation.item.create", item={"type": "function_call_output", "call_id": call_id, "output": output})


def response_create() -> str:
    return _frame("response.create")


def response_cancel(response_id: str | None = None) -> str:
    return _frame("response.cancel", **({"response_id": response_id} if response_id else {}))
