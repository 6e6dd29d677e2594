"""Errors raised by the protocol layer."""

from __future__ import annotations


class MalformedFrame(ValueError):
    """A frame that cannot be used; ``str(exc)`` is a reason fit for a log line and a counter."""

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        #: short label for metrics: ``json``, ``too_large``, ``missing_field``, ``audio``, ``malformed``
        self.kind = kind
