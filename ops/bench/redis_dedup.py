"""Microbenchmark: the Redis dedup store's hot path (one claim + one complete per command).

    .venv/bin/python -m ops.bench.redis_dedup [--commands 20000] [--concurrency 256] [--repeat 3]
        [--url redis://127.0.0.1:6379/0] [--variants naive,blocking-pool,...]

Each variant runs ``--commands`` claim+complete pairs, ``--concurrency`` at once (one task each
taking every n-th command, as the worker's deliveries), after a warm-up of as many pairs again;
every claim names a target (round robin over 3,000) and every complete marks it applied, as the
worker's commands with ``issued_at`` do.  It prints, as min–max over ``--repeat`` runs, the CPU of
this process per command (``time.process_time``), commands per second (wall clock) and, for
information only, the redis-server's CPU per command (``INFO cpu``; the server is shared, so
other clients add to it).  Keys are ``cw:dedup:bench-dedup-<run>-…`` and ``cw:applied:…`` of the
same prefix, deleted after each run.

Variants:

- ``naive``: ``redis.asyncio.Redis.from_url`` with its default pool (a connection per concurrent
  call; redis-py 8 caps it at 100 and raises ``MaxConnectionsError`` beyond, so the bench raises
  ``max_connections`` to the concurrency), redis-py ``Script`` objects, the two-key scripts of the
  earlier layout (one claim and one complete call per command);
- ``blocking-pool``: the same calls over one client with ``BlockingConnectionPool(16)``;
- ``batch-script-exists``: the calls of a tick in one ``pipeline(transaction=False)`` with the
  ``Script`` objects registered on it, as ``Script.__call__(client=pipe)`` does: redis-py then
  sends ``SCRIPT EXISTS`` before every batch (two round trips);
- ``batch-two-key``: the store's batcher (:class:`worker.dedup.redis._Batcher`), the two-key
  scripts: fewest commands, but not Cluster-safe;
- ``store``: :class:`worker.dedup.redis.RedisDedupStore` itself (the batcher, single-key scripts:
  claim + read of the applied mark, mark + complete, each pair in one round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import Pipeline

from worker.dedup import Applied, Claimed
from worker.dedup.redis import (
    APPLIED_PREFIX,
    KEY_PREFIX,
    RedisDedupStore,
    _Batcher,
    _options,
    applied_key,
    command_key,
    script_op,
)
from worker.settings import DedupConfig

FP = "0123456789abcdef0123456789abcdef"
RESULT = b'{"command_id":"x","status":"succeeded","duplicate":false,"attempts":1}'
LEASE_MS, RETENTION_MS = 15_000, 3_600_000
TARGETS = 3_000

# The earlier layout's scripts: claim reads the target's mark, complete sets it (two keys, two
# hash slots: not Cluster-safe).
_MARK2 = """
local known = tonumber(redis.call('GET', KEYS[2]))
if known and known > tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[3])
else redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3]) end
"""
CLAIM2 = """
local applied = redis.call('GET', KEYS[2])
local stored = redis.call('GET', KEYS[1])
if stored then return {stored, applied} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {false, applied}
"""
COMPLETE2 = (
    _MARK2
    + r"""
local stored = redis.call('GET', KEYS[1])
if not stored or string.sub(stored, 1, 1) ~= 'P' then return 0 end
local sep = string.find(stored, '\0', 2, true)
if not sep or string.sub(stored, sep + 1) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'D' .. string.sub(stored, 2, sep) .. ARGV[2], 'PX', ARGV[3])
return 1
"""
)


class Driver(Protocol):
    """One way of doing a command's claim and complete."""

    async def pair(self, command_id: str, target: str, issued_at: float) -> None: ...

    async def close(self) -> None: ...


def _record() -> tuple[str, bytes]:
    token = secrets.token_hex(8)
    return token, b"P" + FP.encode() + b"\0" + token.encode()


class Direct:
    """One awaited script call for the claim and one for the complete, on any client."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.claim = client.register_script(CLAIM2)
        self.complete = client.register_script(COMPLETE2)

    async def pair(self, command_id: str, target: str, issued_at: float) -> None:
        keys = [command_key(command_id), applied_key(target)]
        token, record = _record()
        stored, _ = await self.claim(keys=keys, args=[record, LEASE_MS])
        assert stored is None
        await self.complete(keys=keys, args=[token, RESULT, RETENTION_MS, repr(issued_at)])

    async def close(self) -> None:
        await self.client.aclose()


class Batched(Direct):
    """The store's batcher and client options (bytes arguments), with the two-key scripts."""

    def __init__(self, client: Redis, timeout_s: float) -> None:
        super().__init__(client)
        self.batcher = _Batcher(client, timeout_s)

    async def pair(self, command_id: str, target: str, issued_at: float) -> None:
        keys = [command_key(command_id).encode(), applied_key(target).encode()]
        token, record = _record()
        args = [token.encode(), RESULT, b"%d" % RETENTION_MS, repr(issued_at).encode()]
        claim = script_op(self.claim, keys, [record, b"%d" % LEASE_MS])
        ((stored, _),) = await self.batcher.run([claim])
        assert stored is None
        await self.batcher.run([script_op(self.complete, keys, args)])

    async def close(self) -> None:
        await self.batcher.close()
        await super().close()


