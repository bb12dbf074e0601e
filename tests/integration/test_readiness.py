"""Readiness (/readyz) end to end: the broker connection dropped and back, the dedup store
unreachable, and shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import (
    Admin,
    WorkerFactory,
    worker_settings,
)
from tests.integration.observing import (
    close_connection,
    free_port,
    http_get,
    readyz_until,
    role,
    scrape,
    until,
    value,
)
from worker.app.service import Service
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration


async def test_readiness_follows_the_broker_connection(
    worker_factory: WorkerFactory, prefix: str, fixtures: dict[str, Any]
) -> None:
    """/readyz turns 503 when the broker drops the worker's connection and 200 again once the
    robust connection is back; the worker then consumes again."""
    instance = f"{prefix}-ready"
    async with worker_factory(instance_name=instance) as (service, bus):
        port = service.http_port
        body = await readyz_until(port, 200)
        assert body["checks"]["broker"]["ok"]
        assert body["breakers"] == {"vinix": "closed", "telnyx": "closed"}
        await asyncio.to_thread(close_connection, f"conference-worker/{instance}")
        down = await readyz_until(port, 503)
        assert not down["checks"]["broker"]["ok"]
        assert down["checks"]["dedup"]["ok"]
        assert (await http_get(port, "/healthz"))[0] == 200
        await readyz_until(port, 200, timeout_s=60)
        await bus.publish(role(fixtures))
        (event,) = await bus.events(1)
        assert event["status"] == "succeeded"


async def test_not_ready_while_the_dedup_store_is_unreachable(
    prefix: str, sandbox: Sandbox
) -> None:
    """With Redis unreachable the worker waits for it: alive, not ready, and it says why."""
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5"
    service = Service(worker_settings(prefix, dedup_url=url), sandbox=sandbox)
    starting = asyncio.create_task(service.start())
    try:

        async def listening() -> int | None:
            return service.http_port

        await until(listening)
        body = await readyz_until(service.http_port, 503)
        await asyncio.sleep(1.5)  # a few pings later, still the same answer
        body = await readyz_until(service.http_port, 503)
        assert not body["ready"]
        assert not body["checks"]["dedup"]["ok"]
        assert "unreachable" in body["checks"]["dedup"]["detail"]
        assert (await http_get(service.http_port, "/healthz"))[0] == 200
        assert value(await scrape(service.http_port), "conference_worker_ready") == 0
        assert not starting.done()
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await service.stop()


async def test_not_ready_while_shutting_down(
    worker_factory: WorkerFactory, admin: Admin, fixtures: dict[str, Any]
) -> None:
    """From the moment shutdown begins /readyz answers 503, while in-flight commands finish."""
    async with worker_factory() as (service, bus):
        port = service.http_port
        await readyz_until(port, 200)
        await admin.fault(provider="telnyx", latency_ms=1500, count=1)
        await bus.publish(role(fixtures))

        async def busy() -> bool:
            return value(await scrape(port), "conference_worker_inflight") >= 1

        await until(busy)
        stopping = asyncio.create_task(service.stop())
        body = await readyz_until(port, 503, timeout_s=1.0)
        assert body["checks"]["shutdown"] == {"ok": False, "detail": "shutting down"}
        await stopping
        (event,) = await bus.events(1)
        assert event["status"] == "succeeded"
