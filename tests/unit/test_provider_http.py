"""The provider clients' HTTP boundary: status mapping, Retry-After, URLs, transport errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from pydantic import SecretStr
from yarl import URL

from worker.errors import InvalidMessage, ProviderRejected, ProviderUnavailable
from worker.providers.http import (
    HttpAnswer,
    JsonHttp,
    classify,
    endpoint,
    new_request_id,
    parse_retry_after,
    provider_error,
    redact,
    retry_after,
)
from worker.settings import ProviderConfig

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (200, None),
        (201, None),
        (204, None),
        (400, "provider_rejected"),
        (402, "provider_rejected"),
        (405, "provider_rejected"),
        (413, "provider_rejected"),
        (422, "provider_rejected"),
        (423, "provider_rejected"),
        (401, "provider_unauthorized"),
        (403, "provider_unauthorized"),
        (404, "provider_not_found"),
        (408, "provider_unavailable"),
        (409, "provider_unavailable"),
        (429, "rate_limited"),
        (500, "provider_unavailable"),
        (502, "provider_unavailable"),
        (503, "provider_unavailable"),
        (599, "provider_unavailable"),
        (302, "provider_unavailable"),
        (100, "provider_unavailable"),
    ],
)
def test_classify(status: int, code: str | None) -> None:
    """Each HTTP status maps to the contract's error code (None for a 2xx)."""
    assert classify(status) == code


def test_provider_error_picks_the_class_by_code() -> None:
    """Transient codes raise ProviderUnavailable with retry_after_s; the others ProviderRejected."""
    transient = provider_error("rate_limited", "slow down", answer=None, retry_after_s=3.0)
    permanent = provider_error("provider_not_found", "gone", answer=None, details={"a": 1})
    assert isinstance(transient, ProviderUnavailable)
    assert transient.retry_after_s == 3.0
    assert isinstance(permanent, ProviderRejected)
    assert permanent.details == {"a": 1}


