"""The deduplication behaviour suite against real Redis, plus Redis-only checks.

Time really passes here (expiry is Redis's own), so leases and windows are short.  Every test
uses ids under a fresh uuid4 prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.unit.test_dedup import (
    FP,
    RESULT,
    DedupBehaviour,
    Harness,
    race_in_processes,
)
from worker.dedup import Applied, Claimed, make_dedup_store
from worker.dedup.redis import APPLIED_PREFIX, KEY_PREFIX, RedisDedupStore
from worker.errors import StoreUnavailable
from worker.settings import DedupConfig

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("CW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LEASE_S = 0.3
RETENTION_S = 0.9


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh id prefix; every key under it is deleted at teardown."""
    value = f"test-{uuid.uuid4().hex}-"
    yield value
    client = Redis.from_url(REDIS_URL)
    keys = [
        key
        for pattern in (f"{KEY_PREFIX}{value}*", f"{APPLIED_PREFIX}{value}*")
        async for key in client.scan_iter(match=pattern, count=1000)
    ]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    """A plain client, to look at what the store wrote."""
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def redis_store(lease_s: float = LEASE_S, retention_s: float = RETENTION_S) -> RedisDedupStore:
    return RedisDedupStore(DedupConfig(url=REDIS_URL, lease_s=lease_s, retention_s=retention_s))


class TestRedisBackend(DedupBehaviour):
    """The behaviour suite on Redis, with real sleeps."""

    @pytest.fixture
    async def harness(self, prefix: str) -> AsyncIterator[Harness]:
        store = redis_store()
        yield Harness(store, LEASE_S, RETENTION_S, asyncio.sleep, prefix, slack_s=0.05)
        await store.close()


async def test_records_are_compact_with_ttls(prefix: str, raw: Redis) -> None:
    """Records are P|fp|NUL|token under the lease, then D|fp|NUL|result for the window."""
    store = redis_store(lease_s=60.0, retention_s=3600.0)
    key = f"{KEY_PREFIX}{prefix}a"
    outcome = await store.claim(f"{prefix}a", FP)
    assert isinstance(outcome, Claimed)
    assert await raw.get(key) == f"P{FP}\0{outcome.token}".encode()
    assert 59_000 < await raw.pttl(key) <= 60_000
    await store.complete(f"{prefix}a", outcome.token, RESULT)
    assert await raw.get(key) == f"D{FP}\0".encode() + RESULT
    assert 3_599_000 < await raw.pttl(key) <= 3_600_000
    await store.close()


async def test_release_deletes_key(prefix: str, raw: Redis) -> None:
    """Release removes the key rather than leaving a tombstone."""
    store = redis_store()
    outcome = await store.claim(f"{prefix}a", FP)
    assert isinstance(outcome, Claimed)
    await store.release(f"{prefix}a", outcome.token)
    assert await raw.exists(f"{KEY_PREFIX}{prefix}a") == 0
    await store.close()


async def test_fingerprint_with_nul_is_refused(prefix: str) -> None:
    """A fingerprint containing NUL, the record separator, is refused before any write."""
    store = redis_store()
    with pytest.raises(ValueError, match="NUL"):
        await store.claim(f"{prefix}a", "a\0b")
    await store.close()


async def test_calls_share_one_pipelined_connection(prefix: str, raw: Redis) -> None:
    """500 concurrent claims go through one connection (batched), and all of them succeed."""
    name = f"cw-test-{uuid.uuid4().hex[:12]}"
    store = RedisDedupStore(DedupConfig(url=f"{REDIS_URL}?client_name={name}&max_connections=7"))
    outcomes = await asyncio.gather(*(store.claim(f"{prefix}{i}", FP) for i in range(500)))
    assert all(isinstance(outcome, Claimed) for outcome in outcomes)
    clients = [c for c in await raw.client_list() if c.get("name") == name]
    assert len(clients) == 1, clients
    await store.close()


async def test_claim_reads_the_targets_newest_applied_with_it(prefix: str) -> None:
    """A claim naming a target returns its newest applied issued_at in the same call."""
    store = redis_store(retention_s=60.0)
    target = f"{prefix}target"
    first = await store.claim(f"{prefix}a", FP, target=target)
    assert isinstance(first, Claimed)
    assert first.last_applied is None
    await store.complete(f"{prefix}a", first.token, RESULT, applied=Applied(target, 1000.25))
    second = await store.claim(f"{prefix}b", FP, target=target)
    assert isinstance(second, Claimed)
    assert second.last_applied == 1000.25
    await store.close()


async def test_recovers_after_its_connection_is_killed(prefix: str, raw: Redis) -> None:
    """When Redis drops the connection, the calls on it fail as StoreUnavailable, later calls
    reconnect and succeed."""
    name = f"cw-test-{uuid.uuid4().hex[:12]}"
    store = RedisDedupStore(DedupConfig(url=f"{REDIS_URL}?client_name={name}"))
    await store.ping()
    for client in await raw.client_list():
        if client.get("name") == name:
            await raw.client_kill_filter(_id=client["id"])
    failures = 0
    for attempt in range(3):
        try:
            outcome = await store.claim(f"{prefix}{attempt}", FP)
        except StoreUnavailable:
            failures += 1
            continue
        assert isinstance(outcome, Claimed)
        break
    else:
        pytest.fail("the store did not reconnect")
    assert failures <= 1
    await store.close()


async def test_a_round_trip_that_timed_out_leaves_no_stale_reply_behind(
    prefix: str, raw: Redis
) -> None:
    """A round trip Redis answers too late fails as StoreUnavailable and drops its connection:
    the late replies never reach a later call, which gets its own."""
    store = RedisDedupStore(DedupConfig(url=f"{REDIS_URL}?socket_timeout=0.2"))
    await store.ping()
    await raw.client_pause(500)
    with pytest.raises(StoreUnavailable, match="no answer within"):
        await store.claim(f"{prefix}late", FP)
    await asyncio.sleep(0.6)  # the pause is over; Redis answered the dropped connection, if any
    await store.mark_applied(f"{prefix}target", 42.5)
    assert await store.last_applied(f"{prefix}target") == 42.5
    assert await store.lookup(f"{prefix}other") is None
    await store.close()


async def test_scripts_are_loaded_again_after_a_flush(prefix: str, raw: Redis) -> None:
    """After SCRIPT FLUSH (or a Redis restart) the store loads its scripts again, unnoticed."""
    store = redis_store()
    await store.claim(f"{prefix}a", FP)
    await raw.script_flush()
    outcomes = await asyncio.gather(*(store.claim(f"{prefix}{i}", FP) for i in range(1, 20)))
    assert all(isinstance(outcome, Claimed) for outcome in outcomes)
    await store.close()


async def test_factory_builds_redis_store() -> None:
    """make_dedup_store builds the Redis backend for redis:// URLs, and it answers ping."""
    store = make_dedup_store(DedupConfig(url=REDIS_URL))
    assert isinstance(store, RedisDedupStore)
    await store.ping()
    await store.close()


def test_cross_process_claims_once(prefix: str) -> None:
    """Two OS processes racing on the same 200 ids claim each exactly once in total."""
    won = race_in_processes(REDIS_URL, prefix, 200)
    assert sorted(i for indices in won for i in indices) == list(range(200))
