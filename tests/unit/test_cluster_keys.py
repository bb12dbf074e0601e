"""The Redis dedup store's calls are Redis Cluster-safe: every script touches keys of one hash slot.

No I/O: the store's batcher is replaced by a recorder that answers every call at once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import pytest
from redis.crc import key_slot

from worker.dedup import Applied, Claimed
from worker.dedup.redis import APPLIED_PREFIX, KEY_PREFIX, SCRIPTS, Op, RedisDedupStore
from worker.settings import DedupConfig

COMMAND_IDS = ["plain", "a{b}c", "{x}:*?é" * 20, "{}", "}{", "{", "with space", "é☎"]
TARGETS = ["telnyx|conf-1|call-2", "vinix|{acct}|conf", "{", "a}b{c", "é|☎|x"]


class Recorder:
    """Stands in for the batcher: keeps every call's commands, answers them at once."""

    def __init__(self, sources: dict[bytes | str, str]) -> None:
        self.sources = sources  # digest -> script name
        self.calls: list[Sequence[Op]] = []

    def run(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        self.calls.append(ops)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        future.set_result([self._reply(op) for op in ops])
        return future

    def _reply(self, op: Op) -> Any:
        script, _ = op
        if script is None:
            return True  # PING
        name = self.sources[script.sha]
        return {"claim": None, "last_applied": b"12.5", "reopen": b"absent"}.get(name, 1)


def _keys(op: Op) -> list[Any]:
    _, args = op
    return list(args[1 : 1 + args[0]])


@pytest.fixture
def recorded() -> tuple[RedisDedupStore, Recorder]:
    """A store whose calls go to a :class:`Recorder` (nothing connects)."""
    store = RedisDedupStore(DedupConfig(url="redis://127.0.0.1:1/0"))
    recorder = Recorder({script.sha: name for name, script in store._scripts.items()})
    store._batch = recorder  # type: ignore[assignment]
    return store, recorder


async def _every_call(store: RedisDedupStore) -> None:
    """Each store method, with and without a target, on awkward ids and targets."""
    for command_id in COMMAND_IDS:
        for target in [None, *TARGETS]:
            claim = await store.claim(command_id, "fp", target=target)
            assert isinstance(claim, Claimed)
            applied = None if target is None else Applied(target, 10.25)
            await store.complete(command_id, claim.token, b"result", applied=applied)
        await store.release(command_id, "token")
        assert await store.renew(command_id, "token")
        await store.reopen(command_id, "fp")
    for target in TARGETS:
        assert await store.last_applied(target) == 12.5
        await store.mark_applied(target, 11.0)
    await store.ping()


async def test_every_script_call_stays_in_one_hash_slot(
    recorded: tuple[RedisDedupStore, Recorder],
) -> None:
    """Every EVALSHA the store sends names at least one key, and all its keys share a slot."""
    store, recorder = recorded
    await _every_call(store)
    script_ops = [op for call in recorder.calls for op in call if op[0] is not None]
    assert script_ops
    for op in script_ops:
        keys = _keys(op)
        assert keys, f"a script call without keys: {op}"
        slots = {key_slot(key if isinstance(key, bytes) else key.encode()) for key in keys}
        assert len(slots) == 1, f"keys {keys} span slots {slots}"
    used = {recorder.sources[op[0].sha] for op in script_ops if op[0] is not None}
    assert used == set(SCRIPTS), "every script is exercised"


async def test_keys_keep_the_cw_prefixes(recorded: tuple[RedisDedupStore, Recorder]) -> None:
    """Command keys are cw:dedup:<id>, applied marks cw:applied:<target> (cleanup finds them)."""
    store, recorder = recorded
    await store.claim("id-1", "fp", target="t|1|2")
    await store.complete("id-1", "tok", b"r", applied=Applied("t|1|2", 1.0))
    keys = [key for call in recorder.calls for op in call for key in _keys(op)]
    assert set(keys) == {f"{KEY_PREFIX}id-1".encode(), f"{APPLIED_PREFIX}t|1|2".encode()}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_touch_only_their_declared_key(name: str) -> None:
    """A script reads or writes KEYS[1] alone, never a key it was not given (Cluster checks only
    the declared keys)."""
    indices = {int(index) for index in re.findall(r"KEYS\[(\d+)\]", SCRIPTS[name])}
    assert indices == {1}
    assert "redis.call('KEYS'" not in SCRIPTS[name]
    assert "SCAN" not in SCRIPTS[name]


def test_key_slot_is_redis_clusters() -> None:
    """The slot function follows Redis Cluster: CRC16 mod 16384, hash tags honoured."""
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{}x") != key_slot(b"{}y")