def test_provider_error_caps_the_message() -> None:
    """A provider's very long message is cut so that it fits in a dead-letter header."""
    error = provider_error("provider_rejected", "x" * 10_000, answer=None)
    assert len(error.message) == 500


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        ("Thu, 02 Jan 2025 03:05:05 -0000", 60.0),
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("9" * 400, None),
        ("Mon, 99 Foo 2025 99:99:99 GMT", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Delta-seconds and HTTP-dates give seconds to wait; negative gives 0; garbage gives None."""
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_accepts_a_timestamp_for_now() -> None:
    """``now`` may be a POSIX timestamp instead of a datetime."""
    date = format_datetime(NOW + timedelta(seconds=10), usegmt=True)
    assert parse_retry_after(date, NOW.timestamp()) == 10.0


def test_retry_after_headers_in_order() -> None:
    """retry-after-ms wins over Retry-After, which wins over the rate-limit reset header."""
    both = {"retry-after-ms": "1500", "retry-after": "9", "x-ratelimit-reset": "30"}
    assert retry_after(both, now=NOW, reset_header="x-ratelimit-reset") == 1.5
    assert retry_after({"retry-after": "9", "x-ratelimit-reset": "30"}, now=NOW) == 9.0
    reset_only = {"x-ratelimit-reset": "30"}
    assert retry_after(reset_only, now=NOW, reset_header="x-ratelimit-reset") == 30.0
    assert retry_after(reset_only, now=NOW) is None
    assert retry_after({"retry-after-ms": "junk", "retry-after": "junk"}, now=NOW) is None


@pytest.mark.parametrize("segment", ["a%2Fb", "x?x=1", "a#b", "../etc", "a b", "é/", "%2e%2e"])
def test_endpoint_encodes_every_reserved_character(segment: str) -> None:
    """A segment stays one segment: no '/', '?', '#' or '%' of its own reaches the URL."""
    url = endpoint("https://api.example.com/v2", "accounts", segment, "conferences")
    assert url.raw_query_string == ""
    assert url.raw_fragment == ""
    assert url.raw_path.startswith("/v2/accounts/")
    assert url.raw_path.endswith("/conferences")
    assert url.raw_path.count("/") == 4
    assert URL(url.raw_path, encoded=True).parts[3] == segment


@pytest.mark.parametrize("segment", ["", ".", ".."])
def test_endpoint_refuses_dot_and_empty_segments(segment: str) -> None:
    """'.', '..' and '' would move or merge path segments, so they are refused as invalid."""
    with pytest.raises(InvalidMessage) as caught:
        endpoint("https://api.example.com/v2", "conferences", segment)
    assert caught.value.code == "invalid_command"


def test_redact_walks_json() -> None:
    """Every occurrence of a secret, in keys and values at any depth, is replaced."""
    value = {"k-SECRET": ["x SECRET y", {"n": 1, "s": "SECRET"}], "other": None}
    assert redact(value, ["SECRET", ""]) == {
        "k-[REDACTED]": ["x [REDACTED] y", {"n": 1, "s": "[REDACTED]"}],
        "other": None,
    }
    assert redact("unchanged", [""]) == "unchanged"


def test_new_request_id_is_32_hex() -> None:
    """Request ids are fresh 32-hex strings."""
    first, second = new_request_id(), new_request_id()
    assert first != second
    assert len(first) == 32
    assert int(first, 16) >= 0


def _config(port: int, timeout_s: float = 2.0) -> ProviderConfig:
    return ProviderConfig(
        name="telnyx",
        base_url=f"http://127.0.0.1:{port}/v2",
        api_key=SecretStr("k" * 64),
        timeout_s=timeout_s,
        pool_size=4,
    )


class RawServer:
    """TCP servers that answer every request with canned bytes (or hold it until teardown)."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.release = asyncio.Event()

    async def start(self, response: bytes, *, hold: bool = False) -> int:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            if hold:
                await self.release.wait()
            writer.write(response)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self.release.set()
        await asyncio.sleep(0)
        for writer in self.writers:
            writer.close()
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    """Raw TCP servers for answers that aiohttp.web cannot produce; closed at teardown."""
    server = RawServer()
    yield server
    await server.close()


async def _send(port: int, timeout_s: float = 2.0) -> HttpAnswer:
    http = JsonHttp(_config(port, timeout_s))
    try:
        url = endpoint(f"http://127.0.0.1:{port}/v2", "x")
        return await http.request("POST", url, headers={}, body={"a": 1}, request_id="r1")
    finally:
        await http.aclose()


async def test_server_disconnect_is_unavailable(raw_server: RawServer) -> None:
    """A server that closes the connection without answering gives ProviderUnavailable."""
    port = await raw_server.start(b"")
    with pytest.raises(ProviderUnavailable) as caught:
        await _send(port)
    assert caught.value.code == "provider_unavailable"
    assert caught.value.provider is not None
    assert caught.value.provider.request_id == "r1"
    assert caught.value.__cause__ is not None


async def test_truncated_payload_is_unavailable(raw_server: RawServer) -> None:
    """An answer shorter than its Content-Length gives ProviderUnavailable."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    port = await raw_server.start(head + b'{"data":')
    with pytest.raises(ProviderUnavailable):
        await _send(port)


async def test_invalid_json_on_success_is_unavailable(raw_server: RawServer) -> None:
    """A 2xx whose body is not JSON gives ProviderUnavailable carrying the answer's status."""
    head = b"HTTP/1.1 200 OK\r\nx-request-id: abc\r\nContent-Length: 9\r\n\r\n"
    port = await raw_server.start(head + b"<html/>!!")
    with pytest.raises(ProviderUnavailable) as caught:
        await _send(port)
    assert caught.value.provider is not None
    assert caught.value.provider.status_code == 200
    assert caught.value.provider.request_id == "abc"


async def test_invalid_json_on_error_status_leaves_the_status_in_charge(
    raw_server: RawServer,
) -> None:
    """A non-JSON error page (e.g. a proxy's) comes back with body None; the status decides."""
    head = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n"
    port = await raw_server.start(head + b"<html/>!!")
    answer = await _send(port)
    assert answer.status == 404
    assert answer.body is None
    assert answer.request_id == "r1"


async def test_timeout_is_unavailable(raw_server: RawServer) -> None:
    """No answer within timeout_s gives ProviderUnavailable."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    port = await raw_server.start(ok, hold=True)
    with pytest.raises(ProviderUnavailable) as caught:
        await _send(port, timeout_s=0.2)
    assert "timed out" in caught.value.message


async def test_closed_client_is_unavailable() -> None:
    """A request after aclose() is refused as transient instead of opening a new pool."""
    http = JsonHttp(_config(9))
    await http.aclose()
    with pytest.raises(ProviderUnavailable):
        await http.request("POST", URL("http://127.0.0.1:9/v2/x"), headers={}, body={})
