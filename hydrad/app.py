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
from .events import EventBus
from .pipeline.daemon import Daemon

log = structlog.get_logger("hydrad")


def load_for_run(path: str | None) -> tuple[Config, Secret | None]:
    cfg = load_config(path)
    return cfg, load_api_key(cfg)


async def handle_signals(daemon: Daemon, config_path: str | None) -> None:
    """SIGINT/SIGTERM: graceful stop. SIGHUP: reload (validated first; the old config stays on error)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    cfg, key = load_for_run(config_path)
                except ConfigError as exc:
                    log.error("reload_rejected", problems=exc.problems, kept=daemon.cfg.source)
                    continue
                daemon.reload(cfg, key)
                log.info("reloaded", source=cfg.source)
            else:
                log.info("signal", signal=signal.Signals(signum).name)
                daemon.request_stop()
                return


async def run_app(cfg: Config, api_key: Secret | None, config_path: str | None = None,
                  *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Everything ``hydrad run`` runs, started in dependency order, stopped by the daemon."""
    from .observe.logging import configure_logging, log_context
    from .observe.metrics import Metrics

    configure_logging(cfg.log, secrets=[api_key])
    bus = EventBus()
    bus.subscribe(log_context)
    daemon = Daemon(cfg, api_key, bus=bus)
    metrics = Metrics.for_daemon(daemon, cfg.metrics)
    bus.subscribe(metrics)
    async with trio.open_nursery() as nursery:
        if cfg.recording.enabled:
            from .observe.recorder import Recorder

            recorder = Recorder(cfg.recording)
            bus.subscribe(recorder)
            await nursery.start(recorder.run)
            daemon.recorder = recorder
        nursery.start_soon(metrics.run)
        await nursery.start(daemon.run)
        nursery.start_soon(handle_signals, daemon, config_path)
        log.info("started", config=cfg.source, backend=cfg.audio.backend, model=cfg.hydra.model)
        task_status.started(daemon)
        await daemon.stopped.wait()
        nursery.cancel_scope.cancel()


def check_config_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hydrad check-config")
    parser.add_argument("config")
    args = parser.parse_args(argv)
    try:
        cfg, key = load_for_run(args.config)
    except ConfigError as exc:
        print(f"hydrad: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK (api key: {'found, ' + key.origin if key else 'none'})")
    return 0


def plugins_main(argv: list[str]) -> int:
    print("no plugin support yet", file=sys.stderr)
    return 1
