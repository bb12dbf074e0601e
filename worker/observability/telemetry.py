"""Traces and metrics, built once at the composition root and handed down; nothing global.

:meth:`Telemetry.from_env` reads the standard ``OTEL_*`` variables itself and builds a
``TracerProvider`` of its own (never installed as the global one).  Spans are exported only by
the OpenTelemetry SDK: each exporter sits behind the SDK's ``BatchSpanProcessor``, whose thread
encodes and sends them.

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (a comma-separated list is
  accepted).  Default: ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``)
  is set, else ``none``.  ``OTEL_SDK_DISABLED=true`` means ``none``.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``): ``http/protobuf`` (default), the
  SDK's OTLP/HTTP ``OTLPSpanExporter`` posting to ``<endpoint>/v1/traces`` (or to
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as given), or ``grpc``, the SDK's grpc exporter (the
  endpoint as given).  Only that endpoint is passed; the exporters read the other
  ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, compression, certificates) themselves.
- ``OTEL_BSP_*`` are read by the SDK's ``BatchSpanProcessor``, except that
  ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` defaults to :data:`DEFAULT_EXPORT_BATCH` here when unset
  (the SDK's is 512: a thread encoding 512 spans at once stalls the loop).
- ``OTEL_TRACES_SAMPLER`` (default ``parentbased_traceidratio``) and ``OTEL_TRACES_SAMPLER_ARG``
  (default :data:`DEFAULT_RATIO`): a publisher's sampling decision is followed; commands that
  arrive without one are sampled at the ratio.  The decision is the observer's
  (:class:`~worker.observability.sampling.HeadSampler`, :attr:`Telemetry.head`), made before the
  SDK builds anything; the SDK's own sampler is ``ALWAYS_ON`` for what it is then asked to record.
- ``OTEL_SERVICE_NAME`` (default ``conference-worker``), ``OTEL_RESOURCE_ATTRIBUTES``.

The variables the SDK reads itself (``OTEL_EXPORTER_OTLP_*`` but the endpoint, ``OTEL_BSP_*``,
``OTEL_RESOURCE_ATTRIBUTES``) come from ``os.environ``, whatever mapping ``from_env`` is given.

With tracing off :attr:`Telemetry.tracer` is None and the hot path skips every span.  Metrics
always go to a Prometheus registry of this object's own
(:class:`worker.observability.metrics.Metrics`).  :meth:`Telemetry.shutdown` flushes and shuts
the provider down in a thread (the exporters' calls block).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Tracer

from worker.observability.metrics import Metrics
from worker.observability.sampling import HeadSampler

log = logging.getLogger("worker.observability.telemetry")

DEFAULT_RATIO = 0.1
DEFAULT_EXPORT_BATCH = 64
DEFAULT_SAMPLER = "parentbased_traceidratio"
SERVICE_NAME = "conference-worker"
INSTRUMENTATION = "conference_worker"
Protocol = Literal["http/protobuf", "grpc"]
_EXPORTERS = frozenset({"otlp", "console", "none"})
_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the ``OTEL_*`` variables ask for."""

    exporters: frozenset[str] = frozenset()  # subset of {"otlp", "console"}; empty: no tracing
    protocol: Protocol = "http/protobuf"
    endpoint: str | None = None  # the traces endpoint; None: the exporter's default
    sampler: str = DEFAULT_SAMPLER
    ratio: float = DEFAULT_RATIO
    service_name: str = SERVICE_NAME
    export_batch: int | None = DEFAULT_EXPORT_BATCH  # None: the SDK reads the variable itself

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def tracing_config(environ: Mapping[str, str]) -> TracingConfig:
    """Read the tracing configuration from ``environ``; ValueError names a bad variable."""
    service = environ.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAME
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TracingConfig(service_name=service)
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None
    default_exporter = "otlp" if endpoint or base else "none"
    names = _names(environ.get("OTEL_TRACES_EXPORTER", "") or default_exporter)
    unknown = names - _EXPORTERS
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported {', '.join(sorted(unknown))}")
    protocol = _protocol(environ)
    if endpoint is None and base is not None:
        endpoint = base if protocol == "grpc" else f"{base.rstrip('/')}/v1/traces"
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in _SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER: unsupported {sampler!r}")
    return TracingConfig(
        exporters=frozenset(names - {"none"}),
        protocol=protocol,
        endpoint=endpoint,
        sampler=sampler,
        ratio=_ratio(environ.get("OTEL_TRACES_SAMPLER_ARG", "")),
        service_name=service,
        export_batch=None if "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in environ else DEFAULT_EXPORT_BATCH,
    )


