"""``hydrad ctl``: drive a running hydrad over its control socket.

    hydrad ctl status [--socket PATH] [--json] [--timeout S]

Human-readable output by default, the daemon's JSON response with ``--json``. Exit status 0
on success; otherwise a one-line reason on stderr and a status saying what went wrong
(see :mod:`hydrad.control.client` and docs/control.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from . import protocol as P
from .client import EXIT_OK, EXIT_USAGE, ControlError, raise_for_error, request

#: overrides the socket path when --socket is not given
SOCKET_ENV = "HYDRAD_CONTROL_SOCKET"
DEFAULT_TIMEOUT_S = 5.0


def build_parser(prog: str = "hydrad ctl") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Drive a running hydrad over its control socket.",
        epilog="commands: " + "; ".join(f"{k}: {v}" for k, v in P.COMMANDS.items())
        + ". Exit status: 0 ok, 1 the daemon answered with an error, 2 usage, 3 not running, "
          "4 refused, 5 timed out, 6 bad reply.")
    p.add_argument("command", choices=list(P.COMMANDS), help="what to do")
    p.add_argument("--socket", "-s", metavar="PATH",
                   help=f"control socket (default: ${SOCKET_ENV}, else control.socket from --config or "
                        "/etc/hydrad/hydrad.toml, else /run/hydrad/control.sock)")
    p.add_argument("--config", "-c", metavar="FILE", help="take the socket path from this hydrad config file")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON response instead of text")
    p.add_argument("--timeout", "-t", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"give up after S seconds (default {DEFAULT_TIMEOUT_S})")
    return p


class _UsageError(Exception):
    pass


def socket_path(args: argparse.Namespace, env: dict[str, str] | os._Environ[str] | None = None) -> str:
    env = os.environ if env is None else env
    if args.socket:
        return str(args.socket)
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    from ..config import ConfigError, ControlConfig, load_config

    if args.config:
        try:
            return load_config(args.config).control.socket
        except ConfigError as exc:
            raise _UsageError(f"cannot read the socket path from {args.config}: "
                              + "; ".join(exc.problems)) from None
    try:
        return load_config(None).control.socket
    except (ConfigError, OSError):
        # The default config may be unreadable for an operator; the built-in path still works.
        return ControlConfig().socket


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); argparse printed why
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    if not args.timeout > 0:
        print("hydrad ctl: --timeout must be a positive number of seconds", file=err)
        return EXIT_USAGE
    try:
        path = socket_path(args)
    except _UsageError as exc:
        print(f"hydrad ctl: {exc}", file=err)
        return EXIT_USAGE
    try:
        reply = request(path, args.command, timeout=args.timeout)
        if args.json:
            _emit(out, json.dumps(reply.response, indent=2, sort_keys=True))
        raise_for_error(reply.response)
    except ControlError as exc:
        if args.json and exc.response is None:
            _emit(out, json.dumps({"ok": False, "error": {"code": exc.code, "message": exc.message}}, indent=2))
        print(f"hydrad ctl {args.command}: {_one_line(exc.message)}", file=err)
        return exc.exit_code
    if not args.json:
        _emit(out, render(args.command, reply.result, reply.rtt_s))
    return EXIT_OK


def _emit(out: TextIO, text: str) -> None:
    try:
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()
    except BrokenPipeError:  # `hydrad ctl metrics | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter quiet at exit
        except OSError:
            pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------ human output
def render(cmd: str, result: Any, rtt_s: float) -> str:
    if cmd == "ping":
        return f"pong ({rtt_s * 1000:.1f} ms)"
    if cmd == "cancel":
        return _render_cancel(result)
    if cmd in ("mute", "unmute"):
        muted = result.get("muted", cmd == "mute") if isinstance(result, dict) else cmd == "mute"
        return "microphone muted (hydrad streams silence)" if muted else "microphone unmuted"
    if cmd == "metrics":
        return str(result.get("text", "")) if isinstance(result, dict) else str(result)
    return "\n".join(_render_tree(result))


def _render_cancel(r: dict[str, Any]) -> str:
    if r.get("noop") or not (r.get("in_flight") or r.get("audible")):
        return "nothing to cancel: no response in flight or playing"
    what = f"response {r.get('response_id')}" if r.get("response_id") else "the response"
    parts = ["it was in flight" if r.get("in_flight") else "it had finished generating",
             "playback flushed" if r.get("flushed") else "playback flush not confirmed"]
    return f"cancelled {what} ({'; '.join(parts)})"


def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_scalar(x) for x in v) if v else "-"
    return str(v)


def _render_tree(value: Any, indent: int = 0) -> list[str]:
    if not isinstance(value, dict):
        return [" " * indent + _scalar(value)]
    lines: list[str] = []
    width = max((len(str(k)) for k in value), default=0) + 1
    for k, v in value.items():
        if isinstance(v, dict) and v:
            lines.append(" " * indent + f"{k}:")
            lines.extend(_render_tree(v, indent + 2))
        else:
            lines.append(" " * indent + f"{str(k) + ':':<{width}} {_scalar(v if v != {} else None)}")
    return lines


def ctl_main(argv: list[str] | None = None) -> int:
    """Entry point for ``hydrad ctl ARGS`` (``argv`` without the ``ctl``); returns the exit status."""
    return main(argv)


if __name__ == "__main__":  # python -m hydrad.control.ctl status
    raise SystemExit(ctl_main())
