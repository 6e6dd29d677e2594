"""The hydrad plugin hooks: one function per hook, its docstring says exactly when it fires.

A plugin is a module (or any object) with functions named after these hooks and marked with
``@hookimpl``; hydrad finds it through the ``hydrad`` entry-point group or the
``plugins.modules`` config key (see ``docs/plugins.md``). As usual with pluggy an
implementation may accept any *subset* of the arguments of its spec, by name::

    from hydrad.hooks import hookimpl

    @hookimpl
    def hydrad_speech_started(ctx, event):
        ctx.log.info("user is talking", item_id=event.fields["item_id"])

Rules that hold for every hook (``docs/plugins.md`` has the full threading rules):

* ``ctx`` is this plugin's :class:`~hydrad.hooks.context.HookContext`: its own validated
  settings, a logger bound to its name, the session state, and the requests a plugin may
  make (cancel, mute, unmute). It is the only way into hydrad.
* ``event`` is a :class:`hydrad.events.Event`: ``event.name``, ``event.fields`` (a dict,
  documented per hook below) and ``event.t`` (``time.monotonic()`` when it happened). Each
  plugin gets its own copy, so changing it affects nobody else.
* **Observer hooks** (every ``hydrad_<event name>`` and :func:`hydrad_event`) may be
  ``def`` or ``async def``. They never run on the audio path: each plugin has its own
  ordered queue; ``async def`` hooks run as trio tasks in the hook dispatcher's nursery,
  plain ``def`` hooks run in a worker thread. Each call has a deadline
  (``plugins.hook_deadline_s``); an exception or a timeout is logged with the plugin's name
  and counted, and the next event is delivered as usual. A plugin sees events in the order
  they happened; different plugins do not wait for each other. Return values are ignored.
* For one event a plugin's ``hydrad_<event name>`` is called before its ``hydrad_event``.
"""

from __future__ import annotations

from typing import Any

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("hydrad")
hookimpl = HookimplMarker("hydrad")


# ============================================================================ set-up and tools


@hookspec
def hydrad_plugin_config(table: dict[str, Any]) -> Any:
    """Validate this plugin's own configuration table and return its settings.

    Called once at load time, before start-up, with the ``[plugins.<plugin name>]`` table
    of the config file (an empty dict when there is none). Return whatever settings object
    suits you (a dataclass, the dict itself, ...): it becomes ``ctx.settings``. Raise any
    exception (``ValueError`` is customary) with a message saying which key is wrong and
    what is allowed: hydrad refuses to start and reports the message under the plugin's
    name together with every other configuration problem. Must be a plain ``def``.

    A plugin without this hook takes no configuration; a table for it is an error.
    """


@hookspec
def hydrad_tools(ctx: Any) -> list[dict[str, Any]]:
    """Declare the tools this plugin offers to the model.

    Called once at load time (after :func:`hydrad_plugin_config`, so ``ctx.settings`` is
    available). Return a list of Hydra tool schemas, each
    ``{"name": str, "description": str, "parameters": <JSON schema of an object>}``
    (``"type": "function"`` is added if missing). They are sent in ``session.configure`` of
    every session. Names are 1-64 characters of ``A-Z a-z 0-9 _ -``; ``parameters`` must be a
    valid JSON schema. A plugin that declares tools must implement :func:`hydrad_call_tool`.
    When two plugins declare the same name, the first plugin in hook-call order owns it (see
    ``docs/plugins.md``); the other declaration is ignored with a warning. Must be a plain
    ``def``.
    """


@hookspec
def hydrad_call_tool(ctx: Any, name: str, arguments: dict[str, Any], call_id: str) -> Any:
    """Run one of this plugin's tools for the model and return the result.

    Called when the model calls a tool this plugin declared in :func:`hydrad_tools` (only
    the owning plugin is called). ``arguments`` is already parsed and validated against the
    tool's ``parameters`` schema; ``call_id`` is the service's id of the call. ``def`` tools
    run in a worker thread, ``async def`` tools as trio tasks. Return any JSON-serialisable
    value (it is JSON-encoded) or a ``str`` (sent as it is). Raise
    :class:`hydrad.hooks.ToolError` to send an error result the model can talk about; any
    other exception, a non-serialisable result, or running past ``plugins.tool_deadline_s``
    also sends an error result (the conversation goes on) and is logged with the plugin's
    name. Several calls can run at the same time.
    """


# ============================================================================ life cycle


