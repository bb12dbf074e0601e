"""Dedup stores: one behaviour suite, :class:`DedupBehaviour`, run here on the in-process and
SQLite backends with a fake clock, and in ``tests/integration/test_dedup_redis.py`` on Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import sqlite3
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker import dedup
from worker.dedup import Claimed, Conflict, Done, InProgress
from worker.dedup import memory as memory_module
from worker.dedup import sqlite as sqlite_module
from worker.dedup.memory import MemoryDedupStore
from worker.dedup.sqlite import SqliteDedupStore
from worker.settings import DedupConfig

FP, OTHER_FP = "fp-a", "fp-b"
RESULT = b'{"status":"succeeded","duplicate":false}'
REJECTED = b'{"status":"rejected","error":{"code":"provider_not_found"}}'


@dataclass
class Harness:
    """A store under test, its lease and retention, and a way to let time pass."""

    store: dedup.DedupBackend
    lease_s: float
    retention_s: float
    advance: Callable[[float], Awaitable[None]]
    prefix: str = ""  # prepended to every command id
    slack_s: float = 0.0  # extra time for an expiry to be seen (real clocks only)

    async def claim(self, name: str, fingerprint: str = FP) -> dedup.ClaimOutcome:
        return await self.store.claim(self.prefix + name, fingerprint)

    async def token(self, name: str, fingerprint: str = FP) -> str:
        outcome = await self.claim(name, fingerprint)
        assert isinstance(outcome, Claimed)
        return outcome.token

    async def complete(self, name: str, token: str, result: bytes = RESULT) -> None:
        await self.store.complete(self.prefix + name, token, result)

    async def release(self, name: str, token: str) -> None:
        await self.store.release(self.prefix + name, token)

    async def finish(self, name: str, result: bytes = RESULT) -> str:
        token = await self.token(name)
        await self.complete(name, token, result)
        return token

    async def outlive(self, window_s: float) -> None:
        await self.advance(window_s + self.slack_s)


@dataclass
class FakeClock:
    """A clock that moves only when told."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


