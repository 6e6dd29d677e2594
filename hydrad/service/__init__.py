"""Life as a systemd service: sd_notify (:mod:`.notify`) and readiness/watchdog (:mod:`.health`)."""

from .health import Health, HealthPolicy, ServiceMonitor
from .notify import Notifier, parse_address, watchdog_usec

__all__ = ["Health", "HealthPolicy", "Notifier", "ServiceMonitor", "parse_address", "watchdog_usec"]
