"""What the broker says about consumers, through ``rabbitmqctl`` (no management plugin needed).

A worker replica names its connection ``conference-worker/<CW_INSTANCE_NAME>``, so
:func:`active_replicas` can say which replica is the single active consumer of each queue.  Used
by the replicas benchmark (``ops/bench/replicas.py``) and the scale-out tests
(``tests/integration/replicas.py``).  Each call starts an Erlang VM: about half a second.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from typing import Any


def rabbitmqctl_json(command: str, *columns: str) -> list[dict[str, Any]]:
    """``rabbitmqctl <command> <columns>`` as a list of rows (JSON formatter)."""
    out = subprocess.run(
        ["rabbitmqctl", command, "-q", "--formatter", "json", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return list(json.loads(out or "[]"))


def connection_name(properties: Any) -> str:
    """The ``connection_name`` client property of a connection, or ``""``."""
    for key, _, value in properties or []:
        if key == "connection_name":
            return str(value)
    return ""


def active_replicas(queues: list[str]) -> dict[str, str]:
    """For each of ``queues`` that has one, the instance name of its active consumer."""
    consumers = rabbitmqctl_json("list_consumers", "queue_name", "channel_pid", "active")
    channels = {
        c["pid"]: c["connection"] for c in rabbitmqctl_json("list_channels", "pid", "connection")
    }
    connections = {
        c["pid"]: connection_name(c["client_properties"])
        for c in rabbitmqctl_json("list_connections", "pid", "client_properties")
    }
    wanted, found = set(queues), {}
    for consumer in consumers:
        if consumer["queue_name"] in wanted and consumer["active"]:
            name = connections.get(channels.get(consumer["channel_pid"], ""), "")
            found[consumer["queue_name"]] = name.removeprefix("conference-worker/")
    return found


def consumer_counts() -> Counter[str]:
    """How many consumers each queue has, active or waiting (a single-active-consumer queue's
    ``queue.declare-ok`` counts only its active one)."""
    return Counter(row["queue_name"] for row in rabbitmqctl_json("list_consumers", "queue_name"))


def all_consume(queues: list[str], replicas: int) -> bool:
    """Whether each of ``queues`` has at least ``replicas`` consumers, waiting ones included."""
    counts = consumer_counts()
    return all(counts[q] >= replicas for q in queues)


async def took_over(queue: str, dead: str, timeout_s: float) -> tuple[float, str]:
    """Seconds until a replica other than ``dead`` is the active consumer of ``queue``, and
    which one (TimeoutError after ``timeout_s``)."""
    began = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            now = (await asyncio.to_thread(active_replicas, [queue])).get(queue)
            if now and now != dead:
                return time.monotonic() - began, now
            await asyncio.sleep(0.05)
