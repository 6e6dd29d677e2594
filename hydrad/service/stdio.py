"""Standard output and error that can never kill the daemon.

Under systemd, stdout/stderr are a stream socket to journald; on a bare device they may be a
file on a full SD card, a pipe whose reader died, or ``/dev/full``. Python's own streams raise
``OSError`` (``ENOSPC``, ``EPIPE``, ``EIO``) from ``write``/``flush``, and a log call that
raises inside a task takes that task (and with it the daemon) down: losing log lines must
never cost the conversation. :func:`harden_stdio` replaces ``sys.stdout`` and ``sys.stderr``
with :class:`ResilientStream` objects that write each piece straight to the file descriptor
(no user-space buffer to grow while the target is broken), drop what cannot be written, count
it, and simply succeed again once the target accepts writes.

Call it first thing in ``hydrad run``, before logging is configured (the loggers then write
through it). Writes stay blocking, as before: a journald that stops reading (not one that
fails) still blocks the writer; systemd's watchdog covers that case.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any, TextIO

#: errors that mean "this log target is broken right now": drop the data, keep going
DROP_ERRNOS = frozenset({errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EAGAIN, errno.EDQUOT, errno.EBADF,
                         errno.ECONNRESET, errno.ENOTCONN, errno.EFBIG, errno.EROFS, errno.EINVAL})


class ResilientStream:
    """A text stream on a file descriptor whose write errors are counted, not raised."""

    def __init__(self, fd: int, name: str, encoding: str = "utf-8", isatty: bool | None = None) -> None:
        self._fd = fd
        self.name = name
        self.encoding = encoding
        self.errors = "replace"
        self._isatty = isatty
        self._lock = threading.Lock()
        self.dropped_writes = 0
        self.dropped_bytes = 0
        self.last_error: str | None = None

    def write(self, text: str) -> int:
        if not text:
            return 0
        data = text.encode(self.encoding, "replace")
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno not in DROP_ERRNOS:
                        self.last_error = f"{type(exc).__name__}: {exc}"
                    else:
                        self.last_error = os.strerror(exc.errno or 0)
                    self.dropped_writes += 1
                    self.dropped_bytes += len(view)
                    break
                view = view[n:]
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass  # unbuffered

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        if self._isatty is None:
            try:
                self._isatty = os.isatty(self._fd)
            except OSError:
                self._isatty = False
        return self._isatty

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ResilientStream {self.name} fd={self._fd} dropped={self.dropped_writes}>"


def harden_stdio() -> tuple[ResilientStream | None, ResilientStream | None]:
    """Replace ``sys.stdout``/``sys.stderr`` (if they have a file descriptor) with resilient ones.

    Pending buffered output is flushed first (errors ignored). Idempotent. Returns the new
    streams (None where a stream was left alone, e.g. no fd under a test runner's capture).
    """
    out: list[ResilientStream | None] = []
    for attr in ("stdout", "stderr"):
        stream: TextIO | None = getattr(sys, attr)
        if isinstance(stream, ResilientStream):
            out.append(stream)
            continue
        try:
            fd = stream.fileno() if stream is not None else -1
        except (OSError, ValueError, AttributeError):
            fd = -1
        if fd < 0:
            out.append(None)
            continue
        try:
            stream.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass
        encoding = getattr(stream, "encoding", None) or "utf-8"
        resilient = ResilientStream(fd, f"<{attr}>", encoding)
        setattr(sys, attr, resilient)
        out.append(resilient)
    return out[0], out[1]
