"""Shared deduplication store in Redis (redis-py's asyncio client), for many workers on many hosts.

Keys. ``cw:dedup:<command_id>`` holds one compact record, ``state | fingerprint | NUL | tail``:
in progress ``b"P" + fingerprint + b"\\0" + token`` with a ``PX`` expiry of the lease, done
``b"D" + fingerprint + b"\\0" + result`` with a ``PX`` expiry of the retention window.
``cw:applied:<target>`` holds the newest applied ``issued_at`` of a target.  The names are those
of earlier versions, so old and new workers share them during a rolling upgrade.

Cluster-safe: every Lua script touches one key, its ``KEYS[1]``, so none spans two hash slots.
A command's two keys cannot share a slot: its record must be found from ``command_id`` alone (a
copy without ``issued_at``, so claimed without a target, or one with another target, must meet
the first record as Done or Conflict), while a target's mark is read by all of its commands.  So
``claim`` sends the claim script then a read of the mark, and ``complete`` the mark then the
completion, each pair in one round trip, in order: a done command's target is always marked (a
call that fails in between is retried whole; the mark is idempotent).  The mark is a maximum read
for staleness, never meant to change with a record, so reading it next to the claim rather than
within it loses nothing.

Scripts run by ``EVALSHA`` (redis-py ``Script`` objects hold source and digest); after a restart,
a failover or ``SCRIPT FLUSH`` the store loads the missing ones (once each) and sends their calls
again.  Expiry is Redis's own, on the server's clock.

URLs: ``redis://[[username]:password@]host[:port][/db][?option=value&...]``, ``rediss://...``
(TLS: ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_check_hostname``) and ``unix://[[username]:password@]/path/to/socket[?db=N&...]``, as
redis-py reads them, and

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db][?...]

whose Sentinels (port 26379 by default, IPv6 as ``[addr]:port``) name the primary of
``service_name`` (percent-encoded if need be); credentials and options are the primary's, plus
``sentinel_username`` / ``sentinel_password`` for Sentinels that require AUTH.  After a failover
the next connection goes to the new primary; calls caught in between (connection lost,
``READONLY`` from the demoted primary) fail as :class:`worker.errors.StoreUnavailable`, and the
pipeline holds the message and retries.  Options: ``socket_timeout`` (default 5 s: a round trip
not answered within it fails and drops the connection), ``socket_connect_timeout`` (default:
``socket_timeout``), ``client_name`` (default ``conference-worker``) and redis-py's others.
redis-py retries nothing: an outage (connection errors, timeouts, ``LOADING``, ``READONLY``) is
raised once, as StoreUnavailable.

Batching: a worker has hundreds of commands in flight, and redis-py's per-call path (a pool
checkout, a connection and a timer per call) costs 3–4 times the CPU per command of this store
(``python -m ops.bench.redis_dedup``).  :class:`_Batcher` gathers the calls made while the
previous round trip was out (at first, those of one event-loop tick) into one redis-py
``pipeline(transaction=False)``'s wire form: the commands packed by the connection's own
encoder, written at once on one connection of the client's pool that the batcher keeps, and a
reply (or an error reply) read for each.  It skips ``Pipeline``'s per-batch object, retry
wrapper, reset and metrics recorder (a third less CPU per batch of six, ``ops/bench/RESULTS.md``).
One round trip is in flight at a time; a round trip that fails, times out or is cancelled
drops the connection (its stream is out of step) and the next one connects afresh (after a
Sentinel failover: to the new primary).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.dedup import (
    Applied,
    Claimed,
    ClaimOutcome,
    Conflict,
    Done,
    InProgress,
    Reopened,
    Stored,
)
from worker.errors import StoreUnavailable
from worker.settings import DedupConfig

CLIENT_NAME = "conference-worker"
KEY_PREFIX = "cw:dedup:"
APPLIED_PREFIX = "cw:applied:"
SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SENTINEL_PORT = 26379
# ConnectionError covers LOADING (BusyLoadingError), AUTH failures and MasterNotFoundError;
# READONLY and MASTERDOWN are replies of replicas (a demoted primary; one cut off from it).
_OUTAGES = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, MasterDownError, OSError)
T = TypeVar("T")


async def _reach(call: Awaitable[T]) -> T:
    """Await a Redis call, translating "Redis is not there" into :class:`StoreUnavailable`."""
    try:
        return await call
    except _OUTAGES as exc:
        raise StoreUnavailable(f"redis: {exc or type(exc).__name__}") from exc


def command_key(command_id: str) -> str:
    """The key of a command's record."""
    return KEY_PREFIX + command_id


