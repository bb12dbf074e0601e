"""Span export through the OpenTelemetry SDK, against an OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from worker.observability.telemetry import Telemetry


@dataclass
class Span:
    """A span as the receiver decoded it, with its resource's attributes."""

    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Receiver:
    """Accepts ``POST /v1/traces`` and keeps the decoded spans and each request's headers."""

    spans: list[Span] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    endpoint: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.headers.append(dict(request.headers))
        for resource_spans in export.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                self.spans += [
                    Span(span.name, attributes(span.attributes), resource) for span in scope.spans
                ]
        return web.Response(body=b"", content_type="application/x-protobuf")


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of plain values."""
    return {kv.key: value(kv) for kv in pairs}


def value(kv: KeyValue) -> Any:
    any_value: AnyValue = kv.value
    return getattr(any_value, any_value.WhichOneof("value") or "string_value")


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver on a free port of 127.0.0.1; :attr:`Receiver.endpoint` is its base URL."""
    sink = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        sink.endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield sink
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_spans_reach_an_otlp_http_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env with an OTLP endpoint exports through the SDK's BatchSpanProcessor and HTTP
    exporter: spans arrive at <endpoint>/v1/traces within OTEL_BSP_SCHEDULE_DELAY, with their
    names, attributes, the resource's service.name and the OTEL_EXPORTER_OTLP_HEADERS (read by
    the SDK itself); shutdown() sends what is still queued."""
    async with receiver() as sink:
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cret",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "cw-under-test",
        }
        for name, setting in environ.items():  # the SDK reads OTEL_BSP_* and headers from here
            monkeypatch.setenv(name, setting)
        telemetry = Telemetry.from_env(environ, instance="w-7")
        assert telemetry.tracer is not None
        tracer = telemetry.tracer
        tracer.start_span(
            "process cmds", attributes={"conference_worker.command.id": "c-1", "attempt": 2}
        ).end()
        tracer.start_span("POST", attributes={"http.request.method": "POST"}).end()
        # the SDK's default delay is 5 s: only the 50 ms read from the environment gets here
        await until(lambda: len(sink.spans) == 2, timeout_s=3.0)
        tracer.start_span("late", attributes={"flag": True}).end()
        await telemetry.shutdown()
    assert [(s.name, s.attributes) for s in sink.spans] == [
        ("process cmds", {"conference_worker.command.id": "c-1", "attempt": 2}),
        ("POST", {"http.request.method": "POST"}),
        ("late", {"flag": True}),
    ]
    for span in sink.spans:
        assert span.resource["service.name"] == "cw-under-test"
        assert span.resource["service.instance.id"] == "w-7"
    assert {headers.get("x-api-key") for headers in sink.headers} == {"s3cret"}
    assert {headers["Content-Type"] for headers in sink.headers} == {"application/x-protobuf"}
