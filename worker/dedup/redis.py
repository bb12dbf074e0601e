"""Shared deduplication store: one Redis key per command, for many workers on many hosts.

Key ``cw:dedup:{command_id}`` holds one compact record, ``state | fingerprint | NUL | tail``:

- in progress: ``b"P" + fingerprint + b"\\0" + token``, with a ``PX`` expiry of the lease;
- done: ``b"D" + fingerprint + b"\\0" + result``, with a ``PX`` expiry of the retention window.

Every operation is one round trip to one Lua script (EVALSHA, via ``register_script``), so it is
atomic across workers: ``claim`` sets a missing key or returns the stored record for Python to
judge; ``complete`` and ``release`` compare the token first and do nothing when it no longer holds
the claim (the lease lapsed, perhaps someone else claimed).  Expiry is Redis's own, on the
server's clock.

The connection pool is a :class:`redis.asyncio.BlockingConnectionPool` of ``max_connections``
(default 256, or ``?max_connections=N`` in the URL): when every connection is busy, a call waits
for one instead of failing.  Socket and connect timeouts default to 5 s (``?socket_timeout=S``,
``?socket_connect_timeout=S``); query-string options always win over these defaults.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.dedup import Claimed, ClaimOutcome, Conflict, Done, InProgress
from worker.errors import StoreUnavailable
from worker.settings import DedupConfig

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_SOCKET_TIMEOUT_S = 5.0  # a hung Redis fails the call instead of stalling the handler
KEY_PREFIX = "cw:dedup:"
APPLIED_PREFIX = "cw:applied:"
_OUTAGES = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
T = TypeVar("T")


async def _reach(call: Awaitable[T]) -> T:
    """Await a Redis call, translating "Redis is not there" into :class:`StoreUnavailable`."""
    try:
        return await call
    except _OUTAGES as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


# KEYS[1] = key; ARGV[1] = in-progress record, ARGV[2] = lease in ms.
_CLAIM = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Sets ``stored`` and ``sep`` when KEYS[1] is in progress under token ARGV[1], else returns 0.
_OWNED = r"""
local stored = redis.call('GET', KEYS[1])
if not stored or string.sub(stored, 1, 1) ~= 'P' then return 0 end
local sep = string.find(stored, '\0', 2, true)
if not sep or string.sub(stored, sep + 1) ~= ARGV[1] then return 0 end
"""
# ARGV[1] = token, ARGV[2] = result, ARGV[3] = retention in ms.
_COMPLETE = (
    _OWNED
    + "redis.call('SET', KEYS[1], 'D' .. string.sub(stored, 2, sep) .. ARGV[2], 'PX', ARGV[3])\n"
    + "return 1\n"
)
# ARGV[1] = token.
_RELEASE = _OWNED + "return redis.call('DEL', KEYS[1])\n"
# ARGV[1] = token, ARGV[2] = lease in ms.
_RENEW = _OWNED + "return redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
_LAST_APPLIED = "return redis.call('GET', KEYS[1])"
# ARGV[1] = issued_at, ARGV[2] = retention in ms; keeps the maximum.
_MARK_APPLIED = """
local known = tonumber(redis.call('GET', KEYS[1]))
if known and known > tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


@dataclass(slots=True)
class _Coalescer:
    """Sends the script calls made in one event-loop tick as one pipelined round trip.

    Under load a worker has many commands in flight; their claims and completions, each a
    separate round trip through the connection pool, cost the worker more CPU than anything but
    the provider call.  Calls queued in the same tick share one pipeline (no transaction: each
    script is atomic on its own), one pool checkout and one write.
    """

    redis: Redis
    _pending: list[tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]] = field(
        default_factory=list
    )
    _sending: set[asyncio.Task[None]] = field(default_factory=set)

    def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # keep a reference until it is done
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    await script(keys=keys, args=args, client=pipe)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class RedisDedupStore:
    """A :class:`worker.dedup.DedupStore` in Redis, shared by every worker that uses the URL."""

    def __init__(self, config: DedupConfig) -> None:
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=DEFAULT_MAX_CONNECTIONS,
            socket_timeout=DEFAULT_SOCKET_TIMEOUT_S,
            socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S,
        )
        self._redis = Redis.from_pool(pool)
        self._pool = pool
        self._lease_ms = max(1, round(config.lease_s * 1000))
        self._retention_ms = max(1, round(config.retention_s * 1000))
        self._claim = self._redis.register_script(_CLAIM)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)
        self._mark_applied = self._redis.register_script(_MARK_APPLIED)
        self._renew = self._redis.register_script(_RENEW)
        self._last_applied = self._redis.register_script(_LAST_APPLIED)
        self._batch = _Coalescer(self._redis)

    @property
    def max_connections(self) -> int:
        """Size of the connection pool."""
        return self._pool.max_connections

    async def claim(self, command_id: str, fingerprint: str) -> ClaimOutcome:
        """Claim ``command_id``, or report what is known of it (see :mod:`worker.dedup`).

        ``fingerprint`` must not contain NUL, the record's separator (hashes never do).
        """
        encoded = fingerprint.encode()
        if b"\0" in encoded:
            raise ValueError("fingerprint must not contain NUL")
        token = secrets.token_hex(8)
        record = b"P" + encoded + b"\0" + token.encode()
        stored = await _reach(
            self._batch.call(self._claim, [KEY_PREFIX + command_id], [record, self._lease_ms])
        )
        if stored is None:
            return Claimed(token)
        return _known(stored, encoded)

    async def complete(self, command_id: str, token: str, result: bytes) -> None:
        """Record ``result`` if ``token`` still holds a live claim; otherwise do nothing."""
        await _reach(
            self._batch.call(
                self._complete, [KEY_PREFIX + command_id], [token, result, self._retention_ms]
            )
        )

    async def release(self, command_id: str, token: str) -> None:
        """Forget ``command_id`` if ``token`` still holds a live claim; otherwise do nothing."""
        await _reach(self._batch.call(self._release, [KEY_PREFIX + command_id], [token]))

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend ``token``'s live claim by a lease."""
        renewed = await _reach(
            self._renew(keys=[KEY_PREFIX + command_id], args=[token, self._lease_ms])
        )
        return bool(renewed)

    async def last_applied(self, target: str) -> float | None:
        """The newest applied ``issued_at`` of ``target`` within the retention window."""
        value = await _reach(self._batch.call(self._last_applied, [APPLIED_PREFIX + target], []))
        return None if value is None else float(value)

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Keep the newest ``issued_at`` of ``target`` for the retention window."""
        await _reach(
            self._batch.call(
                self._mark_applied, [APPLIED_PREFIX + target], [repr(issued_at), self._retention_ms]
            )
        )

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if Redis cannot be reached."""
        await _reach(self._redis.ping())

    async def close(self) -> None:
        """Close the client and its connection pool."""
        await self._redis.aclose()


def _known(stored: bytes, fingerprint: bytes) -> ClaimOutcome:
    sep = stored.find(b"\0", 1)
    if stored[1:sep] != fingerprint:
        return Conflict()
    if stored[:1] == b"D":
        return Done(stored[sep + 1 :])
    return InProgress()
