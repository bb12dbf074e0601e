"""Per-target ordering and stale-command protection, within a worker.

Commands for the same target (Vinix: account + conference; Telnyx: conference + call control id)
run one at a time, in arrival order; different targets run concurrently.  Arrival order is kept
because a delivery takes its target's lock before its first ``await`` (``asyncio.Lock`` queues
waiters first come, first served).

The sequencer also remembers, per target, the ``issued_at`` of the newest command applied.  A
command issued before it is *superseded*: applying it would overwrite a newer decision (say, a
delayed retry of an old supervisor role arriving after a newer role was set).  With a store (the
dedup store), that memory survives restarts and is shared by the workers that share the store.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from worker.codec import AnyCommand
from worker.messages import ConferenceUpdate

Target = tuple[str, str, str]


def target_of(command: AnyCommand) -> Target:
    """The thing a command changes."""
    if isinstance(command, ConferenceUpdate):
        return ("vinix", command.account_id, command.conference_id)
    return ("telnyx", command.conference_id, command.call_control_id)


class AppliedStore(Protocol):
    """Where the newest applied ``issued_at`` of each target is kept (the dedup store)."""

    async def last_applied(self, target: str) -> float | None: ...

    async def mark_applied(self, target: str, issued_at: float) -> None: ...


def target_key(target: Target) -> str:
    """A target as one string (for the store)."""
    return "|".join(target)


@dataclass(slots=True)
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True)
class Sequencer:
    """Keyed FIFO locks plus the newest applied ``issued_at`` of each target (bounded LRU)."""

    store: AppliedStore | None = None
    remember: int = 100_000
    _slots: dict[Target, _Slot] = field(default_factory=dict)
    _applied: OrderedDict[Target, float] = field(default_factory=OrderedDict)

    @asynccontextmanager
    async def turn(self, target: Target) -> AsyncIterator[None]:
        """Hold ``target`` exclusively; callers get their turn in the order they asked."""
        slot = self._slots.get(target)
        if slot is None:
            slot = self._slots[target] = _Slot()
        slot.users += 1
        try:
            async with slot.lock:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[target]

    def is_stale(self, target: Target, issued_at: float | None) -> bool:
        """True when a newer command for ``target`` has already been applied."""
        if issued_at is None:
            return False
        newest = self._applied.get(target)
        return newest is not None and issued_at < newest

    def applied(self, target: Target, issued_at: float | None) -> None:
        """Record that a command issued at ``issued_at`` was applied to ``target``."""
        if issued_at is None:
            return
        if issued_at >= self._applied.get(target, float("-inf")):
            self._applied[target] = issued_at
        self._applied.move_to_end(target)
        while len(self._applied) > self.remember:
            self._applied.popitem(last=False)

    async def stale(self, target: Target, issued_at: float | None) -> bool:
        """:meth:`is_stale`, also consulting the store (a newer command may predate a restart)."""
        if issued_at is None:
            return False
        if self.is_stale(target, issued_at):
            return True
        if self.store is None:
            return False
        newest = await self.store.last_applied(target_key(target))
        return newest is not None and issued_at < newest

    async def record(self, target: Target, issued_at: float | None) -> None:
        """:meth:`applied`, also in the store."""
        if issued_at is None:
            return
        self.applied(target, issued_at)
        if self.store is not None:
            await self.store.mark_applied(target_key(target), issued_at)
