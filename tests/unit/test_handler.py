"""The FastStream command handler in memory: FastStream's ``TestRabbitBroker``, no broker.

The app is the worker's own (:func:`worker.app.broker.build`, :func:`worker.app.service.attach`)
with a memory dedup store and scripted providers.  Each test publishes commands to the commands
exchange and reads, through in-memory subscribers of its own on the results and dead-letter
exchanges, the reply queue and the delay queues, what the handler published, and how it settled
each delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from faststream.rabbit import RabbitExchange, RabbitQueue, TestRabbitBroker
from faststream.rabbit.testing import PatchedMessage
from pydantic import SecretStr

from tests.unit.test_pipeline import FakeProvider, make, role
from worker.app import broker as app_broker
from worker.app import topology
from worker.app.service import attach
from worker.errors import ProviderAnswer, ProviderRejected, ProviderUnavailable
from worker.observability.observe import Observer
from worker.settings import BrokerConfig, Topology

TOPOLOGY = Topology(delay_tiers_s=(1.0, 5.0))


REPLIES = "caller.replies"


@dataclass
class Harness:
    """The in-memory app, what reached each destination and how deliveries were settled."""

    broker: Any
    telnyx: FakeProvider
    settled: list[str]
    seen: dict[str, list[Any]]

    async def send(self, body: bytes, **properties: Any) -> None:
        """Publish ``body`` to the commands exchange, as a publisher would."""
        await self.broker.publish(
            body,
            exchange=topology.commands_exchange(TOPOLOGY),
            routing_key="conference.supervisor_role",
            content_type="application/json",
            **properties,
        )

    def bodies(self, destination: str) -> list[Any]:
        """The bodies that reached ``destination`` (results, dead, replies, delay)."""
        return [message.body for message in self.seen[destination]]

    def events(self, destination: str = "results") -> list[dict[str, Any]]:
        """The result events that reached ``destination``, as JSON."""
        return [orjson.loads(body) for body in self.bodies(destination)]


def listen(broker: Any, seen: dict[str, list[Any]]) -> None:
    """In-memory subscribers on every place the handler publishes to."""
    places: dict[str, tuple[RabbitQueue, RabbitExchange | None]] = {
        "results": (RabbitQueue("t.results", routing_key="#"), topology.results_exchange(TOPOLOGY)),
        "dead": (RabbitQueue("t.dead", routing_key="#"), topology.dead_exchange(TOPOLOGY)),
        "replies": (RabbitQueue(REPLIES), None),
        **{f"delay {q.name}": (RabbitQueue(q.name), None) for q in topology.delay_queues(TOPOLOGY)},
    }
    for name, (queue, exchange) in places.items():
        seen[name] = []
        broker.subscriber(queue, exchange, no_reply=True, decoder=_itself)(_recorder(seen[name]))


def _recorder(into: list[Any]) -> Any:
    async def record(message: Any) -> None:
        into.append(message.raw_message)

    return record


async def _itself(message: Any) -> Any:
    return message


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    settled: list[str] = []

    async def ack(self: Any, multiple: bool = False) -> None:
        settled.append("ack")

    async def nack(self: Any, multiple: bool = False, requeue: bool = True) -> None:
        settled.append(f"nack requeue={requeue}")

    async def reject(self: Any, requeue: bool = False) -> None:
        settled.append(f"reject requeue={requeue}")

    telnyx = FakeProvider("telnyx")
    config = BrokerConfig(url=SecretStr("amqp://guest:guest@127.0.0.1:5672/"))
    app = app_broker.build(config, TOPOLOGY)
    attach(app, TOPOLOGY, make(telnyx=telnyx), Observer.disabled())
    seen: dict[str, list[Any]] = {}
    listen(app.broker, seen)
    async with TestRabbitBroker(app.broker) as broker:
        monkeypatch.setattr(PatchedMessage, "ack", ack)
        monkeypatch.setattr(PatchedMessage, "nack", nack)
        monkeypatch.setattr(PatchedMessage, "reject", reject)
        yield Harness(broker, telnyx, settled, seen)


async def test_a_success_publishes_one_result_and_acks(harness: Harness) -> None:
    """A valid command is carried out once, answered on the results exchange, then acked."""
    await harness.send(role())
    (result,) = harness.events()
    assert (result["status"], result["command_id"], result["attempts"]) == ("succeeded", "r-1", 1)
    assert harness.telnyx.calls == 1
    assert harness.bodies("dead") == []
    assert harness.settled == ["ack"]


async def test_the_result_also_goes_to_reply_to(harness: Harness) -> None:
    """With ``reply_to`` the same result event is also published to that queue."""
    await harness.send(role(), reply_to=REPLIES, correlation_id="corr-1")
    (reply,) = harness.seen["replies"]
    assert harness.events("replies") == harness.events("results")
    assert reply.correlation_id == "corr-1"
    assert harness.settled == ["ack"]


async def test_not_json_is_rejected_and_dead_lettered(harness: Harness) -> None:
    """A body that is not JSON ends rejected/invalid_json, dead-lettered as it came, acked."""
    await harness.send(b"{not json")
    (result,) = harness.events()
    assert (result["status"], result["error"]["code"]) == ("rejected", "invalid_json")
    (dead,) = harness.seen["dead"]
    assert dead.body == b"{not json"
    assert dead.headers["x-error-code"] == "invalid_json"
    assert harness.telnyx.calls == 0
    assert harness.settled == ["ack"]


async def test_a_provider_rejection_is_dead_lettered(harness: Harness) -> None:
    """A provider 404 ends rejected/provider_not_found, and the command is dead-lettered."""
    answer = ProviderAnswer("telnyx", 404, "req-404")
    harness.telnyx.script.append(ProviderRejected("provider_not_found", "no", provider=answer))
    await harness.send(role())
    (result,) = harness.events()
    assert (result["status"], result["error"]["code"]) == ("rejected", "provider_not_found")
    assert len(harness.bodies("dead")) == 1
    assert harness.settled == ["ack"]


async def test_a_duplicate_is_answered_from_the_store(harness: Harness) -> None:
    """The same command twice: the provider is called once, the second answer is a duplicate."""
    await harness.send(role())
    await harness.send(role())
    first, second = harness.events()
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert harness.telnyx.calls == 1
    assert harness.settled == ["ack", "ack"]


async def test_a_long_wait_is_deferred_to_a_delay_queue(harness: Harness) -> None:
    """A retry wait longer than the inline limit parks the command in a delay queue and acks."""
    answer = ProviderAnswer("telnyx", 503, "req-503")
    busy = ProviderUnavailable("provider_unavailable", "busy", retry_after_s=4.0, provider=answer)
    harness.telnyx.script.append(busy)
    await harness.send(role())
    assert harness.events() == []
    (delayed,) = harness.seen[f"delay {TOPOLOGY.delay_queue(5.0)}"]
    assert orjson.loads(delayed.body)["command_id"] == "r-1"
    assert delayed.headers["cw-attempts"] == 1
    assert harness.settled == ["ack"]


async def test_a_crash_rejects_the_delivery_back_to_the_queue(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in processing publishes nothing and returns the delivery to the queue."""

    def crash(*_: Any, **__: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr("worker.app.handler.delivery_of", crash)
    await harness.send(role())
    assert harness.events() == []
    assert harness.settled == ["reject requeue=True"]


async def test_a_delivery_whose_consumer_task_is_cancelled_is_still_carried_out_to_its_end(
    harness: Harness,
) -> None:
    """aiormq cancels a channel's consumer tasks when the channel closes: a provider call already
    made still ends with its result, its dedup record and its settling, never half-done (else the
    redelivered copy would wait out the lease and call the provider again)."""
    harness.telnyx.gate = asyncio.Event()
    consumer = asyncio.create_task(harness.send(role()))
    while harness.telnyx.calls == 0:
        await asyncio.sleep(0.001)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    harness.telnyx.gate.set()
    async with asyncio.timeout(5):
        while not harness.settled:
            await asyncio.sleep(0.001)
    assert harness.settled == ["ack"]
    assert [e["status"] for e in harness.events()] == ["succeeded"]
    await harness.send(role())  # the broker's copy, redelivered: answered from the store
    assert harness.telnyx.calls == 1
    assert harness.events()[-1]["duplicate"] is True
