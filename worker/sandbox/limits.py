"""Request throttles: Kazoo's token buckets and a plain requests-per-second window.

:class:`TokenBuckets` follows ``kazoo_token_buckets``: each bucket holds up to ``capacity``
tokens and refills ``fill_rate`` tokens per second.  :meth:`TokenBuckets.consume` takes the cost
only when the bucket holds enough; :meth:`TokenBuckets.consume_until` (what the auth endpoints
use) empties the bucket when it does not.  :class:`RateWindow` admits ``limit`` requests per
one-second window and reports what the ``x-ratelimit-*`` headers say.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One bucket per key (Kazoo: ``"<client ip>/<account id>"``)."""

    def __init__(self, clock: Clock, *, capacity: float = 100.0, fill_rate: float = 10.0) -> None:
        self.capacity = capacity
        self.fill_rate = fill_rate
        self.enabled = True
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def consume(self, key: str, cost: float) -> bool:
        """Take ``cost`` tokens if the bucket holds them; False (and nothing taken) otherwise."""
        bucket = self._refilled(key)
        if bucket.tokens >= cost or not self.enabled:
            bucket.tokens = max(0.0, bucket.tokens - cost)
            return True
        return False

    def consume_until(self, key: str, cost: float) -> bool:
        """Take ``cost`` tokens, or empty the bucket and answer False when it holds fewer."""
        bucket = self._refilled(key)
        if bucket.tokens >= cost or not self.enabled:
            bucket.tokens = max(0.0, bucket.tokens - cost)
            return True
        bucket.tokens = 0.0
        return False

    def tokens(self, key: str) -> float:
        """The tokens ``key``'s bucket holds now."""
        return self._refilled(key).tokens

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
            return bucket
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.fill_rate)
        bucket.updated = now
        return bucket


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request got through, and the numbers for the ``x-ratelimit-*`` headers."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-limit``, ``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (s)."""
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset_s),
        }


class RateWindow:
    """At most ``limit`` requests per one-second window."""

    def __init__(self, clock: Clock, limit: int) -> None:
        self.limit = limit
        self._clock = clock
        self._window = -math.inf
        self._count = 0

    def admit(self) -> Admission:
        """Count one request; ``allowed`` is False once the window's limit is reached."""
        now = self._clock()
        window = math.floor(now)
        if window != self._window:
            self._window, self._count = window, 0
        reset_s = max(1, math.ceil(window + 1 - now))
        if self._count >= self.limit:
            return Admission(False, self.limit, 0, reset_s)
        self._count += 1
        return Admission(True, self.limit, self.limit - self._count, reset_s)
