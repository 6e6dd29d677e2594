"""Simulator configuration and scenario files.

Every behaviour listed in the protocol reference's simulator table (§8) is a field of
:class:`SimConfig`, with the table's default, so a test can switch one behaviour and keep the
rest faithful. Per-turn scripting (tool calls, failures, closes, malformed frames) is a
:class:`TurnAction` keyed by the 1-based number of the user turn it applies to.

A scenario file (TOML or JSON) holds the same keys: top-level keys are ``SimConfig`` fields,
``turns`` maps turn numbers to actions (see ``docs/simulator.md``). Unknown keys are errors:
a typo in a scenario must not silently test the default behaviour instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydrad.protocol import constants as C

DEFAULT_PATH = "/waves/v1/s2s"
DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant."
VOICE_MODES = ("error", "legacy_fallback")
UNKNOWN_TYPE_MODES = ("ignore", "invalid_frame")


class ScenarioError(ValueError):
    """A scenario file or action that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ToolCallSpec:
    """One scripted function call: ``arguments`` is an object (JSON-encoded on the wire) or a
    raw string (sent verbatim, e.g. deliberately broken JSON)."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    call_id: str | None = None

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments), separators=(",", ":"))


@dataclass(frozen=True)
class TurnAction:
    """What the simulator does for one user turn's response (all optional).

    ``tool_calls`` makes that response a tool-calling one (§4.6); ``error`` makes it fail;
    ``close`` ends the connection (``"abrupt"`` = TCP drop, no close frame, or a close code).
    ``error``/``close`` fire ``after_ms`` of wall-clock time after ``response.created`` (or
    when the audio runs out, if sooner); the response never completes. ``raw_frames`` are
    sent verbatim right after ``response.created``.
    """

    reply_s: float | None = None
    tool_calls: tuple[ToolCallSpec, ...] = ()
    split: int = 3
    error: str | None = None
    close: str | int | None = None
    after_ms: int = 0
    raw_frames: tuple[str, ...] = ()
    transcript: str | None = None

    def __post_init__(self) -> None:
        if self.close is not None and self.close != "abrupt" and not (
            isinstance(self.close, int) and not isinstance(self.close, bool) and 1000 <= self.close <= 4999
        ):
            raise ScenarioError(f"close = {self.close!r}: expected \"abrupt\" or a close code 1000..4999")
        if self.split < 1:
            raise ScenarioError(f"split = {self.split}: must be >= 1")
        if self.after_ms < 0:
            raise ScenarioError(f"after_ms = {self.after_ms}: must be >= 0")
        if self.reply_s is not None and self.reply_s < 0:
            raise ScenarioError(f"reply_s = {self.reply_s}: must be >= 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "turn") -> "TurnAction":
        """Build from scenario data (``tool_calls`` as a list of ``{name, arguments, call_id?}``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - known - {"turn"}
        if extra:
            raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "turn":
                continue
            if key == "tool_calls":
                kwargs[key] = tuple(_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(value))
            elif key == "raw_frames":
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ScenarioError(f"{where}.raw_frames: expected a list of strings")
                kwargs[key] = tuple(value)
            elif key in ("split", "after_ms"):
                kwargs[key] = _int(value, f"{where}.{key}")
            elif key == "reply_s":
                kwargs[key] = _float(value, f"{where}.{key}")
            elif key in ("error", "transcript"):
                kwargs[key] = _str(value, f"{where}.{key}")
            else:  # close
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {exc}") from None


def _tool_call(data: object, where: str) -> ToolCallSpec:
    if isinstance(data, ToolCallSpec):
        return data
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise ScenarioError(f"{where}: expected {{name, arguments, call_id?}}")
    extra = set(data) - {"name", "arguments", "call_id"}
    if extra:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}")
    args = data.get("arguments", {})
    if not isinstance(args, (Mapping, str)):
        raise ScenarioError(f"{where}.arguments: expected an object or a string")
    call_id = data.get("call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise ScenarioError(f"{where}.call_id: expected a string")
    return ToolCallSpec(name=data["name"], arguments=args, call_id=call_id)


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where} = {value!r}: expected an integer")
    return value


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where} = {value!r}: expected a number")
    return float(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ScenarioError(f"{where} = {value!r}: expected a string")
    return value


@dataclass(frozen=True)
class SimConfig:
    """Every reference-§8 behaviour, defaulting to the reference's suggestion.

    Connection-level fields are read when a client connects, so replacing ``Simulator.config``
    at run time affects later connections only.
    """

    # --- connection (§1) ---
    #: URL path the server accepts (404 otherwise); None accepts any path.
    path: str | None = DEFAULT_PATH
    accepted_tags: tuple[str, ...] = C.MODEL_TAGS
    #: tag used when the query has no ``model`` (reference: defaults to hydra-v1.1).
    default_tag: str = C.DEFAULT_MODEL
    #: tags that get a ``warning`` (``model_deprecated``) before ``session.created``.
    deprecated_tags: tuple[str, ...] = (C.DEPRECATED_MODEL,)
    #: a key (``api_key`` query or ``Authorization: Bearer``) must be present, else HTTP 401.
    require_key: bool = True
    #: keys refused with HTTP 401 before the upgrade.
    bad_keys: frozenset[str] = frozenset()
    #: when set, only these keys are accepted.
    valid_keys: frozenset[str] | None = None
    #: concurrent live sessions; the next one gets ``error`` server_full + close 1013. None = no cap.
    max_sessions: int | None = None
    #: True: every connection is refused as full; a set of 1-based connection numbers: those are.
    server_full: bool | frozenset[int] = False
    #: seconds with no frame in either direction before the server closes with 1000.
    idle_timeout_s: float = C.IDLE_TIMEOUT_S

    # --- session.configure (§2) ---
    #: ``error``: unknown voice -> invalid_request_error (the configure is not applied and may be
    #: retried); ``legacy_fallback``: silently use ``default_voice``.
    voice_validation: str = "error"
    default_voice: str = C.DEFAULT_VOICE
    #: use a client-requested ``output_audio_sample_rate`` (8000..48000) instead of the tag's rate.
    honour_output_rate: bool = False
    output_rates: Mapping[str, int] = field(default_factory=lambda: dict(C.FALLBACK_OUTPUT_RATE))

    # --- replies (§3.2, §5) ---
    #: reply generation speed relative to real time (0 or inf = as fast as possible).
    realtime_factor: float = 5.0
    #: audio per ``response.output_audio.delta``.
    delta_ms: int = 100
    #: length of each reply unless a turn action overrides it.
    reply_s: float = 2.0
    #: per-cycle pitch jitter of the reply voice (0 = strictly periodic, exact pitch; 0.2 = an
    #: aperiodic, speech-like voice an echo canceller can lock onto; see voice.py)
    voice_jitter: float = 0.0
    #: wall-clock delay between the end of a user turn and ``response.created``.
    response_delay_ms: int = 0
    #: emit ``response.output_audio_transcript.delta`` phrases alongside the audio.
    transcripts: bool = False
    #: keep the audio each session received (``SimSessionRecord.audio``: what the service
    #: heard, for tests and offline checks of a client's uplink; memory grows 32 KB/s).
    keep_audio: bool = False

    # --- turn detection (§5.1, §5.4) ---
    vad_mode: int = 2
    #: consecutive voiced audio needed to open a turn.
    vad_start_ms: int = 60
    #: consecutive unvoiced audio that closes a turn.
    vad_end_silence_ms: int = 500
    #: turns with less speech than this are discarded (user item.done ``incomplete``, no response).
    vad_min_speech_ms: int = 250
    #: frames quieter than this (RMS) are unvoiced whatever webrtcvad says, so its hangover
    #: does not stretch speech over digital silence; None disables the gate.
    vad_silence_floor_dbfs: float | None = -60.0
    #: send ``speech_stopped`` before the discard's ``item.done incomplete`` (the reference does
    #: not say; the VAD did stop hearing speech, so the default is yes).
    discard_speech_stopped: bool = True
    #: on barge-in / client cancel also send ``output_audio.done`` and the assistant
    #: ``item.done`` (``incomplete``) before ``response.done`` (reference §9.11).
    barge_in_extra_events: bool = False

    # --- client frame validation (§4.4) ---
    #: unknown client ``type``: ``ignore`` (draft docs) or ``invalid_frame`` (errors page).
    unknown_type: str = "invalid_frame"
    min_append_bytes: int = C.MIN_APPEND_BYTES

    # --- tools (§4.6) ---
    tool_timeout_s: float = 10.0

    # --- input pacing guard (§1.5, §9.21) ---
    #: max ratio of appended audio time to wall-clock time (None disables the guard).
    max_input_speed: float | None = 1.0
    #: how far ahead of that budget a client may get before the session is ended.
    input_burst_s: float = 2.0

    # --- scripted turns ---
    turns: Mapping[int, TurnAction] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.voice_validation not in VOICE_MODES:
            raise ScenarioError(f"voice_validation = {self.voice_validation!r}: expected one of {VOICE_MODES}")
        if self.unknown_type not in UNKNOWN_TYPE_MODES:
            raise ScenarioError(f"unknown_type = {self.unknown_type!r}: expected one of {UNKNOWN_TYPE_MODES}")
        if self.vad_mode not in (0, 1, 2, 3):
            raise ScenarioError(f"vad_mode = {self.vad_mode}: expected 0..3")
        if not 0.0 <= self.voice_jitter < 0.5:
            raise ScenarioError(f"voice_jitter = {self.voice_jitter}: expected 0 <= jitter < 0.5")
        if self.delta_ms <= 0:
            raise ScenarioError(f"delta_ms = {self.delta_ms}: must be > 0")
        if self.realtime_factor < 0 or math.isnan(self.realtime_factor):
            raise ScenarioError(f"realtime_factor = {self.realtime_factor}: must be >= 0")
        if self.default_tag not in self.accepted_tags:
            raise ScenarioError(f"default_tag = {self.default_tag!r} is not in accepted_tags")
        for tag in self.accepted_tags:
            if tag not in self.output_rates:
                raise ScenarioError(f"output_rates has no rate for accepted tag {tag!r}")

    def output_rate(self, tag: str) -> int:
        return int(self.output_rates[tag])

    def delta_interval_s(self) -> float:
        """Wall-clock seconds between audio deltas."""
        if self.realtime_factor == 0 or math.isinf(self.realtime_factor):
            return 0.0
        return self.delta_ms / 1000.0 / self.realtime_factor

    def is_server_full(self, connection_number: int) -> bool:
        if isinstance(self.server_full, bool):
            return self.server_full
        return connection_number in self.server_full

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "SimConfig | None" = None) -> "SimConfig":
        """Scenario data -> config; keys not given keep ``base``'s (or the default) values."""
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                raise ScenarioError(f"unknown scenario key {key!r}; allowed: {sorted(fields)}")
            changes[key] = _coerce_field(key, value, getattr(base, key))
        try:
            return dataclasses.replace(base, **changes)
        except TypeError as exc:  # pragma: no cover - guarded by _coerce_field
            raise ScenarioError(str(exc)) from None


