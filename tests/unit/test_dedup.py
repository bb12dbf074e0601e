"""Dedup stores: one behaviour suite, :class:`DedupBehaviour`, run here on the in-process and
SQLite backends with a fake clock, and in ``tests/integration/test_dedup_redis.py`` on Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker import dedup
from worker.dedup import Claimed, Conflict, DedupStore, Done, InProgress
from worker.dedup import memory as memory_module
from worker.dedup import sqlite as sqlite_module
from worker.dedup.memory import MemoryDedupStore
from worker.dedup.sqlite import SqliteDedupStore
from worker.settings import DedupConfig

FP, OTHER_FP = "fp-a", "fp-b"
RESULT = b'{"status":"succeeded","duplicate":false}'


@dataclass
class Harness:
    """A store under test, its lease and retention, and a way to let time pass."""

    store: DedupStore
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

    async def test_concurrent_claims_one_winner(self, harness: Harness) -> None:
        """Of 50 concurrent claims of one id exactly one is Claimed, the rest InProgress."""
        outcomes = await asyncio.gather(*(harness.claim("a") for _ in range(50)))
        assert sum(isinstance(o, Claimed) for o in outcomes) == 1
        assert sum(o == InProgress() for o in outcomes) == 49


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


def _race(url: str, prefix: str, count: int, seed: int, *, barrier: Any, results: Any) -> None:
    """One racer: claim every id, in a shuffled order, from the moment all racers are ready."""

    async def race() -> list[int]:
        store = dedup.make_dedup_store(DedupConfig(url=url, lease_s=300.0))
        await store.ping()
        barrier.wait(timeout=150)
        order = random.Random(seed).sample(range(count), count)
        won = [i for i in order if isinstance(await store.claim(f"{prefix}{i}", FP), Claimed)]
        await store.close()
        return won

    results.put(asyncio.run(race()))


def race_in_processes(url: str, prefix: str, count: int, processes: int = 2) -> list[list[int]]:
    """Spawn ``processes`` processes claiming the same ids at once; the indices each won."""
    ctx = multiprocessing.get_context("spawn")
    sync: dict[str, Any] = {"barrier": ctx.Barrier(processes), "results": ctx.Queue()}
    racers = [
        ctx.Process(target=_race, args=(url, prefix, count, seed), kwargs=sync, daemon=True)
        for seed in range(processes)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:  # the results are small enough to wait in the queue's pipe
        racer.join(timeout=240)
    assert [racer.exitcode for racer in racers] == [0] * processes
    return [sync["results"].get(timeout=5) for _ in racers]


@pytest.mark.skipif(
    os.environ.get("CI") == "true",
    reason="hangs intermittently inside the full suite (passes alone; the Redis race passes): "
    "under investigation; run it with `pytest tests/unit/test_dedup.py -k cross_process`",
)
def test_sqlite_cross_process_claims_once(tmp_path: Path) -> None:
    """Two processes sharing one SQLite file claim each of 200 ids exactly once in total."""
    won = race_in_processes(f"sqlite:///{tmp_path}/d.sqlite3", "id-", 200)
    assert sorted(i for indices in won for i in indices) == list(range(200))
