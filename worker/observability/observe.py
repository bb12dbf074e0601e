"""What one command and one provider request leave behind: spans, metrics, one log line.

:class:`Observer` is built by the composition root from a
:class:`worker.observability.telemetry.Telemetry`.
The consumer calls :meth:`Observer.begin` when a delivery arrives (the command span, kind
CONSUMER, continuing the publisher's ``traceparent``; it becomes the task's current span, so the
HTTP client's spans and the result event's ``traceparent`` find it), :meth:`Observer.finish`
once the delivery is settled (span attributes, counters, the outcome log line) and
:meth:`Observer.end` last.

Cost control, since this runs for every command: with tracing off no span is made at all; a
command that is not sampled (:class:`~worker.observability.sampling.HeadSampler` decides before the
SDK is asked) has only a span context, made here (no attributes, no child span; the context still
travels on in ``traceparent``); a sampled command makes its own span and one per provider HTTP
request, while the dedup claim's outcome is an attribute of the command span rather than a span
of its own and the result event carries the command span's context (half the spans, and half
the exporter's work, of one span per step); counters are cached children; the log line is one
dict passed to ``logging`` once, and a success's line is DEBUG unless ``log_successes``
(``CW_LOG_SUCCESSES``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextvars import Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.observability.metrics import Metrics, type_label
from worker.observability.telemetry import Telemetry

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from worker.pipeline.process import Outcome

log = logging.getLogger("worker.commands")

_EVENTS = {
    "succeeded": "command.succeeded",
    "rejected": "command.rejected",
    "failed": "command.failed",
    "expired": "command.expired",
}
_PROPAGATOR = TraceContextTextMapPropagator()


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads W3C trace context from AMQP headers (str, or bytes as the broker may hand them)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def traceparent(ctx: SpanContext) -> str:
    """The W3C ``traceparent`` of a span context."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def _trace_id(watch: Watch, message: AbstractIncomingMessage) -> str | None:
    """The command's trace id: its span's, or (tracing off) the publisher's."""
    if watch.span is not None:
        return f"{watch.span.get_span_context().trace_id:032x}"
    return _incoming_trace_id(message.headers)


def _incoming_trace_id(headers: Mapping[str, Any] | None) -> str | None:
    """The trace id of a well-formed incoming ``traceparent`` (for logs when tracing is off)."""
    value = headers.get("traceparent") if headers else None
    if isinstance(value, str) and len(value) >= 55 and value[2] == "-" and value[35] == "-":
        return value[3:35]
    return None


@dataclass(slots=True)
class Watch:
    """One delivery being observed."""

    started: float  # perf_counter
    received_at: float  # epoch seconds
    span: Span | None = None
    token: Token[Context] | None = None
    first_delivery: bool = True  # not back from a broker-held retry delay


