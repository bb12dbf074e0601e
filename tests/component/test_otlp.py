"""Span export from the event loop, against a collector stand-in on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider

from worker.observability import otlp
from worker.observability.otlp import LoopSpanProcessor, OtlpHttp


@dataclass
class Collector:
    """Answers each export with the next of ``statuses`` (then 200) and keeps what it got."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def span_names(self) -> list[str]:
        names = []
        for body, _ in self.requests:  # aiohttp has undone any Content-Encoding
            export = ExportTraceServiceRequest.FromString(body)
            for resource in export.resource_spans:
                assert resource.resource.attributes  # every span keeps its resource
                names += [s.name for scope in resource.scope_spans for s in scope.spans]
        return names

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.requests.append((await request.read(), dict(request.headers)))
        return web.Response(status=status, body=b"")


@asynccontextmanager
async def collector(statuses: list[int] | None = None) -> AsyncIterator[Collector]:
    sink = Collector(statuses or [])
    app = web.Application()
    app.router.add_post("/v1/traces", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sink.url = f"http://127.0.0.1:{port}/v1/traces"
    try:
        yield sink
    finally:
        await runner.cleanup()


def tracer_with(processor: LoopSpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider


async def test_a_full_batch_is_posted_as_one_request() -> None:
    """Spans reaching the batch size leave at once, as one OTLP request (encoded chunk by chunk)
    that the collector parses whole."""
    count = otlp.ENCODE_CHUNK * 2 + 3
    async with collector() as sink:
        processor = LoopSpanProcessor(OtlpHttp(sink.url, batch=count, delay_s=60))
        tracer = tracer_with(processor).get_tracer("t")
        for i in range(count):
            tracer.start_span(f"s{i}").end()
        await until(lambda: processor.exported == count)
        assert sink.span_names() == [f"s{i}" for i in range(count)]
        assert len(sink.requests) == 1
        await processor.aclose()


async def test_headers_and_gzip_as_configured() -> None:
    """OTEL_EXPORTER_OTLP_HEADERS travel on every export; gzip compresses the body."""
    async with collector() as sink:
        env = {
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cret",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        }
        config = OtlpHttp.from_env(env, sink.url, batch=1)
        assert config is not None
        assert "s3cret" not in repr(config)
        processor = LoopSpanProcessor(config)
        tracer_with(processor).get_tracer("t").start_span("one").end()
        await until(lambda: processor.exported == 1)
        ((_, headers),) = sink.requests
        assert (headers["api-key"], headers["Content-Encoding"]) == ("s3cret", "gzip")
        assert int(headers["Content-Length"]) < len(sink.requests[0][0])  # it was compressed
        assert sink.span_names() == ["one"]
        await processor.aclose()


async def test_shutdown_sends_what_is_queued() -> None:
    """aclose() posts spans that had not yet filled a batch."""
    async with collector() as sink:
        processor = LoopSpanProcessor(OtlpHttp(sink.url, batch=100, delay_s=60))
        tracer_with(processor).get_tracer("t").start_span("late").end()
        await processor.aclose()
        assert sink.span_names() == ["late"]


async def test_a_busy_collector_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 is retried after a pause; nothing is lost."""
    monkeypatch.setattr(otlp, "RETRY_DELAYS_S", (0.01,))
    async with collector([503]) as sink:
        processor = LoopSpanProcessor(OtlpHttp(sink.url, batch=1))
        tracer_with(processor).get_tracer("t").start_span("again").end()
        await until(lambda: processor.exported == 1)
        assert (sink.span_names(), processor.dropped) == (["again"], 0)
        await processor.aclose()


async def test_a_refusal_drops_the_batch_and_a_full_queue_drops_spans(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """400 is not retried: the batch is dropped, counted and logged once; beyond the queue's
    bound spans are dropped rather than held."""
    async with collector([400]) as sink:
        processor = LoopSpanProcessor(OtlpHttp(sink.url, batch=1, max_queue=1))
        tracer = tracer_with(processor).get_tracer("t")
        tracer.start_span("refused").end()
        tracer.start_span("over the bound").end()  # the first is still queued
        await until(lambda: processor.dropped == 2)
        assert sink.requests == []
        assert [r.getMessage() for r in caplog.records if "spans dropped" in r.getMessage()] == [
            "spans dropped (the export queue is full); further drops are counted, not logged"
        ]
        await processor.aclose()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)
