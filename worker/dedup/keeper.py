"""Keeping claims alive while their commands run.

Claims are taken with a short lease, so that the claim of a worker that crashes lapses quickly and
a redelivered command is not held up for long.  A live worker keeps its claims: one background
task renews, every ``interval_s``, each claim held at that moment, in one pipelined batch.  A
command that starts and finishes between two renewals (nearly all of them) costs none.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from worker.dedup import DedupStore
from worker.errors import StoreUnavailable

log = logging.getLogger("worker.dedup")


@dataclass(slots=True)
class LeaseKeeper:
    """Renews the claims its worker holds, in one periodic task."""

    store: DedupStore
    interval_s: float
    _held: dict[str, str] = field(default_factory=dict)

    def hold(self, command_id: str, token: str) -> None:
        """Keep ``command_id``'s claim alive until :meth:`drop`."""
        self._held[command_id] = token

    def drop(self, command_id: str) -> None:
        """Stop renewing (the claim was completed or released)."""
        self._held.pop(command_id, None)

    async def run(self) -> None:
        """Renew every held claim each interval, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.renew_all()

    async def renew_all(self) -> None:
        """Renew every claim held now, all at once (one pipelined batch on Redis).

        A renewal that fails because its command finished meanwhile (dropped while the renewal
        was on its way) is expected; only a claim still held that could not be renewed lapsed.
        """
        held = list(self._held.items())
        if not held:
            return
        try:
            renewed = await asyncio.gather(*(self.store.renew(c, t) for c, t in held))
        except StoreUnavailable as exc:
            log.warning("could not renew claims: %s", exc)
            return
        for (command_id, token), ok in zip(held, renewed, strict=True):
            if not ok and self._held.get(command_id) == token:
                log.warning("claim of %s lapsed before it was renewed", command_id)
                del self._held[command_id]
