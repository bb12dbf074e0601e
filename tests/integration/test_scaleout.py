"""Scale-out on the partitioned topology: several replicas keep per-target order (issue 15).

Each test runs real ``worker run`` processes on the test's own topology (16 partitions, Redis
dedup), the sandbox with a provider latency, and checks the order in which the provider received
each target's role changes (its request log, matched to commands by the request id each result
event names).  Takeover times are printed (``-s`` shows them; CI logs keep them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ops.bench.brokerctl import active_replicas
from tests.integration.conftest import (
    Admin,
    Broker,
    Processes,
    listed_counts,
    settled_command_counts,
    worker_env,
)
from tests.integration.replicas import (
    OrderRun,
    Replicas,
    Target,
    assert_order_held,
    takeover_s,
)
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration

LATENCY_MS = 10
LEASE_S = 3


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(conferences=12) as running:
        yield running


def targets(sandbox: Sandbox, count: int) -> list[Target]:
    calls = sandbox.fixtures["telnyx"]["calls_by_conference"]
    every = [(conf, call) for conf, ids in calls.items() for call in ids]
    assert len(every) >= count
    return every[:count]


def replicas(
    prefix: str, sandbox: Sandbox, broker: Broker, processes: Processes, **env: Any
) -> Replicas:
    values = {"dedup_lease_s": LEASE_S, "prefetch": 64, **env}
    return Replicas(processes, worker_env(prefix, sandbox, **values), broker.settings)


async def with_latency(admin: Admin) -> None:
    await admin.fault(provider="telnyx", latency_ms=LATENCY_MS)


@pytest.mark.timeout(300)
async def test_three_replicas_keep_per_target_order(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """3 replicas, 8 targets x 150 role changes back to back: per target the provider never sees
    an older one after a newer one, the newest lands last, and each command has one result."""
    group = replicas(prefix, sandbox, broker, processes)
    for _ in range(3):
        group.spawn()
    await group.wait_consuming()
    await with_latency(admin)
    run = OrderRun(broker.settings, broker.results)
    run.make(targets(sandbox, 8), per_target=150)
    await run.publish(broker.channel)
    await run.collect(timeout_s=200)
    assert not run.lost()
    assert set(run.first_results().values()) == {1}
    assert all(len(events) == 1 for events in run.events.values())
    assert {e[0]["status"] for e in run.events.values()} == {"succeeded"}
    order, unnamed = await run.applied_order(admin)
    assert unnamed == 0
    assert_order_held(order, run.newest())
    assert await settled_command_counts(broker.settings) == (0, 0)


@pytest.mark.timeout(400)
async def test_sigkill_of_the_active_consumer_twice_loses_nothing(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """The active consumer of a busy partition is SIGKILLed twice during a run: another replica
    takes over within 10 s each time, nothing is lost and per-target order holds."""
    group = replicas(prefix, sandbox, broker, processes)
    for _ in range(3):
        group.spawn()
    await group.wait_consuming()
    await with_latency(admin)
    run = OrderRun(broker.settings, broker.results)
    run.make(targets(sandbox, 8), per_target=250)
    await run.publish(broker.channel)
    partitions = broker.settings.topology().partition_queues()
    takeovers = []
    for _ in range(2):
        await asyncio.sleep(2.0)
        await run.drain()
        busy = await busiest(partitions)
        active = (await asyncio.to_thread(active_replicas, [busy]))[busy]
        group.kill(active)
        takeovers.append(await takeover_s(busy, active))
        group.spawn()  # back to three, as an orchestrator would
    shown = ", ".join(f"{t:.2f} s" for t in takeovers)
    print(f"\ntakeover after SIGKILL of the active consumer: {shown}")
    assert all(t < 10.0 for t in takeovers), takeovers
    await run.collect(timeout_s=300)
    assert not run.lost()
    assert {e[-1]["status"] for e in run.events.values()} == {"succeeded"}
    order, unnamed = await run.applied_order(admin)
    assert unnamed <= 2 * 64  # at most what was in flight at each kill, repeated
    assert_order_held(order, run.newest())
    assert await settled_command_counts(broker.settings) == (0, 0)


async def busiest(partitions: list[str]) -> str:
    """The partition with the most commands waiting or in flight."""
    counts = await asyncio.to_thread(listed_counts)
    return max(partitions, key=lambda q: sum(counts.get(q, (0, 0))))


@pytest.mark.timeout(500)
async def test_scaling_one_to_four_to_two_during_a_run(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """5,000 role changes while the replicas go 1 -> 4 -> 2 (new ones join with no manual step,
    the active one among those stopped hands over): nothing lost, order held, one result each."""
    group = replicas(prefix, sandbox, broker, processes)
    first = group.spawn()
    await group.wait_consuming()
    await with_latency(admin)
    run = OrderRun(broker.settings, broker.results)
    run.make(targets(sandbox, 20), per_target=250)
    await run.publish(broker.channel)
    await asyncio.sleep(2.0)
    for _ in range(3):
        group.spawn()
    await group.wait_consuming()
    await asyncio.sleep(2.0)
    await run.drain()
    stopped = [first, *[name for name in list(group.running) if name != first][:1]]
    for name in stopped:
        assert await group.stop(name) == 0
    await run.collect(timeout_s=400)
    assert not run.lost()
    assert set(run.first_results().values()) == {1}
    assert {e[-1]["status"] for e in run.events.values()} == {"succeeded"}
    order, unnamed = await run.applied_order(admin)
    assert unnamed == 0
    assert_order_held(order, run.newest())
    assert await settled_command_counts(broker.settings) == (0, 0)