class DedupBehaviour:
    """The state machine of :mod:`worker.dedup`; subclasses provide the ``harness`` fixture."""

    async def test_first_claims_get_distinct_tokens(self, harness: Harness) -> None:
        """An open store answers ping; unknown ids are claimed, each with its own token."""
        await harness.store.ping()
        first, second = await harness.token("a"), await harness.token("b")
        assert first
        assert first != second

    async def test_duplicate_in_progress(self, harness: Harness) -> None:
        """The same payload while the first claim is live is InProgress."""
        await harness.token("a")
        assert await harness.claim("a") == InProgress()

    async def test_conflict_in_progress_leaves_claim(self, harness: Harness) -> None:
        """A different payload while in progress is Conflict, and the owner's claim is intact."""
        token = await harness.token("a")
        assert await harness.claim("a", OTHER_FP) == Conflict()
        await harness.complete("a", token)
        assert await harness.claim("a") == Done(RESULT)

    async def test_conflict_after_done_leaves_result(self, harness: Harness) -> None:
        """A different payload after done is Conflict, and the stored result is untouched."""
        await harness.finish("a")
        assert await harness.claim("a", OTHER_FP) == Conflict()
        assert await harness.claim("a") == Done(RESULT)

    @pytest.mark.parametrize("result", [RESULT, b"", b"\x00\x01\xff", '{"x":"é☎"}'.encode()])
    async def test_complete_then_done(self, harness: Harness, result: bytes) -> None:
        """After complete the same payload gets Done with the exact result bytes."""
        await harness.finish("a", result)
        assert await harness.claim("a") == Done(result)

    async def test_unusual_command_id(self, harness: Harness) -> None:
        """A 200-character id with punctuation and non-ASCII works like any other."""
        name = ("{x}:*?é" * 40)[:200]
        await harness.finish(name)
        assert await harness.claim(name) == Done(RESULT)

    async def test_done_ignores_old_token(self, harness: Harness) -> None:
        """Once done, complete and release with the old token change nothing."""
        token = await harness.finish("a")
        await harness.complete("a", token, b"other")
        await harness.release("a", token)
        assert await harness.claim("a") == Done(RESULT)

    async def test_release_forgets(self, harness: Harness) -> None:
        """After release the id is unknown: any payload claims it again with a new token."""
        token = await harness.token("a")
        await harness.release("a", token)
        assert await harness.token("a", OTHER_FP) != token

    async def test_wrong_token_does_nothing(self, harness: Harness) -> None:
        """Complete and release with a token that never held the claim change nothing."""
        await harness.token("a")
        for name in ("a", "unknown"):
            await harness.complete(name, "not-the-token")
            await harness.release(name, "not-the-token")
        assert await harness.claim("a") == InProgress()
        assert await harness.token("unknown")

    async def test_claim_live_within_lease(self, harness: Harness) -> None:
        """Half way through the lease the claim still holds."""
        await harness.token("a")
        await harness.advance(harness.lease_s / 2)
        assert await harness.claim("a") == InProgress()

    async def test_lease_lapse(self, harness: Harness) -> None:
        """After the lease the owner's complete stores nothing and any payload may claim."""
        token = await harness.token("a")
        await harness.outlive(harness.lease_s)
        await harness.complete("a", token)
        assert await harness.token("a", OTHER_FP) != token

    async def test_stale_token_leaves_new_owner(self, harness: Harness) -> None:
        """A lapsed owner's complete and release leave the new owner's claim alone."""
        stale = await harness.token("a")
        await harness.outlive(harness.lease_s)
        fresh = await harness.token("a")
        await harness.complete("a", stale, b"stale")
        await harness.release("a", stale)
        assert await harness.claim("a") == InProgress()
        await harness.complete("a", fresh)
        assert await harness.claim("a") == Done(RESULT)

    async def test_done_kept_for_retention(self, harness: Harness) -> None:
        """A done record outlives the lease; after the retention window the id is unknown."""
        await harness.finish("a")
        await harness.outlive(harness.lease_s)
        assert await harness.claim("a") == Done(RESULT)
        await harness.outlive(harness.retention_s - harness.lease_s)
        assert await harness.token("a", OTHER_FP)

    async def test_renew_extends_only_a_live_claim(self, harness: Harness) -> None:
        """The owner can extend its claim past the lease; a lapsed or foreign token cannot."""
        token = await harness.token("a")
        assert not await harness.store.renew(harness.prefix + "a", "not-the-token")
        await harness.advance(harness.lease_s * 0.6)
        assert await harness.store.renew(harness.prefix + "a", token)
        await harness.advance(harness.lease_s * 0.6)
        assert await harness.claim("a") == InProgress()
        await harness.outlive(harness.lease_s)
        assert not await harness.store.renew(harness.prefix + "a", token)
        assert isinstance(await harness.claim("a"), Claimed)

    async def test_last_applied_keeps_the_newest(self, harness: Harness) -> None:
        """The newest applied issued_at of a target is kept; an older one never replaces it."""
        target = harness.prefix + "telnyx|conf|call"
        assert await harness.store.last_applied(target) is None
        await harness.store.mark_applied(target, 100.5)
        await harness.store.mark_applied(target, 50.0)
        assert await harness.store.last_applied(target) == 100.5
        await harness.store.mark_applied(target, 200.25)
        assert await harness.store.last_applied(target) == 200.25

    async def test_claim_naming_a_target_reads_its_newest_applied(self, harness: Harness) -> None:
        """A claim that names a target also returns the target's newest applied issued_at."""
        target = harness.prefix + "vinix|acct|conf"
        first = await harness.store.claim(harness.prefix + "a", FP, target=target)
        assert isinstance(first, Claimed)
        assert first.last_applied is None
        await harness.store.mark_applied(target, 100.5)
        second = await harness.store.claim(harness.prefix + "b", FP, target=target)
        assert isinstance(second, Claimed)
        assert second.last_applied == 100.5
        untargeted = await harness.store.claim(harness.prefix + "c", FP)
        assert isinstance(untargeted, Claimed)
        assert untargeted.last_applied is None

    async def test_complete_marks_applied_even_after_the_claim_lapsed(
        self, harness: Harness
    ) -> None:
        """complete(applied=...) records the target as applied with the result, and still does
        so when the claim has lapsed (the provider call happened either way)."""
        target = harness.prefix + "telnyx|conf|call"
        token = await harness.token("a")
        await harness.store.complete(
            harness.prefix + "a", token, RESULT, applied=dedup.Applied(target, 10.0)
        )
        assert await harness.claim("a") == Done(RESULT)
        assert await harness.store.last_applied(target) == 10.0
        late = await harness.token("b")
        await harness.outlive(harness.lease_s)
        await harness.store.complete(
            harness.prefix + "b", late, RESULT, applied=dedup.Applied(target, 20.0)
        )
        assert await harness.store.last_applied(target) == 20.0
        assert isinstance(await harness.claim("b"), Claimed)

    async def test_concurrent_claims_one_winner(self, harness: Harness) -> None:
        """Of 50 concurrent claims of one id exactly one is Claimed, the rest InProgress."""
        outcomes = await asyncio.gather(*(harness.claim("a") for _ in range(50)))
        assert sum(isinstance(o, Claimed) for o in outcomes) == 1
        assert sum(o == InProgress() for o in outcomes) == 49

    async def test_reopen_forgets_a_stored_rejection_only(self, harness: Harness) -> None:
        """reopen forgets a stored rejection (the id can be claimed again) and keeps a stored
        success, an in-progress claim and another payload's record, saying which it found."""
        store, p = harness.store, harness.prefix
        await harness.finish("ok")
        await harness.finish("no", REJECTED)
        await harness.token("busy")
        assert await store.reopen(p + "ok", FP) is dedup.Reopened.SUCCEEDED
        assert await store.reopen(p + "busy", FP) is dedup.Reopened.IN_PROGRESS
        assert await store.reopen(p + "no", OTHER_FP) is dedup.Reopened.CONFLICT
        assert await store.reopen(p + "none", FP) is dedup.Reopened.ABSENT
        assert await store.reopen(p + "no", FP) is dedup.Reopened.CLEARED
        assert await store.reopen(p + "no", FP) is dedup.Reopened.ABSENT
        assert await harness.claim("ok") == Done(RESULT)
        assert isinstance(await harness.claim("no"), Claimed)

    async def test_reopen_keeps_what_cannot_be_read(self, harness: Harness) -> None:
        """A stored result that is not a readable event counts as a success: never rerun."""
        await harness.finish("odd", b"not json")
        found = await harness.store.reopen(harness.prefix + "odd", FP)
        assert found is dedup.Reopened.SUCCEEDED
        assert await harness.claim("odd") == Done(b"not json")

    async def test_concurrent_reopens_clear_once(self, harness: Harness) -> None:
        """Of 20 concurrent reopens of one stored rejection exactly one clears it."""
        await harness.finish("no", REJECTED)
        found = await asyncio.gather(
            *(harness.store.reopen(harness.prefix + "no", FP) for _ in range(20))
        )
        assert found.count(dedup.Reopened.CLEARED) == 1
        assert found.count(dedup.Reopened.ABSENT) == 19

    async def test_lookup_tells_what_is_stored(self, harness: Harness) -> None:
        """lookup: None when unknown, in progress, or done with the stored event's status."""
        store, p = harness.store, harness.prefix
        assert await store.lookup(p + "none") is None
        await harness.token("busy")
        await harness.finish("no", REJECTED)
        busy, rejected = await store.lookup(p + "busy"), await store.lookup(p + "no")
        assert busy == dedup.Stored(FP, None)
        assert busy.status == "in_progress"
        assert rejected == dedup.Stored(FP, REJECTED)
        assert rejected.status == "rejected"


