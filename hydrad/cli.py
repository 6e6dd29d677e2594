"""``hydrad`` command line: thin wrappers, each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError

EXIT_CONFIG = 2


def _run(args: argparse.Namespace) -> int:
    import trio

    from .app import load_for_run, run_app
    from .control.server import ControlSocketError
    from .service.stdio import harden_stdio

    harden_stdio()  # before logging is set up: a full disk or a dead journald must not kill the daemon
    try:
        cfg, key = load_for_run(args.config)
    except ConfigError as exc:
        print(f"hydrad: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        trio.run(run_app, cfg, key, args.config)
    except ControlSocketError as exc:  # may clear on a restart (another daemon still listening)
        print(f"hydrad: control socket: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    import trio

    from .demo import run_demo

    return trio.run(run_demo, args.out, args.quiet)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hydrad", description="Full-duplex voice agent daemon for Hydra.")
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="run the daemon (what the systemd unit starts)")
    p_run.add_argument("--config", "-c", default=None, help="TOML config (default /etc/hydrad/hydrad.toml)")
    p_demo = sub.add_parser("demo", help="a full offline conversation against the embedded simulator")
    p_demo.add_argument("--out", default="demo-out", help="directory for the speaker WAV and the timeline")
    p_demo.add_argument("--quiet", action="store_true", help="print only the timeline")
    sub.add_parser("sim", help="run the Hydra simulator", add_help=False)
    sub.add_parser("devices", help="list audio devices", add_help=False)
    sub.add_parser("ctl", help="talk to a running daemon over its control socket", add_help=False)
    sub.add_parser("plugins", help="list installed plugins, their hooks and tools", add_help=False)
    sub.add_parser("timeline", help="render a debug recording as a PNG timeline", add_help=False)
    sub.add_parser("check-config", help="validate a config file and exit", add_help=False)

    if argv and argv[0] in ("sim", "devices", "ctl", "plugins", "timeline", "check-config"):
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        return _demo(args)
    parser.print_help()
    return 0 if args.command is None else 2


def _delegate(name: str, rest: list[str]) -> int:
    """Subcommands with their own argument parsers, imported only when used."""
    if name == "sim":
        from .sim.cli import main as sim_main

        return sim_main(rest)
    if name == "devices":
        from .engine.devices import devices_main

        return devices_main(rest)
    if name == "ctl":
        from .control.ctl import ctl_main

        return ctl_main(rest)
    if name == "plugins":
        from .app import plugins_main

        return plugins_main(rest)
    if name == "timeline":
        from .observe.timeline import timeline_main

        return timeline_main(rest)
    if name == "check-config":
        from .app import check_config_main

        return check_config_main(rest)
    raise AssertionError(name)


if __name__ == "__main__":
    raise SystemExit(main())
