"""The life of one command, as plain async steps that know nothing of the broker.

decode → take the target's turn → deduplicate (reading the target's newest applied ``issued_at``
with the claim) → drop if superseded → check the deadline → call the provider through its gate,
with retries (before each call: is the delivery's channel still open and, after a wait, has no
newer command of the target been applied meanwhile?) → build the result event → remember the
result in the dedup store.
:func:`Pipeline.process` always returns an :class:`Outcome`: a final result event (maybe to be
dead-lettered) or a deferral to a broker-held delay.  The consumer asks for the last step to be
left to it (``remember_later``) and runs it while it publishes the result; what it then does with
the message (publish, dead-letter, delay, ack) is decided in :func:`worker.app.settle.settle`.  Only
trouble that makes the message unsafe to finish (the dedup store unreachable) is waited out here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn, TypeVar

import orjson
from opentelemetry import trace

from worker.contract import codec
from worker.contract.codec import AnyCommand, Identity
from worker.contract.messages import COMMAND_TYPES
from worker.dedup import Applied, Claimed, Conflict, DedupStore, Done, InProgress
from worker.dedup.keeper import LeaseKeeper
from worker.errors import (
    IdempotencyConflict,
    ProviderAnswer,
    StoreUnavailable,
    Superseded,
    WorkerError,
)
from worker.pipeline.allowlist import AllowList, Forbidden
from worker.pipeline.gate import Gate
from worker.pipeline.retry import Admit, Attempted, Retrier, RetryState, Verdict
from worker.pipeline.sequencer import Sequencer, Target, target_key, target_of
from worker.providers import Provider

log = logging.getLogger("worker.pipeline.process")
T = TypeVar("T")

_WAIT_FIRST_S = 0.02
_WAIT_MAX_S = 0.5
_ROUTES = {"conference.update": "vinix", "conference.supervisor_role": "telnyx"}


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the pipeline needs of a message: its body and the retry state it carries."""

    body: bytes
    retry: RetryState = field(default_factory=RetryState)
    not_before: float | None = None  # epoch seconds; set on a deferred command
    user_id: str | None = None  # the publisher, as RabbitMQ verified it (AMQP user_id)
    # Whether the delivery can still be settled; False once its channel is gone (the broker has
    # returned it, and the copy it redelivers is the one to carry out).
    alive: Callable[[], bool] = field(default=lambda: True)


class DeliveryGone(Exception):
    """The delivery's channel closed while it waited for its target's turn, its claim or its
    next attempt: it is not carried out here (the broker redelivers it, in order, to whoever
    consumes now), and its claim is given back."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a delivery ended: a result event (maybe dead-lettered), or a deferral.

    ``command`` (when it could be decoded), ``calls`` (provider calls made by this delivery) and
    ``delayed_retry`` (a deferral decided by the retrier) are for metrics and traces only.

    ``remember`` (only from ``process(..., remember_later=True)``): the dedup store's record of
    this outcome, still to be made; the caller runs it (concurrently with publishing the result)
    and acknowledges the delivery only after it returned.
    """

    event: dict[str, Any]
    routing_key: str
    dead_letter: bool
    defer_s: float | None = None
    retry: RetryState | None = None
    command: AnyCommand | None = None
    calls: int = 0
    delayed_retry: bool = False
    remember: Callable[[], Awaitable[None]] | None = None

    @property
    def status(self) -> str:
        return str(self.event.get("status", "deferred"))

    @property
    def provider(self) -> str | None:
        """The provider the command goes to (None when it could not be decoded)."""
        return None if self.command is None else _ROUTES[self.command.type]


