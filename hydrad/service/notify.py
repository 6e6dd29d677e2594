"""The sd_notify protocol, spoken directly: no libsystemd, a no-op when not under systemd.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: the address of an
``AF_UNIX``/``SOCK_DGRAM`` socket, either a filesystem path (``/run/systemd/notify``) or an
abstract name written with a leading ``@`` (``@/org/freedesktop/systemd1/notify/...``; the
``@`` stands for the NUL byte that starts an abstract address). Each state change is one
datagram of newline-separated ``KEY=VALUE`` assignments (``sd_notify(3)``):

``READY=1``           start-up finished; ``systemctl start`` returns, dependents start
``STATUS=...``        a one-line human-readable status (``systemctl status`` shows it)
``WATCHDOG=1``        "still alive"; must arrive within ``WatchdogSec=`` or systemd restarts us
``STOPPING=1``        shutting down
``RELOADING=1``       reloading the configuration (``MONOTONIC_USEC=`` added, as systemd 253+
                      requires for ``Type=notify-reload``); ``READY=1`` ends the reload

``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) tell a service that the watchdog is on and its
period; :func:`watchdog_usec` parses them like ``sd_watchdog_enabled(3)``: the watchdog is
ours only if ``WATCHDOG_PID`` is unset or our pid.

Failures never propagate: a notification that cannot be sent (socket gone, queue full) is
counted and logged once; the daemon's audio must not depend on systemd's mood. Sends are
non-blocking (``MSG_DONTWAIT``) and can be made from trio code without awaiting.

Address forms not supported: ``vsock:`` (systemd 254+, for VMs). They are reported once and
the notifier stays a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

import structlog

log = structlog.get_logger("hydrad.service")

#: environment variables that belong to systemd's notification protocol
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def parse_address(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` -> a ``sendto`` address (``str`` path or ``bytes`` abstract name).

    ``None`` for unset, empty or unsupported values.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_usec(env: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """The watchdog period in microseconds if systemd's watchdog applies to this process.

    Mirrors ``sd_watchdog_enabled()``: ``WATCHDOG_USEC`` must be a positive integer, and when
    ``WATCHDOG_PID`` is set it must be our pid (the variable leaked to a child otherwise).
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw, 10)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "").strip()
    if wpid:
        try:
            if int(wpid, 10) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec


class Notifier:
    """Sends sd_notify datagrams to one address; every method is a cheap no-op without one.

    ``sent`` keeps the last messages sent (for ``status`` and tests), ``errors`` counts
    failed sends.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.errors = 0
        self.sent: list[str] = []
        self._sock: socket.socket | None = None
        self._warned = False
        self.last_status: str | None = None

    @classmethod
    def from_environ(cls, env: dict[str, str] | None = None, *, unset: bool = False) -> "Notifier":
        """Build from ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

        ``unset=True`` removes the three variables from ``env`` (default ``os.environ``)
        afterwards, like ``sd_notify(unset_environment=1)``, so that child processes (the
        audio engine, plugin commands) do not inherit a socket that is not theirs.
        """
        target = os.environ if env is None else env
        raw = target.get("NOTIFY_SOCKET")
        address = parse_address(raw)
        if raw and address is None:
            log.warning("notify_socket_unsupported", notify_socket=raw,
                        hint="only path and abstract (@) AF_UNIX addresses are supported")
        notifier = cls(address, watchdog_usec=watchdog_usec(target))
        if unset:
            for name in ENV_VARS:
                target.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and bool(self.watchdog_usec)

    # -------------------------------------------------------------- sending
    def notify(self, message: str) -> bool:
        """Send one datagram (``KEY=VALUE`` lines). True if it went out."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock = sock
            self._sock.sendto(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                              self.address)
        except OSError as exc:
            self.errors += 1
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", error=f"{type(exc).__name__}: {exc}", message=message.split("\n")[0])
            # A broken socket object is rebuilt on the next send.
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            return False
        self.sent.append(message)
        del self.sent[:-64]
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(self._with_status("READY=1", status))

    def status(self, text: str) -> bool:
        """``STATUS=`` (one line; newlines would start new assignments, so they are flattened)."""
        text = _one_line(text)
        self.last_status = text
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """``WATCHDOG=trigger``: ask systemd to act as if the watchdog timed out, now."""
        return self.notify("WATCHDOG=trigger")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(self._with_status("STOPPING=1", status))

    def reloading(self, status: str | None = None) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(self._with_status(f"RELOADING=1\nMONOTONIC_USEC={usec}", status))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for more time for the current start/stop phase."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def _with_status(self, head: str, status: str | None) -> str:
        if status is None:
            return head
        status = _one_line(status)
        self.last_status = status
        return f"{head}\nSTATUS={status}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:512]
