"""LeaseKeeper: renews the claims its worker holds, and tells a real lapse from a finished one."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.dedup import Claimed
from worker.dedup.keeper import LeaseKeeper
from worker.dedup.memory import MemoryDedupStore
from worker.settings import DedupConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def claimed(store: MemoryDedupStore, command_id: str) -> str:
    outcome = await store.claim(command_id, "fp")
    assert isinstance(outcome, Claimed)
    return outcome.token


async def test_held_claims_outlive_their_lease() -> None:
    """A held claim renewed each interval is still the holder's after several leases."""
    clock = Clock()
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=10), clock=clock)
    keeper = LeaseKeeper(store, interval_s=5)
    token = await claimed(store, "a")
    keeper.hold("a", token)
    for _ in range(4):
        clock.now += 6
        await keeper.renew_all()
    assert await store.renew("a", token)


async def test_a_claim_finished_while_renewing_is_not_a_lapse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A command that completes while its renewal is on the way is dropped quietly."""
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=10))
    keeper = LeaseKeeper(store, interval_s=5)
    token = await claimed(store, "a")
    keeper.hold("a", token)
    original = store.renew

    async def slow_renew(command_id: str, held: str) -> bool:
        await store.complete("a", token, b"{}")  # the command finishes meanwhile
        keeper.drop("a")
        await asyncio.sleep(0)
        return await original(command_id, held)

    store.renew = slow_renew  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.WARNING, logger="worker.dedup"):
        await keeper.renew_all()
    assert "lapsed" not in caplog.text


async def test_a_real_lapse_is_reported_and_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    """A claim still held whose lease ran out is reported once and no longer renewed."""
    clock = Clock()
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=10), clock=clock)
    keeper = LeaseKeeper(store, interval_s=5)
    keeper.hold("a", await claimed(store, "a"))
    clock.now += 11
    with caplog.at_level(logging.WARNING, logger="worker.dedup"):
        await keeper.renew_all()
        await keeper.renew_all()  # forgotten: not reported again
    assert caplog.text.count("claim of a lapsed") == 1
