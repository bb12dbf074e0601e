"""The shipped RabbitMQ definitions declare exactly what the worker declares."""

from __future__ import annotations

import json
from pathlib import Path

from worker.app.topology import (
    COMMAND_BINDING,
    DEAD_BINDING,
    command_queue_arguments,
    dead_queue_arguments,
    delay_queue_arguments,
)
from worker.settings import Topology

DEFINITIONS = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq" / "definitions.json"


def test_definitions_match_the_worker_declarations() -> None:
    """Same queue arguments and bindings, so RabbitMQ never answers PRECONDITION_FAILED."""
    topology = Topology()
    definitions = json.loads(DEFINITIONS.read_text())
    queues = {queue["name"]: queue["arguments"] for queue in definitions["queues"]}
    assert queues[topology.commands_queue] == command_queue_arguments(topology)
    assert queues[topology.dead_queue] == dead_queue_arguments()
    for seconds in topology.delay_tiers_s:
        assert queues[topology.delay_queue(seconds)] == delay_queue_arguments(topology, seconds)
    assert len(queues) == 2 + len(topology.delay_tiers_s)
    exchanges = {exchange["name"]: exchange["type"] for exchange in definitions["exchanges"]}
    assert exchanges == {
        topology.commands_exchange: "topic",
        topology.results_exchange: "topic",
        topology.dead_exchange: "topic",
    }
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {
        (topology.commands_exchange, topology.commands_queue, COMMAND_BINDING),
        (topology.dead_exchange, topology.dead_queue, DEAD_BINDING),
    }
