"""Chaos scenarios: each bounded in time, each stopping by itself, each checked by ``Run.check``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ops.bench.brokerctl import active_replicas
from tests.chaos.conftest import Run, env_for, start_rabbitmq, start_redis
from tests.integration.conftest import Admin, Processes, listed_counts
from tests.integration.replicas import Replicas

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

KILL_RUN = int(os.environ.get("CW_CHAOS_COMMANDS", "20000"))
REPLICAS = int(os.environ.get("CW_CHAOS_REPLICAS", "3"))  # on the partitioned topology
PREFETCH = 200
OUTAGE_S = 8.0


async def started(run: Run, processes: Processes, **overrides: object) -> Replicas:
    """``REPLICAS`` worker processes on the partitioned topology, once each consumes the intake
    and every partition (the first one's HTTP port is ``http_port`` when given)."""
    port = overrides.pop("http_port", None)
    group = Replicas(processes, env_for(run, prefetch=PREFETCH, **overrides), run.settings)
    group.spawn(**({} if port is None else {"CW_HTTP_PORT": str(port)}))
    for _ in range(REPLICAS - 1):
        group.spawn()
    await group.wait_consuming()
    return group


async def active_on_the_busiest(run: Run, group: Replicas) -> str:
    """The replica that is the active consumer of the partition with the most work left."""
    partitions = run.settings.topology().partition_queues()
    counts = await asyncio.to_thread(listed_counts)
    busy = max(partitions, key=lambda q: sum(counts.get(q, (0, 0))))
    active = (await asyncio.to_thread(active_replicas, [busy])).get(busy)
    return active if active in group.running else next(iter(group.running))


@pytest.mark.timeout(600)
async def test_sigkill_at_random_moments(chaos: Run, admin: Admin, processes: Processes) -> None:
    """SIGKILL the active consumer of the busiest partition at random moments of a 20,000-command
    run, three times, a new replica started each time (as an orchestrator would)."""
    chaos.make_commands(KILL_RUN)
    await chaos.publish()
    rng = random.Random(2611)
    group = await started(chaos, processes)
    for _ in range(3):
        await asyncio.sleep(rng.uniform(2.0, 6.0))
        group.kill(await active_on_the_busiest(chaos, group))
        chaos.repeat_bound += PREFETCH  # at most a prefetch window was in flight at the kill
        await chaos.drain_results()
        group.spawn()
    await chaos.collect_until_complete(timeout_s=400)
    await chaos.check(admin)


@contextlib.asynccontextmanager
async def rabbitmq_stopped() -> AsyncIterator[None]:
    """RabbitMQ's app stopped for the block, and started again after it, whatever the block
    raised: a failed scenario must not leave the broker down for the tests after it."""
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "stop_app"], check=True, capture_output=True
    )
    try:
        yield
    finally:
        await asyncio.to_thread(start_rabbitmq)


@contextlib.asynccontextmanager
async def redis_stopped() -> AsyncIterator[None]:
    """Redis shut down for the block, and running again after it, whatever the block raised."""
    await asyncio.to_thread(
        subprocess.run, ["redis-cli", "shutdown", "nosave"], capture_output=True
    )
    try:
        yield
    finally:
        await asyncio.to_thread(start_redis)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def readiness_becomes(port: int, status: int, timeout_s: float) -> None:
    """Poll the worker's /readyz until it answers ``status``."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                    if answer.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_rabbitmq_restart(chaos: Run, admin: Admin, processes: Processes) -> None:
    """Restart RabbitMQ mid-run: readiness turns false, then true again; the worker reconnects
    and resumes consuming by itself."""
    chaos.make_commands(5000)
    await chaos.publish()
    port = free_port()
    await started(chaos, processes, http_port=port)
    await readiness_becomes(port, 200, timeout_s=30)
    await asyncio.sleep(2)
    async with rabbitmq_stopped():
        await readiness_becomes(port, 503, timeout_s=30)
        await asyncio.sleep(3)
    await readiness_becomes(port, 200, timeout_s=60)
    chaos.repeat_bound += PREFETCH
    await chaos.collect_until_complete(timeout_s=200)
    # After a broker restart a quorum queue may hand a partition's unacknowledged commands back
    # only after its consumer got newer ones (RabbitMQ orders redeliveries loosely): such an
    # older command ends superseded (kept in the dead-letter queue), never applied after them.
    await chaos.check(admin, superseded_ok=True)


@pytest.mark.timeout(300)
async def test_redis_outage(chaos: Run, admin: Admin, processes: Processes) -> None:
    """Stop Redis mid-run: the worker holds its commands rather than risk double execution, and
    resumes when Redis is back."""
    chaos.make_commands(5000)
    await chaos.publish()
    await started(chaos, processes, dedup_url="redis://127.0.0.1:6379/0")
    await asyncio.sleep(2)
    await chaos.drain_results()
    before = chaos.result_count()
    async with redis_stopped():
        await asyncio.sleep(OUTAGE_S)
        await chaos.drain_results()
        during = chaos.result_count() - before
        # Only what was claimed before Redis went (at most a prefetch window per replica) may
        # end meanwhile: its result goes out while its record waits for Redis (README).  A worker
        # carrying on without Redis would answer most of the ~4,000 commands left.
        assert during <= PREFETCH * REPLICAS, f"{during} results in {OUTAGE_S} s without Redis"
    await chaos.collect_until_complete(timeout_s=200)
    await chaos.check(admin)


@pytest.mark.timeout(300)
async def test_provider_failing_slowing_and_rate_limiting(
    chaos: Run, admin: Admin, processes: Processes
) -> None:
    """The sandbox fails, slows down and rate-limits at random: every command still ends once."""
    await admin.fault(status=503, probability=0.2, seed=1)
    await admin.fault(status=429, probability=0.05, retry_after_s=1, seed=2)
    await admin.fault(latency_ms=30, probability=0.3, seed=3)
    chaos.make_commands(5000)
    await chaos.publish()
    await started(chaos, processes, retry_max_attempts=4, breaker_failures=50)
    await chaos.collect_until_complete(timeout_s=250)
    await chaos.check(admin, all_succeed=False)
