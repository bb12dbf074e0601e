"""Telemetry from the environment, the observer's spans, headers and counts, with no I/O."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from httpx import URL
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpExporter,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_pipeline import FakeProvider, make, role
from worker.observability.metrics import Metrics
from worker.observability.observe import Observer
from worker.observability.sampling import HeadSampler
from worker.observability.telemetry import (
    DEFAULT_RATIO,
    Telemetry,
    TracingConfig,
    head_sampler,
    make_processors,
    tracing_config,
)
from worker.pipeline.gate import BreakerState, Gate
from worker.pipeline.process import Delivery, Outcome
from worker.pipeline.retry import RetryState

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
NOT_SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"


def message(headers: dict[str, Any] | None = None, **props: Any) -> Any:
    """A stand-in for an incoming AMQP message."""
    fields: dict[str, Any] = {
        "body": role(),
        "headers": headers or {},
        "routing_key": "conference.supervisor_role",
        "message_id": "m-1",
        "correlation_id": None,
        "delivery_tag": 1,
        "timestamp": None,
    }
    fields.update(props)
    return SimpleNamespace(**fields)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry, by name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- configuration from the environment ---------------------------------------------------------


def test_no_endpoint_means_no_tracing() -> None:
    """Without OTEL_* variables tracing is off and the tracer is None."""
    config = tracing_config({})
    assert not config.enabled
    assert Telemetry.from_env({}).tracer is None


def batch_processors(telemetry: Telemetry) -> list[BatchSpanProcessor]:
    """The provider's span processors (each must be a BatchSpanProcessor)."""
    assert telemetry.provider is not None
    processors = telemetry.provider._active_span_processor._span_processors
    assert all(isinstance(p, BatchSpanProcessor) for p in processors)
    return [p for p in processors if isinstance(p, BatchSpanProcessor)]


def exporter_of(processor: BatchSpanProcessor) -> SpanExporter:
    """The exporter behind a BatchSpanProcessor."""
    exporter = processor._batch_processor._exporter
    assert isinstance(exporter, SpanExporter)
    return exporter


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
            "http://collector:4318/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9999/x",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://t:9999/x",
        ),
    ],
)
async def test_an_endpoint_selects_otlp_over_http(environ: dict[str, str], url: str) -> None:
    """An OTLP endpoint (protocol http/protobuf, the default) builds one BatchSpanProcessor with
    the SDK's HTTP OTLPSpanExporter posting to <endpoint>/v1/traces, or to the _TRACES_ endpoint
    verbatim."""
    config = tracing_config(environ)
    assert (config.exporters, config.protocol) == (frozenset({"otlp"}), "http/protobuf")
    telemetry = Telemetry.from_env(environ)
    assert telemetry.tracer is not None
    (processor,) = batch_processors(telemetry)
    exporter = exporter_of(processor)
    assert isinstance(exporter, HttpExporter)
    assert exporter._endpoint == url
    await telemetry.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    ],
)
def test_none_or_unset_builds_no_tracer(environ: dict[str, str]) -> None:
    """OTEL_TRACES_EXPORTER=none, OTEL_SDK_DISABLED=true or no OTEL_* variable at all: no
    tracer and no provider (so no exporter thread)."""
    telemetry = Telemetry.from_env(environ)
    assert (telemetry.tracer, telemetry.provider) == (None, None)


def test_export_batches_are_small_unless_configured() -> None:
    """Spans are exported 64 at a time (short GIL holds) unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    is set, which the SDK then reads itself."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing_config(endpoint).export_batch == 64
    configured = {**endpoint, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"}
    assert tracing_config(configured).export_batch is None


async def test_the_sdk_processor_batches_64_unless_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The BatchSpanProcessor exports 64 spans at a time unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    is set; that and the other OTEL_BSP_* variables are read by the SDK itself."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    for name, value in endpoint.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    default = Telemetry.from_env(os.environ)
    (processor,) = batch_processors(default)
    batch = processor._batch_processor
    assert (batch._max_export_batch_size, batch._max_queue_size) == (64, 100)
    assert batch._schedule_delay_millis == 250
    await default.shutdown()
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10")
    configured = Telemetry.from_env(os.environ)
    (processor,) = batch_processors(configured)
    assert processor._batch_processor._max_export_batch_size == 10
    await configured.shutdown()


class Recorder(SpanExporter):
    """An exporter keeping what it is given."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.names += [span.name for span in spans]
        return SpanExportResult.SUCCESS


