"""The stack floor: the bare floor's pipeline on the stack the worker is required to use.

The floor (``ops/bench/floor.py``) is aio-pika and aiohttp with nothing else.  This is the same
pipeline, command for command, on the libraries issue 14 prescribes, set up as the worker sets
them up, and still with nothing else:

* **FastStream** consumes: one ``RabbitBroker`` (publisher confirms, ``apply_types=False``, no
  per-message log), one subscriber on the preloaded queue with ``AckPolicy.MANUAL`` and a decoder
  that hands the handler the aio-pika delivery (the worker's ``worker.app.broker`` settings);
* **httpx** calls the provider: one ``httpx.AsyncClient`` per provider on ``httpx-aiohttp``'s
  ``AiohttpTransport``, the worker's own two classes (``ProviderClient``: no cookies;
  ``worker.providers.transport.AiohttpTransport``), the request built once and sent with
  ``client.send``, the read answer's stream swapped for an empty one (as the worker's
  ``JsonHttp``, without its observer and error mapping);
* **FastStream** publishes the result event (a ``broker.publisher`` on the results exchange,
  persistent, awaiting the confirm), then the delivery is acked.

No validation, no dedup (Redis is measured on its own: ``python -m ops.bench.costs``), no
retries, no per-target order, no tracing, no metrics, no log line per command.  So what this
costs over the floor is what the required libraries cost per command before the worker does
any of its own work; the worker's own work is what it costs over this.

    python -m ops.bench.stack --queue Q --results-exchange X \\
        --telnyx-url http://127.0.0.1:PORT/v2 --telnyx-key KEY \\
        --vinix-url http://127.0.0.1:PORT/v2 --vinix-key KEY --prefetch 256
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from aio_pika.abc import AbstractIncomingMessage
from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.publisher import RabbitPublisher

from worker.providers.http import ProviderClient
from worker.providers.transport import AiohttpTransport

from .floor import result_event
from .peer import provider_request
from .pipeline_cli import parser

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_SPENT = httpx.ByteStream(b"")  # a read answer's stream, swapped (worker.providers.http)


async def _delivery(message: Any) -> AbstractIncomingMessage:
    """The subscriber's decoder: the aio-pika delivery itself (as the worker's)."""
    raw: AbstractIncomingMessage = message.raw_message
    return raw


def _client(pool_size: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=pool_size, max_keepalive_connections=pool_size, keepalive_expiry=30
    )
    return ProviderClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
    )


class Stack:
    """The handler: one httpx client per provider, the Vinix token, the results publisher."""

    def __init__(self, args: argparse.Namespace, results: RabbitPublisher) -> None:
        self.args = args
        self.results = results
        self.clients = {
            name: _client(args.pool_size, args.timeout_s) for name in ("telnyx", "vinix")
        }
        self.timeout = httpx.Timeout(args.timeout_s).as_dict()
        self.token = ""
        self.handled = 0

    async def authenticate(self) -> None:
        """One ``PUT /api_auth`` for the Vinix token, before the subscriber starts."""
        body = {"data": {"api_key": self.args.vinix_key}}
        answer = await self.clients["vinix"].put(f"{self.args.vinix_url}/api_auth", json=body)
        answer.raise_for_status()
        self.token = str(answer.json()["auth_token"])

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        print(f"stack: handled {self.handled} command(s)", flush=True)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """One delivery: the provider call, the result published and confirmed, the ack."""
        received_at = datetime.now(UTC)
        command = orjson.loads(message.body)
        args = self.args
        name, method, url, body, headers = provider_request(
            command, telnyx=(args.telnyx_url, args.telnyx_key), vinix=(args.vinix_url, self.token)
        )
        request = httpx.Request(
            method,
            url,
            headers={**_JSON, **headers},
            content=orjson.dumps(body),
            extensions={"timeout": self.timeout},
        )
        try:
            response = await self.clients[name].send(request)
        except httpx.HTTPError as exc:
            print(f"stack: {command.get('command_id')}: {exc!r}", flush=True)
            await message.reject(requeue=True)
            return
        response.stream = _SPENT  # read already: no cycle back to the response (as the worker)
        got = (response.status_code, response.headers.get("x-request-id"), response.content)
        event = result_event(command, name, got, received_at)
        status = event["status"]
        await self.results.publish(
            orjson.dumps(event),
            routing_key=f"{command['type']}.{status}",
            content_type="application/json",
            correlation_id=message.correlation_id or command["command_id"],
            message_id=uuid.uuid4().hex,
            timestamp=datetime.now(UTC),
            message_type="result",
        )
        await message.ack()
        self.handled += 1


def build(args: argparse.Namespace) -> tuple[FastStream, Stack]:
    """The app: the broker as the worker makes it, the results publisher, the subscriber."""
    logger = logging.getLogger("bench.stack.faststream")
    logger.setLevel(logging.WARNING)  # no line per message, as the worker's default
    broker = RabbitBroker(
        args.amqp_url,
        default_channel=Channel(
            prefetch_count=args.prefetch, publisher_confirms=True, on_return_raises=True
        ),
        app_id="bench-stack",
        apply_types=False,
        logger=logger,
    )
    exchange = RabbitExchange(
        args.results_exchange, type=ExchangeType.TOPIC, durable=True, declare=False
    )
    stack = Stack(args, broker.publisher(exchange=exchange, persist=True))

    async def carry_out(message: AbstractIncomingMessage) -> None:
        await stack.handle(message)

    broker.subscriber(
        RabbitQueue(args.queue, declare=False),
        ack_policy=AckPolicy.MANUAL,
        no_reply=True,
        decoder=_delivery,
    )(carry_out)
    app = FastStream(
        broker, logger=logger, on_startup=[stack.authenticate], after_shutdown=[stack.close]
    )
    return app, stack


async def main(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM (FastStream's own handling)."""
    await build(args)[0].run()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser("stack", __doc__).parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
