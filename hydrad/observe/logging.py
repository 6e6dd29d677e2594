"""structlog, configured once: JSON lines for journald, a readable console on a TTY, no secrets.

``configure_logging(cfg.log)`` is called once at start-up (and again on a reload that changes
the level; loggers are not cached, so a reconfiguration takes effect at once everywhere).

* **Format.** ``format = "auto"`` renders one JSON object per line when the stream is not a
  TTY (journald, files, pipes) and structlog's console renderer on a TTY. Every line has a
  stable ``event`` name (snake_case or dotted, never prose), ``level``, ``logger`` and ``ts``
  (UTC, ISO 8601); anything else is a field.
* **Context.** ``session_id``, ``turn_id`` and ``response_id`` are added to every line while
  they are current. The :class:`LogContext` bus sink tracks them from the events; trio tasks
  each run in their own copy of the ``contextvars`` context, so a value bound with
  ``structlog.contextvars.bind_contextvars`` in one task is invisible to the others: the
  tracker is process-wide instead (one daemon, one session at a time). Values bound through
  ``structlog.contextvars`` are merged too, and an explicit field of a log call wins over both.
* **Redaction.** The last processors before rendering replace: the value of any key named like
  a credential (``api_key``, ``authorization``, ``token``, ``password``, ``secret`` ...); the
  value of any key naming an audio payload (``audio``, ``delta``, ``pcm``, ``payload``) with a
  size summary; every registered secret (:func:`register_secret`: the API key), wherever it
  appears inside any string (URL query strings, exception messages and tracebacks, reprs);
  ``api_key=...`` / ``token=...`` query parameters and ``Bearer ...`` credentials; and any run
  of 64 or more base64 characters that mixes cases and digits or repeats one character (an
  audio chunk, silence, a key nobody registered; not a long path or a lowercase id). ``bytes`` values
  become a length. The rendered line is scrubbed for registered secrets once more.
* **Standard library logging** (trio-websocket, pluggy, ...) goes through the same processors
  and renderer, so those lines are JSON and redacted too; their ``event`` is ``library_log``
  and the formatted message is in ``message``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, Iterable, Mapping, TextIO
from urllib.parse import quote, quote_plus

import structlog

from ..config import LogConfig, Secret
from ..events import Event

REDACTED = "[redacted]"

#: keys whose value is a credential, compared after lower-casing and ``-`` -> ``_``
SECRET_KEYS = frozenset({
    "api_key", "apikey", "x_api_key", "authorization", "proxy_authorization", "auth_header", "bearer",
    "token", "access_token", "refresh_token", "password", "passwd", "secret", "client_secret",
    "credential", "credentials", "cookie", "set_cookie",
})
#: keys whose value is an audio payload (or a raw frame that may carry one)
AUDIO_KEYS = frozenset({"audio", "delta", "pcm", "pcm16", "payload", "samples_b64", "audio_b64", "chunk"})

_B64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{64,}={0,2}")
_QUERY_SECRET = re.compile(
    r"(?i)((?<![A-Za-z0-9])(?:api[_-]?key|access[_-]?token|token|auth|key|password|secret)=)([^&\s'\"<>]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/\-]+=*")
_MAX_STR = 8192
_MAX_DEPTH = 6

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | Secret | None) -> None:
    """Redact ``value`` (and its URL-encoded forms) from every log line from now on.

    Values shorter than 6 characters are ignored: redacting them would mangle ordinary words.
    """
    if value is None:
        return
    raw = value.reveal() if isinstance(value, Secret) else str(value)
    raw = raw.strip()
    if len(raw) < 6:
        return
    with _secrets_lock:
        _secrets.update({raw, quote(raw, safe=""), quote_plus(raw)})


def clear_secrets() -> None:
    """Forget every registered secret (tests; a reload registers the new key)."""
    with _secrets_lock:
        _secrets.clear()


def _scrub_secrets(s: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in s:
            s = s.replace(secret, REDACTED)
    return s


def _b64_replacement(m: re.Match[str]) -> str:
    """A long run is base64 (audio, a key) when it mixes cases and digits, or is one repeated
    character (base64 silence is ``AAAA...``); a long path or a lowercase UUID-ish id is not."""
    run = m.group(0)
    mixed = any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)
    if mixed or len(set(run.rstrip("="))) == 1:
        return f"[base64 {len(run)} chars redacted]"
    return run


def redact_text(s: str) -> str:
    """Remove registered secrets, credential query parameters, bearer tokens and base64 runs."""
    s = _scrub_secrets(s)
    s = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, s)
    s = _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, s)
    s = _B64_RUN.sub(_b64_replacement, s)
    if len(s) > _MAX_STR:
        s = s[:_MAX_STR] + f"...[{len(s) - _MAX_STR} chars truncated]"
    return s


def _norm_key(key: Any) -> str:
    return str(key).lower().replace("-", "_")


def _audio_summary(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"[audio {len(value)} bytes]"
    if isinstance(value, str):
        return f"[audio {len(value)} chars]"
    return "[audio]"


def redact_value(value: Any, key: str | None = None, depth: int = 0) -> Any:
    """A copy of ``value`` that is safe to log (see the module doc for the rules)."""
    if key is not None:
        k = _norm_key(key)
        if k in SECRET_KEYS or k.endswith(("_api_key", "_token", "_password", "_secret")):
            return REDACTED if value is not None else None
        if k in AUDIO_KEYS and value is not None and not isinstance(value, (int, float, bool)):
            if isinstance(value, (dict, list, tuple)):  # a structure (e.g. a delta dict): walk it
                pass
            else:
                return _audio_summary(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"[{len(value)} bytes]"
    if isinstance(value, Secret):
        return REDACTED
    if depth >= _MAX_DEPTH:
        return "[...]"
    if isinstance(value, Mapping):
        return {str(k): redact_value(v, str(k), depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact_value(v, None, depth + 1) for v in value]
    # Anything else (exceptions, paths, numpy scalars...) is rendered by repr: scrub that.
    try:
        text = repr(value) if isinstance(value, BaseException) else str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not kill a log line
        text = f"<unprintable {type(value).__name__}>"
    return redact_text(text)


_FIRST_KEYS = ("ts", "level", "event", "logger", "session_id", "turn_id", "response_id")


def redact_processor(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every value of the event dict through :func:`redact_value`.

    Also puts ``ts``, ``level``, ``event``, ``logger`` and the context ids first, so a JSON line
    reads well in ``journalctl -o cat``.
    """
    out: dict[str, Any] = {}
    ordered = [k for k in _FIRST_KEYS if k in event_dict] + [k for k in event_dict if k not in _FIRST_KEYS]
    for k in ordered:
        v = event_dict[k]
        if k == "event":
            out[k] = redact_text(str(v))
        elif k.startswith("_"):
            out[k] = v  # structlog internals (_record, _from_structlog): not rendered
        else:
            out[k] = redact_value(v, k)
    return out


