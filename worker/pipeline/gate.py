"""Protecting a provider: a circuit breaker and a rate limiter, one gate per provider.

Every provider call passes the gate.  The breaker opens after ``failure_threshold`` consecutive
retryable failures; while it is open nobody calls the provider and callers *wait* (their messages
stay unacknowledged, so nothing is drained into the dead-letter queue).  After a cool-down one
caller is let through as a probe (half-open): success closes the breaker and wakes everyone, a
failure opens it again with a doubled cool-down (capped).  A 429 with ``Retry-After`` holds every
call to that provider until then, and an optional requests-per-second limit spaces calls so that
we do not cause the 429s in the first place.

Waiting is bounded by the caller's deadline and interrupted by shutdown; the time spent waiting is
reported so that the retry budget does not count it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("worker.pipeline.gate")


class BreakerState(enum.IntEnum):
    """Exported as a gauge: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class GateConfig:
    """How a provider is protected."""

    failure_threshold: int = 5
    cooldown_s: float = 5.0
    max_cooldown_s: float = 30.0
    rate_limit_rps: float = 0.0  # 0: no limit


class GateClosed(Exception):
    """The wait for the gate ended without a permit: shutdown began, or the deadline passed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "stopping" or "deadline"


@dataclass(slots=True)
class Gate:
    """Breaker and rate limiter of one provider."""

    name: str
    config: GateConfig = field(default_factory=GateConfig)
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[str, BreakerState], None] | None = None
    state: BreakerState = BreakerState.CLOSED
    _failures: int = 0
    _cooldown_s: float = 0.0
    _reopen_at: float = 0.0
    _probing: bool = False
    _not_before: float = 0.0
    _next_slot: float = 0.0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def enter(self, *, deadline: float | None, stopping: asyncio.Event) -> float:
        """Wait for permission to call; return the seconds spent waiting on an unhealthy provider.

        Raises :class:`GateClosed` when ``stopping`` is set or ``deadline`` (on ``clock``) passes.
        After it returns, :attr:`probing` tells whether this call is the half-open probe.
        """
        waited = 0.0
        while True:
            wait = self._wait_needed()
            if wait <= 0:
                self._take_slot()
                return waited
            if stopping.is_set():
                raise GateClosed("stopping")
            if deadline is not None and self.clock() + min(wait, 0.01) >= deadline:
                raise GateClosed("deadline")
            started = self.clock()
            await self._sleep(wait, deadline, stopping)
            waited += self.clock() - started

    @property
    def probing(self) -> bool:
        """A probe call is out (half-open)."""
        return self._probing

    def succeeded(self) -> None:
        """The provider answered (2xx, or a 4xx that proves it is up)."""
        self._failures = 0
        self._probing = False
        if self.state is not BreakerState.CLOSED:
            self._cooldown_s = 0.0
            self._set(BreakerState.CLOSED)

    def unused(self) -> None:
        """A call let in was not made, or was cancelled midway: a probe's place is given back
        (else the half-open breaker would wait for its answer for ever)."""
        if self._probing:
            self._probing = False
            self._wake()

    def failed(self, retry_after_s: float | None = None) -> None:
        """A retryable failure (timeout, 5xx, 429...)."""
        now = self.clock()
        if retry_after_s:
            self._not_before = max(self._not_before, now + retry_after_s)
        self._failures += 1
        probe_failed = self._probing
        self._probing = False
        if probe_failed or self._failures >= self.config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._cooldown_s = min(
            self.config.max_cooldown_s, max(self.config.cooldown_s, self._cooldown_s * 2)
        )
        self._reopen_at = now + self._cooldown_s
        if self.state is not BreakerState.OPEN:
            log.warning("%s: circuit breaker open for %.1f s", self.name, self._cooldown_s)
        self._set(BreakerState.OPEN)

    def _wait_needed(self) -> float:
        now = self.clock()
        if self.state is BreakerState.OPEN:
            if now < self._reopen_at:
                return self._reopen_at - now
            self._set(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            if self._probing:
                return self.config.cooldown_s  # woken early when the probe ends
            self._probing = True
            return 0.0
        return max(self._not_before - now, self._next_slot - now, 0.0)

    def _take_slot(self) -> None:
        if self.config.rate_limit_rps > 0:
            interval = 1.0 / self.config.rate_limit_rps
            self._next_slot = max(self._next_slot, self.clock() - interval) + interval

    async def _sleep(self, wait: float, deadline: float | None, stopping: asyncio.Event) -> None:
        if deadline is not None:
            wait = min(wait, max(deadline - self.clock(), 0.0))
        changed = asyncio.ensure_future(self._changed.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({changed, stop}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stop.cancel()

    def _set(self, state: BreakerState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is BreakerState.CLOSED:
            log.info("%s: circuit breaker closed", self.name)
        if self.on_change is not None:
            self.on_change(self.name, state)
        self._wake()

    def _wake(self) -> None:
        """Wake every waiter so it re-evaluates; a fresh event for the next change."""
        self._changed.set()
        self._changed = asyncio.Event()
