"""Replay means retry: the stored outcome of each dead letter's command, the reopen step a
replay runs before each publish, and what ``--dry-run``, ``list`` and ``show`` say of it (no I/O:
the in-process dedup store and a fake exchange)."""

from __future__ import annotations

import asyncio
import io
from typing import Any, cast

import orjson
import pytest
from rich.console import Console

from tests.unit.test_dlq import Journal, letter
from worker.dedup import Claimed, Done, Reopened, Stored
from worker.dedup.memory import MemoryDedupStore
from worker.operators import dlq, dlq_render
from worker.operators.dlq import DeadLetter, DeadLetterError
from worker.operators.dlq_outcomes import (
    CARRIED_OUT,
    FROM_STORE,
    WAITS,
    Outlook,
    Reopener,
    describe,
    fates_by_code,
    key_of,
    open_store,
    outlook,
)
from worker.settings import DedupConfig

MAX = 256 * 1024
SUCCEEDED = b'{"status":"succeeded"}'
REJECTED = b'{"status":"rejected","error":{"code":"provider_not_found"}}'


def command(command_id: str, role: str = "monitor") -> dict[str, Any]:
    return {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": "conf-1",
        "call_control_id": "call-1",
        "supervisor_role": role,
    }


def dead(command_id: str, code: str = "provider_not_found", **fields: Any) -> DeadLetter:
    return letter(
        command_id=command_id, code=code, body=orjson.dumps(command(command_id, **fields))
    )


async def stored(store: MemoryDedupStore, command_id: str, result: bytes | None) -> str:
    """Store ``result`` for the command (None: leave it claimed); its fingerprint."""
    key = key_of(dead(command_id), MAX)
    assert key is not None
    claim = await store.claim(key[0], key[1])
    assert isinstance(claim, Claimed)
    if result is not None:
        await store.complete(key[0], claim.token, result)
    return key[1]


@pytest.fixture
def store() -> MemoryDedupStore:
    return MemoryDedupStore(DedupConfig(url="memory://"))


def test_key_of_a_valid_command_and_of_what_is_not_one() -> None:
    """A valid command gives its id and fingerprint; invalid JSON or an invalid command, None."""
    key = key_of(dead("c-1"), MAX)
    assert key is not None
    assert key[0] == "c-1"
    assert key_of(letter(body=b"{not json"), MAX) is None
    assert key_of(letter(body=orjson.dumps({"command_id": "x"})), MAX) is None


def test_describe_each_stored_outcome() -> None:
    """Nothing or a rejection: carried out; a success or another payload: from the store."""
    assert describe(None, "fp") == Outlook("nothing", CARRIED_OUT)
    assert describe(Stored("fp", SUCCEEDED), "fp") == Outlook("succeeded", FROM_STORE)
    rejected = Outlook("rejected (provider_not_found)", CARRIED_OUT)
    assert describe(Stored("fp", REJECTED), "fp") == rejected
    assert describe(Stored("fp", None), "fp") == Outlook("in progress", WAITS)
    assert describe(Stored("other", SUCCEEDED), "fp").fate == FROM_STORE


async def test_outlook_reads_the_store_without_changing_it(store: MemoryDedupStore) -> None:
    """outlook asks the store and leaves a stored rejection in place."""
    await stored(store, "no", REJECTED)
    assert (await outlook(store, dead("no"), MAX)).fate == CARRIED_OUT
    assert isinstance(await store.claim("no", key_of(dead("no"), MAX)[1]), Done)  # type: ignore[index]
    assert await outlook(store, letter(body=b"??"), MAX) == Outlook(
        "not a valid command", CARRIED_OUT
    )


async def test_reopener_forgets_rejections_and_keeps_successes(store: MemoryDedupStore) -> None:
    """A stored rejection is forgotten (the command can be claimed again); a success stays."""
    fingerprint = await stored(store, "no", REJECTED)
    await stored(store, "ok", SUCCEEDED)
    reopen = Reopener(store, MAX)
    for item in (dead("no"), dead("ok"), dead("new"), letter(body=b"??")):
        await reopen(item)
    assert reopen.found == {Reopened.CLEARED: 1, Reopened.SUCCEEDED: 1, Reopened.ABSENT: 2}
    assert isinstance(await store.claim("no", fingerprint), Claimed)
    assert await store.lookup("ok") is not None
    assert "1 non-success(es) forgotten" in reopen.summary()
    assert "1 success(es) kept" in reopen.summary()


async def test_reopener_keeps_another_payloads_rejection(store: MemoryDedupStore) -> None:
    """An idempotency_conflict dead letter (same id, other payload) leaves the record alone."""
    await stored(store, "c", REJECTED)
    reopen = Reopener(store, MAX)
    await reopen(dead("c", "idempotency_conflict", role="barge"))
    assert reopen.found == {Reopened.CONFLICT: 1}
    assert await store.lookup("c") is not None


async def test_replay_prepares_each_dead_letter_before_its_publish() -> None:
    """prepare runs for a dead letter before it is published; then publish, then ack."""
    journal = Journal()

    async def prepare(item: DeadLetter) -> None:
        journal.events.append(("prepare", item.command_id))

    await dlq.replay_held(
        cast(Any, journal),
        journal.held("a", "b"),
        None,
        stop=asyncio.Event(),
        progress=journal,
        prepare=prepare,
    )
    assert journal.events == [
        *[("prepare", "a"), ("publish", "a"), ("ack", "a")],
        *[("prepare", "b"), ("publish", "b"), ("ack", "b")],
    ]


async def test_a_failing_prepare_stops_the_replay_and_keeps_the_dead_letter() -> None:
    """The store unreachable: nothing is published, nothing acked, the error is raised."""
    journal = Journal()

    async def prepare(item: DeadLetter) -> None:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError, match="store down"):
        await dlq.replay_held(
            cast(Any, journal),
            journal.held("a"),
            None,
            stop=asyncio.Event(),
            progress=journal,
            prepare=prepare,
        )
    assert journal.events == []


async def test_a_replay_refuses_a_memory_store_it_cannot_share() -> None:
    """memory:// is another process's store: a replay refuses it; list just shows no outcome."""
    config = DedupConfig(url="memory://")
    with pytest.raises(DeadLetterError, match="memory://"):
        async with open_store(config, required=True):
            pass
    async with open_store(config, required=False) as found:
        assert found is None
    async with open_store(None, required=True) as found:
        assert found is None


def test_dry_run_counts_per_error_code_and_tables_show_the_stored_outcome() -> None:
    """--dry-run: per code, carried out / from the store / waiting; list has a stored column."""
    letters = [dead("a"), dead("b"), dead("c", "expired")]
    looks = [
        Outlook("rejected (provider_not_found)", CARRIED_OUT),
        Outlook("succeeded", FROM_STORE),
        Outlook("nothing", CARRIED_OUT),
    ]
    fates = fates_by_code(letters, looks)
    assert fates["provider_not_found"] == {CARRIED_OUT: 1, FROM_STORE: 1}
    assert fates["expired"] == {CARRIED_OUT: 1}
    out = io.StringIO()
    console = Console(file=out, width=200)
    console.print(dlq_render.dry_run_table(letters, looks, "what the replay would do"))
    console.print(dlq_render.letters_table(letters, "3 dead letters", looks))
    text = out.getvalue()
    assert "answered from the store" in text
    assert "rejected (provider_not_found)" in text
    assert dlq_render.summary(letters[1], looks[1])["stored"] == "succeeded"