LEASE_S, RETENTION_S = 30.0, 3600.0


def open_store(kind: str, url: str, clock: FakeClock) -> MemoryDedupStore | SqliteDedupStore:
    config = DedupConfig(url=url, lease_s=LEASE_S, retention_s=RETENTION_S)
    if kind == "memory":
        return MemoryDedupStore(config, clock=clock)
    return SqliteDedupStore(config, clock=clock)


class TestLocalBackends(DedupBehaviour):
    """The behaviour suite on the in-process and SQLite backends, with a fake clock."""

    @pytest.fixture(params=["memory", "sqlite"])
    async def harness(self, request: Any, tmp_path: Path) -> AsyncIterator[Harness]:
        clock = FakeClock()
        store = open_store(request.param, f"{request.param}:///{tmp_path}/d.sqlite3", clock)
        yield Harness(store, LEASE_S, RETENTION_S, clock.advance)
        await store.close()


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    """Done and in-progress records survive closing and reopening the SQLite file."""
    clock, url = FakeClock(), f"sqlite:///{tmp_path}/d.sqlite3"
    first = Harness(open_store("sqlite", url, clock), LEASE_S, RETENTION_S, clock.advance)
    await first.finish("done")
    await first.token("running")
    await first.store.close()
    store = open_store("sqlite", url, clock)
    assert await store.claim("done", FP) == Done(RESULT)
    assert await store.claim("running", FP) == InProgress()
    await store.close()
    await store.close()  # a second close is harmless
    with pytest.raises(sqlite3.ProgrammingError):
        await store.ping()


