"""The naive peer: the pipeline a team would hand-roll on the same stack, FastStream's defaults.

A plain FastStream app (``FastStream(RabbitBroker(...))``) with one subscriber on the command
queue the runner declared (``RabbitQueue(queue, declare=False)``: a passive declare, as the floor
uses it), and nothing tuned but what the same work at the same concurrency as the floor needs:

* prefetch through the broker's default channel, ``Channel(prefetch_count=N)``;
* concurrency: none to add.  FastStream 0.7's ``RabbitSubscriber.start``
  (``faststream/rabbit/subscriber/usecase.py``) hands ``self.consume`` to aio-pika's
  ``Queue.consume``, whose ``consumer`` wrapper (``aio_pika/queue.py``) runs the callback with
  ``aio_pika.tools.create_task``, itself called from a task aiormq creates per ``Basic.Deliver``
  (``aiormq/channel.py``, ``_on_deliver_frame``).  Every delivery is its own task; the
  subscriber's ``MultiLock`` only counts them for the graceful shutdown.  One subscriber thus
  processes up to ``prefetch`` messages at once, like the floor and the worker.

Everything else is a default: FastStream's parser and JSON decoder, the handler's ``dict``
argument validated by fast-depends/pydantic, the default ack policy (``REJECT_ON_ERROR``: acked
once the handler returns), the default logging (a line per message received and processed), the
broker's serializer for the result and its publisher confirms (``Channel.publisher_confirms``
defaults to True: ``broker.publish`` returns once the broker confirmed).  Per command:

1. ``SET cw:peer:<run>:<command_id> 1 NX EX 3600`` on one ``redis.asyncio.Redis.from_url`` (its
   default ``ConnectionPool``, one connection per concurrent call).  One setting had to go:
   redis-py 8 caps that pool at 100 connections and raises ``MaxConnectionsError`` on the 101st
   concurrent call (``redis/asyncio/connection.py``, ``get_available_connection``), which the
   default ack policy turns into a rejected (dead-lettered) command without a result; so
   ``max_connections`` is the prefetch, as a team would set it after its first load test.
   A key already holding a result: that result is published again, marked ``duplicate``; a key
   still at ``1`` (a redelivery after a crash) does the work again.
2. The provider call the floor makes for that type, on one default ``httpx.AsyncClient()`` per
   provider (default limits, ``json=``): Telnyx ``POST /v2/conferences/{id}/actions/update`` with
   the Bearer key and our ``command_id``; Vinix ``POST`` (replace) or ``PATCH`` (merge)
   ``/v2/accounts/{a}/conferences/{c}`` with ``{"data": conference}``, ``X-Auth-Token`` from one
   ``PUT /v2/api_auth`` at start-up, and an ``X-Request-ID``.
3. ``SET <key> <result json> EX 3600``.
4. ``broker.publish(event, exchange=<results>, routing_key=<type>.<status>, persist=True,
   correlation_id=<command_id>)``: a result event of the worker's shape.  An HTTP error still
   gives one (``failed``, ``provider_unavailable``); a non-2xx answer, ``rejected``.

    python -m ops.bench.peer --queue Q --results-exchange X --run bench-1234abcd-drain \\
        --telnyx-url http://127.0.0.1:PORT/v2 --telnyx-key KEY \\
        --vinix-url http://127.0.0.1:PORT/v2 --vinix-key KEY --prefetch 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import redis.asyncio as aioredis
from faststream import FastStream
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

from .pipeline_cli import parser

RETENTION_S = 3600
Request = tuple[str, str, str, dict[str, Any], dict[str, str]]


def now() -> str:
    return datetime.now(UTC).isoformat()


class Peer:
    """The handler and what it holds: Redis, one httpx client per provider, the Vinix token."""

    def __init__(self, args: argparse.Namespace, broker: RabbitBroker) -> None:
        self.args = args
        self.broker = broker
        self.results = RabbitExchange(
            args.results_exchange, type=ExchangeType.TOPIC, durable=True, declare=False
        )
        # The default pool; only its cap raised to the concurrency (see the module docstring).
        self.redis = aioredis.Redis.from_url(args.redis_url, max_connections=args.prefetch)
        self.clients = {"telnyx": httpx.AsyncClient(), "vinix": httpx.AsyncClient()}
        self.token = ""
        self.handled = 0

    async def authenticate(self) -> None:
        """One ``PUT /api_auth`` for the Vinix token, before the subscriber starts."""
        url = f"{self.args.vinix_url}/api_auth"
        answer = await self.clients["vinix"].put(
            url, json={"data": {"api_key": self.args.vinix_key}}
        )
        answer.raise_for_status()
        self.token = str(answer.json()["auth_token"])

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        await self.redis.aclose()
        print(f"peer: handled {self.handled} command(s)", flush=True)

    async def handle(self, command: dict[str, Any]) -> None:
        """One command: dedup, the provider call, the result stored, the event published."""
        key = f"cw:peer:{self.args.run}:{command['command_id']}"
        if not await self.redis.set(key, "1", nx=True, ex=RETENTION_S):
            stored = await self.redis.get(key)
            if stored and stored != b"1":
                await self.publish(json.loads(stored) | {"duplicate": True})
                return
        event = await self.call(command, now())
        await self.redis.set(key, json.dumps(event), ex=RETENTION_S)
        await self.publish(event)
        self.handled += 1

    async def publish(self, event: dict[str, Any]) -> None:
        await self.broker.publish(
            event,
            exchange=self.results,
            routing_key=f"{event['type']}.{event['status']}",
            persist=True,
            correlation_id=event["command_id"],
        )

    def request(self, command: dict[str, Any]) -> Request:
        """(provider, method, url, json body, headers) of the command's provider call."""
        args = self.args
        return provider_request(
            command, telnyx=(args.telnyx_url, args.telnyx_key), vinix=(args.vinix_url, self.token)
        )

    async def call(self, command: dict[str, Any], received_at: str) -> dict[str, Any]:
        """The provider call, as a result event (``failed`` when the request itself failed)."""
        name, method, url, body, headers = self.request(command)
        event: dict[str, Any] = {
            "command_id": command["command_id"],
            "type": command["type"],
            "status": "failed",
            "duplicate": False,
            "attempts": 1,
            "error": None,
            "provider": {"name": name, "status_code": None, "request_id": None},
            "data": None,
            "received_at": received_at,
        }
        try:
            response = await self.clients[name].request(method, url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            error = {"code": "provider_unavailable", "message": repr(exc)[:500], "retryable": True}
            return event | {"error": error, "completed_at": now()}
        answer = response.json() if response.content else None
        data = answer.get("data") if isinstance(answer, dict) else None
        event["provider"].update(
            status_code=response.status_code, request_id=response.headers.get("x-request-id")
        )
        if response.is_success:
            event.update(status="succeeded", data=data if isinstance(data, dict) else None)
        else:
            message = str(answer)[:500]
            event.update(
                status="rejected",
                error={"code": "provider_rejected", "message": message, "retryable": False},
            )
        return event | {"completed_at": now()}


def provider_request(
    command: dict[str, Any], *, telnyx: tuple[str, str], vinix: tuple[str, str]
) -> Request:
    """The floor's provider call for ``command``: ``telnyx`` is (base url, API key), ``vinix``
    (base url, auth token); (provider, method, url, json body, headers)."""
    if command["type"] == "conference.supervisor_role":
        conference = quote(command["conference_id"], safe="")
        body = {
            "call_control_id": command["call_control_id"],
            "supervisor_role": command["supervisor_role"],
            "command_id": command["command_id"],
        }
        for name in ("whisper_call_control_ids", "region"):
            if command.get(name) is not None:
                body[name] = command[name]
        url = f"{telnyx[0]}/conferences/{conference}/actions/update"
        return "telnyx", "POST", url, body, {"Authorization": f"Bearer {telnyx[1]}"}
    account = quote(command["account_id"], safe="")
    conference = quote(command["conference_id"], safe="")
    url = f"{vinix[0]}/accounts/{account}/conferences/{conference}"
    method = "PATCH" if command.get("mode") == "merge" else "POST"
    headers = {"X-Auth-Token": vinix[1], "X-Request-ID": uuid.uuid4().hex}
    return "vinix", method, url, {"data": command["conference"]}, headers


def build(args: argparse.Namespace) -> tuple[FastStream, Peer]:
    """The app: the broker with its default channel's prefetch, the subscriber, the hooks."""
    broker = RabbitBroker(args.amqp_url, default_channel=Channel(prefetch_count=args.prefetch))
    peer = Peer(args, broker)
    broker.subscriber(RabbitQueue(args.queue, declare=False))(peer.handle)
    app = FastStream(broker)
    app.on_startup(peer.authenticate)
    app.after_shutdown(peer.close)
    return app, peer


async def main(args: argparse.Namespace) -> None:
    app, _ = build(args)
    await app.run()  # FastStream stops on SIGINT / SIGTERM


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser("peer", __doc__, http_pool=False)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--run", default="peer", help="dedup keys are cw:peer:<run>:<command id> (the runner's)"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