# ----------------------------------------------------------------------------------- context

class LogContext:
    """Bus sink: the current session, turn and response ids, added to every log line.

    ``turn_id`` is the id of the user's conversation item (from ``speech_started``) and stays
    current until the next user turn; ``response_id`` is current from ``response_created``
    until that response's ``response_done``; ``session_id`` from ``session_connected`` until
    ``session_disconnected``.
    """

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        f = event.fields
        name = event.name
        if name in ("session_connected", "session_configured") and f.get("session_id"):
            self.values["session_id"] = str(f["session_id"])
        elif name == "session_disconnected":
            for k in ("session_id", "turn_id", "response_id"):
                self.values.pop(k, None)
        elif name == "speech_started" and f.get("item_id"):
            self.values["turn_id"] = str(f["item_id"])
        elif name == "response_created" and f.get("response_id"):
            self.values["response_id"] = str(f["response_id"])
        elif name == "response_done" and self.values.get("response_id") == f.get("response_id"):
            self.values.pop("response_id", None)

    def processor(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for k, v in self.values.items():
            event_dict.setdefault(k, v)
        return event_dict

    def clear(self) -> None:
        self.values.clear()


#: the process-wide tracker; subscribe it to the bus (``bus.subscribe(log_context)``)
log_context = LogContext()


# ----------------------------------------------------------------------------------- setup

class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that remembers the name passed to ``structlog.get_logger(name)``."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _LoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        name = str(args[0]) if args and args[0] is not None else "hydrad"
        return _NamedWriteLogger(self.stream, name)


def _add_logger_name(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("logger", record.name)
    else:
        event_dict.setdefault("logger", getattr(logger, "name", "hydrad"))
    return event_dict


def _foreign_event(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A standard-library record: its message is prose, so ``event`` gets a stable name instead."""
    record = event_dict.get("_record")
    if record is not None and not event_dict.get("_from_structlog"):
        event_dict["message"] = event_dict.get("event")
        event_dict["event"] = "library_log"
    return event_dict


def _scrubbing(renderer: Any) -> Any:
    """Wrap the final renderer: the rendered line is scrubbed for registered secrets once more."""

    def render(logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        line = renderer(logger, method, event_dict)
        return _scrub_secrets(line if isinstance(line, str) else line.decode("utf-8", "replace"))

    return render


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def use_json(cfg: LogConfig, stream: Any) -> bool:
    if cfg.format == "json":
        return True
    if cfg.format == "console":
        return False
    return not _is_tty(stream)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_HANDLER_NAME = "hydrad-structlog"


def configure_logging(
    cfg: LogConfig | None = None,
    stream: TextIO | None = None,
    *,
    secrets: Iterable[str | Secret | None] = (),
    context: LogContext | None = None,
    stdlib: bool = True,
) -> None:
    """Configure structlog (and route the standard ``logging`` module through it).

    ``stream`` defaults to ``sys.stdout``. ``secrets`` are registered with
    :func:`register_secret` (pass the API key). Safe to call again (a reload); the last call wins.
    """
    cfg = cfg or LogConfig()
    stream = stream if stream is not None else sys.stdout
    for s in secrets:
        register_secret(s)
    ctx = context or log_context
    level = _LEVELS.get(cfg.level, logging.INFO)
    json_lines = use_json(cfg, stream)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        ctx.processor,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,  # tracebacks become a string, so they get redacted
    ]
    if json_lines:
        renderer: Any = structlog.processors.JSONRenderer(default=str, ensure_ascii=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(stream), timestamp_key="ts", sort_keys=False,
                                                 pad_event_to=28)
    final = _scrubbing(renderer)

    structlog.configure(
        processors=[*shared, redact_processor, final],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_LoggerFactory(stream),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    if stdlib:
        formatter = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[p for p in shared if p is not structlog.processors.format_exc_info] + [
                structlog.stdlib.ExtraAdder(), _foreign_event],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, redact_processor, final],
        )
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(formatter)
        root = logging.getLogger()
        for h in list(root.handlers):
            if h.get_name() == _HANDLER_NAME:
                root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)
        # trio-websocket logs every frame at DEBUG: keep it at INFO unless asked for in the config.
        logging.getLogger("trio-websocket").setLevel(max(level, logging.INFO))


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests): structlog defaults, no handler, no secrets, no context."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    clear_secrets()
    log_context.clear()
