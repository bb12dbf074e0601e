"""The pipelined RESP connection of the Redis dedup store, against small fake servers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.dedup.resp import Endpoint, Pipe, pack

Answer = Callable[[bytes], bytes | None]


@contextlib.asynccontextmanager
async def serve(answer: Answer) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server that hands each chunk it reads to ``answer`` and writes what it returns."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while data := await reader.read(65536):
                received.append(data)
                reply = answer(data)
                if reply is None:
                    return
                writer.write(reply)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


def test_pack_writes_resp_arrays_of_bulk_strings() -> None:
    """str, bytes and numbers become bulk strings; commands are concatenated."""
    assert pack([("SET", "k", b"v\r\n", 5), ("PING",)]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n5\r\n*1\r\n$4\r\nPING\r\n"
    )


def test_endpoint_reads_the_url() -> None:
    """Host, port, db, credentials, timeouts and the client name come from the URL."""
    endpoint = Endpoint.from_url(
        "redis://user:secret@cache:6380/2?socket_timeout=1.5&client_name=w1", client_name="x"
    )
    assert (endpoint.host, endpoint.port, endpoint.db) == ("cache", 6380, 2)
    assert (endpoint.username, endpoint.password, endpoint.client_name) == ("user", "secret", "w1")
    assert "secret" not in repr(endpoint)
    assert (endpoint.timeout_s, endpoint.connect_timeout_s) == (1.5, 1.5)
    assert endpoint.handshake() == [
        ("AUTH", "user", "secret"),
        ("SELECT", 2),
        ("CLIENT", "SETNAME", "w1"),
    ]
    unix = Endpoint.from_url("unix:///run/redis.sock?db=1")
    assert (unix.path, unix.db, unix.tls) == ("/run/redis.sock", 1, None)
    tls = Endpoint.from_url("rediss://cache?ssl_cert_reqs=none")
    assert tls.tls is not None
    assert tls.tls.verify_mode == ssl.CERT_NONE


async def test_replies_resolve_the_calls_in_order() -> None:
    """Calls of one tick go out in one write; replies, errors included, reach their own call."""

    def answer(data: bytes) -> bytes:
        return (
            b"+PONG\r\n-NOSCRIPT No matching script\r\n*2\r\n$-1\r\n$1\r\na\r\n-ERR bad\r\n"
            b"-READONLY You can't write against a read only replica.\r\n"
        )

    async with serve(answer) as (port, received):
        pipe = Pipe(Endpoint.from_url(f"redis://127.0.0.1:{port}"))
        calls = [pipe.call(name) for name in ("PING", "EVALSHA", "GET", "X", "SET")]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == b"PONG"
        assert isinstance(results[1], NoScriptError)
        assert results[2] == [None, b"a"]
        assert isinstance(results[3], ResponseError)
        assert isinstance(results[4], ReadOnlyError)
        assert len(received) == 1  # one write for the five
        await pipe.close()


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    """A call unanswered within socket_timeout fails as a timeout; the connection is dropped and
    the next call opens a new one."""
    answers = iter([b"", b"+PONG\r\n"])

    def answer(data: bytes) -> bytes:
        return next(answers, b"+PONG\r\n")

    async with serve(answer) as (port, _):
        pipe = Pipe(Endpoint.from_url(f"redis://127.0.0.1:{port}?socket_timeout=0.2"))
        with pytest.raises(RedisTimeoutError):
            await pipe.call("PING")
        assert await pipe.call("PING") == b"PONG"
        await pipe.close()


async def test_a_lost_connection_fails_its_calls() -> None:
    """When the server closes the connection, the calls on it fail as connection errors."""
    async with serve(lambda _: None) as (port, _):
        pipe = Pipe(Endpoint.from_url(f"redis://127.0.0.1:{port}"))
        with pytest.raises(RedisConnectionError):
            await pipe.call("PING")
        await pipe.close()


async def test_nothing_listening_fails_the_call() -> None:
    """No server: the call fails as a connection error, not a hang."""
    pipe = Pipe(Endpoint.from_url("redis://127.0.0.1:1?socket_connect_timeout=1"))
    with pytest.raises(RedisConnectionError):
        await pipe.call("PING")
    await pipe.close()


async def test_a_failed_handshake_fails_the_calls() -> None:
    """A wrong password (an error reply to AUTH) fails the queued calls; nothing is sent."""
    async with serve(lambda _: b"-WRONGPASS invalid password\r\n") as (port, received):
        pipe = Pipe(Endpoint.from_url(f"redis://:nope@127.0.0.1:{port}"))
        with pytest.raises(RedisConnectionError, match="WRONGPASS"):
            await pipe.call("PING")
        assert b"PING" not in b"".join(received)
        await pipe.close()


async def test_calls_after_close_fail() -> None:
    """A closed pipe refuses calls at once."""
    pipe = Pipe(Endpoint.from_url("redis://127.0.0.1:1"))
    await pipe.close()
    with pytest.raises(RedisConnectionError):
        await pipe.call("PING")
