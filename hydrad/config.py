"""One TOML file -> typed, frozen configuration, validated before anything starts.

Every problem is reported with its key path, the bad value and what is allowed, all at once
(an operator fixing a kiosk over a slow link should not fix typos one per restart). Unknown
keys are errors: the service itself silently ignores unknown session keys, so a typo here
would otherwise turn into a silent fallback on the device.

The API key is never part of the config objects' ``repr`` and never logged: see :class:`Secret`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .protocol import constants as C

DEFAULT_CONFIG_PATH = Path("/etc/hydrad/hydrad.toml")


class ConfigError(Exception):
    """All problems found in one configuration; ``problems`` holds one line each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        return f"invalid configuration ({self.source}):\n" + "\n".join(f"  - {p}" for p in self.problems)


class Secret:
    """A credential that refuses to show itself in logs, reprs and tracebacks."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<hidden>, from {self.origin})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _check(pred: typing.Callable[[Any], bool], allowed: str) -> dict[str, Any]:
    return {"check": pred, "allowed": allowed}


def _range(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo <= v <= hi, f"a number from {lo} to {hi}")


@dataclass(frozen=True)
class HydraConfig:
    """Where and how to connect."""

    url: str = field(default=C.DEFAULT_ENDPOINT, metadata=_check(
        lambda v: v.startswith(("ws://", "wss://")), "a ws:// or wss:// URL"))
    model: Literal["hydra-v1.1", "hydra-v1.0", "hydra"] = C.DEFAULT_MODEL
    auth: Literal["query", "bearer"] = "query"
    api_key_file: str | None = None
    connect_timeout_s: float = field(default=10.0, metadata=_range(1, 120))
    ping_interval_s: float = field(default=5.0, metadata=_range(0.5, 60))
    ping_timeout_s: float = field(default=5.0, metadata=_range(0.5, 60))


@dataclass(frozen=True)
class SessionConfig:
    """What goes into ``session.configure``."""

    instructions: str = "You are a concise, friendly voice assistant on a kiosk. Answer in one or two short sentences."
    voice: str | None = None
    generate_initial_response: bool = False
    request_output_rate: int | None = field(default=None, metadata=_check(
        lambda v: v in (16000, 24000, 48000), "16000, 24000 or 48000"))
    tool_debounce_ms: int = field(default=200, metadata=_range(0, 2000))


@dataclass(frozen=True)
class BargeInConfig:
    """When queued playback is cut.

    ``immediate``: flush on ``speech_started`` while the agent is audible (the reference client);
    ``server``: flush only when the service cancels or starts a new response (the docs);
    ``guard``: like immediate, but a ``speech_started`` during playback only counts after
    ``guard_ms`` of residual speech energy, ducking meanwhile (rooms without good AEC).
    """

    policy: Literal["immediate", "server", "guard"] = "immediate"
    guard_ms: int = field(default=300, metadata=_range(50, 2000))
    #: how long the guard waits for that much speech before calling it a false alarm
    guard_window_ms: int = field(default=1000, metadata=_range(100, 5000))
    #: a mic frame (after echo cancellation) louder than this counts as speech energy
    guard_threshold_dbfs: float = field(default=-40.0, metadata=_range(-90, 0))
    duck_gain: float = field(default=0.3, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class WavMicItem:
    path: str
    at: float = field(default=0.0, metadata=_range(0, 86400))


@dataclass(frozen=True)
class WavBackendConfig:
    mic: tuple[WavMicItem, ...] = ()
    speaker: str = "hydrad-speaker.wav"
    speaker_rate: int = field(default=24000, metadata=_range(8000, 192000))


@dataclass(frozen=True)
class SounddeviceConfig:
    input_device: str | int | None = None
    output_device: str | int | None = None
    input_rate: int | None = field(default=None, metadata=_range(8000, 192000))
    output_rate: int | None = field(default=None, metadata=_range(8000, 192000))
    input_channels: int | None = field(default=None, metadata=_range(1, 32))
    latency: Literal["low", "high"] | float = "low"


@dataclass(frozen=True)
class AudioConfig:
    """The engine child process and its backend."""

    backend: Literal["sounddevice", "wav", "null"] = "sounddevice"
    frame_ms: int = field(default=20, metadata=_check(lambda v: v in (20, 30, 40), "20, 30 or 40"))
    block_ms: int = field(default=10, metadata=_check(lambda v: v in (5, 10, 20), "5, 10 or 20"))
    fade_ms: float = field(default=5.0, metadata=_range(0, 50))
    output_volume: float = field(default=1.0, metadata=_range(0, 4))
    mic_gain: float = field(default=1.0, metadata=_range(0, 16))
    #: echo cancellation: "auto" = "webrtc" on real devices (the sounddevice backend), else off
    aec: Literal["auto", "off", "webrtc", "system"] = "auto"
    #: residual echo gate after the canceller, dB (0: off); see docs/aec.md
    aec_gate_db: float = field(default=15.0, metadata=_range(0, 60))
    #: the gate's leak check: mute what the canceller lets through after losing the echo path
    aec_leak_check: bool = True
    #: the APM's other stages, with the in-engine canceller (NS adds ~6 ms of latency)
    aec_noise_suppression: bool = False
    aec_high_pass_filter: bool = False
    wav: WavBackendConfig = WavBackendConfig()
    sounddevice: SounddeviceConfig = SounddeviceConfig()


@dataclass(frozen=True)
class PipelineConfig:
    uplink_queue_frames: int = field(default=25, metadata=_range(2, 1000))
    uplink_burst_frames: int = field(default=5, metadata=_range(1, 100))
    playback_queue: int = field(default=256, metadata=_range(4, 10000))
    engine_ping_s: float = field(default=1.0, metadata=_range(0.1, 30))
    engine_hang_s: float = field(default=3.0, metadata=_range(0.5, 60))


@dataclass(frozen=True)
class ReconnectConfig:
    initial_s: float = field(default=1.0, metadata=_range(0.01, 60))
    max_s: float = field(default=30.0, metadata=_range(0.1, 600))
    server_full_max_s: float = field(default=60.0, metadata=_range(0.1, 3600))
    healthy_after_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    auth_retry_s: float = field(default=600.0, metadata=_range(1, 86400))


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True
    socket: str = "/run/hydrad/control.sock"
    mode: int = field(default=0o660, metadata=_range(0, 0o777))
    group: str | None = None
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    max_connections: int = field(default=16, metadata=_range(1, 1024))
    idle_timeout_s: float = field(default=30.0, metadata=_range(0.1, 3600))
    max_line_bytes: int = field(default=65536, metadata=_range(256, 16 * 1024 * 1024))


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    snapshot_interval_s: float = field(default=60.0, metadata=_range(0, 86400))
    textfile: str | None = None


@dataclass(frozen=True)
class RecordingConfig:
    enabled: bool = False
    dir: str = "/var/lib/hydrad/recordings"
    keep_turns: int = field(default=20, metadata=_range(1, 10000))
    max_mb: float = field(default=200.0, metadata=_range(1, 100000))


@dataclass(frozen=True)
class PluginsConfig:
    """``modules`` are imported and registered in addition to the ``hydrad`` entry points.

    Plugin tables (``[plugins.<name>]``) are kept raw in ``settings`` and validated by the
    plugin itself before start-up.
    """

    modules: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    hook_deadline_s: float = field(default=2.0, metadata=_range(0.01, 600))
    tool_deadline_s: float = field(default=8.0, metadata=_range(0.01, 600))
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    hydra: HydraConfig = HydraConfig()
    session: SessionConfig = SessionConfig()
    barge_in: BargeInConfig = BargeInConfig()
    audio: AudioConfig = AudioConfig()
    pipeline: PipelineConfig = PipelineConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    recording: RecordingConfig = RecordingConfig()
    plugins: PluginsConfig = PluginsConfig()
    #: where this config came from ("built-in defaults" or a path), for status and logs
    source: str = "built-in defaults"


# --------------------------------------------------------------------------- building

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "absent"}.get(tp, getattr(tp, "__name__", str(tp)))


_NO = object()


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML (``true``, ``"x"``), not as Python prints it."""
    import json

    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Return the value as type ``tp``, or ``_NO`` after recording a problem."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        return _NO
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, path, sub)
            if out is not _NO and not sub:
                return out
        return _NO
    if origin is tuple:
        if not isinstance(value, list):
            return _NO
        (item_tp, *_rest) = get_args(tp)
        items = []
        for i, item in enumerate(value):
            out = _coerce(item, item_tp, f"{path}[{i}]", problems)
            if out is _NO:
                problems.append(f"{path}[{i}] = {_show(item)}: expected {_describe(item_tp)}")
            else:
                items.append(out)
        return tuple(items)
    if origin is dict:
        return value if isinstance(value, dict) else _NO
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems) if isinstance(value, dict) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return _NO  # pragma: no cover - a type this loader does not know


