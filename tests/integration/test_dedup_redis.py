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
from worker.dedup import Claimed, make_dedup_store
from worker.dedup.redis import APPLIED_PREFIX, KEY_PREFIX, RedisDedupStore
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


async def test_pool_size_default_and_url_override() -> None:
    """The pool holds 256 connections unless the URL says ?max_connections=N."""
    default = redis_store()
    custom = RedisDedupStore(DedupConfig(url=f"{REDIS_URL}?max_connections=7"))
    assert (default.max_connections, custom.max_connections) == (256, 7)
    await default.close()
    await custom.close()


async def test_small_pool_waits_instead_of_failing(prefix: str) -> None:
    """With more concurrent calls than connections, calls wait for a connection."""
    store = RedisDedupStore(DedupConfig(url=f"{REDIS_URL}?max_connections=2"))
    outcomes = await asyncio.gather(*(store.claim(f"{prefix}{i}", FP) for i in range(50)))
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