class Observer:
    """Spans, metrics and outcome log lines of the commands and provider requests."""

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        exchange: str = "",
        queue: str = "",
        log_successes: bool = False,
    ) -> None:
        self.tracer = telemetry.tracer
        self._head = telemetry.head
        self._success_level = logging.INFO if log_successes else logging.DEBUG
        self.metrics: Metrics = telemetry.metrics
        self._exchange = exchange
        self._queue = queue
        self._span_name = f"process {exchange}".rstrip()

    @classmethod
    def disabled(cls) -> Observer:
        """No tracing; metrics into a registry nobody reads."""
        return cls(Telemetry.disabled())

    # --- commands -------------------------------------------------------------------------

    def begin(self, message: AbstractIncomingMessage) -> Watch:
        """A delivery arrived: start its span (the task's current span from here on)."""
        headers = message.headers
        watch = Watch(time.perf_counter(), time.time())
        tracer = self.tracer
        if tracer is None:
            return watch
        parent = (
            _PROPAGATOR.extract(headers, getter=_GETTER)
            if headers and "traceparent" in headers
            else None
        )
        parent_span = None if parent is None else trace.get_current_span(parent).get_span_context()
        span: Span
        if self._head.sampled(parent_span):
            attributes = self._consumer_attributes(message)
            span = tracer.start_span(self._span_name, parent, SpanKind.CONSUMER, attributes)
        else:
            span = NonRecordingSpan(self._head.dropped(parent_span))
        watch.span = span
        watch.token = context.attach(trace.set_span_in_context(span))
        return watch

    def _consumer_attributes(self, message: AbstractIncomingMessage) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": self._exchange,
            "messaging.destination.subscription.name": self._queue,
            "messaging.message.body.size": len(message.body),
        }
        if message.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.routing_key
        if message.message_id:
            attributes["messaging.message.id"] = message.message_id
        if message.correlation_id:
            attributes["messaging.message.conversation_id"] = message.correlation_id
        if message.delivery_tag is not None:
            attributes["messaging.rabbitmq.message.delivery_tag"] = message.delivery_tag
        return attributes

    def finish(
        self, watch: Watch, message: AbstractIncomingMessage, outcome: Outcome, settled: bool
    ) -> None:
        """The delivery was settled (or returned to the queue): count it, log it, describe it."""
        event = outcome.event
        command = outcome.command
        deferred = outcome.defer_s is not None
        kind = event.get("type") if event else (command.type if command else None)
        fields: dict[str, Any] = {
            "command_id": event.get("command_id") if event else _id_of(command),
            "type": kind,
            "status": outcome.status,
            "attempts": outcome.retry.attempts if outcome.retry else event.get("attempts", 0),
            "error_code": (event.get("error") or {}).get("code"),
            "duration_ms": round((time.perf_counter() - watch.started) * 1000.0, 3),
        }
        self._count(watch, message, outcome, fields, settled)
        span = watch.span
        if span is not None and span.is_recording():
            _describe(span, outcome, fields)
        level = self._success_level if outcome.status == "succeeded" else logging.INFO
        if settled and log.isEnabledFor(level):
            fields["trace_id"] = _trace_id(watch, message)  # only a log line needs it
            if deferred:
                fields["delay_s"] = round(outcome.defer_s or 0.0, 3)
                name = "command.deferred"
            else:
                duplicate = event.get("duplicate", False)
                name = "command.duplicate" if duplicate else _EVENTS.get(outcome.status, "command")
            log.log(level, name, extra=fields)

    def _count(
        self,
        watch: Watch,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        fields: dict[str, Any],
        settled: bool,
    ) -> None:
        metrics = self.metrics
        provider = outcome.provider
        if provider is not None:
            if outcome.calls > 1:
                metrics.retries(provider, "in_process").inc(outcome.calls - 1)
            if outcome.delayed_retry and settled:
                metrics.retries(provider, "delayed").inc()
        if not settled:
            return
        sent_at = _sent_at(message, outcome) if watch.first_delivery else None
        if sent_at is not None:
            metrics.command_age.observe(max(watch.received_at - sent_at, 0.0))
        if outcome.defer_s is not None:
            return
        kind = type_label(fields["type"])
        metrics.commands(kind, fields["status"]).inc()
        if outcome.event.get("duplicate", False):
            metrics.duplicates(kind).inc()
        if outcome.dead_letter and fields["error_code"]:
            metrics.dead_letters(fields["error_code"]).inc()

    def crashed(self, watch: Watch, exc: BaseException) -> None:
        """Processing raised (a bug): the delivery goes back to the queue."""
        span = watch.span
        if span is not None and span.is_recording():
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))

    def end(self, watch: Watch) -> None:
        """Last call for a delivery: end its span and restore the task's context."""
        if watch.span is not None:
            watch.span.end()
        if watch.token is not None:
            context.detach(watch.token)

    # --- result publishing ------------------------------------------------------------------

    def trace_headers(self, message: AbstractIncomingMessage) -> dict[str, Any] | None:
        """``traceparent``/``tracestate`` for the result event: the command's span (the task's
        current one), or (tracing off) the publisher's own context passed through."""
        if self.tracer is None:
            incoming = message.headers
            if not incoming or "traceparent" not in incoming:
                return None
            return {k: incoming[k] for k in ("traceparent", "tracestate") if k in incoming}
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        headers: dict[str, Any] = {"traceparent": traceparent(ctx)}
        if ctx.trace_state:
            headers["tracestate"] = ctx.trace_state.to_header()
        return headers

    # --- provider requests (worker.providers.http.RequestObserver) -----------------------------

    def request_started(
        self, provider: str, method: str, url: httpx.URL, headers: Mapping[str, str]
    ) -> tuple[Span | None, Mapping[str, str]]:
        """A CLIENT span when the command is recorded; ``traceparent`` added to the headers."""
        if self.tracer is None:
            return None, headers
        current = trace.get_current_span()
        if not current.is_recording():
            ctx = current.get_span_context()
            if not ctx.is_valid:
                return None, headers
            return None, {**headers, "traceparent": traceparent(ctx)}
        span = self.tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=_client_attributes(provider, method, url)
        )
        return span, {**headers, "traceparent": traceparent(span.get_span_context())}

    def request_finished(
        self,
        span: Span | None,
        provider: str,
        status_code: int | None,
        error_type: str | None,
        seconds: float,
    ) -> None:
        """Record the request's duration; finish its span."""
        if error_type != "cancelled":
            self.metrics.provider_request(provider, status_code, seconds)
        if span is None:
            return
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
            if status_code >= 400:
                error_type = str(status_code)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def _id_of(command: Any) -> str | None:
    return command.command_id if command is not None else None


def _sent_at(message: AbstractIncomingMessage, outcome: Outcome) -> float | None:
    """When the command was sent: the AMQP timestamp, else its ``issued_at`` (epoch seconds)."""
    stamp = message.timestamp
    if isinstance(stamp, datetime):
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    command = outcome.command
    if command is not None and command.issued_at is not None:
        return command.issued_at.timestamp()
    return None


def _describe(span: Span, outcome: Outcome, fields: dict[str, Any]) -> None:
    """The command span's own attributes (ids, type, status, attempts, error code)."""
    attributes: dict[str, Any] = {
        "conference_worker.command.status": fields["status"],
        "conference_worker.command.attempts": fields["attempts"],
        "conference_worker.command.duplicate": bool(outcome.event.get("duplicate", False)),
    }
    for key in ("command_id", "type", "error_code"):
        if fields[key] is not None:
            name = "id" if key == "command_id" else key
            attributes[f"conference_worker.command.{name}"] = fields[key]
    if outcome.defer_s is not None:
        attributes["conference_worker.command.defer_s"] = round(outcome.defer_s, 3)
    if fields["error_code"]:
        attributes["error.type"] = fields["error_code"]
    span.set_attributes(attributes)
    if fields["status"] == "failed":
        span.set_status(Status(StatusCode.ERROR, fields["error_code"]))


def _client_attributes(provider: str, method: str, url: httpx.URL) -> dict[str, Any]:
    """HTTP client attributes; ``url.full`` without credentials, query string or fragment.

    The URL is read as its encoded text (where ``?``, ``#`` and ``@`` are delimiters only), its
    ``host`` and its ``port`` (httpx gives it only when explicit and not the scheme's default).
    """
    scheme, _, rest = str(url).partition("://")
    rest = rest.partition("#")[0].partition("?")[0]
    authority, slash, path = rest.partition("/")
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.full": f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}",
        "server.address": url.host or "",
        "conference_worker.provider": provider,
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    return attributes
