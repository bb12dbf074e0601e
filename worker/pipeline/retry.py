"""Carrying a command out against its provider, with retries in process and through the broker.

Exponential backoff with full jitter (``random() * min(max_delay, base * 2**n)``), never shorter
than a provider's ``Retry-After``, capped three ways: attempts, a total time budget, and the
command's ``expires_at``.  Short waits (up to ``inline_max_s``) are slept in process; longer ones,
and any wait when the worker is stopping, are *deferred*: the command leaves the consumer for a
broker-held delay and comes back with its :class:`RetryState` in headers of our own, so a crash
loses nothing and the count goes on where it was.  The budget spans both kinds of retry; time spent
waiting for an unhealthy provider's circuit breaker is not charged to it.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from worker.errors import (
    DeadlineExceeded,
    PermanentError,
    ProviderUnavailable,
    Superseded,
    TransientError,
)
from worker.pipeline.gate import Gate, GateClosed
from worker.providers import Provider, ProviderSuccess
from worker.settings import RetryPolicy

Clock = Callable[[], float]


class Verdict(enum.Enum):
    """Whether the next call may go (asked of the pipeline just before each one)."""

    GO = "go"
    GONE = "gone"  # the delivery's channel closed: its redelivered copy carries the command out
    STALE = "stale"  # a newer command of the target was applied meanwhile: superseded


# Asked before each call; the argument says whether time passed since the claim was read (a
# wait for the gate, or a retry), so that what the claim said may have changed.
Admit = Callable[[bool], Awaitable[Verdict]]


async def _always(_: bool) -> Verdict:
    return Verdict.GO


# Sleeps for the delay unless ``stopping`` is set first; returns True when interrupted.
Sleep = Callable[[float, asyncio.Event], Awaitable[bool]]
Final = PermanentError | TransientError | DeadlineExceeded


async def interruptible_sleep(delay: float, stopping: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds, or less if ``stopping`` is set; True when interrupted."""
    if stopping.is_set():
        return True
    try:
        await asyncio.wait_for(stopping.wait(), timeout=delay)
    except TimeoutError:
        return False
    return True


@dataclass(slots=True)
class RetryState:
    """What a command carries from one delivery to the next (headers ``cw-*``)."""

    attempts: int = 0
    budget_used_s: float = 0.0
    first_failure_at: float | None = None
    probes: int = 0  # failed breaker probes: calls made on everyone's behalf, not capped


@dataclass(slots=True)
class Attempted:
    """How far carrying a command out got: success, a final error, or a deferral."""

    state: RetryState
    success: ProviderSuccess | None = None
    error: Final | None = None
    defer_s: float | None = None
    gone: bool = False  # the delivery's channel closed before a call: none was made

    @property
    def attempts(self) -> int:
        return self.state.attempts


def backoff_delay(policy: RetryPolicy, attempt: int, rng: Callable[[], float]) -> float:
    """Full-jitter delay to wait after the ``attempt``-th failed call (1-based)."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** (attempt - 1))
    return rng() * ceiling


def next_delay(
    policy: RetryPolicy, attempt: int, error: TransientError, rng: Callable[[], float]
) -> float:
    """The backoff delay, stretched to the provider's ``Retry-After`` when it asked for more."""
    delay = backoff_delay(policy, attempt, rng)
    retry_after = error.retry_after_s if isinstance(error, ProviderUnavailable) else None
    return delay if retry_after is None else max(delay, retry_after)


@dataclass(slots=True)
class _Run:
    """Book-keeping of one delivery's share of the retries."""

    state: RetryState
    started: float
    expires_at: float | None
    paused: float = 0.0
    clock: Clock = field(default=time.time)
    retried: bool = False  # a call was let in before (the next one is a retry)

    def budget_used(self) -> float:
        return self.state.budget_used_s + (self.clock() - self.started - self.paused)


