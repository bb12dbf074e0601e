"""Deduplication by ``command_id``: a small Protocol, three backends, one factory.

The state machine every backend implements (CONTRACT.md, "Deduplication"):

- ``claim`` on an unknown id records it *in progress* under a short lease and returns
  :class:`Claimed`; the caller then owns the command until it calls ``complete`` or ``release``,
  renewing the lease while it works; when an owner crashes its claim lapses within a lease.
- ``claim`` on an id in progress returns :class:`InProgress` (same payload) or
  :class:`Conflict` (different fingerprint).
- ``complete`` stores the final result event for the retention window; a later ``claim``
  returns :class:`Done` with it (same payload) or :class:`Conflict`.
- ``release`` forgets the id (the command ended ``failed`` or ``expired``), so it can run again.
- ``complete`` and ``release`` act only while the caller's token holds a live claim: after the
  lease lapsed (whether or not someone else claimed since), or once done, they do nothing.

Each store also remembers, per target, the ``issued_at`` of the newest command applied to it, so
that stale-command protection survives a restart and is shared by workers that share the store.
On the hot path that costs no call of its own: ``claim(..., target=...)`` reads it with the claim
(:attr:`Claimed.last_applied`) and ``complete(..., applied=...)`` records it with the result;
:meth:`DedupStore.last_applied` / :meth:`DedupStore.mark_applied` do either alone.

Backends are chosen by URL in :func:`make_dedup_store`: ``memory://``, ``sqlite:///path``,
``redis://...``, ``rediss://...``, ``unix:///path`` and ``redis+sentinel://...`` (the Redis forms
are described in :mod:`worker.dedup.redis`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import orjson

from worker.settings import DedupConfig


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller now owns the command; ``token`` proves it to complete/release.

    ``last_applied``: the newest applied ``issued_at`` of the target named in the claim (None
    when no target was named or nothing is known of it).
    """

    token: str
    last_applied: float | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    """A command issued at ``issued_at`` (epoch seconds) was applied to ``target``."""

    target: str
    issued_at: float


@dataclass(frozen=True, slots=True)
class Done:
    """Already finished within the retention window; ``result`` is the stored result event."""

    result: bytes


@dataclass(frozen=True, slots=True)
class InProgress:
    """Another delivery of the same command owns it right now."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """The id is known with a different payload fingerprint."""


ClaimOutcome = Claimed | Done | InProgress | Conflict


class DedupStore(Protocol):
    """Where the worker remembers which commands it has carried out."""

    async def claim(
        self, command_id: str, fingerprint: str, *, target: str | None = None
    ) -> ClaimOutcome:
        """Atomically claim ``command_id`` or report what is known of it.

        With ``target``, a :class:`Claimed` also tells the target's newest applied ``issued_at``.
        """
        ...

    async def complete(
        self, command_id: str, token: str, result: bytes, *, applied: Applied | None = None
    ) -> None:
        """Store the final result of a claimed command for the retention window.

        With ``applied``, also record it as :meth:`mark_applied` does (even if the claim lapsed).
        """
        ...

    async def release(self, command_id: str, token: str) -> None:
        """Forget a claimed command, so that it may be carried out again."""
        ...

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend a live claim by a lease; False when ``token`` no longer holds it."""
        ...

    async def last_applied(self, target: str) -> float | None:
        """The ``issued_at`` (epoch seconds) of the newest command applied to ``target``."""
        ...

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Record that a command issued at ``issued_at`` was applied (keeps the maximum)."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


# --- What the operators' tools need of the store (``worker/operators/dlq_store.py``): to read
# what is stored for a command, and, before a dead letter is replayed, to forget a stored
# non-success so that the replay carries the command out again.  Never used on the hot path.


@dataclass(frozen=True, slots=True)
class Stored:
    """What the store holds for a command id: in progress, or done with its result event."""

    fingerprint: str
    result: bytes | None  # None while in progress

    @property
    def status(self) -> str:
        """``in_progress``, or the stored event's status (``succeeded``, ``rejected``, ...)."""
        return "in_progress" if self.result is None else stored_status(self.result)


class Reopened(enum.StrEnum):
    """What :meth:`OutcomeStore.reopen` found, and whether it forgot it."""

    ABSENT = "absent"  # nothing stored: the replay carries the command out
    CLEARED = "cleared"  # a stored non-success was forgotten: the replay carries it out again
    SUCCEEDED = "succeeded"  # a stored success, kept: the replay is answered as a duplicate
    IN_PROGRESS = "in_progress"  # a delivery owns it now: the replay waits for its outcome
    CONFLICT = "conflict"  # stored for another payload, kept: the replay is a conflict again


def stored_status(result: bytes) -> str:
    """The status of a stored result event; ``succeeded`` when it cannot be read (never rerun
    what might have succeeded)."""
    try:
        document = orjson.loads(result)
    except orjson.JSONDecodeError:
        return "succeeded"
    status = document.get("status") if isinstance(document, dict) else None
    return status if isinstance(status, str) else "succeeded"


class OutcomeStore(Protocol):
    """The operators' view of a dedup store (every backend implements it)."""

    async def lookup(self, command_id: str) -> Stored | None:
        """What is stored for ``command_id`` (None: nothing, or it expired)."""
        ...

    async def reopen(self, command_id: str, fingerprint: str) -> Reopened:
        """Atomically forget ``command_id``'s stored result unless it succeeded, is in progress
        or belongs to another payload (``fingerprint``); say which."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


class DedupBackend(DedupStore, OutcomeStore, Protocol):
    """A backend: the worker's view and the operators' view of one store."""


def make_dedup_store(config: DedupConfig) -> DedupBackend:
    """Build the backend named by ``config.url``'s scheme."""
    scheme = config.url.split(":", 1)[0].lower()
    if scheme == "memory":
        from worker.dedup.memory import MemoryDedupStore

        return MemoryDedupStore(config)
    if scheme == "sqlite":
        from worker.dedup.sqlite import SqliteDedupStore

        return SqliteDedupStore(config)
    if scheme in {"redis", "rediss", "unix", "redis+sentinel"}:
        from worker.dedup.redis import RedisDedupStore

        return RedisDedupStore(config)
    raise ValueError(
        f"unsupported dedup URL scheme {scheme!r}: use memory://, sqlite:///, redis://,"
        " rediss://, unix:// or redis+sentinel://"
    )


__all__ = [
    "Applied",
    "ClaimOutcome",
    "Claimed",
    "Conflict",
    "DedupBackend",
    "DedupStore",
    "Done",
    "InProgress",
    "OutcomeStore",
    "Reopened",
    "Stored",
    "make_dedup_store",
    "stored_status",
]
