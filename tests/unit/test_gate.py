"""The provider gate: circuit breaker states, probes, Retry-After holds and rate limiting."""

from __future__ import annotations

import asyncio
import time

import pytest

from worker.pipeline.gate import BreakerState, Gate, GateClosed, GateConfig


def state(g: Gate) -> BreakerState:
    """The breaker state, read through a call so the type checker does not narrow it."""
    return g.state


def gate(**config: float) -> Gate:
    return Gate("telnyx", GateConfig(**config))  # type: ignore[arg-type]


async def enter(
    g: Gate, deadline: float | None = None, stopping: asyncio.Event | None = None
) -> float:
    return await g.enter(deadline=deadline, stopping=stopping or asyncio.Event())


async def test_breaker_opens_after_consecutive_failures_only() -> None:
    """N consecutive retryable failures open the breaker; a success in between resets the count."""
    g = gate(failure_threshold=3)
    g.failed()
    g.failed()
    g.succeeded()
    g.failed()
    g.failed()
    assert state(g) is BreakerState.CLOSED
    g.failed()
    assert state(g) is BreakerState.OPEN


async def test_one_probe_after_the_cooldown_then_closed_on_success() -> None:
    """After the cool-down exactly one caller probes; its success lets everyone through."""
    g = gate(failure_threshold=1, cooldown_s=0.1)
    g.failed()
    started = time.monotonic()
    callers = [asyncio.create_task(enter(g)) for _ in range(6)]
    done, waiting = await asyncio.wait(callers, return_when=asyncio.FIRST_COMPLETED)
    assert time.monotonic() - started >= 0.09
    assert state(g) is BreakerState.HALF_OPEN
    await asyncio.sleep(0.02)
    assert (len(done), len([t for t in waiting if not t.done()])) == (1, 5)
    g.succeeded()
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)
    assert state(g) is BreakerState.CLOSED


async def test_failed_probe_reopens_with_a_longer_cooldown() -> None:
    """A failed probe opens the breaker again, for twice as long (capped)."""
    g = gate(failure_threshold=1, cooldown_s=0.05, max_cooldown_s=0.08)
    g.failed()
    await enter(g)
    g.failed()
    assert state(g) is BreakerState.OPEN
    assert g._cooldown_s == pytest.approx(0.08)


async def test_deadline_ends_the_wait() -> None:
    """A caller whose deadline passes while the breaker is open gets GateClosed('deadline')."""
    g = gate(failure_threshold=1, cooldown_s=10)
    g.failed()
    with pytest.raises(GateClosed) as closed:
        await enter(g, deadline=time.monotonic() + 0.05)
    assert closed.value.reason == "deadline"


async def test_stopping_ends_the_wait() -> None:
    """Shutdown wakes callers waiting at an open breaker with GateClosed('stopping')."""
    g = gate(failure_threshold=1, cooldown_s=10)
    g.failed()
    stopping = asyncio.Event()
    waiter = asyncio.create_task(enter(g, stopping=stopping))
    await asyncio.sleep(0.01)
    stopping.set()
    with pytest.raises(GateClosed) as closed:
        await waiter
    assert closed.value.reason == "stopping"


async def test_retry_after_holds_every_call() -> None:
    """A 429's Retry-After holds every caller of that provider until it has passed."""
    g = gate()
    g.failed(retry_after_s=0.1)
    started = time.monotonic()
    waited = await enter(g)
    assert time.monotonic() - started >= 0.09
    assert waited >= 0.09


async def test_rate_limit_spaces_calls() -> None:
    """With rate_limit_rps=50, 6 calls take about 100 ms."""
    g = gate(rate_limit_rps=50)
    started = time.monotonic()
    for _ in range(6):
        await enter(g)
    assert 0.08 <= time.monotonic() - started < 0.5


async def test_state_changes_are_reported() -> None:
    """on_change hears every breaker transition (for the metrics gauge)."""
    seen: list[BreakerState] = []
    g = Gate(
        "vinix",
        GateConfig(failure_threshold=1, cooldown_s=0.01),
        on_change=lambda _name, state: seen.append(state),
    )
    g.failed()
    await enter(g)
    g.succeeded()
    assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_a_probe_not_made_gives_its_place_to_the_next_caller() -> None:
    """A caller let in as the half-open probe that then makes no call (its delivery went away,
    or it was cancelled) gives the probe back at once: the next caller probes, nobody waits for
    an answer that will never come."""
    g = gate(failure_threshold=1, cooldown_s=10.0)
    g.failed()
    g._reopen_at = 0.0  # the cool-down is over
    await enter(g)
    assert g.probing
    waiting = asyncio.create_task(enter(g))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    g.unused()
    await asyncio.wait_for(waiting, timeout=1)
    assert g.probing  # the next caller is the probe now