def _build(cls: type, table: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            if cls is PluginsConfig and isinstance(value, dict):
                kwargs.setdefault("settings", {})[key] = value
                continue
            close = [k for k in fields if k[:3] == key[:3]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: unknown key{hint}; allowed keys: {', '.join(sorted(fields))}")
            continue
        tp = hints[key]
        before = len(problems)
        out = _coerce(value, tp, path, problems)
        if out is _NO:
            if len(problems) == before:
                problems.append(f"{path} = {_show(value)}: expected {_describe(tp)}")
            continue
        check = fields[key].metadata.get("check")
        if check is not None and out is not None:
            try:
                ok = check(out)
            except TypeError:
                ok = True  # the check is for the other member of a union (e.g. latency name vs seconds)
            if not ok:
                problems.append(f"{path} = {_show(value)}: expected {fields[key].metadata['allowed']}")
                continue
        kwargs[key] = out
    return cls(**kwargs)


def _cross_checks(cfg: Config, problems: list[str]) -> None:
    voice = cfg.session.voice
    roster = C.VOICE_ROSTERS[cfg.hydra.model]
    if voice is not None and voice not in roster and voice != C.DEFAULT_VOICE:
        problems.append(
            f"session.voice = {_show(voice)}: not a voice of model {cfg.hydra.model!r}; "
            f"allowed: {', '.join(roster)} (or omit it for the service default {C.DEFAULT_VOICE!r})"
        )
    if cfg.audio.frame_ms % cfg.audio.block_ms:
        problems.append(f"audio.frame_ms = {cfg.audio.frame_ms}: must be a multiple of audio.block_ms ({cfg.audio.block_ms})")
    if cfg.control.enabled and not cfg.control.socket.startswith("/"):
        problems.append(f"control.socket = {_show(cfg.control.socket)}: expected an absolute path")


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    _cross_checks(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return dataclasses.replace(cfg, source=source)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load ``path``; ``None`` means the default path if it exists, else built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"], str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read ({exc})"], str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML ({exc})"], str(p)) from None
    return config_from_dict(data, str(p))


# --------------------------------------------------------------------------- credentials

API_KEY_ENV = ("HYDRA_API_KEY", "SMALLEST_API_KEY")
CREDENTIAL_NAME = "hydra-api-key"


def load_api_key(cfg: Config, env: typing.Mapping[str, str] | None = None) -> Secret | None:
    """Find the API key: environment, then ``hydra.api_key_file``, then systemd credentials.

    Returns None when there is none (the demo and the simulator need none). A configured
    file that cannot be read is an error: silently running without a key would end in a
    401 loop on the device.
    """
    env = os.environ if env is None else env
    for name in API_KEY_ENV:
        if env.get(name, "").strip():
            return Secret(env[name].strip(), f"${name}")
    candidates: list[tuple[Path, bool]] = []
    if cfg.hydra.api_key_file:
        candidates.append((Path(cfg.hydra.api_key_file), True))
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append((Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME, False))
    for path, required in candidates:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            if required:
                raise ConfigError([f"hydra.api_key_file = {str(path)!r}: no such file"], cfg.source) from None
            continue
        except OSError as exc:
            raise ConfigError([f"API key file {str(path)!r}: cannot read ({exc.strerror})"], cfg.source) from None
        if not value:
            raise ConfigError([f"API key file {str(path)!r} is empty"], cfg.source)
        return Secret(value, str(path))
    return None
