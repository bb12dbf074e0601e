"""Whether a command is traced: decided at the head, before the OpenTelemetry SDK builds anything.

The SDK's ``Tracer.start_span`` asks its sampler only after reading the parent, making ids, a
sampling result and a span context, and counting the span for its own metrics: ≈ 2.4 µs in a hot
loop, for every command, though at the default ratio nine in ten are dropped.  With every command
dropped, the worker's drains cost 616–632 µs per command before this against 530–598 with tracing
off, and 548–578 after against 524–578 (ops/bench/RESULTS.md).  :class:`HeadSampler` decides
first; only a sampled command reaches the SDK (whose sampler is then ``ALWAYS_ON``).  A dropped
command still gets a span context, so its ``traceparent`` travels on to the provider and the
result event.

The rules are those of the ``OTEL_TRACES_SAMPLER`` values it stands for::

    parent based, and a valid parent   ->  the parent's sampled flag
    otherwise (a root, or not parent based)
        a parent's trace id            ->  TraceIdRatioBased's rule: low 64 bits < ratio * 2**64
        no parent                      ->  a fresh random draw at the same rate

(always_on is ratio 1, always_off ratio 0.)  A root's draw is not derived from the trace id the
SDK then makes: nothing downstream re-derives it, services after us follow the sampled flag.
"""

from __future__ import annotations

import random

from opentelemetry.trace import SpanContext, TraceFlags

_LOW_64 = (1 << 64) - 1
_SAMPLED = int(TraceFlags.SAMPLED)
_RANDOM_TRACE_ID = int(TraceFlags.RANDOM_TRACE_ID)  # W3C level 2: the trace id is random


class HeadSampler:
    """A parent-based (or not) ratio sampler that costs a comparison when it drops."""

    __slots__ = ("_bound", "parent_based", "ratio")

    def __init__(self, ratio: float = 1.0, *, parent_based: bool = True) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sampling ratio {ratio} is not within 0..1")
        self.ratio = ratio
        self.parent_based = parent_based
        self._bound = round(ratio * (1 << 64))  # as TraceIdRatioBased.get_bound_for_rate

    def __repr__(self) -> str:
        kind = "parentbased_traceidratio" if self.parent_based else "traceidratio"
        return f"{kind}({self.ratio:g})"

    def sampled(self, parent: SpanContext | None) -> bool:
        """Whether the command continuing ``parent`` (None: a new trace) is recorded."""
        if parent is not None and parent.is_valid:
            if self.parent_based:
                return bool(parent.trace_flags & _SAMPLED)
            return parent.trace_id & _LOW_64 < self._bound
        return random.getrandbits(64) < self._bound

    @staticmethod
    def dropped(parent: SpanContext | None) -> SpanContext:
        """The span context of a command that is not recorded (what the SDK would make)."""
        span_id = random.getrandbits(64) or 1  # 0 is the invalid id
        if parent is not None and parent.is_valid:
            flags = TraceFlags(parent.trace_flags & ~_SAMPLED)
            return SpanContext(parent.trace_id, span_id, False, flags, parent.trace_state)
        trace_id = random.getrandbits(128) or 1  # 0 is the invalid id
        return SpanContext(trace_id, span_id, False, TraceFlags(_RANDOM_TRACE_ID))
