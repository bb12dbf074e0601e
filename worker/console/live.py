"""The live state beside the dead letters: queue depths, the worker's own metrics, the results.

- Queue depths: a passive declare of each queue (ready messages and consumers).
- The worker: its ``/metrics`` (Prometheus text, parsed by ``prometheus_client``): in flight,
  each provider's breaker, and rates per status from two successive scrapes.
- Results: a server-named, exclusive queue bound to the results exchange; the console counts
  the result events by status and keeps the last few, so a replay's results are seen arriving.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelClosed, ChannelNotFoundEntity
from prometheus_client.parser import text_string_to_metric_families

BREAKER = {0: "closed", 1: "half-open", 2: "open"}
RECENT = 20


async def queue_depths(connection: AbstractConnection, names: Iterable[str]) -> dict[str, Any]:
    """Ready messages and consumers of each queue (None for a queue that does not exist)."""
    depths: dict[str, Any] = {}
    for name in names:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(name, passive=True)
            result = declared.declaration_result
            depths[name] = {"ready": result.message_count, "consumers": result.consumer_count}
        except (ChannelNotFoundEntity, ChannelClosed):
            depths[name] = None
        finally:
            if not channel.is_closed:
                await channel.close()
    return depths


def read_metrics(text: str) -> dict[str, Any]:
    """In flight, breakers by provider and results by status, from the Prometheus text."""
    inflight, breakers, commands = 0.0, {}, Counter[str]()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "conference_worker_inflight":
                inflight = sample.value
            elif sample.name == "conference_worker_breaker_state":
                breakers[sample.labels["provider"]] = BREAKER.get(int(sample.value), "?")
            elif sample.name == "conference_worker_commands_total":
                commands[sample.labels["status"]] += int(sample.value)
    return {"inflight": int(inflight), "breakers": breakers, "commands": dict(commands)}


@dataclass(slots=True)
class WorkerMetrics:
    """Scrapes the worker's ``/metrics``; rates from the previous scrape."""

    url: str
    _last: tuple[float, dict[str, int]] | None = None

    async def read(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The worker's state now, or ``{"reachable": False, ...}``."""
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with http.get(f"{self.url.rstrip('/')}/metrics", timeout=timeout) as answer:
                answer.raise_for_status()
                state = read_metrics(await answer.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return {"reachable": False, "error": type(exc).__name__}
        now, counts = time.monotonic(), state["commands"]
        rates: dict[str, float] = {}
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            rates = {k: (v - self._last[1].get(k, 0)) / elapsed for k, v in counts.items()}
        self._last = (now, counts)
        return {"reachable": True, **state, "rates": rates}


@dataclass(slots=True)
class ResultFeed:
    """Result events as they arrive: counts by status since the console started, the last few."""

    counts: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))

    async def start(self, connection: AbstractConnection, exchange: str) -> None:
        """Bind an exclusive, server-named queue to ``exchange`` and consume it."""
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._take, no_ack=True)

    async def _take(self, message: AbstractIncomingMessage) -> None:
        try:
            event = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        self.counts[str(event.get("status"))] += 1
        error = event.get("error") or {}
        self.recent.appendleft(
            {
                "command_id": event.get("command_id"),
                "status": event.get("status"),
                "duplicate": bool(event.get("duplicate")),
                "code": error.get("code") if isinstance(error, dict) else None,
            }
        )

    def view(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "recent": list(self.recent)}
