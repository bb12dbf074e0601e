"""In-process deduplication store: a dict with monotonic-time expiry, for tests and one-offs.

Nothing survives the process and nothing is shared between processes.  Every method runs to the
end without awaiting, so a claim is atomic with respect to the other tasks of the event loop.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.dedup import (
    Applied,
    Claimed,
    ClaimOutcome,
    Conflict,
    Done,
    InProgress,
    Reopened,
    Stored,
    stored_status,
)
from worker.settings import DedupConfig

PURGE_EVERY = 1024  # claims between two sweeps of expired entries


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    token: str | None  # None once done
    result: bytes | None  # None while in progress
    expires_at: float  # on ``clock``


class MemoryDedupStore:
    """A :class:`worker.dedup.DedupStore` held in a dict; ``clock`` is injectable for tests."""

    def __init__(self, config: DedupConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_s = config.lease_s
        self._retention_s = config.retention_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._applied: dict[str, tuple[float, float]] = {}  # target -> (issued_at, expires_at)
        self._claims = 0

    async def claim(
        self, command_id: str, fingerprint: str, *, target: str | None = None
    ) -> ClaimOutcome:
        """Claim ``command_id``, or report what is known of it (see :mod:`worker.dedup`)."""
        now = self._clock()
        self._maybe_purge(now)
        entry = self._entries.get(command_id)
        if entry is None or entry.expires_at <= now:
            token = secrets.token_hex(8)
            self._entries[command_id] = _Entry(fingerprint, token, None, now + self._lease_s)
            return Claimed(token, None if target is None else await self.last_applied(target))
        if entry.fingerprint != fingerprint:
            return Conflict()
        if entry.result is not None:
            return Done(entry.result)
        return InProgress()

    async def complete(
        self, command_id: str, token: str, result: bytes, *, applied: Applied | None = None
    ) -> None:
        """Record ``result`` if ``token`` still holds a live claim; mark ``applied`` anyway."""
        if applied is not None:
            await self.mark_applied(applied.target, applied.issued_at)
        entry = self._owned(command_id, token)
        if entry is not None:
            entry.token = None
            entry.result = result
            entry.expires_at = self._clock() + self._retention_s

    async def release(self, command_id: str, token: str) -> None:
        """Forget ``command_id`` if ``token`` still holds a live claim; otherwise do nothing."""
        if self._owned(command_id, token) is not None:
            del self._entries[command_id]

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend ``token``'s live claim by a lease."""
        entry = self._owned(command_id, token)
        if entry is None:
            return False
        entry.expires_at = self._clock() + self._lease_s
        return True

    async def last_applied(self, target: str) -> float | None:
        """The newest applied ``issued_at`` of ``target`` within the retention window."""
        known = self._applied.get(target)
        return known[0] if known is not None and known[1] > self._clock() else None

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Keep the newest ``issued_at`` of ``target`` for the retention window."""
        newest = max(issued_at, await self.last_applied(target) or issued_at)
        self._applied[target] = (newest, self._clock() + self._retention_s)

    async def lookup(self, command_id: str) -> Stored | None:
        """What is stored for ``command_id``."""
        entry = self._entries.get(command_id)
        if entry is None or entry.expires_at <= self._clock():
            return None
        return Stored(entry.fingerprint, entry.result)

    async def reopen(self, command_id: str, fingerprint: str) -> Reopened:
        """Forget a stored non-success of the same payload (see :mod:`worker.dedup`)."""
        entry = self._entries.get(command_id)
        if entry is None or entry.expires_at <= self._clock():
            return Reopened.ABSENT
        if entry.fingerprint != fingerprint:
            return Reopened.CONFLICT
        if entry.result is None:
            return Reopened.IN_PROGRESS
        if stored_status(entry.result) == "succeeded":
            return Reopened.SUCCEEDED
        del self._entries[command_id]
        return Reopened.CLEARED

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def _owned(self, command_id: str, token: str) -> _Entry | None:
        entry = self._entries.get(command_id)
        if entry is None or entry.token != token or entry.expires_at <= self._clock():
            return None
        return entry

    def _maybe_purge(self, now: float) -> None:
        self._claims += 1
        if self._claims % PURGE_EVERY:
            return
        expired = [key for key, entry in self._entries.items() if entry.expires_at <= now]
        for key in expired:
            del self._entries[key]
