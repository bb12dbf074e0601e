"""The stack floor (``ops/bench/stack.py``): one command through its FastStream subscriber, its
httpx client and its results publisher, on ``TestRabbitBroker`` against a mocked provider."""

from __future__ import annotations

from typing import cast

import httpx
import orjson
from faststream.rabbit import (
    ExchangeType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
    TestRabbitBroker,
)

from ops.bench.stack import build, parse
from worker.contract.messages import ResultEvent
from worker.providers.http import ProviderClient

ROLE = {
    "command_id": "bench-1234abcd-drain-stack-0000001",
    "type": "conference.supervisor_role",
    "conference_id": "conf/1",
    "call_control_id": "v3:call",
    "supervisor_role": "barge",
}
ARGV = ["--queue", "q", "--results-exchange", "x", "--telnyx-url", "http://tx/v2"]
ARGV += ["--telnyx-key", "TK", "--vinix-url", "http://vx/v2", "--vinix-key", "VK"]


async def test_a_command_gives_one_result_event_of_the_workers_shape() -> None:
    """The delivery's provider call goes out as the floor's (Bearer key, our command_id), and the
    answer comes back as one result event on the results exchange, routed ``<type>.<status>``."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": {"ok": True}}, headers={"x-request-id": "p1"})

    app, stack = build(parse(ARGV))
    broker = cast(RabbitBroker, app.broker)
    transport = httpx.MockTransport(answer)
    stack.clients = {name: ProviderClient(transport=transport) for name in stack.clients}
    results: list[object] = []
    exchange = RabbitExchange("x", type=ExchangeType.TOPIC, durable=True, declare=False)
    routed = RabbitQueue("t.results", routing_key="conference.supervisor_role.succeeded")

    @broker.subscriber(routed, exchange)
    async def listen(body: object) -> None:
        results.append(body)

    async with TestRabbitBroker(broker) as test:
        await test.publish(orjson.dumps(ROLE), queue="q")
    (body,) = results
    event = ResultEvent.model_validate(body)
    assert event.provider is not None
    assert (event.status, event.provider.request_id) == ("succeeded", "p1")
    assert event.data == {"ok": True}
    assert len(seen) == 1
    assert seen[0].url == "http://tx/v2/conferences/conf%2F1/actions/update"
    assert seen[0].headers["authorization"] == "Bearer TK"
    assert orjson.loads(seen[0].content)["command_id"] == ROLE["command_id"]
    assert stack.handled == 1
