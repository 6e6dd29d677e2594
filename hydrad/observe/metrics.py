"""Prometheus metrics, the per-turn ``turn.completed`` log line and the periodic snapshot.

:class:`Metrics` is two things:

* a **bus sink** (``bus.subscribe(metrics)``): the events drive the per-turn histograms and
  the event counters (turns, barge-ins, tool calls, service errors, malformed frames, plugin
  errors, ...), and each ``response_done`` becomes one ``turn.completed`` log line;
* a **collector** on its own :class:`prometheus_client.CollectorRegistry`: at each scrape it
  reads the daemon's own counters (``Daemon.counters``), the engine's last STATS and a few live
  gauges through provider callables, so nothing is counted twice and nothing can drift.

The text exposition (``metrics_text()``, ``hydrad ctl metrics``, the textfile collector) is
produced by ``prometheus_client.generate_latest``. Every metric is listed in docs/metrics.md.

Everything here runs in the trio thread and never blocks: the textfile write is handed to a
worker thread, the text itself is generated in the trio thread (the providers' dicts are
mutated there).
"""

from __future__ import annotations

import collections
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import prometheus_client
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import MetricsConfig
from ..events import Event

log = structlog.get_logger("hydrad.metrics")

NS = "hydrad"

LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
STOP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
TOOL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
SPEECH_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)

#: distinct values a label may take before the rest are folded into "other" (label values come
#: from the service, plugins and tool names: a misbehaving peer must not explode the series)
MAX_LABEL_VALUES = 32

Provider = Callable[[], Any]


