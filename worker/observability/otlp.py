"""OTLP/HTTP span export from the event loop: no exporter thread, so no stall of the loop.

Why not the SDK's ``BatchSpanProcessor``: its thread encodes a whole batch of spans holding the
GIL, and every system call the event loop makes (each socket write, each ``epoll_wait``) hands the
GIL to that thread for up to the switch interval, so a batch stalls command processing for about
its encoding time.  At 750 commands/s the publish→result p99 was 6–6.5 ms without tracing, 8–13
ms with batches of 8 spans, 14–20 with 64 and 42 with 256 (ops/bench/RESULTS.md).  Here spans are
encoded in the loop, :data:`ENCODE_CHUNK` at a time with a yield between chunks, and posted by an
aiohttp session in the loop::

    span.end() --on_end--> queue (bounded; full: the span is dropped)
    queue reaches the batch size, or the schedule delay passes
        --> encode chunk by chunk (one ExportTraceServiceRequest each) --> POST the concatenation

Protobuf parses concatenated messages as one whose repeated fields are appended, so a batch is
the concatenation of its chunks' requests (each names the resource once; collectors take it).
Encoding each span on its own instead cost 60 µs more per command at the default ratio, the
resource being encoded again for every span.

A failed POST is retried (429, 502, 503, 504, or no answer) after 1, 2, 4 s, then dropped; spans
dropped, for that or for a full queue, are counted (:attr:`LoopSpanProcessor.dropped`) and the
first drop is logged.  Configured by the standard variables (:meth:`OtlpHttp.from_env`):
endpoint, headers, timeout (seconds, as the Python SDK reads it), ``gzip`` compression, CA and
client certificates; ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_SCHEDULE_DELAY`` (ms) and
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.util.re import parse_env_headers

log = logging.getLogger("worker.observability.telemetry")

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_DELAYS_S = (1.0, 2.0, 4.0)
ENCODE_CHUNK = 8  # spans encoded between two yields to the event loop


@dataclass(frozen=True, slots=True)
class OtlpHttp:
    """Where and how to post spans."""

    endpoint: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    timeout_s: float = 10.0
    gzip: bool = False
    tls: ssl.SSLContext | None = None
    max_queue: int = 2048
    batch: int = 64
    delay_s: float = 5.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], endpoint: str | None, batch: int
    ) -> OtlpHttp | None:
        """The export ``environ`` asks for; None when only the SDK's exporter can do it (deflate
        compression, a credential provider)."""

        def get(name: str) -> str:
            traces = environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}", "").strip()
            return traces or environ.get(f"OTEL_EXPORTER_OTLP_{name}", "").strip()

        compression = get("COMPRESSION").lower()
        if compression not in ("", "none", "gzip") or any(
            "CREDENTIAL_PROVIDER" in name for name in environ
        ):
            return None

        def bsp(name: str, default: float) -> float:
            return _number(environ.get(f"OTEL_BSP_{name}", ""), f"OTEL_BSP_{name}", default)

        return cls(
            endpoint=endpoint or DEFAULT_ENDPOINT,
            headers=dict(parse_env_headers(get("HEADERS"), liberal=True)),
            timeout_s=_number(get("TIMEOUT"), "OTEL_EXPORTER_OTLP_TIMEOUT", 10.0),
            gzip=compression == "gzip",
            tls=_tls(get("CERTIFICATE"), get("CLIENT_CERTIFICATE"), get("CLIENT_KEY")),
            max_queue=int(bsp("MAX_QUEUE_SIZE", 2048)),
            batch=int(bsp("MAX_EXPORT_BATCH_SIZE", batch)),
            delay_s=bsp("SCHEDULE_DELAY", 5000) / 1000,
        )


def _number(value: str, name: str, default: float) -> float:
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not number > 0:
        raise ValueError(f"{name}: {value!r} is not positive")
    return number


def _tls(ca: str, cert: str, key: str) -> ssl.SSLContext | None:
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca or None)
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


class LoopSpanProcessor(SpanProcessor):
    """Queues sampled spans as they end; encodes and posts them in batches, in the event loop.

    Spans must end in the loop's thread (the worker's all do).
    """

    def __init__(self, config: OtlpHttp) -> None:
        self._config = config
        self._queue: list[ReadableSpan] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.dropped = 0  # spans lost to a full queue or a failed export
        self.exported = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._config.max_queue:
            self._drop(1, "the export queue is full")
            return
        self._queue.append(span)
        if self._task is None:
            self._start()
        if len(self._queue) >= self._config.batch and self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a span ended outside the loop: sent with the next, or at aclose()
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="otlp-export")

    async def aclose(self) -> None:
        """Send what is queued (within the timeout), then stop."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(self._config.timeout_s):
                while self._queue:
                    await self._post(self._take(), retries=())
        except TimeoutError:
            self._drop(len(self._queue), "shutting down")
        finally:
            if self._session is not None:
                await self._session.close()

    def shutdown(self) -> None:  # the SDK's call, from a thread: aclose() has done the work
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return not self._queue

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                async with asyncio.timeout(self._config.delay_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            while self._queue:
                batch = self._take()
                try:
                    await self._post(batch, retries=RETRY_DELAYS_S)
                except Exception:  # a span the encoder cannot take: lose the batch, not the task
                    log.exception("could not export %d spans", len(batch))
                    self.dropped += len(batch)
                if len(self._queue) < self._config.batch:
                    break

    def _take(self) -> list[ReadableSpan]:
        batch, self._queue = self._queue[: self._config.batch], self._queue[self._config.batch :]
        return batch

    async def _post(self, spans: list[ReadableSpan], retries: tuple[float, ...]) -> None:
        parts = []
        for start in range(0, len(spans), ENCODE_CHUNK):
            if start:
                await asyncio.sleep(0)  # let deliveries in between chunks
            parts.append(encode_spans(spans[start : start + ENCODE_CHUNK]).SerializeToString())
        body = b"".join(parts)
        headers = {**self._config.headers, "Content-Type": "application/x-protobuf"}
        if self._config.gzip:
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        for delay in (*retries, None):
            problem = await self._send(body, headers)
            if problem is None:
                self.exported += len(spans)
                return
            reason, retryable = problem
            if delay is None or not retryable:
                self._drop(len(spans), reason)
                return
            await asyncio.sleep(delay)

    async def _send(self, body: bytes, headers: dict[str, str]) -> tuple[str, bool] | None:
        """None when the collector took the spans; else what went wrong, and if worth a retry."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
            connector = aiohttp.TCPConnector(limit=1, ssl=self._config.tls or True)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        try:
            async with self._session.post(self._config.endpoint, data=body, headers=headers) as r:
                await r.read()
                if r.status < 300:
                    return None
                return f"HTTP {r.status}", r.status in RETRY_STATUSES
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}", True

    def _drop(self, count: int, why: str) -> None:
        if count and not self.dropped:
            log.warning("spans dropped (%s); further drops are counted, not logged", why)
        self.dropped += count
