"""Per-target ordering and stale-command protection, within a worker.

Commands for the same target (Vinix: account + conference; Telnyx: conference + call control id)
run one at a time, in arrival order; different targets run concurrently.  Arrival order is kept
because a delivery takes its target's lock before its first ``await`` (``asyncio.Lock`` queues
waiters first come, first served).

The sequencer also remembers, per target, the ``issued_at`` of the newest command applied.  A
command issued before it is *superseded*: applying it would overwrite a newer decision (say, a
delayed retry of an old supervisor role arriving after a newer role was set).  The dedup store
keeps the same memory across restarts and workers; the pipeline reads it with the claim and
hands it to :meth:`Sequencer.is_stale`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from worker.contract.codec import AnyCommand
from worker.contract.messages import ConferenceUpdate

Target = tuple[str, str, str]


def target_of(command: AnyCommand) -> Target:
    """The thing a command changes."""
    if isinstance(command, ConferenceUpdate):
        return ("vinix", command.account_id, command.conference_id)
    return ("telnyx", command.conference_id, command.call_control_id)


def target_key(target: Target) -> str:
    """A target as one string (for the store)."""
    return "|".join(target)


@dataclass(slots=True)
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True)
class _Turn:
    """One caller's turn at a target (a plain class: cheaper than a generator-based one)."""

    sequencer: Sequencer
    target: Target
    slot: _Slot

    async def __aenter__(self) -> None:
        try:
            await self.slot.lock.acquire()
        except BaseException:
            self.sequencer._leave(self.target, self.slot)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.slot.lock.release()
        self.sequencer._leave(self.target, self.slot)


@dataclass(slots=True)
class Sequencer:
    """Keyed FIFO locks plus the newest applied ``issued_at`` of each target (bounded LRU)."""

    remember: int = 100_000
    _slots: dict[Target, _Slot] = field(default_factory=dict)
    _applied: OrderedDict[Target, float] = field(default_factory=OrderedDict)

    def turn(self, target: Target) -> _Turn:
        """``async with`` it to hold ``target`` exclusively; turns come in the order asked."""
        slot = self._slots.get(target)
        if slot is None:
            slot = self._slots[target] = _Slot()
        slot.users += 1
        return _Turn(self, target, slot)

    def _leave(self, target: Target, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._slots[target]

    def is_stale(
        self, target: Target, issued_at: float | None, stored: float | None = None
    ) -> bool:
        """True when a newer command for ``target`` has already been applied.

        ``stored``: the newest applied ``issued_at`` the dedup store knows (other workers, or
        before a restart).
        """
        if issued_at is None:
            return False
        newest = self._applied.get(target)
        return (newest is not None and issued_at < newest) or (
            stored is not None and issued_at < stored
        )

    def applied(self, target: Target, issued_at: float | None) -> None:
        """Record that a command issued at ``issued_at`` was applied to ``target``."""
        if issued_at is None:
            return
        if issued_at >= self._applied.get(target, float("-inf")):
            self._applied[target] = issued_at
        self._applied.move_to_end(target)
        while len(self._applied) > self.remember:
            self._applied.popitem(last=False)