class ScriptsOnPipeline(Redis):
    """A client whose pipelines carry the scripts, as ``Script.__call__(client=pipe)`` leaves
    them: ``execute`` then sends ``SCRIPT EXISTS`` first."""

    scripts: tuple[Any, ...] = ()

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.scripts.update(self.scripts)
        return pipe


class BatchedScriptExists(Batched):
    def __init__(self, url: str) -> None:
        options, timeout_s = _options(url)
        client = ScriptsOnPipeline(connection_pool=ConnectionPool(**options))
        super().__init__(client, timeout_s)
        client.scripts = (self.claim, self.complete)


def _batched(url: str) -> Batched:
    options, timeout_s = _options(url)
    return Batched(Redis.from_pool(ConnectionPool(**options)), timeout_s)


class Store:
    """:class:`RedisDedupStore`, as the worker calls it."""

    def __init__(self, url: str) -> None:
        config = DedupConfig(url=url, lease_s=LEASE_MS / 1000, retention_s=RETENTION_MS / 1000)
        self.store = RedisDedupStore(config)

    async def pair(self, command_id: str, target: str, issued_at: float) -> None:
        claim = await self.store.claim(command_id, FP, target=target)
        assert isinstance(claim, Claimed)
        applied = Applied(target, issued_at)
        await self.store.complete(command_id, claim.token, RESULT, applied=applied)

    async def close(self) -> None:
        await self.store.close()


VARIANTS: dict[str, Callable[[str, int], Driver]] = {
    # redis-py 8's default pool refuses a 101st connection (MaxConnectionsError): sized to fit.
    "naive": lambda url, lanes: Direct(Redis.from_url(url, max_connections=max(100, lanes))),
    "blocking-pool": lambda url, _: Direct(
        Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=16, timeout=30))
    ),
    "batch-script-exists": lambda url, _: BatchedScriptExists(url),
    "batch-two-key": lambda url, _: _batched(url),
    "store": lambda url, _: Store(url),
}


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_us: float  # this process, per command
    rate: float  # commands per second
    server_us: float  # redis-server, per command (shared: indicative)


async def _server_cpu(client: Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _drive(driver: Driver, prefix: str, first: int, count: int, concurrency: int) -> None:
    async def lane(lane_no: int) -> None:
        for n in range(first + lane_no, first + count, concurrency):
            await driver.pair(f"{prefix}{n}", f"{prefix}t{n % TARGETS}", 1_700_000_000.0 + n)

    async with asyncio.TaskGroup() as lanes:  # one failing stops the rest before the cleanup
        for i in range(concurrency):
            lanes.create_task(lane(i))


async def _cleanup(client: Redis, prefix: str) -> None:
    for pattern in (f"{KEY_PREFIX}{prefix}*", f"{APPLIED_PREFIX}{prefix}*"):
        batch = [key async for key in client.scan_iter(match=pattern, count=5000)]
        for start in range(0, len(batch), 5000):
            await client.delete(*batch[start : start + 5000])


async def run_once(name: str, args: argparse.Namespace, admin: Redis) -> Sample:
    """One timed run of a variant (after a warm-up), its keys deleted afterwards."""
    prefix = f"bench-dedup-{uuid.uuid4().hex[:12]}-{name}-"
    driver = VARIANTS[name](args.url, args.concurrency)
    try:
        await _drive(driver, prefix, 0, args.commands, args.concurrency)  # warm-up
        gc.collect()
        server, cpu, wall = await _server_cpu(admin), time.process_time(), time.perf_counter()
        await _drive(driver, prefix, args.commands, args.commands, args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        server = await _server_cpu(admin) - server
    finally:
        await driver.close()
        await _cleanup(admin, prefix)
    per = 1e6 / args.commands
    return Sample(cpu * per, args.commands / wall, server * per)


def _span(values: list[float], digits: int = 0) -> str:
    low, high = min(values), max(values)
    return f"{low:,.{digits}f}–{high:,.{digits}f}"


@contextlib.contextmanager
def _table(args: argparse.Namespace) -> Iterator[Callable[[str, list[Sample]], None]]:
    print(
        f"{args.commands:,} claim+complete pairs, {args.concurrency} concurrent, "
        f"{args.repeat} runs each (min–max)"
    )
    print(f"{'variant':<22} {'CPU µs/command':>16} {'commands/s':>18} {'redis-server µs/cmd':>20}")

    def row(name: str, samples: list[Sample]) -> None:
        print(
            f"{name:<22} {_span([s.cpu_us for s in samples]):>16} "
            f"{_span([s.rate for s in samples]):>18} "
            f"{_span([s.server_us for s in samples], 1):>20}",
            flush=True,
        )

    yield row


async def main(args: argparse.Namespace) -> None:
    """Every variant ``--repeat`` times, interleaved (so that a slow moment hits them all)."""
    admin = Redis.from_url(args.url)
    names: list[str] = args.variants
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    try:
        for _ in range(args.repeat):
            for name in names:
                samples[name].append(await run_once(name, args, admin))
    finally:
        await admin.aclose()
    with _table(args) as row:
        for name in names:
            row(name, samples[name])


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.redis_dedup", description=__doc__)
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--variants",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    return args


def run(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the benchmark."""
    asyncio.run(main(_parse(argv)))


if __name__ == "__main__":
    run()