def applied_key(target: str) -> str:
    """The key of a target's newest applied ``issued_at``."""
    return APPLIED_PREFIX + target


# Every script touches KEYS[1] alone (see the module docstring).
# ARGV[1] = in-progress record, ARGV[2] = lease in ms; returns the stored record, or nil once set.
_CLAIM = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return nil
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
_LAST_APPLIED = "return redis.call('GET', KEYS[1])\n"
# ARGV[1] = issued_at, ARGV[2] = retention in ms: keeps the maximum.
_MARK_APPLIED = """
local known = tonumber(redis.call('GET', KEYS[1]))
if known and known > tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
# ARGV[1] = fingerprint.  Forgets a done record of that fingerprint unless its result event
# succeeded (or cannot be read: never rerun what may have succeeded); says what it found.
_REOPEN = r"""
local stored = redis.call('GET', KEYS[1])
if not stored then return 'absent' end
local sep = string.find(stored, '\0', 2, true)
if not sep or string.sub(stored, 2, sep - 1) ~= ARGV[1] then return 'conflict' end
if string.sub(stored, 1, 1) ~= 'D' then return 'in_progress' end
local ok, event = pcall(cjson.decode, string.sub(stored, sep + 1))
if not ok or type(event) ~= 'table' or event['status'] == 'succeeded' then return 'succeeded' end
redis.call('DEL', KEYS[1])
return 'cleared'
"""
SCRIPTS = {
    "claim": _CLAIM,
    "complete": _COMPLETE,
    "release": _RELEASE,
    "renew": _RENEW,
    "last_applied": _LAST_APPLIED,
    "mark_applied": _MARK_APPLIED,
    "reopen": _REOPEN,
}

# One command of a call: a script and its (numkeys, *keys, *args), or None and a plain command.
Op = tuple[AsyncScript | None, tuple[Any, ...]]


def script_op(script: AsyncScript, keys: Sequence[str | bytes], args: Sequence[Any]) -> Op:
    """An ``EVALSHA`` of ``script`` on ``keys`` with ``args``."""
    return script, (len(keys), *keys, *args)


class _Call:
    """The commands of one store call, and the future that gets all their replies."""

    __slots__ = ("future", "left", "ops", "replies", "retried")

    def __init__(self, ops: Sequence[Op], future: asyncio.Future[list[Any]]) -> None:
        self.ops, self.future = ops, future
        self.replies: list[Any] = [None] * len(ops)
        self.left = len(ops)
        self.retried = False  # after a SCRIPT LOAD; a second NOSCRIPT is an error

    def answer(self, index: int, reply: Any) -> None:
        if self.future.done():
            return
        if isinstance(reply, Exception):
            self.future.set_exception(reply)
            return
        self.replies[index] = reply
        self.left -= 1
        if not self.left:
            self.future.set_result(self.replies)


Batch = list[tuple[_Call, int]]  # (call, index of the op within it)


def _fail(batch: Batch, exc: Exception) -> None:
    for call, index in batch:
        call.answer(index, exc)


class _Batcher:
    """Sends the calls queued while no round trip is out as one pipeline, one at a time."""

    def __init__(self, client: Redis, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._queue: Batch = []
        self._sending: Batch = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        self._closed = False

    def run(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        """Queue one call's commands; the future gets their replies, or the first error."""
        call = _Call(ops, asyncio.get_running_loop().create_future())
        if self._closed:
            call.future.set_exception(RedisConnectionError("the store is closed"))
            return call.future
        self._queue.extend((call, index) for index in range(len(ops)))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return call.future

    async def close(self) -> None:
        """Fail what is queued or on its way, and stop sending."""
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        closed = RedisConnectionError("the store is closed")
        _fail(self._sending + self._queue, closed)
        self._queue = []
        if self._connection is not None:
            await self._connection.disconnect()

    async def _send(self) -> None:
        try:
            while self._queue:
                self._sending, self._queue = self._queue, []
                try:
                    await self._execute(self._sending)
                except Exception as exc:  # a bug: fail its calls rather than leave them waiting
                    _fail(self._sending, exc)
                self._sending = []
        finally:
            self._sender = None

    async def _execute(self, batch: Batch) -> None:
        commands = []
        for call, index in batch:
            script, args = call.ops[index]
            commands.append(args if script is None else (b"EVALSHA", script.sha.encode(), *args))
        try:
            replies = await self._bounded(self._round_trip(commands))
        except Exception as exc:  # the connection failed: every call of the batch with it
            _fail(batch, exc)
            return
        missing: Batch = []
        for (call, index), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError) and not call.retried:
                missing.append((call, index))
            else:
                call.answer(index, reply)
        if missing:
            await self._reload(missing)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` at once on the batcher's connection; a reply or error reply each."""
        connection = self._connection
        if connection is None:
            pool = self._client.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._connection = connection
        try:
            if not connection.is_connected:  # connect() itself: Sentinel's asks for the primary
                await connection.connect()
            packed = connection.pack_commands(commands)
            await connection.send_packed_command(packed)  # health_check_interval= is honoured
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # an error reply (NOSCRIPT, READONLY): in step still
                    replies.append(exc)
        except BaseException:  # lost, timed out or cancelled midway: the stream is out of step
            await connection.disconnect(nowait=True)
            raise
        return replies

    async def _bounded(self, call: Awaitable[T]) -> T:
        """``call`` within the timeout (on expiry, :meth:`_round_trip` drops its connection)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except TimeoutError:
            raise RedisTimeoutError(f"no answer within {self._timeout_s:g} s") from None

    async def _reload(self, missing: Batch) -> None:
        """Load the scripts Redis lacks (after a restart or flush), then send their calls again."""
        scripts = {id(script): script for call, i in missing if (script := call.ops[i][0])}
        loads = [(b"SCRIPT", b"LOAD", script.script) for script in scripts.values()]
        try:
            replies = await self._bounded(self._round_trip(loads))
        except Exception as exc:
            _fail(missing, exc)
            return
        failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if failed is not None:
            _fail(missing, failed)
            return
        for call, _ in missing:
            call.retried = True
        self._queue[:0] = missing


def _host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (the Sentinel port by default)."""
    found = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if found is None:
        raise ValueError("redis+sentinel URL: bad host list")
    host = found.group(1) or found.group(3)
    return host, int(found.group(2) or found.group(4) or DEFAULT_SENTINEL_PORT)


def _options(url: str) -> tuple[dict[str, Any], float]:
    """Connection options from a redis-py URL, with the store's defaults, and the timeout.

    The connections get no read timeout of their own: the batcher bounds each round trip as a
    whole (one timer per batch rather than one per reply).
    """
    options: dict[str, Any] = {"client_name": CLIENT_NAME, **parse_url(url)}
    timeout = float(options.get("socket_timeout") or DEFAULT_TIMEOUT_S)
    options["socket_timeout"] = None
    options["socket_connect_timeout"] = float(options.get("socket_connect_timeout") or timeout)
    options["retry"] = Retry(NoBackoff(), 0)  # an outage is the caller's to handle, at once
    return options, timeout


def _sentinel_client(url: str) -> tuple[Redis, Sentinel, float]:
    """A client of the primary named by a ``redis+sentinel://`` URL, its Sentinel, the timeout."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    path = [unquote(part) for part in parts.path.split("/") if part]
    if not hosts or not 1 <= len(path) <= 2:
        raise ValueError(
            "use redis+sentinel://[[user]:password@]host[:port][,...]/service_name[/db]"
        )
    sentinels = [_host_port(host) for host in hosts.split(",")]
    credentials = f"{userinfo}@" if userinfo else ""
    db = path[1] if len(path) == 2 else "0"
    options, timeout = _options(f"redis://{credentials}sentinel/{db}?{parts.query}")
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs["socket_timeout"] = timeout
    for name in ("username", "password"):
        if (value := options.pop(f"sentinel_{name}", None)) is not None:
            sentinel_kwargs[name] = value
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(path[0], **options), sentinel, timeout


class RedisDedupStore:
    """A :class:`worker.dedup.DedupStore` in Redis, shared by every worker that uses the URL."""

    def __init__(self, config: DedupConfig) -> None:
        self._sentinel: Sentinel | None = None
        if config.url.split(":", 1)[0].lower() == SENTINEL_SCHEME:
            self._client, self._sentinel, timeout_s = _sentinel_client(config.url)
        else:
            options, timeout_s = _options(config.url)
            self._client = Redis.from_pool(ConnectionPool(**options))
        self._scripts = {name: self._client.register_script(src) for name, src in SCRIPTS.items()}
        self._batch = _Batcher(self._client, timeout_s)
        # Arguments go as bytes: redis-py passes bytes through without converting them.
        self._lease_ms = b"%d" % max(1, round(config.lease_s * 1000))
        self._retention_ms = b"%d" % max(1, round(config.retention_s * 1000))

    def _op(self, name: str, key: str, *args: bytes) -> Op:
        return script_op(self._scripts[name], [key.encode()], args)

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
        record = b"P" + encoded + b"\0" + token.encode()
        ops = [self._op("claim", command_key(command_id), record, self._lease_ms)]
        if target is not None:
            ops.append(self._op("last_applied", applied_key(target)))
        replies = await _reach(self._batch.run(ops))
        stored = replies[0]
        if stored is None:
            applied = replies[1] if target is not None else None
            return Claimed(token, None if applied is None else float(applied))
        return _known(stored, encoded)

    async def complete(
        self, command_id: str, token: str, result: bytes, *, applied: Applied | None = None
    ) -> None:
        """Record ``result`` if ``token`` still holds a live claim; mark ``applied`` anyway."""
        ops = [] if applied is None else [self._mark(applied.target, applied.issued_at)]
        key = command_key(command_id)
        ops.append(self._op("complete", key, token.encode(), result, self._retention_ms))
        await _reach(self._batch.run(ops))

    async def release(self, command_id: str, token: str) -> None:
        """Forget ``command_id`` if ``token`` still holds a live claim; otherwise do nothing."""
        op = self._op("release", command_key(command_id), token.encode())
        await _reach(self._batch.run([op]))

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend ``token``'s live claim by a lease."""
        op = self._op("renew", command_key(command_id), token.encode(), self._lease_ms)
        (renewed,) = await _reach(self._batch.run([op]))
        return bool(renewed)

    async def last_applied(self, target: str) -> float | None:
        """The newest applied ``issued_at`` of ``target`` within the retention window."""
        (value,) = await _reach(self._batch.run([self._op("last_applied", applied_key(target))]))
        return None if value is None else float(value)

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Keep the newest ``issued_at`` of ``target`` for the retention window."""
        await _reach(self._batch.run([self._mark(target, issued_at)]))

    def _mark(self, target: str, issued_at: float) -> Op:
        issued = repr(issued_at).encode()
        return self._op("mark_applied", applied_key(target), issued, self._retention_ms)

    async def lookup(self, command_id: str) -> Stored | None:
        """What is stored for ``command_id``."""
        op: Op = (None, ("GET", command_key(command_id).encode()))
        (stored,) = await _reach(self._batch.run([op]))
        if stored is None:
            return None
        sep = stored.find(b"\0", 1)
        fingerprint = stored[1:sep].decode()
        return Stored(fingerprint, stored[sep + 1 :] if stored[:1] == b"D" else None)

    async def reopen(self, command_id: str, fingerprint: str) -> Reopened:
        """Forget a stored non-success of the same payload, in one script."""
        op = self._op("reopen", command_key(command_id), fingerprint.encode())
        (found,) = await _reach(self._batch.run([op]))
        return Reopened(found.decode() if isinstance(found, bytes) else str(found))

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if Redis cannot be reached."""
        await _reach(self._batch.run([(None, ("PING",))]))

    async def close(self) -> None:
        """Fail the calls still queued and close the connections."""
        await self._batch.close()
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def _known(stored: bytes, fingerprint: bytes) -> ClaimOutcome:
    sep = stored.find(b"\0", 1)
    if stored[1:sep] != fingerprint:
        return Conflict()
    if stored[:1] == b"D":
        return Done(stored[sep + 1 :])
    return InProgress()