@hookspec
def hydrad_startup(ctx: Any) -> None:
    """hydrad is starting: the hook dispatcher runs, the session has not connected yet.

    Called once, before the daemon starts, with the usual deadline. ``def`` or ``async def``.
    A failure is logged and counted; hydrad starts anyway.
    """


@hookspec
def hydrad_serve(ctx: Any) -> None:
    """A long-running background task for this plugin (must be ``async def``).

    Started after :func:`hydrad_startup` in the hook dispatcher's nursery and cancelled when
    hydrad stops, after :func:`hydrad_shutdown`. Use it for work that outlives one event, e.g.
    a sender draining the plugin's own bounded queue. No deadline; if it raises, the error is
    logged and counted and it is not restarted.
    """


@hookspec
def hydrad_shutdown(ctx: Any) -> None:
    """hydrad is stopping: the session is closed and every queued event was delivered.

    Called once with the usual deadline while :func:`hydrad_serve` tasks still run (flush
    your queue here). ``def`` or ``async def``.
    """


# ============================================================================ observers: every event


@hookspec
def hydrad_event(ctx: Any, event: Any) -> None:
    """Every event, whatever its name (called after the event's own hook, if any).

    For plugins that forward events generically (``exec``, ``webhook``): ``event.name`` is one
    of the names below; ``event.fields`` as documented for that name. New event names may be
    added in later versions; ignore names you do not know.
    """


# ============================================================================ observers: session


@hookspec
def hydrad_session_connected(ctx: Any, event: Any) -> None:
    """The WebSocket is open and the service sent ``session.created``.

    Fields: ``session_id``, ``model`` (the model tag), ``url`` (without the API key).
    ``session.configure`` is being sent; the mic is still closed.
    """


@hookspec
def hydrad_session_configured(ctx: Any, event: Any) -> None:
    """The service accepted ``session.configure``: the mic opens now.

    Fields: ``session_id``, ``config`` (the effective session echoed by the service: voice,
    instructions, tools, ...), ``output_rate`` (Hz of the agent's audio).
    """


@hookspec
def hydrad_session_disconnected(ctx: Any, event: Any) -> None:
    """The session ended (hydrad reconnects on its own unless it is stopping).

    Fields: ``session_id`` (None if the service never sent one), ``reason`` (why, in words),
    ``code`` (WebSocket close code or None). Anything still playing was flushed.
    """


# ============================================================================ observers: user turn


@hookspec
def hydrad_speech_started(ctx: Any, event: Any) -> None:
    """The service's VAD heard the user start speaking (``input_audio_buffer.speech_started``).

    Fields: ``item_id`` (the user item), ``audio_start_ms`` (position in the session's input
    audio), ``during_response`` (True when the agent was speaking or producing a response:
    this speech is a barge-in and a :func:`hydrad_barge_in` follows under the default policy).
    """


@hookspec
def hydrad_speech_stopped(ctx: Any, event: Any) -> None:
    """The service's VAD heard the user stop speaking.

    Fields: ``item_id``, ``audio_end_ms``. The user turn is not final yet: see
    :func:`hydrad_user_turn_done`.
    """


@hookspec
def hydrad_user_turn_done(ctx: Any, event: Any) -> None:
    """The user's turn is final (the user item's ``conversation.item.done``).

    Fields: ``item_id``, ``status``: ``completed`` (a response follows) or ``discarded``
    (too short or noise: no response follows), ``text`` (transcript if the service sent one,
    else None; absent for discarded turns).
    """


# ============================================================================ observers: response


@hookspec
def hydrad_response_created(ctx: Any, event: Any) -> None:
    """The service started a response (``response.created``).

    Fields: ``response_id``. Nothing is audible yet; a tool-calling response never becomes
    audible (its narration is a second response).
    """


@hookspec
def hydrad_response_audio_started(ctx: Any, event: Any) -> None:
    """The first sample of the response became audible at the speaker.

    From the audio engine's playout accounting, not from the first audio delta. Fields:
    ``response_id``, ``first_audible`` (``time.monotonic()`` of that sample), ``latency_ms``
    (end of the user's speech to first audible sample; None when there was no user turn,
    e.g. a greeting or a tool narration).
    """


@hookspec
def hydrad_response_done(ctx: Any, event: Any) -> None:
    """The response is over for the user: the service finished it *and* local playback
    drained or was flushed. Fired once per response, after :func:`hydrad_barge_in` if it was cut.

    Fields: ``response_id``, ``status`` (``completed``, ``cancelled``, ``failed``,
    ``incomplete``), ``reason`` (e.g. ``interrupted``, ``client_cancelled``, ``disconnected``,
    or None), ``metrics`` (the turn's metrics dict, see ``docs/metrics.md``: latencies,
    heard seconds, barge-in, tool calls with durations).
    """


