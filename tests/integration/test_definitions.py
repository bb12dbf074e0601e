"""ops/rabbitmq/definitions.json, imported into the real RabbitMQ, agrees with the worker.

The file is imported the way operators do it (``rabbitmqctl import_definitions``), then the worker
declares its topology over it: RabbitMQ answers PRECONDITION_FAILED if any queue argument
differs.  (The other order needs no test: an import leaves an existing queue as it is.)  The
import works on a copy whose every name, including the policy's pattern, carries the test's own
prefix, so the default names of real deployments are never touched and concurrent tests cannot
clash; everything it creates is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from worker.app import topology
from worker.settings import Settings, Topology

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFINITIONS = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq" / "definitions.json"
TOPOLOGY_KEYS = ("exchanges", "queues", "bindings", "policies")


def _escaped(name: str) -> str:
    """A queue name as the policies of definitions.json write it in a pattern."""
    return name.replace(".", r"\.")


def prefixed_copy(definitions: dict[str, Any], names: dict[str, str], prefix: str) -> Any:
    """The topology of ``definitions`` with every name (and pattern) renamed by ``names``."""

    def rename(value: Any) -> Any:
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, list):
            return [rename(item) for item in value]
        if isinstance(value, dict):
            return {key: rename(item) for key, item in value.items()}
        return value

    copy = {key: rename(definitions[key]) for key in TOPOLOGY_KEYS}
    for policy in copy["policies"]:
        policy["name"] = f"{prefix}.{policy['name']}"
        pattern = policy["pattern"]
        for old in sorted(names, key=len, reverse=True):
            pattern = pattern.replace(_escaped(old), _escaped(names[old]))
        assert pattern != policy["pattern"], f"policy {policy['name']} was not renamed"
        policy["pattern"] = pattern
    text = json.dumps(copy)
    for default in names:
        assert f'"{default}"' not in text, f"{default} survived the renaming"
    return copy


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def queue_policies() -> dict[str, str]:
    """Queue name -> the policy RabbitMQ applied to it ('' when none)."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "policy")
    found: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if parts and parts[0]:
            found[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return found


def import_definitions(document: Any, expected_queues: set[str]) -> None:
    """``rabbitmqctl import_definitions`` (asynchronous on the broker): wait until it is done."""
    with tempfile.TemporaryDirectory() as directory:
        # rabbitmqctl reads the file as the rabbitmq user.
        Path(directory).chmod(0o755)
        path = Path(directory) / "definitions.json"
        path.write_text(json.dumps(document))
        path.chmod(0o644)
        rabbitmqctl("import_definitions", str(path))
    deadline = time.monotonic() + 30
    while not expected_queues <= set(queue_policies()):
        assert time.monotonic() < deadline, f"the import did not create {expected_queues}"
        time.sleep(0.2)


@pytest.fixture
async def imported(prefix: str) -> AsyncIterator[tuple[Topology, dict[str, Any]]]:
    """The prefixed copy of definitions.json, imported; removed (with its policy) afterwards."""
    default = Settings().topology()  # the definitions hold the default, partitioned topology
    assert default.partitioned
    mine = dataclasses.replace(
        default,
        commands_exchange=f"{prefix}.commands",
        commands_queue=f"{prefix}.worker.commands",
        results_exchange=f"{prefix}.results",
        dead_exchange=f"{prefix}.dead",
        dead_queue=f"{prefix}.worker.dead",
    )
    names = {
        getattr(default, field): getattr(mine, field)
        for field in (
            "commands_exchange",
            "commands_queue",
            "results_exchange",
            "dead_exchange",
            "dead_queue",
        )
    }
    # The intake, the partitions exchange, the partitions and the delay tiers are named after
    # the command queue: renamed too, or the import would create (and leave behind) the
    # default-named ones.
    names |= {
        default.intake_queue: mine.intake_queue,
        default.partitions_exchange: mine.partitions_exchange,
    }
    names |= dict(zip(default.partition_queues(), mine.partition_queues(), strict=True))
    names |= {default.delay_queue(s): mine.delay_queue(s) for s in default.delay_tiers_s}
    copy = prefixed_copy(json.loads(DEFINITIONS.read_text()), names, prefix)
    try:
        expected = {mine.intake_queue, *mine.partition_queues(), mine.dead_queue}
        await asyncio.to_thread(import_definitions, copy, expected)
        yield mine, copy
    finally:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await topology.delete(await connection.channel(), mine)
        for policy in copy["policies"]:
            await asyncio.to_thread(rabbitmqctl, "clear_policy", "-p", "/", policy["name"])


def test_prefixed_copy_renames_every_object_and_pattern() -> None:
    """The copy keeps the topology and renames queues, exchanges, bindings, arguments, policies."""
    definitions = json.loads(DEFINITIONS.read_text())
    names = {
        "conference-worker.commands": "p.worker.commands",
        "conference-worker.commands.intake": "p.worker.commands.intake",
        "conference-worker.commands.p00": "p.worker.commands.p00",
        "conference.dead": "p.dead",
    }
    copy = prefixed_copy(definitions, names, "p")
    assert set(copy) == set(TOPOLOGY_KEYS)
    queues = {queue["name"]: queue["arguments"] for queue in copy["queues"]}
    assert queues["p.worker.commands.intake"]["x-dead-letter-exchange"] == "p.dead"
    assert queues["p.worker.commands.p00"]["x-dead-letter-exchange"] == "p.dead"
    (policy,) = copy["policies"]
    assert policy["pattern"] == r"^p\.worker\.commands\.(intake|p\d+)$"
    assert policy["definition"]["dead-letter-exchange"] == "p.dead"


async def test_worker_declares_over_the_imported_definitions(
    imported: tuple[Topology, dict[str, Any]],
) -> None:
    """Importing the definitions, then declaring the worker's topology: no PRECONDITION_FAILED."""
    mine, copy = imported
    (policy,) = copy["policies"]
    applied = await asyncio.to_thread(queue_policies)
    for name in (mine.intake_queue, *mine.partition_queues()):
        assert applied[name] == policy["name"], name
    assert applied[mine.dead_queue] == ""  # the policy never reaches the dead-letter queue
    assert applied[mine.delay_queue(5)] == ""

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        declared = await topology.declare(await connection.channel(), mine)
        assert declared.commands.name == mine.intake_queue
        # The same check fails when an argument differs: the broker does compare them.
        arguments = topology.partitioned_queue_arguments(mine)
        arguments["x-delivery-limit"] = mine.delivery_limit + 1
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(mine.partition_queue(3), durable=True, arguments=arguments)
