"""Upgrading a deployment from the single command queue (CONTRACT 1.1) to partitions (1.3).

Commands queued in the old ``<q>`` and waiting in one of its delay tiers must all be carried
out by a worker of the new layout, and the old queue must stop receiving new commands.
"""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import aio_pika
import orjson

from tests.integration.conftest import (
    AMQP_URL,
    WorkerFactory,
    result_events,
    settled_command_counts,
    total_counts,
    worker_settings,
)
from worker.app import topology

QUEUED = 200


def role(fx: dict[str, Any], command_id: str, n: int) -> dict[str, Any]:
    calls = [(c, x) for c, ids in fx["telnyx"]["calls_by_conference"].items() for x in ids]
    conf, call = calls[n % len(calls)]
    return {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": conf,
        "call_control_id": call,
        "supervisor_role": ("monitor", "barge", "whisper")[n % 3],
    }


def bindings_to(queue: str) -> list[str]:
    """The exchanges ``queue`` is bound to (the default exchange's implicit binding aside)."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_bindings",
            "-q",
            "--no-table-headers",
            "source_name",
            "destination_name",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    sources = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1] == queue and parts[0]:
            sources.append(parts[0])
    return sources


async def test_upgrade_from_the_single_queue_carries_out_every_queued_command(
    prefix: str, worker_factory: WorkerFactory, fixtures: dict[str, Any]
) -> None:
    """200 commands in the old queue and one in its 1 s delay tier: a partitioned worker carries
    out all 201, unbinds the old queue (new commands go to the intake only) and leaves it empty."""
    old = worker_settings(prefix, partitions=0)
    run = uuid.uuid4().hex[:8]
    ids = [f"up-{run}-{n}" for n in range(QUEUED)]
    delayed = f"up-{run}-delayed"
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await topology.declare(channel, old.topology())
        results = await channel.declare_queue(f"{prefix}.upgrade-results")
        await results.bind(old.results_exchange, "#")
        exchange = await channel.get_exchange(old.commands_exchange)
        for n, command_id in enumerate(ids):
            body = orjson.dumps(role(fixtures, command_id, n))
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=2), "conference.supervisor_role"
            )
        # A retry the old worker had parked in a delay tier (as it parks one: its cw-* headers).
        retry = aio_pika.Message(
            orjson.dumps(role(fixtures, delayed, QUEUED)),
            delivery_mode=2,
            headers={"cw-attempts": 1, "cw-routing-key": "conference.supervisor_role"},
        )
        await channel.default_exchange.publish(retry, old.topology().delay_queue(1.0))
        declared = await channel.declare_queue(old.commands_queue, passive=True)
        assert declared.declaration_result.message_count == QUEUED

        async with worker_factory() as (service, bus):
            assert service.legacy, "the worker did not see the old queue"
            got = await result_events(results, QUEUED + 1, timeout_s=90)
            assert sorted(e["command_id"] for e in got) == sorted([*ids, delayed])
            assert {e["status"] for e in got} == {"succeeded"}
            assert old.commands_exchange not in bindings_to(old.commands_queue)
            after = f"up-{run}-after"
            await bus.publish(role(fixtures, after, 1))
            (event,) = await result_events(results, 1, timeout_s=30)
            assert (event["command_id"], event["status"]) == (after, "succeeded")
            assert await settled_command_counts(bus.settings) == (0, 0)
            legacy = [old.commands_queue, old.topology().delay_queue(1.0)]
            assert total_counts(legacy) == (0, 0)
        await channel.queue_delete(f"{prefix}.upgrade-results")
