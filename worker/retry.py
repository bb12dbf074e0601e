"""Carrying a command out against its provider, with retries in process.

Exponential backoff with full jitter (``random() * min(max_delay, base * 2**n)``), never shorter
than a provider's ``Retry-After``, and capped three ways: by the number of attempts, by a total
time budget per command, and by the command's ``expires_at``.  A wait that would end past the
deadline ends the command ``expired`` at once rather than sleeping towards a certain failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import DeadlineExceeded, PermanentError, ProviderUnavailable, TransientError
from worker.providers import Provider, ProviderSuccess
from worker.settings import RetryPolicy

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Attempted:
    """What carrying a command out came to: a success or the final error, and the calls made."""

    attempts: int
    success: ProviderSuccess | None = None
    error: PermanentError | TransientError | DeadlineExceeded | None = None


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
class Retrier:
    """Runs provider calls under a :class:`RetryPolicy` (clock, sleep and rng injectable)."""

    policy: RetryPolicy
    clock: Clock = time.time
    sleep: Sleep = asyncio.sleep
    rng: Callable[[], float] = random.random

    async def run(self, provider: Provider, command: Any, *, expires_at: float | None) -> Attempted:
        """Call ``provider`` until success, a permanent error, or a spent budget."""
        budget_ends = self.clock() + self.policy.budget_s
        attempts = 0
        while True:
            if expires_at is not None and self.clock() >= expires_at:
                return Attempted(attempts, error=DeadlineExceeded())
            attempts += 1
            try:
                return Attempted(attempts, success=await provider.execute(command))
            except PermanentError as exc:
                return Attempted(attempts, error=exc)
            except TransientError as exc:
                wait = self._wait_before_retry(attempts, exc, budget_ends, expires_at)
                if isinstance(wait, float):
                    await self.sleep(wait)
                    continue
                return Attempted(attempts, error=wait)

    def _wait_before_retry(
        self,
        attempts: int,
        exc: TransientError,
        budget_ends: float,
        expires_at: float | None,
    ) -> float | TransientError | DeadlineExceeded:
        """How long to wait before the next call, or the error that ends the command now."""
        if attempts >= self.policy.max_attempts:
            return exc
        delay = next_delay(self.policy, attempts, exc, self.rng)
        resume = self.clock() + delay
        if expires_at is not None and resume >= expires_at:
            return DeadlineExceeded(provider=exc.provider)
        if resume > budget_ends:
            return exc
        return delay