def _percentile(values: Iterable[float], q: float) -> float | None:
    data = sorted(values)
    if not data:
        return None
    k = (len(data) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


class _LabelCap:
    """Bounded label values per metric: the first ``limit`` distinct values, then ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: dict[str, set[str]] = collections.defaultdict(set)

    def __call__(self, metric: str, value: Any) -> str:
        v = "none" if value is None or value == "" else str(value)[:64]
        seen = self.seen[metric]
        if v in seen:
            return v
        if len(seen) >= self.limit:
            return "other"
        seen.add(v)
        return v


class _Monotonic:
    """Turns a cumulative value that resets (engine restart) into a counter that never goes down."""

    def __init__(self) -> None:
        self.offset: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.epoch: Any = None

    def new_epoch(self, epoch: Any) -> None:
        """A new engine process: everything it reports starts from zero again."""
        if epoch != self.epoch:
            if self.epoch is not None:
                for k, v in self.last.items():
                    self.offset[k] = self.offset.get(k, 0.0) + v
                self.last = {}
            self.epoch = epoch

    def __call__(self, key: str, raw: Any) -> float | None:
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            if key in self.last:
                return self.offset.get(key, 0.0) + self.last[key]
            return None
        raw = float(raw)
        prev = self.last.get(key)
        if prev is not None and raw < prev:  # reset without a visible epoch change
            self.offset[key] = self.offset.get(key, 0.0) + prev
        self.last[key] = raw
        return self.offset.get(key, 0.0) + raw


# Daemon counter keys -> (metric, label name, label value). Keys with a ``prefix.`` take the
# suffix as the label value. Anything not listed lands in hydrad_daemon_counter_total{name}.
_DAEMON_EXACT: dict[str, tuple[str, str | None, str | None]] = {
    "uplink_frames_sent": ("uplink_frames_sent", None, None),
    "uplink_silence_filled": ("uplink_silence_frames", "reason", "no_capture"),
    "uplink_frames_muted": ("uplink_silence_frames", "reason", "muted"),
    "capture_frames_gated": ("uplink_frames_dropped", "reason", "gate_closed"),
    "frames_unsent": ("client_frames_unsent", None, None),
    "frames_received": ("server_events_received", None, None),
    "deltas_received": ("audio_deltas_received", None, None),
    "unknown_events": ("unknown_server_events", None, None),
    "playback_chunks_dropped_flushed": ("playback_chunks_dropped", "reason", "flushed_in_daemon_queue"),
    "engine.plays_dropped_before_engine": ("playback_chunks_dropped", "reason", "flushed_in_engine_outbox"),
    "ping_timeouts": ("ping_timeouts", None, None),
    "event_handler_errors": ("event_handler_errors", None, None),
    "tool_errors": ("tool_errors", None, None),
}
_DAEMON_PREFIX: dict[str, tuple[str, str]] = {
    "uplink_frames_dropped.": ("uplink_frames_dropped", "reason"),
    "frames_sent.": ("client_frames_sent", "type"),
    "reconnects.": ("reconnects", "cause"),
}
#: counted from the bus events instead (the daemon counts them too): skipped in the fallback
_DAEMON_FROM_EVENTS = ("malformed_frames.",)

_DOCS: dict[str, str] = {
    "uplink_frames_sent": "Microphone frames sent to the service (input_audio_buffer.append), silence included.",
    "uplink_silence_frames": "Uplink frames that carried silence: muted mic, or no capture from the engine.",
    "uplink_frames_dropped": "Microphone frames that never reached the service, by reason.",
    "client_frames_sent": "Client frames sent other than audio, by type.",
    "client_frames_unsent": "Client frames that could not be sent (the socket was gone).",
    "server_events_received": "Server frames received and parsed.",
    "audio_deltas_received": "response.output_audio.delta frames received.",
    "unknown_server_events": "Server frames of a type hydrad does not know (ignored).",
    "playback_chunks_dropped": "Response audio chunks of a flushed response that never reached the engine, by where they were dropped.",
    "ping_timeouts": "WebSocket pings that got no pong in time (the connection was dropped).",
    "event_handler_errors": "Server events whose handling raised (the event was skipped).",
    "tool_errors": "Tool calls that returned an error to the model (as counted by the daemon).",
    "reconnects": "Sessions that ended and were reconnected, by cause.",
}

# Engine STATS keys that are cumulative per engine process -> (metric, scale, doc)
_ENGINE_CUMULATIVE: dict[str, tuple[str, float, str]] = {
    "underruns": ("playback_underruns", 1.0, "Playback underruns: the output ran dry while a response was playing."),
    "underrun_ms": ("playback_underrun_seconds", 0.001, "Time the output spent starved during responses."),
    "overruns": ("capture_overruns", 1.0, "Capture overruns: microphone input lost (device overflow or a full capture queue)."),
    "late_callbacks": ("engine_late_callbacks", 1.0, "Audio callbacks or clock ticks that missed their deadline."),
    "callbacks": ("engine_callbacks", 1.0, "Audio callbacks run by the engine."),
    "capture_frames": ("engine_capture_frames", 1.0, "Capture frames produced by the engine."),
}
_ENGINE_DROPS: dict[str, str] = {
    "dropped_after_flush": "flushed_in_engine",
    "overflow_dropped": "engine_buffer_overflow",
}


class Metrics:
    """Bus sink + Prometheus registry. See the module doc and docs/metrics.md.

    Providers (all optional, all cheap, called at scrape/snapshot time in the trio thread):

    ``counters``
        ``() -> Mapping[str, number]``: the daemon's ``Counter`` (``Daemon.counters``).
    ``engine_stats``
        ``() -> Mapping``: the engine's last STATS (``Daemon.engine.last_stats``); cumulative
        values are made monotonic across engine restarts.
    ``engine_counters``
        ``() -> Mapping[str, number]``: ``restarts``, ``hangs``, ``plays_dropped_before_engine``.
    ``gauges``
        ``() -> Mapping[str, number]``: ``uplink_backlog_frames``, ``playback_queue_chunks``,
        ``muted`` (0/1).
    ``uplink_latency_ms``
        ``() -> Iterable[float]``: recent capture -> sent latencies (``Daemon.uplink_latency_ms``).
    ``plugin_stats``
        ``() -> Mapping[plugin, Mapping[str, int]]``: the hook dispatcher's ``stats`` (``calls``,
        ``errors``, ``timeouts``, ``dropped``, ``serve_errors`` per plugin).
    ``extra_counters``
        ``{component: () -> Mapping[str, number]}``: any other component's counters (e.g.
        ``{"control": lambda: control_server.counters}``), exported as
        ``hydrad_component_counter_total{component, name}``.
    """

    def __init__(
        self,
        counters: Provider | None = None,
        *,
        engine_stats: Provider | None = None,
        engine_counters: Provider | None = None,
        gauges: Provider | None = None,
        uplink_latency_ms: Provider | None = None,
        plugin_stats: Provider | None = None,
        extra_counters: Mapping[str, Provider] | None = None,
        cfg: MetricsConfig | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
        textfile_interval_s: float = 15.0,
    ) -> None:
        # The *_created series double the exposition for no use on a device; hydrad is the
        # only user of prometheus_client in its process.
        prometheus_client.disable_created_metrics()
        self.cfg = cfg or MetricsConfig()
        self.providers: dict[str, Provider | None] = {
            "counters": counters, "engine_stats": engine_stats, "engine_counters": engine_counters,
            "gauges": gauges, "uplink_latency_ms": uplink_latency_ms, "plugin_stats": plugin_stats,
        }
        for component, fn in (extra_counters or {}).items():
            self.providers["extra:" + component] = fn
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.log = logger or log
        self.textfile_interval_s = textfile_interval_s
        self.started = clock()
        self.label = _LabelCap()
        self._engine_mono = _Monotonic()
        self.provider_errors = 0
        self.textfile_errors = 0
        self.snapshots = 0
        self.connected = False
        #: the last turns' metrics (newest last), for status and the demo
        self.recent_turns: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=100))
        self._speech_start_ms: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._speech_ms: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._tool_names: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._double_talk_seen = (0, 0)   # the canceller's (double talk, cut) at the last turn's end
        self._build_event_metrics()
        self.registry.register(_PullCollector(self))

    @classmethod
    def for_daemon(cls, daemon: Any, cfg: MetricsConfig | None = None, **kwargs: Any) -> "Metrics":
        """Wire the providers to a :class:`hydrad.pipeline.daemon.Daemon` (subscribe it yourself)."""

        def engine_counters() -> dict[str, Any]:
            eng = daemon.engine
            return {**dict(getattr(eng, "counters", {}) or {}), "restarts": getattr(eng, "restarts", 0)}

        def gauges() -> dict[str, Any]:
            if hasattr(daemon, "observe_gauges"):
                return dict(daemon.observe_gauges())
            out: dict[str, Any] = {"muted": 1 if getattr(daemon, "muted", False) else 0}
            q = getattr(daemon, "_uplink_q", None)
            if q is not None:
                out["uplink_backlog_frames"] = len(q)
            ch = getattr(daemon, "_play_send", None)
            if ch is not None:
                out["playback_queue_chunks"] = ch.statistics().current_buffer_used
            return out

        return cls(
            lambda: daemon.counters,
            engine_stats=lambda: daemon.engine.last_stats,
            engine_counters=engine_counters,
            gauges=gauges,
            uplink_latency_ms=lambda: daemon.uplink_latency_ms,
            cfg=cfg, **kwargs,
        )

    # ------------------------------------------------------------------ event metrics
    def _build_event_metrics(self) -> None:
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=NS, registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, namespace=NS, registry=r, buckets=buckets)

        self.responses = counter("responses", "Responses whose turn is complete (one turn.completed log line each), by status.", ("status",))
        self.user_turns = counter("user_turns", "User turns (committed user items), by status: completed or discarded.", ("status",))
        self.first_delta = hist("turn_first_delta_seconds", "End of user speech (speech_stopped received) -> first audio delta received.", LATENCY_BUCKETS)
        self.first_audible = hist("turn_first_audible_seconds", "End of user speech (speech_stopped received) -> first response sample audible (engine accounting).", LATENCY_BUCKETS)
        self.user_speech = hist("user_speech_seconds", "User speech duration per utterance (audio_end_ms - audio_start_ms).", SPEECH_BUCKETS)
        self.response_audio = hist("response_audio_seconds", "Response audio received per response (responses with audio only).", SPEECH_BUCKETS)
        self.heard_audio = counter("heard_audio_seconds", "Response audio actually played out (heard), in seconds.")
        self.late_deltas = counter("late_deltas_dropped", "Audio deltas of a cut (barged-in or cancelled) response that arrived after the cut and were dropped.")
        self.barge_ins = counter("barge_ins", "Barge-ins: queued playback cut, by trigger.", ("trigger",))
        self.barge_in_stop = hist("barge_in_stop_seconds", "Barge-in trigger -> last audible sample (engine flush confirmation).", STOP_BUCKETS)
        self.tool_calls = counter("tool_calls", "Tool calls completed, by tool and outcome (ok or error).", ("tool", "outcome"))
        self.tool_duration = hist("tool_call_duration_seconds", "Tool call duration, by tool.", TOOL_BUCKETS, ("tool",))
        self.cancels = counter("cancels", "Cancel requests, by source.", ("source",))
        self.service_errors = counter("service_errors", "Service errors (error events and failed responses), by code.", ("code",))
        self.service_warnings = counter("service_warnings", "Service warnings, by code.", ("code",))
        self.malformed = counter("malformed_frames", "Server frames that could not be parsed, by kind.", ("kind",))
        self.plugin_errors = counter("plugin_errors", "Plugin hook failures, by plugin, hook and kind (error or timeout).", ("plugin", "hook", "kind"))
        self.sessions = counter("sessions", "Sessions configured (session.configured received).")
        self.disconnects = counter("session_disconnects", "Sessions that ended, by close code.", ("code",))
        self.engine_states = counter("engine_state_changes", "Audio engine state changes, by new state.", ("state",))
        self.guard_decisions = counter("guard_decisions", "Echo-guard decisions on speech during playback, by decision.", ("decision",))
        self.connected_g = Gauge("session_connected", "1 while a configured session is up.", namespace=NS, registry=r)
        info = prometheus_client.Info("build", "hydrad build information.", namespace=NS, registry=r)
        info.info({"version": _version()})
        # Pre-create the common label values so dashboards see zeros, not gaps.
        for s in ("completed", "cancelled", "failed", "incomplete"):
            self.responses.labels(s)
        for s in ("completed", "discarded"):
            self.user_turns.labels(s)
        for t in ("speech_started", "response_created", "response_cancelled", "cancel"):
            self.barge_ins.labels(self.label("barge_in", t))

    def __call__(self, event: Event) -> None:
        """The bus sink. Never raises (the bus would count it, but a metric must not be lost silently)."""
        handler = getattr(self, "_on_" + event.name, None)
        if handler is None:
            return
        try:
            handler(event.fields, event)
        except Exception:  # noqa: BLE001
            self.log.exception("metrics_event_failed", event_name=event.name)

    # The handlers: one per event name (docs/architecture.md).
    def _on_session_configured(self, f: Mapping[str, Any], ev: Event) -> None:
        self.sessions.inc()
        self.connected = True
        self.connected_g.set(1)

    def _on_session_disconnected(self, f: Mapping[str, Any], ev: Event) -> None:
        self.connected = False
        self.connected_g.set(0)
        self.disconnects.labels(self.label("disconnect", f.get("code"))).inc()

    def _on_speech_started(self, f: Mapping[str, Any], ev: Event) -> None:
        item, start = f.get("item_id"), f.get("audio_start_ms")
        if item is not None and isinstance(start, (int, float)):
            self._remember(self._speech_start_ms, str(item), float(start))

    def _on_speech_stopped(self, f: Mapping[str, Any], ev: Event) -> None:
        item, end = f.get("item_id"), f.get("audio_end_ms")
        start = self._speech_start_ms.get(str(item)) if item is not None else None
        if start is not None and isinstance(end, (int, float)) and end >= start:
            ms = float(end) - start
            self._remember(self._speech_ms, str(item), ms)
            self.user_speech.observe(ms / 1000)
            self._windows["user_speech_ms"].append(ms)

    def _on_user_turn_done(self, f: Mapping[str, Any], ev: Event) -> None:
        status = f.get("status")
        self.user_turns.labels(status if status in ("completed", "discarded") else self.label("user_turn", status)).inc()

    def _on_response_done(self, f: Mapping[str, Any], ev: Event) -> None:
        m = dict(f.get("metrics") or {})
        status = f.get("status") or m.get("status") or "unknown"
        self.responses.labels(self.label("responses", status)).inc()
        user_item = m.get("user_item_id")
        if m.get("user_speech_ms") is None and user_item is not None:
            m["user_speech_ms"] = self._speech_ms.get(str(user_item))
        for key, hist, window in (("end_of_speech_to_first_delta_ms", self.first_delta, "first_delta_ms"),
                                  ("end_of_speech_to_first_audible_ms", self.first_audible, "first_audible_ms")):
            v = m.get(key)
            if isinstance(v, (int, float)) and v >= 0:
                hist.observe(v / 1000)
                self._windows[window].append(float(v))
        audio_s = m.get("response_audio_s")
        if isinstance(audio_s, (int, float)) and audio_s > 0:
            self.response_audio.observe(audio_s)
        heard_s = m.get("heard_s")
        if isinstance(heard_s, (int, float)) and heard_s > 0:
            self.heard_audio.inc(heard_s)
        late = m.get("late_deltas_dropped")
        if isinstance(late, int) and late > 0:
            self.late_deltas.inc(late)
        turn = {"response_id": f.get("response_id"), "status": status, "reason": f.get("reason"),
                "turn_id": user_item, **{k: v for k, v in m.items() if k not in ("status", "reason")},
                **self._echo_now(), "t": ev.t}
        self.recent_turns.append(turn)
        fields = {k: v for k, v in turn.items() if k != "t"}
        self.log.info("turn.completed", **fields)

    def _echo_now(self) -> dict[str, Any]:
        """The canceller's figures at the end of a turn (none when it is off); the double-talk
        ones cover this turn alone (since the previous turn ended; a restarted engine
        counts from zero)."""
        aec = (self._call("engine_stats") or {}).get("aec")
        if not isinstance(aec, Mapping):
            return {}
        talk, cut = aec.get("double_talk_frames"), aec.get("double_talk_cut_frames")
        turn_talk = turn_cut = None
        if isinstance(talk, int) and isinstance(cut, int):
            t0, c0 = self._double_talk_seen
            if talk < t0 or cut < c0:
                t0 = c0 = 0
            turn_talk, turn_cut = talk - t0, cut - c0
            self._double_talk_seen = (talk, cut)
        return {"echo_erle_db": aec.get("erle_db"), "echo_residual_dbfs": aec.get("residual_echo_dbfs"),
                "echo_path_delay_ms": aec.get("path_delay_ms"), "echo_gated_frames": aec.get("gated_frames"),
                "echo_leak_frames": aec.get("leak_frames"), "echo_kept_frames": aec.get("kept_frames"),
                "echo_coupling_db": aec.get("echo_coupling_db"), "echo_double_talk_frames": turn_talk,
                "echo_double_talk_cut_share": (round(turn_cut / turn_talk, 3)
                                               if turn_talk and turn_cut is not None else None)}

    def _on_barge_in(self, f: Mapping[str, Any], ev: Event) -> None:
        self.barge_ins.labels(self.label("barge_in", f.get("trigger"))).inc()
        stop = f.get("stop_ms")
        if isinstance(stop, (int, float)) and stop >= 0:
            self.barge_in_stop.observe(stop / 1000)
            self._windows["barge_in_stop_ms"].append(float(stop))

    def _on_tool_call(self, f: Mapping[str, Any], ev: Event) -> None:
        if f.get("call_id") is not None:
            self._remember(self._tool_names, str(f["call_id"]), str(f.get("name") or "unknown"))

    def _on_tool_result(self, f: Mapping[str, Any], ev: Event) -> None:
        name = f.get("name") or self._tool_names.get(str(f.get("call_id")), "unknown")
        tool = self.label("tool", name)
        self.tool_calls.labels(tool, "error" if f.get("error") else "ok").inc()
        d = f.get("duration_ms")
        if isinstance(d, (int, float)) and d >= 0:
            self.tool_duration.labels(tool).observe(d / 1000)
            self._windows["tool_ms"].append(float(d))

    def _on_cancel_requested(self, f: Mapping[str, Any], ev: Event) -> None:
        self.cancels.labels(self.label("cancel", f.get("source"))).inc()

    def _on_service_error(self, f: Mapping[str, Any], ev: Event) -> None:
        self.service_errors.labels(self.label("service_error", f.get("code"))).inc()

    def _on_service_warning(self, f: Mapping[str, Any], ev: Event) -> None:
        self.service_warnings.labels(self.label("service_warning", f.get("code"))).inc()

    def _on_malformed_frame(self, f: Mapping[str, Any], ev: Event) -> None:
        self.malformed.labels(self.label("malformed", f.get("kind"))).inc()

    def _on_plugin_error(self, f: Mapping[str, Any], ev: Event) -> None:
        kind = f.get("kind")
        if kind not in ("error", "timeout"):
            kind = "timeout" if f.get("timeout") or "timeout" in str(f.get("error_type", "")).lower() else "error"
        self.plugin_errors.labels(self.label("plugin", f.get("plugin")), self.label("hook", f.get("hook")), kind).inc()

    def _on_engine_state(self, f: Mapping[str, Any], ev: Event) -> None:
        self.engine_states.labels(self.label("engine_state", f.get("state"))).inc()

    def _on_guard_decision(self, f: Mapping[str, Any], ev: Event) -> None:
        decision = f.get("decision", f.get("outcome", f.get("result")))
        self.guard_decisions.labels(self.label("guard", decision)).inc()

    @staticmethod
    def _remember(d: collections.OrderedDict[str, Any], key: str, value: Any, limit: int = 256) -> None:
        d[key] = value
        d.move_to_end(key)
        while len(d) > limit:
            d.popitem(last=False)

    # ------------------------------------------------------------------ providers
    def _call(self, name: str) -> Any:
        fn = self.providers.get(name)
        if fn is None:
            return None
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a scrape must not fail because a provider did
            self.provider_errors += 1
            self.log.warning("metrics_provider_failed", provider=name, exc_info=True)
            return None

    # ------------------------------------------------------------------ outputs
    def metrics_text(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")

    def snapshot(self) -> dict[str, Any]:
        """Every metric's current value as a compact nested dict (the snapshot log event).

        Counters and gauges: a number, or ``{label value: number}``; histograms: ``count`` and
        ``sum``; plus ``recent``: p50/p95 of the last 100 values of each per-turn latency.
        """
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            name = family.name[len(NS) + 1:] if family.name.startswith(NS + "_") else family.name
            if family.type == "info":
                continue
            if family.type == "histogram":
                entry: dict[str, Any] = {}
                for s in family.samples:
                    if s.name.endswith(("_count", "_sum")):
                        key = s.name.rsplit("_", 1)[1]
                        lbl = ",".join(f"{v}" for v in s.labels.values())
                        if lbl:
                            entry.setdefault(lbl, {})[key] = _num(s.value)
                        else:
                            entry[key] = _num(s.value)
                if entry:
                    out[name] = entry
                continue
            values: dict[str, Any] = {}
            scalar: Any = None
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                if not s.labels:
                    scalar = _num(s.value)
                else:
                    values[",".join(str(v) for v in s.labels.values())] = _num(s.value)
            if values:
                out[name] = values
            elif scalar is not None:
                out[name] = scalar
        recent: dict[str, Any] = {}
        for key, window in self._windows.items():
            if window:
                recent[key] = {"p50": round(_percentile(window, 0.5) or 0.0, 1),
                               "p95": round(_percentile(window, 0.95) or 0.0, 1), "n": len(window)}
        if recent:
            out["recent"] = recent
        return out

    def log_snapshot(self) -> dict[str, Any]:
        snap = self.snapshot()
        self.snapshots += 1
        self.log.info("metrics.snapshot", **snap)
        return snap

    def write_textfile(self, text: str | None = None, path: str | None = None) -> bool:
        """Write the exposition to the textfile-collector path atomically (temp file + rename).

        Generates the text in the calling thread unless given. Returns False (and logs) on an
        I/O error: a full disk must not take the daemon down.
        """
        target = path or self.cfg.textfile
        if not target:
            return False
        if text is None:
            text = self.metrics_text()
        try:
            _atomic_write(Path(target), text)
            return True
        except OSError as exc:
            self.textfile_errors += 1
            self.log.warning("metrics_textfile_failed", path=target, error=str(exc))
            return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Periodic snapshot log event and textfile write, until cancelled.

        ``snapshot_interval_s = 0`` disables the snapshot; the textfile (when configured) is
        written every ``textfile_interval_s`` and once more when the task is cancelled.
        """
        task_status.started()
        snap_every = self.cfg.snapshot_interval_s or None
        file_every = self.textfile_interval_s if self.cfg.textfile else None
        if snap_every is None and file_every is None:
            await trio.sleep_forever()
        now = trio.current_time()
        next_snap = now + snap_every if snap_every else math.inf
        next_file = now if file_every else math.inf  # a first file at once: the scraper sees hydrad up
        try:
            while True:
                await trio.sleep_until(min(next_snap, next_file))
                now = trio.current_time()
                if now >= next_snap:
                    self.log_snapshot()
                    next_snap += snap_every  # type: ignore[operator]
                    if next_snap <= now:
                        next_snap = now + snap_every  # type: ignore[operator]
                if now >= next_file:
                    text = self.metrics_text()
                    await trio.to_thread.run_sync(self.write_textfile, text)
                    next_file = now + file_every  # type: ignore[operator]
        finally:
            if file_every:
                self.write_textfile()  # last values on shutdown (small file, synchronous)


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 6)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hydrad")
    except Exception:  # noqa: BLE001
        return "unknown"


