"""The head sampler: the OTEL_TRACES_SAMPLER rules, decided before the SDK builds anything."""

from __future__ import annotations

import random

import pytest
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from worker.observability.sampling import HeadSampler

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331


def parent(*, sampled: bool, trace_id: int = TRACE_ID) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, PARENT_ID, True, flags, TraceState([("pub", "1")]))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_parent_based_follows_the_parents_flag(ratio: float) -> None:
    """Parent based: a valid parent's sampled flag decides, whatever the ratio."""
    head = HeadSampler(ratio)
    assert head.sampled(parent(sampled=True))
    assert not head.sampled(parent(sampled=False))


def test_not_parent_based_judges_the_parents_trace_id() -> None:
    """Not parent based: TraceIdRatioBased's rule on the parent's trace id (low 64 bits)."""
    head = HeadSampler(0.5, parent_based=False)
    low = (1 << 64) - 1
    assert head.sampled(parent(sampled=False, trace_id=(7 << 64) | 1))
    assert not head.sampled(parent(sampled=True, trace_id=(7 << 64) | low))


def test_roots_are_sampled_at_the_ratio() -> None:
    """A command without a parent is sampled at the ratio; 0 never, 1 always."""
    random.seed(7)
    head = HeadSampler(0.1)
    share = sum(head.sampled(None) for _ in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
    assert not any(HeadSampler(0.0).sampled(None) for _ in range(1000))
    assert all(HeadSampler(1.0).sampled(None) for _ in range(1000))


def test_a_dropped_child_keeps_the_trace_and_its_state() -> None:
    """Dropped under a parent: same trace id and tracestate, a new span id, not sampled."""
    ctx = HeadSampler.dropped(parent(sampled=False))
    assert (ctx.trace_id, ctx.trace_state.to_header()) == (TRACE_ID, "pub=1")
    assert ctx.span_id not in (0, PARENT_ID)
    assert not ctx.trace_flags.sampled
    assert ctx.is_valid
    assert not ctx.is_remote


def test_a_dropped_root_starts_a_trace() -> None:
    """Dropped without a parent: a valid new trace, marked random and not sampled."""
    first, second = HeadSampler.dropped(None), HeadSampler.dropped(None)
    assert first.is_valid
    assert first.trace_id != second.trace_id
    assert not first.trace_flags.sampled
    assert first.trace_flags.random_trace_id


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_ratio_outside_0_1_is_refused(ratio: float) -> None:
    """The ratio is a probability."""
    with pytest.raises(ValueError, match="ratio"):
        HeadSampler(ratio)