def _coerce_field(key: str, value: Any, current: Any) -> Any:
    """Type-check one scenario value against the field's current value's type."""
    if key == "turns":
        return parse_turns(value)
    if key == "server_full":
        if isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple, set, frozenset)):
            return frozenset(_int(v, f"server_full[{i}]") for i, v in enumerate(value))
        raise ScenarioError(f"server_full = {value!r}: expected a boolean or a list of connection numbers")
    if key in ("bad_keys", "valid_keys"):
        if value is None and key == "valid_keys":
            return None
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
            raise ScenarioError(f"{key}: expected a list of strings")
        return frozenset(value)
    if key in ("accepted_tags", "deprecated_tags"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ScenarioError(f"{key}: expected a list of strings")
        return tuple(value)
    if key == "output_rates":
        if not isinstance(value, Mapping):
            raise ScenarioError("output_rates: expected a table of tag = rate")
        return {str(k): _int(v, f"output_rates.{k}") for k, v in value.items()}
    if key in ("max_sessions", "max_input_speed", "path", "vad_silence_floor_dbfs") and value is None:
        return None
    if key == "max_sessions":
        return _int(value, key)
    if key in ("max_input_speed", "vad_silence_floor_dbfs"):
        return _float(value, key)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"{key} = {value!r}: expected true/false")
        return value
    if isinstance(current, int):
        return _int(value, key)
    if isinstance(current, float):
        return _float(value, key)
    if isinstance(current, str) or key == "path":
        return _str(value, key)
    raise ScenarioError(f"{key}: cannot be set from a scenario")  # pragma: no cover