@dataclass(slots=True)
class Pipeline:
    """Everything a command needs, handed in by the composition root."""

    providers: Mapping[str, Provider]
    gates: Mapping[str, Gate]
    dedup: DedupStore
    retrier: Retrier
    max_body_bytes: int
    allowlist: AllowList | None = None
    sequencer: Sequencer = field(default_factory=Sequencer)
    keeper: LeaseKeeper | None = None  # renews the claims of long-running commands
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    infra_retry_s: float = 1.0
    clock: Callable[[], float] = time.time

    async def process(self, delivery: Delivery, *, remember_later: bool = False) -> Outcome:
        """Carry out one delivery's command and say how it ended.

        With ``remember_later`` the dedup store's record is left to the caller
        (:attr:`Outcome.remember`), so that it need not wait for it before publishing.
        """
        received_at = datetime.now(UTC)
        try:
            command = codec.decode(delivery.body, self.max_body_bytes)
        except WorkerError as exc:
            ident = codec.identity(delivery.body, self.max_body_bytes)
            return _failure(ident, exc, delivery.retry.attempts, received_at)
        if self.allowlist is not None:
            try:
                self.allowlist.check(delivery.user_id, command)
            except Forbidden as exc:
                log.warning(
                    "forbidden: %s",
                    exc.message,
                    extra={"command_id": command.command_id, "user_id": delivery.user_id},
                )
                ident = Identity(command.command_id, command.type)
                return _failure(ident, exc, delivery.retry.attempts, received_at)
        wait = (delivery.not_before or 0.0) - self.clock()
        if wait > 0.25:
            return _deferred(delivery.retry, wait, command)
        async with self.sequencer.turn(target_of(command)):
            if not delivery.alive():  # else a stale copy could land after its redelivered self
                raise DeliveryGone(command.command_id)
            outcome = await self._carry_out(command, delivery, received_at)
        if outcome.remember is not None and not remember_later:
            await outcome.remember()
            outcome = replace(outcome, remember=None)
        return outcome

    async def _carry_out(
        self, command: AnyCommand, delivery: Delivery, received_at: datetime
    ) -> Outcome:
        ident = Identity(command.command_id, command.type)
        target = target_of(command)
        issued_at = command.issued_at.timestamp() if command.issued_at else None
        key = None if issued_at is None else target_key(target)
        retry = delivery.retry
        claim = await self._claim(command.command_id, codec.fingerprint(command), key)
        if isinstance(claim, Done):
            return _replay(claim.result, received_at, command)
        if isinstance(claim, Conflict):
            return _failure(
                ident, IdempotencyConflict(), retry.attempts, received_at, command=command
            )
        if not delivery.alive():  # closed while it waited for the claim: give it back now
            await self._give_up(command.command_id, claim)
        applied = None
        if self.sequencer.is_stale(target, issued_at, claim.last_applied):
            outcome = _failure(ident, Superseded(), retry.attempts, received_at, command=command)
        else:
            admit = partial(self._admit, delivery, target, issued_at)
            outcome = await self._call(command, claim, delivery, received_at, admit)
            if outcome.status == "succeeded" and key is not None and issued_at is not None:
                self.sequencer.applied(target, issued_at)
                applied = Applied(key, issued_at)
        return replace(outcome, remember=partial(self._remember, command, claim, outcome, applied))

    async def _call(
        self,
        command: AnyCommand,
        claim: Claimed,
        delivery: Delivery,
        received_at: datetime,
        admit: Admit,
    ) -> Outcome:
        """Carry the claimed command out against its provider (the claim kept alive meanwhile)."""
        provider = _ROUTES[command.type]
        retry = delivery.retry
        before = retry.attempts
        if self.keeper is not None:
            self.keeper.hold(command.command_id, claim.token)
        try:
            attempted = await self.retrier.run(
                self.providers[provider],
                self.gates[provider],
                command,
                state=retry,
                expires_at=command.expires_at.timestamp() if command.expires_at else None,
                stopping=self.stopping,
                admit=admit,
            )
        finally:
            if self.keeper is not None:
                self.keeper.drop(command.command_id)
        if attempted.gone:
            await self._give_up(command.command_id, claim)
        ident = Identity(command.command_id, command.type)
        return _finish(ident, attempted, received_at, command, attempted.attempts - before)

    async def _claim(
        self, command_id: str, fingerprint: str, target: str | None
    ) -> Claimed | Done | Conflict:
        """Claim the command (its outcome an attribute of the delivery's span, when recorded)."""
        claim = await self._claim_when_free(command_id, fingerprint, target)
        span = trace.get_current_span()  # the delivery's, when it is recorded
        if span.is_recording():
            span.set_attribute("conference_worker.dedup.outcome", type(claim).__name__.lower())
        return claim

    async def _claim_when_free(
        self, command_id: str, fingerprint: str, target: str | None
    ) -> Claimed | Done | Conflict:
        """Claim the command, waiting out an in-flight duplicate (never run in parallel)."""
        wait = _WAIT_FIRST_S
        while True:
            outcome = await self._with_store(
                partial(self.dedup.claim, command_id, fingerprint, target=target)
            )
            if not isinstance(outcome, InProgress):
                return outcome
            await asyncio.sleep(wait)
            wait = min(wait * 2, _WAIT_MAX_S)

    async def _admit(
        self, delivery: Delivery, target: Target, issued_at: float | None, waited: bool
    ) -> Verdict:
        """Whether the next provider call may go: not once the delivery's channel closed, nor,
        after a wait, once a newer command of the target was applied (by another replica that
        took the partition over meanwhile, say): its call could land after the newer one's."""
        if not delivery.alive():
            return Verdict.GONE
        if waited and issued_at is not None:
            stored = await self._with_store(partial(self.dedup.last_applied, target_key(target)))
            if self.sequencer.is_stale(target, issued_at, stored):
                return Verdict.STALE
        return Verdict.GO

    async def _give_up(self, command_id: str, claim: Claimed) -> NoReturn:
        """Free the claim of a delivery whose channel closed, for its redelivered copy."""
        await self._with_store(partial(self.dedup.release, command_id, claim.token))
        raise DeliveryGone(command_id)

    async def _remember(
        self, command: AnyCommand, claim: Claimed, outcome: Outcome, applied: Applied | None
    ) -> None:
        """Keep what succeeded or the provider rejected; forget the rest (it may run again)."""
        code = (outcome.event.get("error") or {}).get("code", "")
        provider_rejected = outcome.status == "rejected" and code.startswith("provider_")
        if outcome.status == "succeeded" or provider_rejected:
            result = codec.encode(outcome.event)
            await self._with_store(
                partial(
                    self.dedup.complete, command.command_id, claim.token, result, applied=applied
                )
            )
        else:
            await self._with_store(partial(self.dedup.release, command.command_id, claim.token))

    async def _with_store(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a dedup operation, holding the message while the store is unreachable."""
        while True:
            try:
                return await operation()
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


def _failure(
    ident: Identity,
    error: WorkerError,
    attempts: int,
    received_at: datetime,
    *,
    command: AnyCommand | None = None,
    calls: int = 0,
) -> Outcome:
    event = _event(ident, error.status, attempts, received_at, error=error, provider=error.provider)
    return Outcome(
        event, _routing_key(ident.type, error.status), True, command=command, calls=calls
    )


def _deferred(
    retry: RetryState,
    delay_s: float,
    command: AnyCommand,
    calls: int = 0,
    *,
    delayed_retry: bool = False,
) -> Outcome:
    return Outcome(
        {},
        "",
        dead_letter=False,
        defer_s=delay_s,
        retry=retry,
        command=command,
        calls=calls,
        delayed_retry=delayed_retry,
    )


def _finish(
    ident: Identity, attempted: Attempted, received_at: datetime, command: AnyCommand, calls: int
) -> Outcome:
    if attempted.defer_s is not None:
        return _deferred(attempted.state, attempted.defer_s, command, calls, delayed_retry=True)
    if attempted.error is not None:
        return _failure(
            ident, attempted.error, attempted.attempts, received_at, command=command, calls=calls
        )
    success = attempted.success
    event = _event(
        ident,
        "succeeded",
        attempted.attempts,
        received_at,
        provider=success.answer if success else None,
        data=success.data if success else None,
    )
    return Outcome(
        event, _routing_key(ident.type, "succeeded"), False, command=command, calls=calls
    )


def _replay(stored: bytes, received_at: datetime, command: AnyCommand) -> Outcome:
    """A stored result, answered again for a duplicate delivery (never dead-lettered)."""
    event = orjson.loads(stored)
    event.update(
        duplicate=True, attempts=0, received_at=received_at, completed_at=datetime.now(UTC)
    )
    return Outcome(event, _routing_key(event.get("type"), event["status"]), False, command=command)
