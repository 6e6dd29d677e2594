"""``hydrad sim``: run the simulator in the foreground until Ctrl-C.

Flags override the scenario file, which overrides the reference-§8 defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from typing import Any

import trio

from .config import ScenarioError, SimConfig, load_scenario
from .server import Simulator

DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydrad sim", description="Run a local, protocol-faithful Hydra simulator.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT}; 0 = any)")
    p.add_argument("--scenario", metavar="FILE", help="TOML or JSON scenario file (see docs/simulator.md)")
    p.add_argument("--reply-s", type=float, help="reply length in seconds (default 2.0)")
    p.add_argument("--realtime-factor", type=float, help="reply generation speed vs real time (default 5; 0 = instant)")
    p.add_argument("--delta-ms", type=int, help="audio per output delta (default 100)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions before server_full + 1013")
    p.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, help="idle close after N s (default 30)")
    p.add_argument("--tool-timeout", dest="tool_timeout_s", type=float, help="tool_response_timeout after N s (default 10)")
    p.add_argument("--voice-validation", choices=("error", "legacy_fallback"), help="unknown voice handling")
    p.add_argument("--unknown-type", choices=("ignore", "invalid_frame"), help="unknown client event types")
    p.add_argument("--honour-output-rate", action="store_true", default=None,
                   help="use the client's requested output_audio_sample_rate")
    p.add_argument("--transcripts", action="store_true", default=None,
                   help="emit response.output_audio_transcript.delta")
    p.add_argument("--barge-in-extra-events", action="store_true", default=None,
                   help="send output_audio.done + item.done before a cancelled response.done")
    p.add_argument("--no-input-speed-guard", action="store_true", help="allow audio faster than real time")
    p.add_argument("--no-auth", action="store_true", help="accept connections without an API key")
    p.add_argument("--bad-key", action="append", default=[], metavar="KEY", help="refuse this key with HTTP 401")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections and sessions")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    config = load_scenario(args.scenario) if args.scenario else SimConfig()
    changes: dict[str, Any] = {}
    for name in ("reply_s", "realtime_factor", "delta_ms", "max_sessions", "idle_timeout_s", "tool_timeout_s",
                 "voice_validation", "unknown_type", "honour_output_rate", "transcripts", "barge_in_extra_events"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.no_input_speed_guard:
        changes["max_input_speed"] = None
    if args.no_auth:
        changes["require_key"] = False
    if args.bad_key:
        changes["bad_keys"] = frozenset(config.bad_keys | set(args.bad_key))
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(args)
    except (ScenarioError, OSError) as exc:
        print(f"hydrad sim: {exc}", file=sys.stderr)
        return 2
    sim = Simulator(config)

    async def run() -> None:
        # Own the signals so Ctrl-C / SIGTERM is a clean cancel, not a KeyboardInterrupt
        # surfacing from inside some connection task.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(sim.serve, args.host, args.port)
                print(f"hydrad sim listening; connect to: {sim.url(api_key='sim-key')}", flush=True)
                print("(any non-empty api_key works unless configured otherwise; Ctrl-C to stop)", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except Exception as exc:
        os_error = _find(exc, OSError)
        if os_error is None:
            raise
        print(f"hydrad sim: cannot listen on {args.host}:{args.port}: {os_error}", file=sys.stderr)
        return 1
    return 0


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` inside (possibly nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