def parse_turns(value: object) -> dict[int, TurnAction]:
    """``{"1": {...}, "2": {...}}`` or ``[{turn = 1, ...}, ...]`` -> ``{1: TurnAction, ...}``.

    Turn 0 is the ``generate_initial_response`` greeting; user turns count from 1 and only
    turns that produce a response (not discarded blips) are counted.
    """
    items: list[tuple[object, object]]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or "turn" not in entry:
                raise ScenarioError(f"turns[{i}]: expected a table with a 'turn' number")
            items.append((entry["turn"], entry))
    else:
        raise ScenarioError("turns: expected a table keyed by turn number or a list of tables")
    out: dict[int, TurnAction] = {}
    for key, action in items:
        try:
            number = int(key)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ScenarioError(f"turns: key {key!r} is not a turn number") from None
        if number < 0 or isinstance(key, bool):
            raise ScenarioError(f"turns: turn number {key!r} must be >= 0")
        if isinstance(action, TurnAction):
            out[number] = action
        elif isinstance(action, Mapping):
            out[number] = TurnAction.from_mapping(action, f"turns.{number}")
        else:
            raise ScenarioError(f"turns.{number}: expected a table")
    return out


def load_scenario(path: str | Path, base: SimConfig | None = None) -> SimConfig:
    """Read a TOML (``.toml``) or JSON (anything else) scenario file into a config."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{path}: the top level must be a table/object")
    try:
        return SimConfig.from_mapping(data, base)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
