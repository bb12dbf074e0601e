"""Replays and purges started from the console, run in the background with their progress.

A job browses the dead-letter queue on a channel of its own, takes the dead letters whose keys
were selected on the page (:func:`worker.console.snapshot.key_of`), and replays them as ``dlq
replay`` does (each command reopened in the dedup store, published, confirmed, then its dead
letter acked: :func:`worker.operators.dlq.replay_held`) or acks them (purge).  What it did not
take goes back when its channel closes.  One job runs at a time (:class:`Jobs` holds the lock
that snapshots take too), so a job never finds the dead letters held by a snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from aio_pika.abc import AbstractConnection

from worker.console.snapshot import key_of
from worker.dedup import OutcomeStore
from worker.operators import dlq
from worker.operators.dlq_outcomes import Reopener

log = logging.getLogger("worker.console.jobs")
Kind = Literal["replay", "purge"]


@dataclass(slots=True)
class Job:
    """One replay or purge: what it was asked, how far it got."""

    id: int
    kind: Kind
    asked: int  # keys selected on the page
    total: int = 0  # dead letters found for them
    done: int = 0
    refused: int = 0  # could not be published: still dead
    finished: bool = False
    error: str = ""
    stored: dict[str, int] = field(default_factory=dict)  # what the store held (replays)

    def start(self, total: int) -> None:
        self.total = total

    def advance(self) -> None:
        self.done += 1

    def stop(self) -> None:
        pass

    def view(self) -> dict[str, Any]:
        """The job as the page polls it."""
        return {
            "id": self.id,
            "kind": self.kind,
            "asked": self.asked,
            "total": self.total,
            "done": self.done,
            "refused": self.refused,
            "finished": self.finished,
            "error": self.error,
            "stored": self.stored,
        }


@dataclass(slots=True)
class Jobs:
    """The console's jobs; one runs at a time, under :attr:`lock`."""

    connection: AbstractConnection
    dead_queue: str
    commands_exchange: str
    store: OutcomeStore | None
    max_body_bytes: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jobs: dict[int, Job] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, kind: Kind, keys: Collection[str]) -> Job:
        """Start a job on the dead letters of ``keys``; it runs in the background."""
        job = Job(next(self._ids), kind, len(keys))
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run(job, frozenset(keys)), name=f"console-{kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def close(self) -> None:
        """Wait for the running job (a replay finishes the dead letters in hand)."""
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _run(self, job: Job, keys: frozenset[str]) -> None:
        try:
            async with self.lock:
                if job.kind == "replay":
                    await self._replay(job, keys)
                else:
                    await self._purge(job, keys)
        except Exception as exc:  # shown on the page; the dead letters not done stay
            log.warning("console %s failed: %s", job.kind, exc)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = True

    async def _chosen(self, channel: Any, keys: frozenset[str]) -> list[dlq.Held]:
        held = await dlq.browse(channel, self.dead_queue, idle_s=1.0)
        return [item for item in held if key_of(item.letter) in keys]

    async def _replay(self, job: Job, keys: frozenset[str]) -> None:
        if self.store is None:
            raise dlq.DeadLetterError("no dedup store to reopen the commands in: not replayed")
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        async with channel:
            exchange = await channel.get_exchange(self.commands_exchange, ensure=True)
            chosen = await self._chosen(channel, keys)
            reopener = Reopener(self.store, self.max_body_bytes)
            report = await dlq.replay_held(
                exchange,
                chosen,
                None,
                stop=asyncio.Event(),
                progress=job,
                in_flight=8,
                prepare=reopener,
            )
            job.refused = report.refused
            job.stored = {str(found): count for found, count in reopener.found.items()}

    async def _purge(self, job: Job, keys: frozenset[str]) -> None:
        channel = await self.connection.channel()
        async with channel:
            chosen = await self._chosen(channel, keys)
            job.start(len(chosen))
            for item in chosen:
                await item.message.ack()
                job.advance()