@dataclass(slots=True)
class Retrier:
    """Runs provider calls under a :class:`RetryPolicy` (clock, sleep and rng injectable)."""

    policy: RetryPolicy
    clock: Clock = time.time
    sleep: Sleep = interruptible_sleep
    rng: Callable[[], float] = random.random

    async def run(
        self,
        provider: Provider,
        gate: Gate,
        command: Any,
        *,
        state: RetryState,
        expires_at: float | None,
        stopping: asyncio.Event,
        admit: Admit = _always,
    ) -> Attempted:
        """Call ``provider`` until success, a final error, or a deferral to the broker.

        ``admit`` is asked before each call.  Once the delivery's channel has closed (its broker
        copy is redelivered, maybe to a replica that acts on the target meanwhile) no further
        call is made (``gone``); after a wait, a command that a newer one of its target has
        overtaken meanwhile ends superseded: either call could land after the newer one's.
        """
        run = _Run(state, self.clock(), expires_at, clock=self.clock)
        while True:
            ended = await self._admitted(run, gate, stopping, admit)
            if ended is not None:
                return ended
            state.attempts += 1
            probe = gate.probing
            try:
                success = await provider.execute(command)
            except asyncio.CancelledError:
                if probe:
                    gate.unused()
                raise
            except PermanentError as exc:
                gate.succeeded()
                return Attempted(state, error=exc)
            except TransientError as exc:
                if probe or not exc.shared:  # another caller's failure was counted already
                    gate.failed(getattr(exc, "retry_after_s", None))
                state.probes += probe
                outcome = await self._after_failure(run, exc, stopping)
                if outcome is not None:
                    return outcome
            else:
                gate.succeeded()
                return Attempted(state, success=success)

    async def _admitted(
        self, run: _Run, gate: Gate, stopping: asyncio.Event, admit: Admit
    ) -> Attempted | None:
        """Wait for the gate before a call (None), or end here: expired, deferred, gone or
        superseded."""
        expires_at, state = run.expires_at, run.state
        if expires_at is not None and self.clock() >= expires_at:
            return Attempted(state, error=DeadlineExceeded())
        try:
            waited = await gate.enter(deadline=expires_at, stopping=stopping)
        except GateClosed as closed:
            if closed.reason == "deadline":
                return Attempted(state, error=DeadlineExceeded())
            return self._defer(run, 0.0)
        run.paused += waited
        probe = gate.probing  # this call is to be the half-open probe
        verdict = await admit(waited > 0 or run.retried)
        run.retried = True
        if verdict is Verdict.GO:
            return None
        if probe:
            gate.unused()
        if verdict is Verdict.GONE:
            return Attempted(state, gone=True)
        return Attempted(state, error=Superseded())

    async def _after_failure(
        self, run: _Run, exc: TransientError, stopping: asyncio.Event
    ) -> Attempted | None:
        """Wait before the next call (None), or end here: failed, expired or deferred."""
        state = run.state
        if state.first_failure_at is None:
            state.first_failure_at = self.clock()
        if state.attempts - state.probes >= self.policy.max_attempts:
            return Attempted(state, error=exc)
        delay = next_delay(self.policy, state.attempts, exc, self.rng)
        if run.expires_at is not None and self.clock() + delay >= run.expires_at:
            return Attempted(state, error=DeadlineExceeded(provider=exc.provider))
        if run.budget_used() + delay > self.policy.budget_s:
            return Attempted(state, error=exc)
        if delay > self.policy.inline_max_s or stopping.is_set():
            return self._defer(run, delay)
        began = self.clock()
        if await self.sleep(delay, stopping):
            return self._defer(run, max(delay - (self.clock() - began), 0.0))
        return None

    def _defer(self, run: _Run, delay: float) -> Attempted:
        """Hand the rest of the wait to the broker, charging it to the budget now."""
        run.state.budget_used_s = run.budget_used() + delay
        return Attempted(run.state, defer_s=delay)
