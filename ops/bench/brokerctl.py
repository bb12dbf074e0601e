"""What the broker says about consumers, through ``rabbitmqctl`` (no management plugin needed).

A worker replica names its connection ``conference-worker/<CW_INSTANCE_NAME>``, so
:func:`active_replicas` can say which replica is the single active consumer of each queue.  Used
by the replicas benchmark (``ops/bench/replicas.py``) and the scale-out tests
(``tests/integration/replicas.py``).  Each call starts an Erlang VM: about half a second.
"""

from __future__ import annotations

import json
import subprocess
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


def consumer_counts() -> dict[str, int]:
    """How many consumers each queue has, active or waiting (a single-active-consumer queue's
    ``queue.declare-ok`` counts only its active one)."""
    out = subprocess.run(
        ["rabbitmqctl", "list_consumers", "-q", "--no-table-headers", "queue_name"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    counts: dict[str, int] = {}
    for line in out.split():
        counts[line] = counts.get(line, 0) + 1
    return counts
