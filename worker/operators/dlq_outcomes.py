"""The stored outcome of each dead letter's command, and the step of a replay that reopens it.

**Replay means retry.**  A dead letter whose command the provider rejected has that rejection
stored in the dedup store (CONTRACT.md, "Deduplication"): published again as it is, the worker
would answer it from the store and the replay would be a silent no-op.  So, just before each
dead letter is published again, :class:`Reopener` asks the store to forget the stored outcome of
its command, atomically and only if that outcome is not a success, is not in progress and is of
the same payload (:meth:`worker.dedup.OutcomeStore.reopen`).  The worker then carries the
command out again; a stored success stays, and the replay is answered as a duplicate without a
provider call.  Nothing on the wire changes and the worker trusts no header: only someone who can
write to the dedup store can make a command run again.

Two replays of one dead letter at once cannot happen (a delivered dead letter is held by one
consumer until acked); two dead letters of one command, or a replay that died between a confirm
and its ack, meet the worker's claim: one copy runs, the other waits and is answered from the
store.  A success is therefore never repeated at the provider, and a dead letter is removed only
after its command is on its way again.

:func:`outlook` says, without changing anything, what a replay would do with a dead letter (for
``dlq replay --dry-run``, ``dlq list`` and ``dlq show``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import orjson

from worker.contract import codec
from worker.dedup import OutcomeStore, Reopened, Stored, make_dedup_store
from worker.errors import WorkerError
from worker.operators.dlq import DeadLetter, DeadLetterError
from worker.settings import DedupConfig

CARRIED_OUT = "carried out"
FROM_STORE = "answered from the store"
WAITS = "waits for a run in progress"
#: The dry run's columns, in order.
FATES = (CARRIED_OUT, FROM_STORE, WAITS)


@dataclass(frozen=True, slots=True)
class Outlook:
    """What is stored for a dead letter's command, and what a replay would do with it."""

    stored: str  # "nothing", "succeeded", "rejected (provider_not_found)", "in progress", ...
    fate: str  # one of FATES


def key_of(letter: DeadLetter, max_body_bytes: int) -> tuple[str, str] | None:
    """The command id and payload fingerprint of a dead letter; None when it is not a valid
    command (a replay has it rejected again, and nothing is stored for it)."""
    try:
        command = codec.decode(letter.body, max_body_bytes)
    except WorkerError:
        return None
    return command.command_id, codec.fingerprint(command)


def describe(stored: Stored | None, fingerprint: str) -> Outlook:
    """The :class:`Outlook` of what the store holds for a command of ``fingerprint``."""
    if stored is None:
        return Outlook("nothing", CARRIED_OUT)
    if stored.fingerprint != fingerprint:
        return Outlook("another payload (conflict)", FROM_STORE)
    status = stored.status
    if status == "in_progress":
        return Outlook("in progress", WAITS)
    if status == "succeeded":
        return Outlook("succeeded", FROM_STORE)
    return Outlook(f"{status} ({stored_code(stored)})", CARRIED_OUT)


def stored_code(stored: Stored) -> str:
    """The error code of a stored result event ('' when none)."""
    try:
        error = orjson.loads(stored.result or b"{}").get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return str(error.get("code", "")) if isinstance(error, dict) else ""


async def outlook(store: OutcomeStore, letter: DeadLetter, max_body_bytes: int) -> Outlook:
    """What a replay of ``letter`` would do, as the store says now."""
    key = key_of(letter, max_body_bytes)
    if key is None:
        return Outlook("not a valid command", CARRIED_OUT)
    return describe(await store.lookup(key[0]), key[1])


async def outlooks(
    store: OutcomeStore, letters: Iterable[DeadLetter], max_body_bytes: int
) -> list[Outlook]:
    """:func:`outlook` of each dead letter, in order."""
    return [await outlook(store, letter, max_body_bytes) for letter in letters]


def fates_by_code(
    letters: Iterable[DeadLetter], seen: Iterable[Outlook]
) -> dict[str, Counter[str]]:
    """Per error code, how many dead letters a replay would carry out, answer from the store,
    or leave waiting (``dlq replay --dry-run``)."""
    table: dict[str, Counter[str]] = {}
    for letter, look in zip(letters, seen, strict=True):
        table.setdefault(letter.code or "no code", Counter())[look.fate] += 1
    return table


@dataclass(slots=True)
class Reopener:
    """The replay's step before each publish: reopen the command in the store (see above)."""

    store: OutcomeStore
    max_body_bytes: int
    found: Counter[Reopened] = field(default_factory=Counter)

    async def __call__(self, letter: DeadLetter) -> None:
        """Forget the stored non-success of ``letter``'s command; count what was found."""
        key = key_of(letter, self.max_body_bytes)
        found = Reopened.ABSENT if key is None else await self.store.reopen(*key)
        self.found[found] += 1

    def summary(self) -> str:
        """One line: what the store held for the replayed commands."""
        cleared, kept = self.found[Reopened.CLEARED], self.found[Reopened.SUCCEEDED]
        return (
            f"stored outcomes: {cleared} non-success(es) forgotten (carried out again), "
            f"{kept} success(es) kept (answered as duplicates, no provider call)"
        )


MEMORY_STORE = (
    "CW_DEDUP_URL is memory://: the workers' dedup store cannot be reached from this process, so "
    "a replay could not forget their stored rejections; set CW_DEDUP_URL to the workers' store"
)


@contextlib.asynccontextmanager
async def open_store(
    config: DedupConfig | None, *, required: bool
) -> AsyncIterator[OutcomeStore | None]:
    """The workers' dedup store, or None when there is none to reach (an error if ``required``:
    a replay must never be answered from a store it could not reopen)."""
    if config is None or config.url.lower().startswith("memory:"):
        if required and config is not None:
            raise DeadLetterError(MEMORY_STORE)
        yield None
        return
    store = make_dedup_store(config)
    try:
        yield store
    finally:
        await store.close()


async def looks_of(
    config: DedupConfig | None, letters: list[DeadLetter], max_body_bytes: int
) -> list[Outlook] | None:
    """The stored outcome of each dead letter's command (None: no store to ask)."""
    async with open_store(config, required=False) as store:
        if store is None:
            return None
        return await outlooks(store, letters, max_body_bytes)
