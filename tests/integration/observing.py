"""Helpers of the observability tests: commands, a recording proxy, scraping and polling."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.integration.conftest import AMQP_URL, Bus, take, worker_settings
from worker.app import topology
from worker.app.service import Service
from worker.observability.log import JsonFormatter
from worker.observability.telemetry import Telemetry
from worker.sandbox import Sandbox

T = TypeVar("T")

# --- commands ------------------------------------------------------------------------------------


def role(fx: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A Telnyx supervisor role change for a known call."""
    conference = fx["telnyx"]["conference_ids"][0]
    body = {
        "command_id": f"obs-{uuid.uuid4().hex[:10]}",
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": fx["telnyx"]["calls_by_conference"][conference][0],
        "supervisor_role": "monitor",
    }
    return body | overrides


def update(fx: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A Vinix conference update of a known conference."""
    body = {
        "command_id": f"obs-{uuid.uuid4().hex[:10]}",
        "type": "conference.update",
        "account_id": fx["vinix"]["account_id"],
        "conference_id": fx["vinix"]["conference_ids"][0],
        "conference": {"name": "Observed bridge"},
    }
    return body | overrides


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A publisher's (traceparent, trace id, span id)."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


PAST = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()


# --- helpers -------------------------------------------------------------------------------------


class RecordingProxy:
    """Forwards every request to the sandbox and remembers its headers (the sandbox's own request
    log keeps only a few of them)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> RecordingProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        self.requests.append({"path": request.raw_path, "headers": dict(request.headers)})
        skip = {"host", "content-length", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        url = URL(self.target + request.raw_path, encoded=True)
        async with self._http.request(
            request.method, url, data=await request.read(), headers=headers
        ) as answer:
            keep = {"content-type", "retry-after", "x-request-id"}
            reply = {k: v for k, v in answer.headers.items() if k.lower() in keep}
            return web.Response(body=await answer.read(), status=answer.status, headers=reply)


@asynccontextmanager
async def traced_worker(
    prefix: str, sandbox: Sandbox, telemetry: Telemetry, **overrides: Any
) -> AsyncIterator[tuple[Service, Bus]]:
    """A worker with injected telemetry, and a bus that keeps result messages whole."""
    settings = worker_settings(prefix, **overrides)
    service = Service(settings, sandbox=sandbox, grace_s=5.0, telemetry=telemetry)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await service.start()
        channel = await connection.channel()
        results = await channel.declare_queue(f"{prefix}.test-results")
        await results.bind(settings.results_exchange, "#")
        yield service, Bus(settings, connection, channel, results)
    finally:
        await service.stop()
        channel = await connection.channel()
        # Deleted by name: polled with basic.get, it never had a consumer to auto-delete it.
        await channel.queue_delete(f"{prefix}.test-results")
        await topology.delete(channel, settings.topology())
        await connection.close()


async def result_messages(
    bus: Bus, count: int, timeout_s: float = 30.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The next ``count`` result messages, properties and headers included."""
    return await take(bus.results, count, timeout_s)


async def until(check: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
    """Poll ``check`` until it returns something true; that value."""
    async with asyncio.timeout(timeout_s):
        while True:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.02)


async def http_get(port: int | None, path: str) -> tuple[int, str]:
    """Status and text of GET ``path`` on the worker's HTTP port."""
    assert port
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


async def readyz_until(port: int | None, status: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll /readyz until it answers ``status``; its body."""
    async with asyncio.timeout(timeout_s):
        while True:
            got, text = await http_get(port, "/readyz")
            if got == status:
                return dict(orjson.loads(text))
            await asyncio.sleep(0.05)


async def scrape(port: int | None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics as {(sample name, labels): value}."""
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def secrets_in(texts: list[str], secrets: list[str]) -> list[str]:
    """Which of ``secrets`` appear in any of ``texts``."""
    return [secret for secret in secrets if any(secret in text for text in texts)]


def span_texts(spans: Any) -> list[str]:
    """Every string a span carries: name, attribute values, events, resource."""
    texts: list[str] = []
    for span in spans:
        texts.append(span.name)
        texts.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            texts.append(event.name)
            texts.extend(str(v) for v in (event.attributes or {}).values())
        texts.extend(str(v) for v in span.resource.attributes.values())
    return texts


@asynccontextmanager
async def captured_logs() -> AsyncIterator[io.StringIO]:
    """Every worker log record at DEBUG and above, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("worker")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def close_connection(name: str) -> None:
    """Have RabbitMQ close the one connection whose client properties carry ``name``."""
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (pid,) = [line.split("\t", 1)[0] for line in out.splitlines() if f'"{name}"' in line]
    subprocess.run(
        ["rabbitmqctl", "close_connection", pid, "readiness test"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
