"""The bare floor pipeline, a process of its own: one command with nothing but the libraries.

aio-pika consume (manual ack, concurrency = prefetch, one task per delivery, as the worker) →
``orjson.loads`` → aiohttp request to the sandbox, the same provider call the worker makes for that
command type (Telnyx: ``POST /v2/conferences/{id}/actions/update`` with the Bearer key and our
``command_id``; Vinix: ``POST`` (replace) or ``PATCH`` (merge) ``/v2/accounts/{a}/conferences/{c}``
with ``{"data": conference}``, ``X-Auth-Token`` from one ``PUT /v2/api_auth`` at start and an
``X-Request-ID``) → read and parse the JSON answer → a result event of the worker's shape, published
persistent to the results exchange with the worker's properties, awaiting the publisher confirm →
ack.  No validation, no dedup, no retries, no per-target ordering, no logging per command.

    python -m ops.bench.floor --queue Q --results-exchange X \\
        --telnyx-url http://127.0.0.1:PORT/v2 --telnyx-key KEY \\
        --vinix-url http://127.0.0.1:PORT/v2 --vinix-key KEY --prefetch 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from yarl import URL

from .pipeline_cli import parser

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def _session(args: argparse.Namespace) -> aiohttp.ClientSession:
    """A pool configured as the worker's ``JsonHttp`` (one per provider)."""
    connector = aiohttp.TCPConnector(
        limit=args.pool_size, limit_per_host=args.pool_size, ttl_dns_cache=300, keepalive_timeout=30
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout_s)
    )


def result_event(
    command: dict[str, Any],
    provider: str,
    got: tuple[int, str | None, bytes],
    received_at: datetime,
) -> dict[str, Any]:
    """A result event of the worker's shape for the provider's answer ``got`` (status, its
    ``x-request-id``, body); a 2xx succeeded."""
    status_code, request_id, raw = got
    answer = orjson.loads(raw) if raw else None
    ok = 200 <= status_code < 300
    data = answer.get("data") if isinstance(answer, dict) else None
    return {
        "command_id": command["command_id"],
        "type": command["type"],
        "status": "succeeded" if ok else "rejected",
        "duplicate": False,
        "attempts": 1,
        "error": None if ok else {"code": "provider_rejected", "message": str(answer)[:500]},
        "provider": {"name": provider, "status_code": status_code, "request_id": request_id},
        "data": data if isinstance(data, dict) else None,
        "received_at": received_at,
        "completed_at": datetime.now(UTC),
    }


class Floor:
    """One consumer, one results exchange, one aiohttp session per provider (as the worker)."""

    def __init__(
        self, args: argparse.Namespace, telnyx: aiohttp.ClientSession, vinix: aiohttp.ClientSession
    ) -> None:
        self.args = args
        self.sessions = {"telnyx": telnyx, "vinix": vinix}
        self.results: AbstractExchange | None = None
        self.token = ""
        self.telnyx_auth = {**_JSON, "Authorization": f"Bearer {args.telnyx_key}"}
        self.handled = 0

    async def authenticate(self) -> None:
        """One ``PUT /api_auth`` for the Vinix token (the worker caches its token likewise)."""
        body = orjson.dumps({"data": {"api_key": self.args.vinix_key}})
        url = f"{self.args.vinix_url}/api_auth"
        async with self.sessions["vinix"].put(url, data=body, headers=_JSON) as r:
            envelope = orjson.loads(await r.read())
        if r.status not in {200, 201}:
            raise SystemExit(f"floor: vinix api_auth answered {r.status}: {envelope}")
        self.token = str(envelope["auth_token"])

    def _request(
        self, command: dict[str, Any]
    ) -> tuple[str, str, URL, dict[str, Any], dict[str, str]]:
        if command["type"] == "conference.supervisor_role":
            conference = quote(command["conference_id"], safe="")
            url = URL(
                f"{self.args.telnyx_url}/conferences/{conference}/actions/update", encoded=True
            )
            body = {
                "call_control_id": command["call_control_id"],
                "supervisor_role": command["supervisor_role"],
                "command_id": command["command_id"],
            }
            for name in ("whisper_call_control_ids", "region"):
                if command.get(name) is not None:
                    body[name] = command[name]
            return "telnyx", "POST", url, body, self.telnyx_auth
        account = quote(command["account_id"], safe="")
        conference = quote(command["conference_id"], safe="")
        url = URL(
            f"{self.args.vinix_url}/accounts/{account}/conferences/{conference}", encoded=True
        )
        method = "PATCH" if command.get("mode") == "merge" else "POST"
        headers = {**_JSON, "X-Auth-Token": self.token, "X-Request-ID": uuid.uuid4().hex}
        return "vinix", method, url, {"data": command["conference"]}, headers

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        received_at = datetime.now(UTC)
        command = orjson.loads(message.body)
        name, method, url, body, headers = self._request(command)
        try:
            async with self.sessions[name].request(
                method, url, data=orjson.dumps(body), headers=headers, allow_redirects=False
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"floor: {command.get('command_id')}: {exc!r}", file=sys.stderr, flush=True)
            await message.reject(requeue=True)
            return
        got = (response.status, response.headers.get("x-request-id"), raw)
        event = result_event(command, name, got, received_at)
        status = event["status"]
        result = aio_pika.Message(
            orjson.dumps(event),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=message.correlation_id or command["command_id"],
            message_id=uuid.uuid4().hex,
            timestamp=datetime.now(UTC),
            app_id="bench-floor",
            type="result",
        )
        assert self.results is not None
        await self.results.publish(result, f"{command['type']}.{status}", mandatory=False)
        await message.ack()
        self.handled += 1


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with _session(args) as telnyx, _session(args) as vinix:
        floor = Floor(args, telnyx, vinix)
        await floor.authenticate()
        connection = await aio_pika.connect(
            args.amqp_url, client_properties={"connection_name": "bench-floor"}
        )
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.set_qos(prefetch_count=args.prefetch)
            floor.results = await channel.get_exchange(args.results_exchange, ensure=False)
            queue = await channel.get_queue(args.queue, ensure=False)
            tag = await queue.consume(floor.on_message, no_ack=False)
            await stop.wait()
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
    print(f"floor: handled {floor.handled} command(s)", file=sys.stderr, flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser("floor", __doc__).parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
