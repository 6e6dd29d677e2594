"""Composition: the one place where the daemon, its observers and its interfaces are wired.

Each component has its own module and knows only its seam (docs/architecture.md); this file
decides which ones run for ``hydrad run`` and in what order they start and stop.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import structlog
import trio

from .config import Config, ConfigError, Secret, load_api_key, load_config
from .control.server import ControlServer, ControlSocketError
from .events import EventBus
from .hooks import HookDispatcher, PluginTools, describe_plugins, format_plugins, load_plugins
from .pipeline.daemon import Daemon
from .service.health import ServiceMonitor
from .service.notify import Notifier

log = structlog.get_logger("hydrad")


def load_for_run(path: str | None) -> tuple[Config, Secret | None]:
    """Config, API key and plugin settings, all validated before anything starts."""
    cfg = load_config(path)
    key = load_api_key(cfg)
    load_plugins(cfg)  # plugin tables are validated by their plugins, errors named by plugin
    return cfg, key


async def handle_signals(daemon: Daemon, config_path: str | None, monitor: ServiceMonitor | None = None) -> None:
    """SIGINT/SIGTERM: graceful stop. SIGHUP: reload (validated first; the old config stays on error).

    ``monitor`` tells systemd: RELOADING=1 ... READY=1 around a reload, STOPPING=1 on stop.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if monitor is not None:
                    monitor.reloading()
                try:
                    cfg, key = load_for_run(config_path)
                except ConfigError as exc:
                    log.error("reload_rejected", problems=exc.problems, kept=daemon.cfg.source)
                    if monitor is not None:
                        monitor.reloaded(False, "; ".join(exc.problems))
                    continue
                daemon.reload(cfg, key)
                log.info("reloaded", source=cfg.source)
                if monitor is not None:
                    monitor.reloaded(True, cfg.source)
            else:
                log.info("signal", signal=signal.Signals(signum).name)
                if monitor is not None:
                    monitor.stopping()
                daemon.request_stop()
                return


async def run_app(cfg: Config, api_key: Secret | None, config_path: str | None = None,
                  *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Everything ``hydrad run`` runs, started in dependency order, stopped by the daemon."""
    from .observe.logging import configure_logging, log_context
    from .observe.metrics import Metrics

    configure_logging(cfg.log, secrets=[api_key])
    plugins = load_plugins(cfg)
    bus = EventBus()
    # $NOTIFY_SOCKET / $WATCHDOG_*: read once, then removed from the environment so the engine
    # and plugin children do not inherit them (this runs before anything is spawned).
    notifier = Notifier.from_environ(unset=True)
    bus.subscribe(log_context)
    daemon = Daemon(cfg, api_key, tools=PluginTools(plugins), bus=bus)
    monitor = ServiceMonitor(daemon, notifier)
    dispatcher = HookDispatcher(plugins, daemon, bus)
    metrics = Metrics.for_daemon(daemon, cfg.metrics, plugin_stats=lambda: dispatcher.stats,
                                 extra_counters={"control": lambda: control.counters})
    bus.subscribe(metrics)
    daemon.metrics_text = metrics.metrics_text  # type: ignore[method-assign]
    control = ControlServer(cfg.control, daemon)
    refused: ControlSocketError | None = None
    async with trio.open_nursery() as nursery:
        # The control socket first: an unsafe socket path refuses the start before the engine
        # and the WebSocket are up.
        try:
            await nursery.start(control.run)
        except ControlSocketError as exc:
            refused = exc
            nursery.cancel_scope.cancel()
        else:
            await _run_components(nursery, cfg, config_path, bus, daemon, dispatcher, metrics, task_status, monitor)
    if refused is not None:
        log.error("control_socket_refused", error=str(refused))
        notifier.status(f"not started: {refused}")
        raise refused


async def _run_components(nursery: trio.Nursery, cfg: Config, config_path: str | None, bus: EventBus,
                          daemon: Daemon, dispatcher: Any, metrics: Any, task_status: Any,
                          monitor: ServiceMonitor | None = None) -> None:
    """The observers, the plugins and the daemon, once the control socket is safely up."""
    await nursery.start(dispatcher.run)
    if cfg.recording.enabled:
        from .observe.recorder import Recorder

        recorder = Recorder(cfg.recording)
        bus.subscribe(recorder)
        await nursery.start(recorder.run)
        daemon.recorder = recorder
    nursery.start_soon(metrics.run)
    await nursery.start(daemon.run)
    nursery.start_soon(handle_signals, daemon, config_path, monitor)
    if monitor is not None:
        nursery.start_soon(monitor.run)  # READY=1, STATUS=, WATCHDOG=1 while healthy, STOPPING=1
    log.info("started", config=cfg.source, backend=cfg.audio.backend, model=cfg.hydra.model)
    task_status.started(daemon)
    await daemon.stopped.wait()
    await dispatcher.aclose()  # plugins still see session_disconnected and their shutdown hook
    nursery.cancel_scope.cancel()


def _quiet_logging() -> None:
    """Command-line tools print results on stdout; only warnings go to stderr."""
    from .config import LogConfig
    from .observe.logging import configure_logging

    configure_logging(LogConfig(level="warning", format="console"), stream=sys.stderr)


def check_config_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hydrad check-config")
    parser.add_argument("config")
    args = parser.parse_args(argv)
    _quiet_logging()
    try:
        cfg, key = load_for_run(args.config)
    except ConfigError as exc:
        print(f"hydrad: {exc}", file=sys.stderr)
        return 2
    if cfg.audio.backend == "sounddevice":
        from .engine.devices import check_devices

        problems = check_devices(cfg.audio.sounddevice.input_device, cfg.audio.sounddevice.output_device)
        if cfg.audio.aec in ("auto", "webrtc"):
            from .engine.aec import AecUnavailable, load_rtc

            try:
                load_rtc()
            except AecUnavailable as exc:
                problems.append(f"audio.aec = {cfg.audio.aec!r}: {exc}")
        if problems:
            print("hydrad: " + "\n".join(problems), file=sys.stderr)
            return 2
    print(f"{args.config}: OK (api key: {'found, ' + key.origin if key else 'none'})")
    return 0


def plugins_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hydrad plugins", description="List plugins, their hooks and tools.")
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _quiet_logging()
    try:
        rows = describe_plugins(load_plugins(load_config(args.config)))
    except ConfigError as exc:
        print(f"hydrad: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_plugins(rows))
    return 0
