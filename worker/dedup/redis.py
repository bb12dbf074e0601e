"""Shared deduplication store: one Redis key per command, for many workers on many hosts.

Key ``cw:dedup:{command_id}`` holds one compact record, ``state | fingerprint | NUL | tail``:

- in progress: ``b"P" + fingerprint + b"\\0" + token``, with a ``PX`` expiry of the lease;
- done: ``b"D" + fingerprint + b"\\0" + result``, with a ``PX`` expiry of the retention window.

Key ``cw:applied:{target}`` holds the newest applied ``issued_at`` of a target.

Every operation is one Lua script (``EVALSHA``), so it is atomic across workers: ``claim`` sets a
missing key or returns the stored record for Python to judge, and reads the target's newest
applied ``issued_at`` in the same step; ``complete`` records that a target was applied, then, like
``release``, compares the token first and does nothing when it no longer holds the claim (the
lease lapsed, perhaps someone else claimed).  Expiry is Redis's own, on the server's clock.  The
two keys of a call are in different hash slots: Redis Cluster is not supported.

All calls share one pipelined connection (:class:`worker.dedup.resp.Pipe`): the calls made in
one event-loop tick go out as one write.  Under load a worker has hundreds of commands in flight;
redis-py's pool, with a checkout, a task and a timeout per call, cost more CPU than anything but
the provider call (ops/bench/RESULTS.md).  A call not answered within the socket timeout (default
5 s, ``?socket_timeout=S``) drops the connection and fails its calls; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.dedup import Applied, Claimed, ClaimOutcome, Conflict, Done, InProgress
from worker.dedup.resp import Endpoint, Pipe
from worker.errors import StoreUnavailable
from worker.settings import DedupConfig

CLIENT_NAME = "conference-worker"
KEY_PREFIX = "cw:dedup:"
APPLIED_PREFIX = "cw:applied:"
_OUTAGES = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    OSError,
    TimeoutError,
)
T = TypeVar("T")


async def _reach(call: Awaitable[T]) -> T:
    """Await a Redis call, translating "Redis is not there" into :class:`StoreUnavailable`."""
    try:
        return await call
    except _OUTAGES as exc:
        raise StoreUnavailable(f"redis: {exc or type(exc).__name__}") from exc


# Keeps the maximum of KEYS[k] and ARGV[i] for ARGV[j] ms (the indices spliced in).
_MARK = """
local known = tonumber(redis.call('GET', KEYS[{k}]))
if known and known > tonumber(ARGV[{i}]) then
  redis.call('PEXPIRE', KEYS[{k}], ARGV[{j}])
else
  redis.call('SET', KEYS[{k}], ARGV[{i}], 'PX', ARGV[{j}])