async def test_shutdown_flushes_the_queued_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans still queued (far from a full batch, long before the schedule delay) reach the
    exporter when shutdown() flushes the provider."""
    recorder = Recorder()
    monkeypatch.setattr("worker.observability.telemetry._otlp_exporter", lambda config: recorder)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    telemetry = Telemetry.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert telemetry.tracer is not None
    telemetry.tracer.start_span("late").end()
    telemetry.tracer.start_span("later").end()
    assert recorder.names == []
    await telemetry.shutdown()
    assert recorder.names == ["late", "later"]


def test_grpc_keeps_the_endpoint_and_traces_endpoint_wins() -> None:
    """grpc uses the endpoint as given; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used verbatim."""
    grpc = tracing_config(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert (grpc.protocol, grpc.endpoint) == ("grpc", "http://c:4317")
    (processor,) = make_processors(grpc)
    assert isinstance(processor, BatchSpanProcessor)
    assert isinstance(processor._batch_processor._exporter, GrpcExporter)
    processor.shutdown()  # type: ignore[no-untyped-call]  # its thread
    traces = tracing_config(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9999/x",
        }
    )
    assert traces.endpoint == "http://t:9999/x"


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, {"console"}),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, {"otlp", "console"}),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, set()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, set()),
    ],
)
def test_exporter_selection(environ: dict[str, str], exporters: set[str]) -> None:
    """OTEL_TRACES_EXPORTER picks console / otlp / none; OTEL_SDK_DISABLED turns all off."""
    assert tracing_config(environ).exporters == frozenset(exporters)


def test_console_exporter_is_built() -> None:
    """console builds a ConsoleSpanExporter."""
    (processor,) = make_processors(TracingConfig(exporters=frozenset({"console"})))
    assert isinstance(processor, BatchSpanProcessor)
    assert isinstance(processor._batch_processor._exporter, ConsoleSpanExporter)
    processor.shutdown()  # type: ignore[no-untyped-call]  # its thread


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_TRACES_SAMPLER": "sometimes"},
        {"OTEL_TRACES_SAMPLER_ARG": "1.5"},
        {"OTEL_TRACES_SAMPLER_ARG": "half"},
    ],
)
def test_bad_variables_are_refused(environ: dict[str, str]) -> None:
    """An unsupported exporter, protocol or sampler, or a ratio outside 0..1, is a ValueError."""
    with pytest.raises(ValueError, match="OTEL_"):
        tracing_config(environ)


def test_default_sampler_is_parent_based_ratio() -> None:
    """By default commands without a parent are sampled at DEFAULT_RATIO; parents decide."""
    config = tracing_config({"OTEL_TRACES_EXPORTER": "console"})
    assert (config.sampler, config.ratio) == ("parentbased_traceidratio", DEFAULT_RATIO)
    head = head_sampler(config)
    assert (head.parent_based, head.ratio) == (True, DEFAULT_RATIO)


@pytest.mark.parametrize(
    ("sampler", "arg", "parent_based", "ratio"),
    [
        ("traceidratio", "0.25", False, 0.25),
        ("always_on", "", False, 1.0),
        ("always_off", "0.5", False, 0.0),
        ("parentbased_always_off", "", True, 0.0),
        ("parentbased_always_on", "", True, 1.0),
    ],
)
def test_sampler_from_env(sampler: str, arg: str, parent_based: bool, ratio: float) -> None:
    """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG give the named sampler's rules."""
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg}
    head = head_sampler(tracing_config(env))
    assert (head.parent_based, head.ratio) == (parent_based, ratio)


