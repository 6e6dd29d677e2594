"""``webhook``: POST chosen events as JSON to a URL, with retries and a bounded queue.

Hooks used: ``hydrad_plugin_config`` (validate), ``hydrad_startup`` (fresh queue and state),
``hydrad_event`` (append to the bounded queue; never waits), ``hydrad_serve`` (the sender:
one ``httpx.AsyncClient`` -- httpx runs on trio through anyio -- sending in order with retries
and exponential backoff), ``hydrad_shutdown`` (flush, bounded by the hook deadline).
"""

from __future__ import annotations

import collections
import json
import math
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from hydrad.hooks import hookimpl

MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Settings:
    url: str | None = None  # None: not configured, nothing is sent
    events: frozenset[str] = frozenset({"*"})
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.5
    queue_size: int = 256

    def wants(self, event_name: str) -> bool:
        return "*" in self.events or event_name in self.events


def parse_settings(table: dict[str, Any]) -> Settings:
    allowed = {"url", "events", "headers", "timeout_s", "retries", "backoff_s", "queue_size"}
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if not table:
        return Settings()
    url = table.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"url = {url!r}: expected an http:// or https:// URL")
    events = table.get("events", ["*"])
    if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
        raise ValueError(f"events = {events!r}: expected a non-empty list of event names (or [\"*\"])")
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("headers: expected a table of string values")

    def number(key: str, default: float, lo: float, hi: float) -> float:
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise ValueError(f"{key} = {v!r}: expected a number from {lo} to {hi}")
        return float(v)

    def integer(key: str, default: int, lo: int, hi: int) -> int:
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{key} = {v!r}: expected an integer from {lo} to {hi}")
        return v

    return Settings(url=url, events=frozenset(events), headers=dict(headers),
                    timeout_s=number("timeout_s", 5.0, 0.05, 300), retries=integer("retries", 3, 0, 100),
                    backoff_s=number("backoff_s", 0.5, 0.0, 60), queue_size=integer("queue_size", 256, 1, 100000))


class WebhookPlugin:
    """One instance per process (the entry point's object); state is reset on every start-up."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = trio.Event()
        self._sending = False
        self._seq = 0
        self._settings = Settings()
        self._host = socket.gethostname()

    @hookimpl
    def hydrad_plugin_config(self, table: dict[str, Any]) -> Settings:
        return parse_settings(table)

    @hookimpl
    async def hydrad_startup(self, ctx: Any) -> None:
        self._settings = ctx.settings
        self.stats = Counter()
        self.queue = collections.deque(maxlen=self._settings.queue_size)
        self._wake = trio.Event()
        self._sending = False
        self._seq = 0
        if self._settings.url is None:
            ctx.log.info("webhook_not_configured", hint="add [plugins.webhook] url = ... to post events")

    @hookimpl
    async def hydrad_event(self, ctx: Any, event: Any) -> None:
        s = self._settings
        if s.url is None or not s.wants(event.name):
            return
        self._seq += 1
        if len(self.queue) == self.queue.maxlen:
            self.stats["dropped"] += 1
            if self.stats["dropped"] == 1 or self.stats["dropped"] % 100 == 0:
                ctx.log.warning("webhook_queue_full", dropped=self.stats["dropped"], queue_size=s.queue_size)
        self.queue.append({
            "id": uuid.uuid4().hex, "seq": self._seq, "type": event.name, "data": event.fields,
            "timestamp": time.time() - (time.monotonic() - event.t), "host": self._host,
        })
        self._wake.set()

    @hookimpl
    async def hydrad_serve(self, ctx: Any) -> None:
        s = self._settings
        if s.url is None:
            return
        headers = {"User-Agent": "hydrad-webhook/0.1", **s.headers}
        async with httpx.AsyncClient(timeout=s.timeout_s, headers=headers) as client:
            while True:
                while not self.queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._sending = True
                try:
                    body = self.queue.popleft()
                    await self._deliver(ctx, client, s, body)
                finally:
                    self._sending = False

    @hookimpl
    async def hydrad_shutdown(self, ctx: Any) -> None:
        # The sender keeps running until after this hook; wait for it to empty the queue.
        # The dispatcher's hook deadline bounds the wait; what is left is counted as lost.
        try:
            while self.queue or self._sending:
                await trio.sleep(0.02)
        finally:
            if self.queue:
                self.stats["lost_at_shutdown"] += len(self.queue)
                ctx.log.warning("webhook_unsent_at_shutdown", events=len(self.queue))

    async def _deliver(self, ctx: Any, client: httpx.AsyncClient, s: Settings, body: dict[str, Any]) -> bool:
        data = json.dumps(body, default=str, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": body["id"]}
        delay = s.backoff_s
        assert s.url is not None
        for attempt in range(s.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            try:
                response = await client.post(s.url, content=data, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    self.stats["sent"] += 1
                    return True
                problem = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    self.stats["rejected"] += 1
                    ctx.log.warning("webhook_rejected", status=response.status_code, event_name=body["type"],
                                    seq=body["seq"], body=response.text[:200])
                    return False
            ctx.log.info("webhook_attempt_failed", attempt=attempt + 1, of=s.retries + 1, error=problem,
                         event_name=body["type"], seq=body["seq"])
        self.stats["failed"] += 1
        ctx.log.warning("webhook_gave_up", event_name=body["type"], seq=body["seq"], attempts=s.retries + 1)
        return False


plugin = WebhookPlugin()

__all__ = ["Settings", "WebhookPlugin", "parse_settings", "plugin"]
