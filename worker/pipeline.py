"""The life of one command, as plain async steps that know nothing of the broker.

decode → deduplicate → check the deadline → call the provider with retries → remember the
result → build the result event.  :func:`process` always returns an :class:`Outcome`; what the
consumer then does with the message (publish, dead-letter, ack) is decided in
:func:`worker.consumer.settle`.  Only infrastructure trouble that makes the message unsafe to
finish (the dedup store unreachable) is waited out here, holding the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from worker import codec
from worker.codec import AnyCommand, Identity
from worker.dedup import Claimed, Conflict, DedupStore, Done, InProgress
from worker.errors import IdempotencyConflict, ProviderAnswer, StoreUnavailable, WorkerError
from worker.messages import COMMAND_TYPES
from worker.providers import Provider
from worker.retry import Attempted, Retrier

log = logging.getLogger("worker.pipeline")
T = TypeVar("T")

_WAIT_FIRST_S = 0.02
_WAIT_MAX_S = 0.5


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command ended: its result event and whether it belongs in the dead-letter queue."""

    event: dict[str, Any]
    routing_key: str
    dead_letter: bool

    @property
    def status(self) -> str:
        return str(self.event["status"])


@dataclass(slots=True)
class Pipeline:
    """Everything a command needs, handed in by the composition root."""

    providers: Mapping[str, Provider]
    dedup: DedupStore
    retrier: Retrier
    max_body_bytes: int
    infra_retry_s: float = 1.0
    _routes: dict[str, str] = field(
        default_factory=lambda: {
            "conference.update": "vinix",
            "conference.supervisor_role": "telnyx",
        }
    )

    async def process(self, body: bytes) -> Outcome:
        """Carry out one delivery's command and say how it ended."""
        received_at = datetime.now(UTC)
        try:
            command = codec.decode(body, self.max_body_bytes)
        except WorkerError as exc:
            return _failure(codec.identity(body, self.max_body_bytes), exc, 0, received_at)
        ident = Identity(command.command_id, command.type)
        fingerprint = codec.fingerprint(command)
        claim = await self._claim(command.command_id, fingerprint)
        if isinstance(claim, Done):
            return _replay(claim.result, received_at)
        if isinstance(claim, Conflict):
            return _failure(ident, IdempotencyConflict(), 0, received_at)
        attempted = await self.retrier.run(
            self.providers[self._routes[command.type]],
            command,
            expires_at=command.expires_at.timestamp() if command.expires_at else None,
        )
        outcome = _finish(ident, attempted, received_at)
        await self._remember(command, claim, outcome)
        return outcome

    async def _claim(self, command_id: str, fingerprint: str) -> Claimed | Done | Conflict:
        """Claim the command, waiting out an in-flight duplicate (never run in parallel)."""
        wait = _WAIT_FIRST_S
        while True:
            outcome = await self._with_store(self.dedup.claim, command_id, fingerprint)
            if not isinstance(outcome, InProgress):
                return outcome
            await asyncio.sleep(wait)
            wait = min(wait * 2, _WAIT_MAX_S)

    async def _remember(self, command: AnyCommand, claim: Claimed, outcome: Outcome) -> None:
        """Keep what succeeded or was rejected by the provider; forget failed and expired."""
        if outcome.status in {"succeeded", "rejected"}:
            await self._with_store(
                self.dedup.complete, command.command_id, claim.token, codec.encode(outcome.event)
            )
        else:
            await self._with_store(self.dedup.release, command.command_id, claim.token)

    async def _with_store(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a dedup operation, holding the message while the store is unreachable."""
        while True:
            try:
                return await operation(*args)
            except StoreUnavailable as exc:
                log.warning("dedup store unavailable, holding the command: %s", exc)
            await asyncio.sleep(self.infra_retry_s)


def _routing_key(kind: str | None, status: str) -> str:
    return f"{kind if kind in COMMAND_TYPES else 'unknown'}.{status}"


def _event(
    ident: Identity,
    status: str,
    attempts: int,
    received_at: datetime,
    *,
    error: WorkerError | None = None,
    provider: ProviderAnswer | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "command_id": ident.command_id,
        "type": ident.type,
        "status": status,
        "duplicate": False,
        "attempts": attempts,
        "error": None if error is None else _error(error),
        "provider": None if provider is None else _provider(provider),
        "data": data,
        "received_at": received_at,
        "completed_at": datetime.now(UTC),
    }


def _error(error: WorkerError) -> dict[str, Any]:
    return {
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "details": error.details,
    }


def _provider(answer: ProviderAnswer) -> dict[str, Any]:
    return {"name": answer.name, "status_code": answer.status_code, "request_id": answer.request_id}


def _failure(ident: Identity, error: WorkerError, attempts: int, received_at: datetime) -> Outcome:
    event = _event(ident, error.status, attempts, received_at, error=error, provider=error.provider)
    return Outcome(event, _routing_key(ident.type, error.status), dead_letter=True)


def _finish(ident: Identity, attempted: Attempted, received_at: datetime) -> Outcome:
    if attempted.success is None:
        assert attempted.error is not None
        return _failure(ident, attempted.error, attempted.attempts, received_at)
    success = attempted.success
    event = _event(
        ident,
        "succeeded",
        attempted.attempts,
        received_at,
        provider=success.answer,
        data=success.data,
    )
    return Outcome(event, _routing_key(ident.type, "succeeded"), dead_letter=False)


def _replay(stored: bytes, received_at: datetime) -> Outcome:
    """A stored result, answered again for a duplicate delivery (never dead-lettered)."""
    event = orjson.loads(stored)
    event.update(
        duplicate=True, attempts=0, received_at=received_at, completed_at=datetime.now(UTC)
    )
    return Outcome(event, _routing_key(event.get("type"), event["status"]), dead_letter=False)
