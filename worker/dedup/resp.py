"""One pipelined Redis connection, as lean as the dedup store's hot path needs.

:class:`Pipe` sends every command queued in an event-loop tick as one write and resolves each
command's future from the replies, in order (Redis answers a connection's commands in the order
sent), as :class:`hiredis.Reader` parses them in ``data_received``.  Several batches may be on the
wire at once.  Compared with redis-py's client (a pool checkout, a task, a timeout and several
coroutine layers per call or pipeline) this costs a quarter of the CPU per command
(ops/bench/RESULTS.md); redis-py still parses the URL.

- Connecting: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS; options
  ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``)
  and ``unix:///path``; ``db``, ``client_name``, ``socket_timeout`` (default 5 s) and
  ``socket_connect_timeout`` in the query string.  AUTH, SELECT and CLIENT SETNAME are sent on
  every (re)connection.
- Failures: a command not answered within ``socket_timeout`` aborts the connection; a lost
  connection fails every command on it with :class:`redis.exceptions.ConnectionError`; the next
  command reconnects.  Error replies become redis-py's exceptions (``NoScriptError``,
  ``BusyLoadingError``, ``ReadOnlyError``, ``ResponseError``) for that command alone.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_TIMEOUT_S = 5.0
Command = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, from a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    db: int = 0
    client_name: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_url(cls, url: str, *, client_name: str | None = None) -> Endpoint:
        options: dict[str, Any] = dict(parse_url(url))
        timeout_s = float(options.get("socket_timeout") or DEFAULT_TIMEOUT_S)
        unix = options.get("connection_class") is UnixDomainSocketConnection
        return cls(
            host=str(options.get("host", "127.0.0.1")),
            port=int(options.get("port", 6379)),
            path=options.get("path") if unix else None,
            tls=_tls(options) if url.lower().startswith("rediss:") else None,
            username=options.get("username"),
            password=options.get("password"),
            db=int(options.get("db") or 0),
            client_name=options.get("client_name") or client_name,
            timeout_s=timeout_s,
            connect_timeout_s=float(options.get("socket_connect_timeout") or timeout_s),
        )

    def handshake(self) -> list[Command]:
        commands: list[Command] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            commands.append(("AUTH", *auth))
        if self.db:
            commands.append(("SELECT", self.db))
        if self.client_name:
            commands.append(("CLIENT", "SETNAME", self.client_name))
        return commands


def _tls(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif str(options.get("ssl_check_hostname", "true")).lower() in ("false", "0", "no"):
        context.check_hostname = False
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


def pack(commands: list[Command]) -> bytes:
    """RESP arrays of bulk strings (str, bytes, int, float arguments)."""
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out += b"$%d\r\n%b\r\n" % (len(data), data)
    return bytes(out)


def _error(reply: hiredis.ReplyError) -> Exception:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("LOADING"):
        return BusyLoadingError(message)
    if message.startswith("READONLY"):  # a replica, after a failover: an outage, not a bug
        return ReadOnlyError(message)
    return ResponseError(message)


class _Protocol(asyncio.Protocol):
    """Replies to futures, in order; a command late beyond ``timeout_s`` aborts the connection."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        assert self._transport is not None
        now = time.monotonic()
        self._transport.write(pack([command for command, _ in batch]))
        self._waiting.extend((future, now) for _, future in batch)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._check)

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                future, _ = waiting.popleft()
                if future.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(_error(reply))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._abort(RedisConnectionError(f"redis protocol error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(RedisConnectionError("the redis connection is closed"))

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        late = self._waiting[0][1] + self._timeout_s - time.monotonic()
        if late <= 0:
            self._abort(RedisTimeoutError(f"redis did not answer within {self._timeout_s:g} s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(late, self._check)

    def _abort(self, exc: Exception) -> None:
        self._fail(exc)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = list(self._waiting)  # emptied in place: data_received may hold the deque
        self._waiting.clear()
        _reject((future for future, _ in waiting), exc)


class Pipe:
    """Commands in, replies out, over one connection opened on first use and after a loss."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._pending: list[tuple[Command, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._closed = False

    def call(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command for this tick's write; the future gets its reply or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("the store is closed"))
            return future
        self._pending.append((command, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._protocol is not None:
            self._protocol.close()
        self._fail_pending(RedisConnectionError("the store is closed"))

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        protocol = self._protocol
        if protocol is None or protocol.closed:
            if self._connecting is None and not self._closed:
                self._connecting = asyncio.ensure_future(self._connect())
            return
        batch, self._pending = self._pending, []
        protocol.send(batch)

    async def _connect(self) -> None:
        try:
            protocol = await self._open_and_greet(self._endpoint)
        except Exception as exc:
            failure = exc if isinstance(exc, RedisConnectionError) else None
            self._fail_pending(
                failure or RedisConnectionError(f"cannot reach redis: {type(exc).__name__}: {exc}")
            )
            return
        finally:
            self._connecting = None
        self._protocol = protocol
        self._flush()

    async def _open_and_greet(self, endpoint: Endpoint) -> _Protocol:
        """A connection that has passed AUTH, SELECT and CLIENT SETNAME (closed if not)."""
        async with asyncio.timeout(endpoint.connect_timeout_s):
            protocol = await self._open(endpoint)
            try:
                handshake = endpoint.handshake()
                if handshake:
                    loop = asyncio.get_running_loop()
                    calls = [(command, loop.create_future()) for command in handshake]
                    protocol.send(calls)
                    await asyncio.gather(*(future for _, future in calls))
            except BaseException:
                protocol.close()
                raise
        return protocol

    async def _open(self, endpoint: Endpoint) -> _Protocol:
        loop = asyncio.get_running_loop()
        timeout_s = endpoint.timeout_s
        if endpoint.path is not None:
            _, protocol = await loop.create_unix_connection(
                lambda: _Protocol(timeout_s), endpoint.path
            )
        else:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(timeout_s),
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                server_hostname=endpoint.host if endpoint.tls else None,
            )
        return protocol

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, []
        _reject((future for _, future in pending), exc)


def _reject(futures: Iterable[asyncio.Future[Any]], exc: Exception) -> None:
    """Fail every future still waiting with ``exc``."""
    for future in futures:
        if not future.done():
            future.set_exception(exc)