@hookspec
def hydrad_barge_in(ctx: Any, event: Any) -> None:
    """Playback of a response was cut, and the engine confirmed the speaker is silent.

    Fields: ``response_id``, ``trigger`` (``speech_started``: the user spoke;
    ``response_created``: a new response replaced it; ``response_cancelled``: the service
    cancelled it; ``cancel``: a cancel request; ``disconnect``), ``heard_samples`` and
    ``heard_s`` (how much of it the user heard), ``dropped_samples`` (queued audio thrown
    away), ``stop_ms`` (from the decision to cut to silence at the speaker).
    """


@hookspec
def hydrad_cancel_requested(ctx: Any, event: Any) -> None:
    """Someone asked hydrad to cancel the current response.

    Fields: ``source`` (``control``: the control socket; ``plugin``: a plugin's
    ``ctx.request_cancel()``; ``programmatic``: code embedding hydrad; ``shutdown``),
    ``response_id`` (what was cancelled, or None), ``in_flight`` (True when the service was
    still producing it and ``response.cancel`` was sent). A :func:`hydrad_barge_in` with
    trigger ``cancel`` follows when something was audible.
    """


# ============================================================================ observers: tools


@hookspec
def hydrad_tool_call(ctx: Any, event: Any) -> None:
    """The model called a tool; the call is starting (any plugin may observe it).

    Fields: ``call_id``, ``name``, ``arguments`` (the raw JSON text from the service, not yet
    validated). A :func:`hydrad_tool_result` with the same ``call_id`` follows.
    """


@hookspec
def hydrad_tool_result(ctx: Any, event: Any) -> None:
    """A tool call finished and its output was sent to the model.

    Fields: ``call_id``, ``output`` (the JSON string sent), ``error`` (None on success, else
    why it failed: invalid arguments, unknown tool, exception, timeout), ``duration_ms``.
    """


# ============================================================================ observers: problems and devices


@hookspec
def hydrad_service_error(ctx: Any, event: Any) -> None:
    """The service sent an ``error`` frame, or a response failed.

    Fields: ``code``, ``type``, ``message``, ``param`` (or None); ``event_id`` for error frames
    (the client event it refers to, or None).
    """


@hookspec
def hydrad_service_warning(ctx: Any, event: Any) -> None:
    """The service sent a ``warning`` frame (e.g. a deprecated model tag).

    Fields: ``code``, ``message``.
    """


@hookspec
def hydrad_malformed_frame(ctx: Any, event: Any) -> None:
    """A frame from the service could not be parsed and was skipped.

    Fields: ``kind`` (what was wrong, e.g. ``invalid_json``), ``reason`` (details).
    """


@hookspec
def hydrad_engine_state(ctx: Any, event: Any) -> None:
    """The audio engine child process or its device changed state.

    Fields: ``state`` (``starting``, ``running``, ``restarting``, ``device_lost``, ...),
    ``detail`` (an error text or None).
    """


@hookspec
def hydrad_guard_decision(ctx: Any, event: Any) -> None:
    """The ``guard`` barge-in policy decided whether speech during playback was a real
    barge-in or echo (only with ``barge_in.policy = "guard"``).

    Fields are those the guard publishes (at least ``decision``); treat unknown fields as
    informational.
    """


#: Hooks that are not observers (called at load time or with their own rules).
SETUP_HOOKS = ("hydrad_plugin_config", "hydrad_tools", "hydrad_call_tool")
LIFECYCLE_HOOKS = ("hydrad_startup", "hydrad_serve", "hydrad_shutdown")
GENERIC_HOOK = "hydrad_event"
PREFIX = "hydrad_"


def hook_names() -> list[str]:
    """Every hook name, in the order of this module (the order of the docs' reference)."""
    import inspect
    import sys

    module = sys.modules[__name__]
    out = []
    for name, obj in vars(module).items():
        if name.startswith(PREFIX) and inspect.isfunction(obj) and hasattr(obj, "hydrad_spec"):
            out.append(name)
    return out


def observer_hooks() -> list[str]:
    """``hydrad_event`` and every per-event observer hook."""
    return [h for h in hook_names() if h not in SETUP_HOOKS + LIFECYCLE_HOOKS]


def event_hook(event_name: str) -> str:
    """The observer hook for an event name: ``speech_started`` -> ``hydrad_speech_started``."""
    return PREFIX + event_name