async def test_from_env_builds_a_provider_of_its_own() -> None:
    """A configured exporter gives a tracer from a private provider; shutdown flushes it."""
    telemetry = Telemetry.from_env({"OTEL_TRACES_EXPORTER": "console"}, instance="w-1")
    assert telemetry.tracer is not None
    assert telemetry.provider is not None
    resource = telemetry.provider.resource.attributes
    assert (resource["service.name"], resource["service.instance.id"]) == (
        "conference-worker",
        "w-1",
    )
    await telemetry.shutdown()


# --- the observer: spans and trace headers ------------------------------------------------------


async def run_command(observer: Observer, msg: Any, *, provider: FakeProvider | None = None) -> Any:
    """One delivery through a pipeline traced by ``observer``, as the consumer drives it."""
    pipeline = make(telnyx=provider)
    watch = observer.begin(msg)
    try:
        span, headers = observer.request_started(
            "telnyx", "POST", URL("http://u:p@h:1/v2/x?token=t"), {"a": "b"}
        )
        observer.request_finished(span, "telnyx", 503, None, 0.01)
        outcome = await pipeline.process(Delivery(msg.body))
        result_headers = observer.trace_headers(msg)
        observer.finish(watch, msg, outcome, True)
    finally:
        observer.end(watch)
    return headers, result_headers


async def test_sampled_command_continues_the_trace() -> None:
    """A sampled traceparent: consumer span under the publisher's, children under it, headers."""
    telemetry = Telemetry.in_memory()
    observer = Observer(telemetry, exchange="cmds", queue="q")
    sent, result = await run_command(observer, message({"traceparent": SAMPLED}))
    assert telemetry.exporter is not None
    spans = {span.name: span for span in telemetry.exporter.get_finished_spans()}
    assert set(spans) == {"process cmds", "POST"}
    command = spans["process cmds"]
    assert command.kind is SpanKind.CONSUMER
    assert command.parent is not None
    assert f"{command.parent.span_id:016x}" == PARENT_ID
    assert {f"{s.context.trace_id:032x}" for s in spans.values()} == {TRACE_ID}
    parent = spans["POST"].parent
    assert parent is not None
    assert parent.span_id == command.context.span_id
    attributes = command.attributes or {}
    assert attributes["conference_worker.dedup.outcome"] == "claimed"
    assert attributes["conference_worker.command.id"] == "r-1"
    assert attributes["conference_worker.command.status"] == "succeeded"
    assert attributes["messaging.system"] == "rabbitmq"
    client = spans["POST"]
    assert (client.attributes or {})["url.full"] == "http://h:1/v2/x"
    assert (client.attributes or {})["error.type"] == "503"
    assert sent["traceparent"] == f"00-{TRACE_ID}-{client.context.span_id:016x}-01"
    assert result == {"traceparent": f"00-{TRACE_ID}-{command.context.span_id:016x}-01"}


