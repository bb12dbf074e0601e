"""A stand-in OpenTelemetry collector: accepts OTLP/HTTP trace exports and counts the spans.

The benchmark runs the worker with tracing on, as in production (``OTEL_TRACES_EXPORTER=otlp``,
the default sampler, OTLP/HTTP export from the event loop), so that the worker pays for every
span it makes, for serialising it and for sending it; the sink answers each export at once and
keeps the bodies, counting their spans only when asked (between measurements: parsing them while
a scenario runs would delay the runner's own timestamps), so the run proves that spans really
left the worker.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

PATH = "/v1/traces"


@dataclass(slots=True)
class OtlpSink:
    """An aiohttp server on 127.0.0.1 (a free port); :attr:`endpoint` is the traces URL."""

    exports: int = 0
    bytes_received: int = 0
    _counted: int = 0
    _bodies: list[tuple[bytes, bool]] = field(default_factory=list)  # (body, gzipped), uncounted
    _runner: web.AppRunner | None = None
    _port: int = 0
    _seen: dict[str, int] = field(default_factory=dict)

    @property
    def spans(self) -> int:
        """Spans received so far (the bodies not yet counted are parsed now)."""
        bodies, self._bodies = self._bodies, []
        for body, gzipped in bodies:
            export = ExportTraceServiceRequest.FromString(
                gzip.decompress(body) if gzipped else body
            )
            self._counted += sum(
                len(scope.spans)
                for resource in export.resource_spans
                for scope in resource.scope_spans
            )
        return self._counted

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}{PATH}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(PATH, self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def mark(self, name: str) -> None:
        """Remember the span count now, to report the spans exported since (see :meth:`since`)."""
        self._seen[name] = self.spans

    def since(self, name: str) -> int:
        return self.spans - self._seen.get(name, self.spans)

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._bodies.append((body, request.headers.get("Content-Encoding") == "gzip"))
        self.exports += 1
        self.bytes_received += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")
