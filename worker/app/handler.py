"""The command subscriber's handler: one delivery in, one settled delivery out.

FastStream calls :meth:`CommandHandler.handle` once per delivery, each in a task of its own
(aio-pika runs every consumer callback as a task), so all the deliveries in flight (up to the
prefetch count) are processed concurrently.  aiormq cancels a channel's consumer tasks when the
channel closes (a broker restart, a lost connection), which would stop a provider call midway or
the dedup store's record of one that was made (the command then applied with no record: its
redelivered copy waits out the claim's lease and calls again, and the target's newest applied
``issued_at`` is lost, so an older command could land after it).  So each delivery is worked in
a task of the handler's own, shielded from that: a provider call under way runs to its end and
is recorded, a delivery still waiting for its target's turn, its claim or its next attempt stops
there (:class:`DeliveryGone`), and the broker's copy, redelivered, finds the command done or free.

The handler is thin: it hands the delivery to the pipeline
(:class:`worker.pipeline.process.Pipeline`, which knows nothing of the broker) and the outcome to
:func:`worker.app.settle.settle`, the one place that acks, requeues, dead-letters or defers.  A
delivery whose processing raises (a bug, not a bad message) is rejected back to the queue, where
the quorum queue's delivery limit ends a poison message in the dead-letter queue instead of a
loop.

On a partition (``routed``) a stopping worker *holds* what arrives: the delivery is neither started
nor settled, so that no other replica can take the partition over while this one still carries
out its commands; the connection's close returns the held deliveries to the head of the queue,
and only then does the broker make the next consumer active (README, "Scaling").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from worker.app.settle import Sends, delivery_of, quietly, settle
from worker.observability.observe import Observer, Watch
from worker.pipeline.process import DeliveryGone, Pipeline

log = logging.getLogger("worker.app.handler")


@dataclass(slots=True)
class CommandHandler:
    """Carries out the deliveries FastStream hands it, and tells how many are in flight."""

    pipeline: Pipeline
    publisher: Sends
    observer: Observer = field(default_factory=Observer.disabled)
    routed: bool = False  # deliveries come from partitions, through the intake
    completed: int = 0
    held: int = 0
    abandoned: int = 0  # deliveries whose channel closed before a call (redelivered)
    _inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    _holding: bool = False

    @property
    def inflight(self) -> int:
        """Deliveries being processed right now."""
        return len(self._inflight)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery and settle it (or hold it, when stopping on a partition).

        The work goes on when the channel's close cancels this task (see the module docstring).
        """
        if self._holding:
            self.held += 1
            return
        work = asyncio.create_task(self._work(message))
        self._inflight.add(work)
        work.add_done_callback(self._inflight.discard)
        await asyncio.shield(work)

    async def _work(self, message: AbstractIncomingMessage) -> None:
        watch = self.observer.begin(message)
        try:
            await self._carry_out(message, watch)
        finally:
            self.observer.end(watch)

    async def _carry_out(self, message: AbstractIncomingMessage, watch: Watch) -> None:
        try:
            delivery = delivery_of(message, self.routed)
            watch.first_delivery = delivery.retry.attempts == 0 and delivery.not_before is None
            outcome = await self.pipeline.process(delivery, remember_later=True)
        except asyncio.CancelledError:
            raise
        except DeliveryGone as gone:  # returned by the broker already: nothing to settle
            log.info("not carrying out %s: its delivery's channel closed", gone)
            self.abandoned += 1
            return
        except Exception as exc:
            log.exception("processing crashed; rejecting the delivery back to the queue")
            self.observer.crashed(watch, exc)
            await quietly(message.reject(requeue=True))
            return
        settled = await settle(message, outcome, self.publisher)
        if settled:
            self.completed += 1
        self.observer.finish(watch, message, outcome, settled)

    def stopping(self) -> None:
        """From now on, commands waiting in a backoff or for an open breaker are deferred, and on
        a partition new deliveries are held."""
        self.pipeline.stopping.set()
        self._holding = self.routed

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the deliveries in flight; cancel those still running.

        A cancelled delivery is neither acked nor rejected: the broker returns it to the queue
        when the channel closes.
        """
        pending = set(self._inflight)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=grace_s) if grace_s > 0 else ((), pending)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
            log.warning(
                "%d commands still running after %.1f s were returned to the queue",
                len(late),
                grace_s,
            )