async def test_unsampled_command_makes_no_span_but_propagates() -> None:
    """A not-sampled parent: no span is recorded, yet traceparent (flag 00) travels on."""
    telemetry = Telemetry.in_memory(HeadSampler(0.0))
    observer = Observer(telemetry)
    sent, result = await run_command(observer, message({"traceparent": NOT_SAMPLED}))
    assert telemetry.exporter is not None
    assert telemetry.exporter.get_finished_spans() == ()
    assert sent["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert sent["traceparent"].endswith("-00")
    assert result["traceparent"].startswith(f"00-{TRACE_ID}-")


async def test_tracing_off_passes_the_publisher_context_through() -> None:
    """Tracing off: no traceparent is made up; the publisher's is echoed on the result."""
    observer = Observer.disabled()
    incoming = {"traceparent": SAMPLED, "tracestate": "k=v"}
    sent, result = await run_command(observer, message(incoming))
    assert "traceparent" not in sent
    assert result == incoming


# --- the observer: metrics and the outcome log line ---------------------------------------------


async def test_outcomes_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Each settled outcome counts by type/status, and (successes logged too) logs one line
    with the stable fields."""
    observer = Observer(Telemetry.disabled(), log_successes=True)
    caplog.set_level(logging.INFO, logger="worker.commands")
    await run_command(observer, message({"traceparent": SAMPLED}))
    await run_command(observer, message(body=role(supervisor_role="shout")))
    got = samples(observer.metrics)
    kind = "conference.supervisor_role"
    total = "conference_worker_commands_total"
    assert got[(total, (("status", "succeeded"), ("type", kind)))] == 1
    assert got[(total, (("status", "rejected"), ("type", kind)))] == 1
    assert got[("conference_worker_dead_letters_total", (("code", "invalid_command"),))] == 1
    count = ("conference_worker_provider_request_duration_seconds_count",)
    assert got[(*count, (("provider", "telnyx"), ("status_code", "503")))] == 2
    lines = [r for r in caplog.records if r.name == "worker.commands"]
    assert [r.getMessage() for r in lines] == ["command.succeeded", "command.rejected"]
    fields = ("command_id", "type", "status", "attempts", "error_code", "duration_ms", "trace_id")
    for record in lines:
        assert all(hasattr(record, name) for name in fields)
    assert (lines[0].trace_id, lines[1].error_code) == (TRACE_ID, "invalid_command")  # type: ignore[attr-defined]


async def test_successes_are_logged_at_debug_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """By default a success is a DEBUG line and anything else an INFO line."""
    observer = Observer(Telemetry.disabled())
    caplog.set_level(logging.DEBUG, logger="worker.commands")
    await run_command(observer, message({"traceparent": SAMPLED}))
    await run_command(observer, message(body=role(supervisor_role="shout")))
    lines = [(r.getMessage(), r.levelno) for r in caplog.records if r.name == "worker.commands"]
    assert lines == [("command.succeeded", logging.DEBUG), ("command.rejected", logging.INFO)]


def test_retries_are_counted_from_calls_and_deferrals() -> None:
    """calls-1 in-process retries per delivery; a retrier deferral is one delayed retry."""
    observer = Observer(Telemetry.disabled())
    pipeline_outcome = Outcome(
        {},
        "",
        dead_letter=False,
        defer_s=5.0,
        retry=RetryState(attempts=3),
        command=_command(),
        calls=3,
        delayed_retry=True,
    )
    watch = observer.begin(message())
    observer.finish(watch, message(), pipeline_outcome, True)
    observer.end(watch)
    got = samples(observer.metrics)
    retries = "conference_worker_retries_total"
    assert got[(retries, (("kind", "in_process"), ("provider", "telnyx")))] == 2
    assert got[(retries, (("kind", "delayed"), ("provider", "telnyx")))] == 1
    total = "conference_worker_commands_total"
    assert sum(v for (name, _), v in got.items() if name == total) == 0


def test_breaker_state_gauge_follows_the_gate() -> None:
    """Gate(on_change=metrics.breaker_changed) moves the gauge: 2 open, 0 closed."""
    metrics = Metrics()
    gate = Gate("vinix", on_change=metrics.breaker_changed)
    gauge = ("conference_worker_breaker_state", (("provider", "vinix"),))
    for _ in range(gate.config.failure_threshold):
        gate.failed()
    assert gate.state is BreakerState.OPEN
    assert samples(metrics)[gauge] == 2
    gate.succeeded()
    assert samples(metrics)[gauge] == 0


def test_registries_are_private() -> None:
    """Two Metrics objects never share a registry (nothing goes to the global one)."""
    first, second = Metrics(), Metrics()
    first.commands("conference.update", "succeeded").inc()
    key = (
        "conference_worker_commands_total",
        (("status", "succeeded"), ("type", "conference.update")),
    )
    assert (samples(first)[key], samples(second)[key]) == (1, 0)


def _command() -> Any:
    from worker.contract import codec

    return codec.decode(role(), 1 << 20)


def test_every_metric_the_dashboards_read_is_exported() -> None:
    """The registry exposes each conference_worker_* family named in the issue (and ops/)."""
    names = {
        family.name for family in text_string_to_metric_families(Metrics().exposition().decode())
    }
    assert {
        "conference_worker_commands",
        "conference_worker_duplicates",
        "conference_worker_retries",
        "conference_worker_dead_letters",
        "conference_worker_provider_request_duration_seconds",
        "conference_worker_command_age_seconds",
        "conference_worker_inflight",
        "conference_worker_breaker_state",
        "conference_worker_ready",
    } <= names
