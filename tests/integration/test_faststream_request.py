"""A FastStream service of someone else's asks with ``broker.request()`` and gets its result.

The client below is plain FastStream with its defaults, none of this project's code: it
publishes a command to ``conference.commands`` with ``broker.request()``, which sets
``reply_to`` to RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``) and waits for the answer
there.  The worker (the real one, on the real RabbitMQ) answers on ``reply_to`` with the same
result event it publishes to ``conference.results``: for a success and for a rejection.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange

from tests.integration.conftest import AMQP_URL, WorkerFactory

pytestmark = pytest.mark.integration


def supervisor_role(fixtures: dict[str, Any], command_id: str, **fields: Any) -> dict[str, Any]:
    conference, calls = next(iter(fixtures["telnyx"]["calls_by_conference"].items()))
    return {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": calls[0],
        "supervisor_role": "monitor",
        **fields,
    }


async def test_broker_request_gets_the_result_on_direct_reply_to(
    worker_factory: WorkerFactory, fixtures: dict[str, Any]
) -> None:
    """``broker.request()`` of a foreign FastStream app gets a success and a rejection back."""
    async with worker_factory() as (_, bus):
        commands = RabbitExchange(bus.settings.commands_exchange, type=ExchangeType.TOPIC)
        client = RabbitBroker(AMQP_URL)
        async with client:
            await client.start()
            ok_id, bad_id = f"req-{uuid.uuid4().hex}", f"req-{uuid.uuid4().hex}"
            ok = await client.request(
                supervisor_role(fixtures, ok_id),
                exchange=commands,
                routing_key="conference.supervisor_role",
                timeout=30,
            )
            bad = await client.request(
                supervisor_role(fixtures, bad_id, supervisor_role="shout"),
                exchange=commands,
                routing_key="conference.supervisor_role",
                timeout=30,
            )
            succeeded, rejected = await ok.decode(), await bad.decode()
        assert isinstance(succeeded, dict)
        assert isinstance(rejected, dict)
        assert (succeeded["command_id"], succeeded["status"]) == (ok_id, "succeeded")
        assert (rejected["command_id"], rejected["status"]) == (bad_id, "rejected")
        assert rejected["error"]["code"] == "invalid_command"
        assert ok.correlation_id
        assert bad.correlation_id != ok.correlation_id
        published = {event["command_id"]: event for event in await bus.events(2)}
        assert published[ok_id]["status"] == "succeeded"
        assert published[bad_id]["status"] == "rejected"