end
"""
# KEYS[1] = key, KEYS[2] = applied key (or absent); ARGV[1] = in-progress record, ARGV[2] = lease
# in ms.  Returns {stored record or false, the target's newest applied issued_at or false}.
_CLAIM = """
local applied = false
if KEYS[2] then applied = redis.call('GET', KEYS[2]) end
local stored = redis.call('GET', KEYS[1])
if stored then return {stored, applied} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {false, applied}
"""
# Sets ``stored`` and ``sep`` when KEYS[1] is in progress under token ARGV[1], else returns 0.
_OWNED = r"""
local stored = redis.call('GET', KEYS[1])
if not stored or string.sub(stored, 1, 1) ~= 'P' then return 0 end
local sep = string.find(stored, '\0', 2, true)
if not sep or string.sub(stored, sep + 1) ~= ARGV[1] then return 0 end
"""
# ARGV[1] = token, ARGV[2] = result, ARGV[3] = retention in ms, ARGV[4] = issued_at when KEYS[2]
# (applied key) is given: the target is marked applied even when the claim has lapsed.
_COMPLETE = (
    "if KEYS[2] then\n"
    + _MARK.format(k=2, i=4, j=3)
    + "end\n"
    + _OWNED
    + "redis.call('SET', KEYS[1], 'D' .. string.sub(stored, 2, sep) .. ARGV[2], 'PX', ARGV[3])\n"
    + "return 1\n"
)
# ARGV[1] = token.
_RELEASE = _OWNED + "return redis.call('DEL', KEYS[1])\n"
# ARGV[1] = token, ARGV[2] = lease in ms.
_RENEW = _OWNED + "return redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
_LAST_APPLIED = "return redis.call('GET', KEYS[1])"
# KEYS[1] = applied key; ARGV[1] = issued_at, ARGV[2] = retention in ms.
_MARK_APPLIED = _MARK.format(k=1, i=1, j=2) + "return 1\n"


@dataclass(frozen=True, slots=True)
class _Script:
    source: bytes
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        encoded = source.encode()
        return cls(encoded, hashlib.sha1(encoded, usedforsecurity=False).hexdigest())


_SCRIPTS = {
    name: _Script.of(source)
    for name, source in {
        "claim": _CLAIM,
        "complete": _COMPLETE,
        "release": _RELEASE,
        "renew": _RENEW,
        "last_applied": _LAST_APPLIED,
        "mark_applied": _MARK_APPLIED,
    }.items()
}


class _Scripts:
    """Runs the scripts by digest over a :class:`Pipe`, loading one when Redis lacks it."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._loading: dict[str, asyncio.Future[Any]] = {}

    def call(self, *command: Any) -> asyncio.Future[Any]:
        return self._pipe.call(*command)

    async def eval(self, script: _Script, keys: list[Any], args: list[Any]) -> Any:
        """``EVALSHA``; after a Redis restart or SCRIPT FLUSH, ``SCRIPT LOAD`` and again."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._pipe.call(*command)
        except NoScriptError:
            await self._load(script)
            return await self._pipe.call(*command)

    async def _load(self, script: _Script) -> None:
        """One ``SCRIPT LOAD`` for all the calls that found the script missing at once."""
        loading = self._loading.get(script.sha)
        if loading is None:
            loading = self._loading[script.sha] = self._pipe.call("SCRIPT", "LOAD", script.source)
            loading.add_done_callback(lambda _: self._loading.pop(script.sha, None))
        await asyncio.shield(loading)

    async def close(self) -> None:
        await self._pipe.close()


class RedisDedupStore:
    """A :class:`worker.dedup.DedupStore` in Redis, shared by every worker that uses the URL."""

    def __init__(self, config: DedupConfig) -> None:
        self._pipe = _Scripts(Pipe(Endpoint.from_url(config.url, client_name=CLIENT_NAME)))
        self._lease_ms = max(1, round(config.lease_s * 1000))
        self._retention_ms = max(1, round(config.retention_s * 1000))

    async def claim(
        self, command_id: str, fingerprint: str, *, target: str | None = None
    ) -> ClaimOutcome:
        """Claim ``command_id``, or report what is known of it (see :mod:`worker.dedup`).

        ``fingerprint`` must not contain NUL, the record's separator (hashes never do).
        """
        encoded = fingerprint.encode()
        if b"\0" in encoded:
            raise ValueError("fingerprint must not contain NUL")
        token = secrets.token_hex(8)
        keys = [KEY_PREFIX + command_id]
        if target is not None:
            keys.append(APPLIED_PREFIX + target)
        record = b"P" + encoded + b"\0" + token.encode()
        stored, applied = await _reach(
            self._pipe.eval(_SCRIPTS["claim"], keys, [record, self._lease_ms])
        )
        if stored is None:
            return Claimed(token, None if applied is None else float(applied))
        return _known(stored, encoded)

    async def complete(
        self, command_id: str, token: str, result: bytes, *, applied: Applied | None = None
    ) -> None:
        """Record ``result`` if ``token`` still holds a live claim; mark ``applied`` anyway."""
        keys = [KEY_PREFIX + command_id]
        args: list[Any] = [token, result, self._retention_ms]
        if applied is not None:
            keys.append(APPLIED_PREFIX + applied.target)
            args.append(repr(applied.issued_at))
        await _reach(self._pipe.eval(_SCRIPTS["complete"], keys, args))

    async def release(self, command_id: str, token: str) -> None:
        """Forget ``command_id`` if ``token`` still holds a live claim; otherwise do nothing."""
        await _reach(self._pipe.eval(_SCRIPTS["release"], [KEY_PREFIX + command_id], [token]))

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend ``token``'s live claim by a lease."""
        renewed = await _reach(
            self._pipe.eval(_SCRIPTS["renew"], [KEY_PREFIX + command_id], [token, self._lease_ms])
        )
        return bool(renewed)

    async def last_applied(self, target: str) -> float | None:
        """The newest applied ``issued_at`` of ``target`` within the retention window."""
        value = await _reach(
            self._pipe.eval(_SCRIPTS["last_applied"], [APPLIED_PREFIX + target], [])
        )
        return None if value is None else float(value)

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Keep the newest ``issued_at`` of ``target`` for the retention window."""
        args = [repr(issued_at), self._retention_ms]
        await _reach(self._pipe.eval(_SCRIPTS["mark_applied"], [APPLIED_PREFIX + target], args))

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if Redis cannot be reached."""
        await _reach(self._pipe.call("PING"))

    async def close(self) -> None:
        """Close the connection."""
        await self._pipe.close()


def _known(stored: bytes, fingerprint: bytes) -> ClaimOutcome:
    sep = stored.find(b"\0", 1)
    if stored[1:sep] != fingerprint:
        return Conflict()
    if stored[:1] == b"D":
        return Done(stored[sep + 1 :])
    return InProgress()
