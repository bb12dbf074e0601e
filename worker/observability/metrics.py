"""The worker's Prometheus metrics, in a registry of their own (never the global default one).

Every series the dashboards and alerts read (``ops/prometheus``, ``ops/grafana``) is created at
zero up front, so rates and ``absent()`` work from the first scrape.  Label values are bounded:
command types outside the contract count as ``unknown``, error codes come from the contract's
list, HTTP status codes are numbers (or ``error`` when no answer came).

The hot path calls the small methods here; each caches its labelled children, so a count is a
dict look-up and an increment (``labels()`` itself takes a lock and validates every time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from worker.contract.messages import COMMAND_TYPES, ErrorCode, Status
from worker.pipeline.gate import BreakerState

M = TypeVar("M", bound=MetricWrapperBase)

PROVIDERS = ("vinix", "telnyx")
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def type_label(kind: str | None) -> str:
    """A command type as a label value: one of the contract's, else ``unknown``."""
    return kind if kind in COMMAND_TYPES else "unknown"


class _Children(Generic[M]):
    """A metric's labelled children, cached by label values."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    """Counters, gauges and histograms of one worker."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.commands = _Children(
            Counter(
                "conference_worker_commands",
                "Deliveries finished with a result event (published and confirmed, then "
                "acknowledged), by command type and result status; duplicates included.",
                ["type", "status"],
                registry=r,
            )
        )
        self.duplicates = _Children(
            Counter(
                "conference_worker_duplicates",
                "Deliveries answered from the deduplication store (duplicate: true), by type.",
                ["type"],
                registry=r,
            )
        )
        self.retries = _Children(
            Counter(
                "conference_worker_retries",
                "Provider retries. kind=in_process: provider calls after the first within one "
                "delivery (calls made by the delivery minus one); kind=delayed: commands handed "
                "to a broker-held delay queue to be tried again later (after a failed call, or "
                "at shutdown while waiting to retry).",
                ["provider", "kind"],
                registry=r,
            )
        )
        self.dead_letters = _Children(
            Counter(
                "conference_worker_dead_letters",
                "Commands published to the dead-letter exchange, by error code.",
                ["code"],
                registry=r,
            )
        )
        self.provider_duration = _Children(
            Histogram(
                "conference_worker_provider_request_duration_seconds",
                "Provider HTTP requests (token requests included), from sending to the whole "
                "answer read, by provider and HTTP status code ('error': no answer).",
                ["provider", "status_code"],
                registry=r,
            )
        )
        self.command_age = Histogram(
            "conference_worker_command_age_seconds",
            "Seconds from a command's AMQP timestamp property (else its issued_at) to the "
            "moment the worker took it from the queue, for deliveries from publishers (not "
            "those back from a retry delay); commands with neither are not observed.",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "conference_worker_inflight", "Deliveries being processed right now.", registry=r
        )
        self.breaker_state = _Children(
            Gauge(
                "conference_worker_breaker_state",
                "Circuit breaker of each provider: 0 closed, 1 half-open, 2 open.",
                ["provider"],
                registry=r,
            )
        )
        self.ready = Gauge(
            "conference_worker_ready",
            "1 while GET /readyz answers 200 (broker, consumer and dedup store ok), else 0.",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._zeros()

    def _zeros(self) -> None:
        """Create every bounded series at zero."""
        for kind in COMMAND_TYPES:
            self.duplicates(kind)
            for status in get_args(Status):
                self.commands(kind, status)
        self.commands("unknown", "rejected")
        for code in get_args(ErrorCode):
            self.dead_letters(code)
        for provider in PROVIDERS:
            self.breaker_state(provider).set(0)
            for kind in ("in_process", "delayed"):
                self.retries(provider, kind)

    def breaker_changed(self, provider: str, state: BreakerState) -> None:
        """``Gate(on_change=...)``: the provider's breaker changed state."""
        self.breaker_state(provider).set(int(state))

    def provider_request(self, provider: str, status_code: int | None, seconds: float) -> None:
        """One provider HTTP request took ``seconds`` (status None: no answer)."""
        label = "error" if status_code is None else str(status_code)
        self.provider_duration(provider, label).observe(seconds)

    def track(self, *, inflight: Callable[[], float], ready: Callable[[], float]) -> None:
        """Read the in-flight count and the readiness when scraped (nothing on the hot path)."""
        self.inflight.set_function(inflight)
        self.ready.set_function(ready)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