def _names(value: str) -> frozenset[str]:
    return frozenset(part.strip().lower() for part in value.split(",") if part.strip())


def _protocol(environ: Mapping[str, str]) -> Protocol:
    value = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )
    if value == "grpc":
        return "grpc"
    if value == "http/protobuf":
        return "http/protobuf"
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported {value!r} (http/protobuf, grpc)")


def _ratio(value: str) -> float:
    if not value.strip():
        return DEFAULT_RATIO
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {value!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {ratio} is not within 0..1")
    return ratio


def head_sampler(config: TracingConfig) -> HeadSampler:
    """The sampler ``config.sampler`` names (the ratio ones use ``config.ratio``)."""
    name = config.sampler.removeprefix("parentbased_")
    ratio = {"always_on": 1.0, "always_off": 0.0}.get(name, config.ratio)
    return HeadSampler(ratio, parent_based=config.sampler.startswith("parentbased_"))


def make_processors(config: TracingConfig) -> list[SpanProcessor]:
    """The span processors ``config`` names, each a ``BatchSpanProcessor`` (exporters imported
    only when used)."""
    exporters: list[SpanExporter] = []
    if "console" in config.exporters:
        exporters.append(ConsoleSpanExporter(service_name=config.service_name))
    if "otlp" in config.exporters:
        exporters.append(_otlp_exporter(config))
    return [
        BatchSpanProcessor(exporter, max_export_batch_size=config.export_batch)
        for exporter in exporters
    ]


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=config.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=config.endpoint)


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("conference-worker")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _resource(service_name: str, instance: str | None) -> Resource:
    attributes: dict[str, str] = {"service.name": service_name, "service.version": version()}
    if instance:
        attributes["service.instance.id"] = instance
    return Resource.create(attributes)


@dataclass(slots=True)
class Telemetry:
    """The tracer (None: tracing off), its head sampler and the metrics of one worker."""

    tracer: Tracer | None = None
    head: HeadSampler = field(default_factory=HeadSampler)
    metrics: Metrics = field(default_factory=Metrics)
    provider: TracerProvider | None = None
    exporter: InMemorySpanExporter | None = None  # only for :meth:`in_memory`
    config: TracingConfig = field(default_factory=TracingConfig)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, instance: str | None = None
    ) -> Telemetry:
        """Tracing as the ``OTEL_*`` variables say (default: ``os.environ``), new metrics."""
        environ = os.environ if environ is None else environ
        config = tracing_config(environ)
        if not config.enabled:
            return cls(config=config)
        provider = TracerProvider(
            sampler=ALWAYS_ON, resource=_resource(config.service_name, instance)
        )
        for processor in make_processors(config):
            provider.add_span_processor(processor)
        head = head_sampler(config)
        log.info("tracing: %s, sampler %r", ",".join(sorted(config.exporters)), head)
        return cls(_tracer(provider), head, provider=provider, config=config)

    @classmethod
    def in_memory(cls, head: HeadSampler | None = None) -> Telemetry:
        """Every span kept in memory (:attr:`exporter`), exported as it ends (for tests)."""
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=ALWAYS_ON, resource=_resource(SERVICE_NAME, None))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        config = TracingConfig(exporters=frozenset({"memory"}), sampler="custom")
        head = head or HeadSampler()
        return cls(_tracer(provider), head, provider=provider, exporter=exporter, config=config)

    @classmethod
    def disabled(cls) -> Telemetry:
        """No tracing; metrics still counted."""
        return cls()

    async def shutdown(self) -> None:
        """Flush the spans still queued and stop the exporters, in a thread (exporting blocks)."""
        if self.provider is not None:
            await asyncio.to_thread(_flush_and_shut_down, self.provider)


def _flush_and_shut_down(provider: TracerProvider) -> None:
    provider.force_flush()
    provider.shutdown()


def _tracer(provider: TracerProvider) -> Tracer:
    return provider.get_tracer(INSTRUMENTATION, version())