async def test_sqlite_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite:///rel/path is relative to the working directory, parents created, WAL on."""
    monkeypatch.chdir(tmp_path)
    store = SqliteDedupStore(DedupConfig(url="sqlite:///state/deep/d.sqlite3"))
    await store.close()
    conn = sqlite3.connect(tmp_path / "state/deep/d.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:relative", "mongodb://x"])
def test_bad_url_refused(url: str) -> None:
    """An unknown scheme, or a sqlite URL that names no file, is refused."""
    with pytest.raises(ValueError, match="sqlite:///"):
        dedup.make_dedup_store(DedupConfig(url=url))


async def test_memory_purges_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired entries are dropped from the dict every PURGE_EVERY claims."""
    monkeypatch.setattr(memory_module, "PURGE_EVERY", 2)
    clock = FakeClock()
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=LEASE_S), clock=clock)
    await store.claim("old", FP)
    await clock.advance(LEASE_S)
    await store.claim("new", FP)  # the 2nd claim purges
    assert list(store._entries) == ["new"]


async def test_sqlite_purges_expired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired rows are deleted from the file every PURGE_EVERY claims."""
    monkeypatch.setattr(sqlite_module, "PURGE_EVERY", 2)
    clock, config = FakeClock(), DedupConfig(f"sqlite:///{tmp_path}/d.sqlite3", lease_s=LEASE_S)
    store = SqliteDedupStore(config, clock=clock)
    await store.claim("old", FP)
    await clock.advance(LEASE_S)
    await store.claim("new", FP)  # the 2nd claim purges
    assert store._conn.execute("SELECT command_id FROM dedup").fetchall() == [("new",)]
    await store.close()


def test_factory_picks_backend(tmp_path: Path) -> None:
    """make_dedup_store chooses the backend by URL scheme, in any case."""
    assert isinstance(dedup.make_dedup_store(DedupConfig(url="memory://")), MemoryDedupStore)
    store = dedup.make_dedup_store(DedupConfig(url=f"SQLITE:///{tmp_path}/d.sqlite3"))
    assert isinstance(store, SqliteDedupStore)
    asyncio.run(store.close())


RACE_TIMEOUT_S = 60.0  # the whole race, start-up included; well within pytest's `timeout`


def _race(url: str, prefix: str, count: int, seed: int, *, barrier: Any, results: Any) -> None:
    """One racer: once all racers are ready, open the store and claim every id in a shuffled
    order; put ``(seed, indices won)`` on ``results``, or ``(seed, traceback)`` if it failed."""

    async def race() -> list[int]:
        barrier.wait(timeout=RACE_TIMEOUT_S)  # the parent aborts it if another racer fails
        store = dedup.make_dedup_store(DedupConfig(url=url, lease_s=300.0))
        try:
            order = random.Random(seed).sample(range(count), count)
            return [i for i in order if isinstance(await store.claim(f"{prefix}{i}", FP), Claimed)]
        finally:
            await store.close()

    try:
        results.put((seed, asyncio.run(race())))
    except BaseException:
        results.put((seed, traceback.format_exc()))
        raise


