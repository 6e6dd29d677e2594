"""Observers of the event bus: structured logs, Prometheus metrics, debug recordings, timelines.

Each module knows only ``hydrad.events`` (and the config dataclasses); the daemon's internals
reach them through small provider callables and taps, wired in ``hydrad/app.py``.
See docs/metrics.md.
"""