class _PullCollector(Collector):
    """The scrape-time metrics: daemon counters, engine stats, live gauges."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing to check for duplicates at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        engine_counters = m._call("engine_counters") or {}
        daemon = dict(m._call("counters") or {})
        if "plays_dropped_before_engine" in engine_counters:
            daemon["engine.plays_dropped_before_engine"] = engine_counters["plays_dropped_before_engine"]
        yield from self._daemon(daemon)
        yield from self._engine(m._call("engine_stats") or {}, engine_counters)
        yield from self._gauges(m._call("gauges") or {}, m._call("uplink_latency_ms"))
        yield from self._plugins(m._call("plugin_stats"))
        yield from self._extra()
        up = GaugeMetricFamily(f"{NS}_uptime_seconds", "Seconds since the metrics (the daemon) started.")
        up.add_metric([], round(m.clock() - m.started, 3))
        yield up
        pe = CounterMetricFamily(f"{NS}_metrics_provider_errors", "Metric providers that raised during a scrape.")
        pe.add_metric([], m.provider_errors)
        yield pe

    def _daemon(self, counters: Mapping[str, Any]) -> Iterator[Metric]:
        values: dict[str, dict[tuple[str, ...], float]] = collections.defaultdict(dict)
        label_names: dict[str, str | None] = {}
        other: dict[str, float] = {}
        for key, raw in counters.items():
            if not isinstance(raw, (int, float)):
                continue
            key = str(key)
            if key in _DAEMON_EXACT:
                metric, lname, lval = _DAEMON_EXACT[key]
                label_names[metric] = lname
                lk = (lval,) if lname else ()
                values[metric][lk] = values[metric].get(lk, 0.0) + raw
                continue
            for prefix, (metric, lname) in _DAEMON_PREFIX.items():
                if key.startswith(prefix):
                    label_names[metric] = lname
                    lk = (self.m.label(metric, key[len(prefix):]),)
                    values[metric][lk] = values[metric].get(lk, 0.0) + raw
                    break
            else:
                if not key.startswith(_DAEMON_FROM_EVENTS):
                    name = self.m.label("daemon_counter", key)
                    other[name] = other.get(name, 0.0) + raw
        # Always present, so a scrape of an idle daemon shows the zeros.
        for metric in ("uplink_frames_sent", "audio_deltas_received", "client_frames_unsent"):
            values.setdefault(metric, {}).setdefault((), 0.0)
            label_names.setdefault(metric, None)
        values.setdefault("uplink_frames_dropped", {}).setdefault(("backlog",), 0.0)
        label_names.setdefault("uplink_frames_dropped", "reason")
        for metric, series in sorted(values.items()):
            lname = label_names.get(metric)
            fam = CounterMetricFamily(f"{NS}_{metric}", _DOCS.get(metric, metric), labels=[lname] if lname else [])
            for lk, v in sorted(series.items()):
                fam.add_metric(list(lk), v)
            yield fam
        if other:
            fam = CounterMetricFamily(f"{NS}_daemon_counter", "Other daemon counters, by name (see docs/metrics.md).",
                                      labels=["name"])
            for name, v in sorted(other.items()):
                fam.add_metric([name], v)
            yield fam

    def _echo(self, aec: Any, mono: Any) -> Iterator[Metric]:
        """The echo canceller's figures (absent when audio.aec is off or system)."""
        if not isinstance(aec, Mapping):
            return
        for key, metric, scale, doc in (
                ("erle_db", "echo_erle_db", 1.0, "Echo return loss enhancement: median over the last 5 s of agent speech."),
                ("residual_echo_dbfs", "echo_residual_dbfs", 1.0, "Residual echo after the canceller: median level while the agent speaks."),
                ("path_delay_ms", "echo_path_delay_seconds", 0.001, "Estimated echo path delay (DAC to ADC)."),
                ("echo_coupling_db", "echo_coupling_db", 1.0,
                 "The echo path's peak gain (mic over far end), measured at the start of the last reply."),
        ):
            v = aec.get(key)
            if isinstance(v, (int, float)):
                g = GaugeMetricFamily(f"{NS}_{metric}", doc)
                g.add_metric([], v * scale)
                yield g
        gated = CounterMetricFamily(f"{NS}_echo_gated_frames", "10 ms capture frames the residual echo gate muted.")
        gated.add_metric([], mono("aec.gated_frames", aec.get("gated_frames")) or 0.0)
        yield gated
        leaked = CounterMetricFamily(f"{NS}_echo_leak_frames",
                                     "Of those, frames muted because the canceller had lost the echo path (leak check).")
        leaked.add_metric([], mono("aec.leak_frames", aec.get("leak_frames")) or 0.0)
        yield leaked
        for key, metric, doc in (
                ("kept_frames", "echo_kept_frames",
                 "Frames AEC3 suppressed as echo that the echo path cannot explain: the user's voice went up instead."),
                ("double_talk_frames", "echo_double_talk_frames",
                 "Frames holding the user's voice while the agent played (double talk)."),
                ("double_talk_cut_frames", "echo_double_talk_cut_frames",
                 "Of those, frames that went up 10 dB or more under the microphone: the canceller cut the user."),
        ):
            fam = CounterMetricFamily(f"{NS}_{metric}", doc)
            fam.add_metric([], mono(f"aec.{key}", aec.get(key)) or 0.0)
            yield fam
        resyncs = CounterMetricFamily(f"{NS}_echo_resyncs",
                                      "Times the canceller put its two streams back in step (a stream lost frames).")
        resyncs.add_metric([], mono("aec.resyncs", aec.get("resyncs")) or 0.0)
        yield resyncs

    def _engine(self, stats: Mapping[str, Any], counters: Mapping[str, Any]) -> Iterator[Metric]:
        mono = self.m._engine_mono
        if stats and stats.get("pid") is not None:
            # Exact when the engine reports its pid. Without it, a value that went down is a
            # reset (a restart count is no epoch: last_stats stays stale until the new engine's
            # first STATS, and that would count the old values twice).
            mono.new_epoch(stats["pid"])
        for key, (metric, scale, doc) in _ENGINE_CUMULATIVE.items():
            v = mono(key, stats.get(key)) if stats else mono(key, None)
            fam = CounterMetricFamily(f"{NS}_{metric}", doc)
            fam.add_metric([], (v or 0.0) * scale)
            yield fam
        drops = CounterMetricFamily(f"{NS}_engine_audio_dropped",
                                    "Audio the engine discarded before playing it, by reason (engine units).", labels=["reason"])
        for key, reason in _ENGINE_DROPS.items():
            v = mono(key, stats.get(key)) if stats else mono(key, None)
            drops.add_metric([reason], v or 0.0)
        yield drops
        flags = stats.get("flags") if stats else None
        fam = CounterMetricFamily(f"{NS}_engine_status_flags", "Audio callback status flags seen (PortAudio), by flag.",
                                  labels=["flag"])
        if isinstance(flags, Mapping):
            for flag, n in sorted(flags.items()):
                v = mono("flag." + str(flag), n)
                if v is not None:
                    fam.add_metric([self.m.label("flag", flag)], v)
        yield fam
        for key, metric, doc in (("restarts", "engine_restarts", "Audio engine process restarts."),
                                 ("hangs", "engine_hangs", "Audio engine hangs detected (no pong) and killed.")):
            fam = CounterMetricFamily(f"{NS}_{metric}", doc)
            fam.add_metric([], float(counters.get(key, 0) or 0))
            yield fam
        yield from self._echo(stats.get("aec") if stats else None, mono)
        buf = GaugeMetricFamily(f"{NS}_playback_buffer_seconds", "Audio queued in the engine's playout buffer (depth).")
        if isinstance(stats.get("buffer_ms") if stats else None, (int, float)):
            buf.add_metric([], stats["buffer_ms"] / 1000)
        else:
            buf.add_metric([], 0.0)
        yield buf
        if stats:
            cb = GaugeMetricFamily(f"{NS}_engine_callback_duration_seconds",
                                   "Audio callback run time over the last stats interval.", labels=["stat"])
            for key, stat in (("callback_us_mean", "mean"), ("callback_us_max", "max")):
                if isinstance(stats.get(key), (int, float)):
                    cb.add_metric([stat], stats[key] / 1e6)
            yield cb
            if isinstance(stats.get("writer_queue"), (int, float)):
                wq = GaugeMetricFamily(f"{NS}_engine_writer_queue", "Messages waiting in the engine's pipe writer.")
                wq.add_metric([], stats["writer_queue"])
                yield wq
            dev = GaugeMetricFamily(f"{NS}_engine_device_open", "1 while the engine reports its devices open.")
            dev.add_metric([], 1.0 if stats.get("device_state") in (None, "open") else 0.0)
            yield dev

    def _plugins(self, stats: Any) -> Iterator[Metric]:
        if not isinstance(stats, Mapping):
            return
        calls = CounterMetricFamily(f"{NS}_plugin_hook_calls", "Plugin hook calls, by plugin.", labels=["plugin"])
        errors = CounterMetricFamily(f"{NS}_plugin_hook_failures",
                                     "Plugin hook failures, by plugin and kind (error, timeout, serve_error).",
                                     labels=["plugin", "kind"])
        dropped = CounterMetricFamily(f"{NS}_plugin_events_dropped",
                                      "Events a plugin lost because its queue was full, by plugin.", labels=["plugin"])
        for plugin, c in sorted(stats.items()):
            if not isinstance(c, Mapping):
                continue
            name = self.m.label("plugin", plugin)
            calls.add_metric([name], float(c.get("calls", 0) or 0))
            for key, kind in (("errors", "error"), ("timeouts", "timeout"), ("serve_errors", "serve_error")):
                errors.add_metric([name, kind], float(c.get(key, 0) or 0))
            dropped.add_metric([name], float(c.get("dropped", 0) or 0))
        yield calls
        yield errors
        yield dropped

    def _extra(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(f"{NS}_component_counter", "Counters of other components (control socket, ...).",
                                  labels=["component", "name"])
        any_ = False
        for key in [k for k in self.m.providers if k.startswith("extra:")]:
            values = self.m._call(key)
            if not isinstance(values, Mapping):
                continue
            component = key[len("extra:"):]
            for name, v in sorted(values.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    fam.add_metric([component, self.m.label("component:" + component, name)], float(v))
                    any_ = True
        if any_:
            yield fam

    def _gauges(self, gauges: Mapping[str, Any], latencies: Any) -> Iterator[Metric]:
        for key, metric, doc in (
            ("uplink_backlog_frames", "uplink_backlog_frames", "Microphone frames waiting to be sent (uplink backlog)."),
            ("playback_queue_chunks", "playback_queue_chunks", "Response audio chunks waiting for the engine (daemon side)."),
            ("muted", "muted", "1 while the microphone is muted (silence is streamed)."),
        ):
            fam = GaugeMetricFamily(f"{NS}_{metric}", doc)
            v = gauges.get(key)
            fam.add_metric([], float(v) if isinstance(v, (int, float)) else 0.0)
            yield fam
        if latencies is not None:
            values = [float(x) for x in list(latencies)]
            fam = GaugeMetricFamily(f"{NS}_uplink_latency_seconds",
                                    "Capture (ADC) -> sent on the socket, over the last 500 frames.", labels=["quantile"])
            for q in (0.5, 0.95, 1.0):
                p = _percentile(values, q)
                if p is not None:
                    fam.add_metric([str(q) if q < 1 else "max"], p / 1000)
            yield fam
