"""The worker's own HTTP server: liveness, readiness, Prometheus metrics, the AsyncAPI document.

- ``GET /healthz``: 200 while the event loop answers (liveness).
- ``GET /readyz``: 200 only when the broker connection is open, the consumer is consuming, the
  deduplication store answered its last ping (pinged every second in the background) and the
  worker is not shutting down; 503 otherwise.  The JSON body lists every check with a reason,
  and each provider's circuit breaker state.
- ``GET /metrics``: the Prometheus text format of the worker's own registry.
- ``GET /asyncapi.yaml``: the AsyncAPI document of the wire contract, FastStream's document of
  the worker's app (rendered at the first request, so it is there in an installed package too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from worker.observability.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection
    from faststream.rabbit.subscriber import RabbitSubscriber

log = logging.getLogger("worker.app.health")


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness condition and why it holds or not."""

    ok: bool
    detail: str


Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class StoreProbe:
    """Pings the deduplication store every ``interval_s``; :meth:`check` answers from the last
    ping, so a readiness probe never waits on the store (and never floods it)."""

    def __init__(
        self,
        ping: Callable[[], Awaitable[None]],
        *,
        interval_s: float = 1.0,
        stale_after_s: float = 3.0,
        secrets: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ping = ping
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s
        self._secrets = tuple(secret for secret in secrets if secret)
        self._clock = clock
        self._last: Check | None = None
        self._at = 0.0
        self._reachable = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start pinging in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dedup-store-probe")

    async def stop(self) -> None:
        """Stop pinging."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reachable(self) -> None:
        """Wait until a ping has succeeded."""
        await self._reachable.wait()

    def check(self) -> Check:
        """The last ping's result (not ok when it is older than ``stale_after_s``)."""
        if self._last is None:
            return Check(False, "not checked yet")
        age = self._clock() - self._at
        if age > self._stale_after_s:
            return Check(False, f"no answer to a ping for {age:.1f} s")
        return self._last

    async def _run(self) -> None:
        while True:
            await self._once()
            await asyncio.sleep(self._interval_s)

    async def _once(self) -> None:
        was = self._last
        try:
            await self._ping()
        except Exception as exc:
            self._last = Check(False, f"unreachable: {self._hide(exc)}")
            if was is None or was.ok:
                log.warning("dedup store %s", self._last.detail)
        else:
            self._last = Check(True, "ok")
            if was is not None and not was.ok:
                log.warning("dedup store reachable again")
            self._reachable.set()
        self._at = self._clock()

    def _hide(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"[:300]
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        return text


def broker_check(
    connection: AbstractRobustConnection | None, subscriber: RabbitSubscriber | None
) -> Check:
    """Connected to the broker, and the command subscriber consuming."""
    if connection is None:
        return Check(False, "not connected yet")
    if connection.is_closed:
        return Check(False, "connection closed")
    if not connection.connected.is_set():
        return Check(False, "connection lost; reconnecting")
    if subscriber is None:
        return Check(False, "not consuming yet")
    if not subscriber.running:
        return Check(False, "consumer stopped")
    return Check(True, "ok")


def report(checks: dict[str, Check], breakers: dict[str, str]) -> tuple[bool, dict[str, Any]]:
    """Readiness and the ``/readyz`` body."""
    ready = all(check.ok for check in checks.values())
    body = {
        "ready": ready,
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
        "breakers": breakers,
    }
    return ready, body


class HealthServer:
    """An aiohttp server on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(self, host: str, port: int, *, readiness: Readiness, metrics: Metrics) -> None:
        self._host = host
        self._port = port
        self._readiness = readiness
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._asyncapi: bytes | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_text)
        app.router.add_get("/asyncapi.yaml", self._asyncapi_yaml)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("HTTP on %s:%d (/healthz /readyz /metrics /asyncapi.yaml)", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, body = self._readiness()
        return _json(body, 200 if ready else 503)

    async def _metrics_text(self, _: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def _asyncapi_yaml(self, _: web.Request) -> web.Response:
        if self._asyncapi is None:
            from worker.contract import schemas as contract

            text = await asyncio.to_thread(lambda: contract.render()[contract.ASYNCAPI])
            self._asyncapi = text.encode()
        response = web.Response(body=self._asyncapi)
        response.headers["Content-Type"] = "application/yaml; charset=utf-8"
        return response


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