def race_in_processes(url: str, prefix: str, count: int, processes: int = 2) -> list[list[int]]:
    """Spawn ``processes`` processes that open ``url`` and claim the same ids at the same moment;
    the indices each won.

    Nothing here waits without a bound: the whole race has RACE_TIMEOUT_S, and once a racer
    fails the others are released from the barrier and the assertion carries its traceback.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and loops
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    sync = {"barrier": barrier, "results": results}
    racers = [
        ctx.Process(target=_race, args=(url, prefix, count, seed), kwargs=sync, daemon=True)
        for seed in range(processes)
    ]
    for racer in racers:
        racer.start()
    deadline = time.monotonic() + RACE_TIMEOUT_S
    reports: dict[int, list[int] | str] = {}
    try:
        while len(reports) < processes and time.monotonic() < deadline:
            try:
                seed, report = results.get(timeout=0.1)
            except queue.Empty:  # a racer that ended without a report will never send one
                if any(racer.exitcode not in (None, 0) for racer in racers):
                    break
                continue
            reports[seed] = report
            if isinstance(report, str):
                break
    finally:
        barrier.abort()  # harmless once every racer is past it
        for racer in racers:
            racer.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if racer.is_alive():
                racer.kill()
                racer.join(timeout=5)
    for _ in range(processes - len(reports)):  # the reports of racers released by the abort
        try:
            seed, report = results.get(timeout=0.1)
        except queue.Empty:
            break
        reports.setdefault(seed, report)
    codes = [racer.exitcode for racer in racers]
    failures = "\n".join(f"racer {s}:\n{r}" for s, r in reports.items() if isinstance(r, str))
    assert not failures, f"a racer failed (exit codes {codes}):\n{failures}"
    assert len(reports) == processes, (
        f"only racers {sorted(reports)} of {processes} reported within {RACE_TIMEOUT_S} s"
        f" (exit codes {codes}; -9: still running at the deadline, so killed)"
    )
    assert codes == [0] * processes, f"racers reported but exited with codes {codes}"
    return [report for _, report in sorted(reports.items()) if not isinstance(report, str)]


def test_sqlite_cross_process_claims_once(tmp_path: Path) -> None:
    """Two processes opening one new SQLite file at the same moment both open it, and claim each
    of 200 ids exactly once in total."""
    won = race_in_processes(f"sqlite:///{tmp_path}/d.sqlite3", "id-", 200)
    assert sorted(i for indices in won for i in indices) == list(range(200))


def _writer_of_rollback_journal(path: Path) -> sqlite3.Connection:
    """A connection holding the write lock of a file still in rollback-journal mode, as a
    process that is switching a new file to WAL does."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE other (x)")
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_sqlite_open_waits_for_a_concurrent_switch_to_wal(tmp_path: Path) -> None:
    """Opening while another connection writes the file in rollback-journal mode waits for it
    (SQLite refuses the switch to WAL at once there, whatever the busy timeout), then turns WAL
    on."""
    writer = _writer_of_rollback_journal(tmp_path / "d.sqlite3")
    done = threading.Timer(0.3, writer.execute, ("COMMIT",))
    done.start()
    try:
        store = SqliteDedupStore(DedupConfig(url=f"sqlite:///{tmp_path}/d.sqlite3"))
    finally:
        done.join(timeout=10)
        writer.close()
    assert store._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    asyncio.run(store.close())


def test_sqlite_open_gives_up_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that stays locked is reported as locked once the busy timeout has passed."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_S", 0.2)
    writer = _writer_of_rollback_journal(tmp_path / "d.sqlite3")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        SqliteDedupStore(DedupConfig(url=f"sqlite:///{tmp_path}/d.sqlite3"))
    assert 0.2 <= time.monotonic() - started < 5, "gave up before or long after the timeout"
    writer.close()
