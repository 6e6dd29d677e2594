"""Readiness, status and the watchdog: what hydrad tells systemd, and when.

One task, :meth:`ServiceMonitor.run`, watches the :class:`~hydrad.pipeline.daemon.Daemon`
through what it exposes (``state``, ``counters``, ``configured_event``, ``engine``,
``last_end``, ``stopped``) and speaks sd_notify (:mod:`hydrad.service.notify`).

**Readiness** (``READY=1``, sent once). The first of:

1. the engine is running and the first session is configured (``daemon.configured_event``):
   the normal case, the kiosk can talk;
2. the engine is running and the first connection attempt has *ended* (the daemon is in
   ``backoff`` or ``auth_failed``): the service is unreachable or refuses us, hydrad is up and
   retrying (or waiting for a new key) and ``hydrad ctl`` works: readiness must not block
   boot on the network;
3. ``ready_bound_s`` (default 30 s) after start, whatever the state (engine still failing,
   a connect that hangs until ``hydra.connect_timeout_s``): ``STATUS=`` says what is missing.

The bound must stay below the unit's ``TimeoutStartSec=`` (90 s in ``systemd/hydrad.service``).

**Health** (``WATCHDOG=1`` is sent every ``WATCHDOG_USEC/2`` *only while healthy*, so a
wedged pipeline stops the pings and systemd restarts the service after ``WatchdogSec=``).
Healthy means all of:

* the trio event loop runs (implicit: this task would not run otherwise);
* while a session is ``connected`` with the mic gate open, the uplink sends frames:
  ``counters["uplink_frames_sent"]`` advanced within ``uplink_stall_s`` (it streams 50
  frames/s, silence included, whatever the engine does);
* the engine answers: while ``engine.state == "running"``, a new ``STATS`` report (every
  second) arrived within ``engine_stale_s``; while it is not running, its restart loop makes
  progress (state or restart count changed within ``engine_stuck_s``);
* the session loop makes progress: no daemon state other than ``connected`` and
  ``auth_failed`` lasts longer than its own timeouts allow (``connecting``/``handshaking``:
  ``2 x hydra.connect_timeout_s + 10 s``; ``backoff``: ``reconnect.server_full_max_s + 10 s``;
  ``auth_failed`` waits up to ``reconnect.auth_retry_s`` by design).

A disconnected daemon that retries correctly is healthy: restarting it would not bring the
network back. A 401 is healthy too (the daemon stays up for ``ctl`` and a reload).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog
import trio

from .notify import Notifier

log = structlog.get_logger("hydrad.service")


@dataclass(frozen=True)
class HealthPolicy:
    uplink_stall_s: float = 3.0
    engine_stale_s: float | None = None  # default: pipeline.engine_hang_s + 5
    engine_stuck_s: float = 30.0
    connect_stuck_s: float | None = None  # default: 2 * hydra.connect_timeout_s + 10
    backoff_stuck_s: float | None = None  # default: reconnect.server_full_max_s + 10
    ready_bound_s: float = 30.0
    tick_s: float = 0.2


@dataclass
class Health:
    ok: bool
    reasons: list[str] = field(default_factory=list)


class ServiceMonitor:
    """The readiness/status/watchdog task for one daemon. See the module documentation."""

    def __init__(self, daemon: Any, notifier: Notifier, policy: HealthPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.daemon = daemon
        self.notifier = notifier
        self.policy = policy or HealthPolicy()
        self.clock = clock
        self.ready_sent = False
        self.ready_reason: str | None = None
        self.stopping_sent = False
        self.pings = 0
        self.withheld = 0
        self.health = Health(True)
        self._t0 = clock()
        now = self._t0
        self._uplink_seen = (-1, now)
        self._stats_seen: tuple[Any, float] = (None, now)
        self._engine_seen: tuple[Any, float] = (None, now)
        self._phase_seen: tuple[Any, float] = (None, now)
        self._last_ping = -1e9
        self._reload_note: str | None = None

    # ------------------------------------------------------------------ policy
    def _limits(self) -> tuple[float, float, float]:
        cfg = self.daemon.cfg
        p = self.policy
        stale = p.engine_stale_s if p.engine_stale_s is not None else cfg.pipeline.engine_hang_s + 5.0
        connect = p.connect_stuck_s if p.connect_stuck_s is not None else 2 * cfg.hydra.connect_timeout_s + 10.0
        backoff = p.backoff_stuck_s if p.backoff_stuck_s is not None else \
            max(cfg.reconnect.server_full_max_s, cfg.reconnect.max_s) + 10.0
        return stale, connect, backoff

    def check(self) -> Health:
        """Evaluate health now (and update the progress trackers)."""
        d = self.daemon
        now = self.clock()
        stale_s, connect_s, backoff_s = self._limits()
        reasons: list[str] = []

        # Uplink: while connected with the gate open the counter must move.
        sent = int(d.counters["uplink_frames_sent"])
        must_stream = d.state == "connected" and d.gate_open
        if sent != self._uplink_seen[0] or not must_stream:
            self._uplink_seen = (sent, now)
        elif now - self._uplink_seen[1] > self.policy.uplink_stall_s:
            reasons.append(f"uplink stalled for {now - self._uplink_seen[1]:.1f} s (connected, no frame sent)")

        # Engine: fresh STATS while running; a moving restart loop otherwise.
        eng = d.engine
        stats = eng.last_stats
        if eng.state != "running" or stats is not self._stats_seen[0]:
            self._stats_seen = (stats, now)
        elif now - self._stats_seen[1] > stale_s:
            reasons.append(f"engine running but silent for {now - self._stats_seen[1]:.1f} s")
        ekey = (eng.state, eng.restarts, eng.pid)
        if ekey != self._engine_seen[0] or eng.state == "running":
            self._engine_seen = (ekey, now)
        elif now - self._engine_seen[1] > self.policy.engine_stuck_s:
            reasons.append(f"engine stuck in {eng.state!r} for {now - self._engine_seen[1]:.1f} s")

        # Session loop: every phase but connected/auth_failed is bounded by its own timeouts.
        phase = (d.state, d.sessions, sum(v for k, v in d.counters.items() if k.startswith("reconnects.")))
        if phase != self._phase_seen[0]:
            self._phase_seen = (phase, now)
        dwell = now - self._phase_seen[1]
        limit = {"connecting": connect_s, "handshaking": connect_s, "starting": connect_s,
                 "backoff": backoff_s}.get(d.state)
        if limit is not None and dwell > limit:
            reasons.append(f"session loop stuck in {d.state!r} for {dwell:.1f} s")

        self.health = Health(not reasons, reasons)
        return self.health

    def readiness(self) -> str | None:
        """Why the daemon counts as ready now, or None (see the module documentation)."""
        d = self.daemon
        engine_up = d.engine.state == "running"
        if engine_up and d.configured_event.is_set():
            return "session configured"
        if engine_up and d.state in ("backoff", "auth_failed"):
            return "service unreachable, retrying"
        if self.clock() - self._t0 >= self.policy.ready_bound_s:
            return f"readiness bound ({self.policy.ready_bound_s:g} s) reached"
        return None

    def status_line(self) -> str:
        """One line for ``STATUS=``: what the daemon is doing, and what is wrong if anything."""
        d = self.daemon
        cfg = d.cfg
        host = urlsplit(cfg.hydra.url).netloc or cfg.hydra.url
        end = d.last_end
        state = d.state
        if state == "connected":
            conv = d.conversation
            sid = conv.session_id if conv is not None else None
            text = f"connected to {host} (session {sid}, {d.sessions} session(s) so far)"
        elif state == "auth_failed":
            text = (f"NOT CONNECTED: API key refused by {host} (HTTP 401); fix the credential and "
                    f"`systemctl reload hydrad` (automatic retry every {cfg.reconnect.auth_retry_s:g} s)")
        elif state == "backoff" and end is not None and end.kind == "server_full":
            text = f"service busy (server_full / 1013): retrying with backoff up to {cfg.reconnect.server_full_max_s:g} s"
        elif state == "backoff":
            why = end.detail if end is not None else "disconnected"
            text = f"reconnecting to {host}: {why}"
        elif state in ("connecting", "handshaking"):
            text = f"{state} to {host}" + (f" (last: {end.detail})" if end is not None else "")
        elif state == "stopping":
            text = "stopping"
        else:
            text = state
        eng = d.engine
        if eng.state != "running" and state != "stopping":
            text += f"; audio engine {eng.state} (restarts {eng.restarts})"
        if d.muted:
            text += "; muted"
        if not self.health.ok:
            text += "; UNHEALTHY: " + ", ".join(self.health.reasons)
        if self._reload_note:
            text += f"; {self._reload_note}"
        return text

    # ------------------------------------------------------------------ app hooks
    def stopping(self) -> None:
        """SIGTERM received (the app calls this before ``daemon.request_stop()``)."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.stopping("stopping: closing the session")

    def reloading(self) -> None:
        """SIGHUP received, before the new config is validated.

        Only once ready: systemd acts on ``RELOADING=1`` in the running state only, and the
        readiness logic keeps sending the first ``READY=1``.
        """
        if self.ready_sent:
            self.notifier.reloading("reloading configuration")

    def reloaded(self, ok: bool, detail: str) -> None:
        """After a reload: ``READY=1`` ends the reload in either case (the old config stays on error)."""
        self._reload_note = None if ok else f"reload rejected, old config kept: {detail}"
        if self.ready_sent:
            self.notifier.ready(self.status_line())
        else:
            self.notifier.status(self.status_line())

    # ------------------------------------------------------------------ the task
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Until ``daemon.stopped``: READY once, STATUS on change, WATCHDOG while healthy."""
        n = self.notifier
        period = (n.watchdog_usec / 2e6) if n.watchdog_enabled and n.watchdog_usec else None
        tick = self.policy.tick_s if period is None else min(self.policy.tick_s, period / 2)
        last_status: str | None = None
        was_ok = True
        task_status.started()
        try:
            while not self.daemon.stopped.is_set():
                if self.daemon.state == "stopping":
                    self.stopping()
                    await self.daemon.stopped.wait()
                    break
                health = self.check()
                if health.ok != was_ok:
                    was_ok = health.ok
                    if health.ok:
                        log.info("health_recovered")
                    else:
                        log.warning("health_failed", reasons=health.reasons, watchdog=period is not None)
                if not self.ready_sent:
                    reason = self.readiness()
                    if reason is not None:
                        self.ready_sent, self.ready_reason = True, reason
                        last_status = self.status_line()
                        n.ready(last_status)
                        log.info("service_ready", reason=reason, after_s=round(self.clock() - self._t0, 2))
                status = self.status_line()
                if status != last_status:
                    last_status = status
                    n.status(status)
                if period is not None:
                    now = self.clock()
                    if health.ok and now - self._last_ping >= period:
                        self._last_ping = now
                        self.pings += 1
                        n.watchdog()
                    elif not health.ok and now - self._last_ping >= period:
                        self.withheld += 1
                await trio.sleep(tick)
        finally:
            self.stopping()

    def snapshot(self) -> dict[str, Any]:
        """For ``status`` and the control socket."""
        return {"ready": self.ready_sent, "ready_reason": self.ready_reason, "healthy": self.health.ok,
                "reasons": list(self.health.reasons), "watchdog_usec": self.notifier.watchdog_usec,
                "watchdog_pings": self.pings, "notify_errors": self.notifier.errors}
