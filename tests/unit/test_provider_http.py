"""The provider clients' HTTP boundary: status mapping, Retry-After, URLs, JsonHttp.

JsonHttp's own behaviour (request building, answer parsing, error translation, closing, the
observer, the clients' ``transport=`` seam) is tested over ``httpx.MockTransport``, without
sockets.  The two real transports (``aiohttp``, the default, and ``httpcore``) are each tested
against a local TCP server for what only a real transport shows: the request line's bytes,
keep-alive within the pool limit, disconnects, truncated and malformed answers, timeouts,
refused connections, TLS verification.
"""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import orjson
import pytest
from pydantic import SecretStr

from worker.contract.messages import ConferenceUpdate, SupervisorRoleChange
from worker.errors import InvalidMessage, ProviderRejected, ProviderUnavailable
from worker.providers import http as http_module
from worker.providers.factory import make_provider
from worker.providers.http import (
    Backend,
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
from worker.providers.transport import AiohttpTransport
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


SEGMENTS = [
    "a%2Fb", "%2F", "x?x=1", "?", "a#b", "#", "../etc", "..%2F", "...", "a b", "é/", "%2e%2e",
    "%252F", "a;b", "@evil", "a:b", "a+b", "\\", "\x00", "\r\n", "😀",
]  # fmt: skip


@pytest.mark.parametrize("segment", SEGMENTS)
def test_endpoint_encodes_every_reserved_character(segment: str) -> None:
    """A segment stays one segment: no '/', '?', '#' or '%' of its own reaches the URL, and
    httpx keeps the encoding exactly as made (no decoding, no re-encoding, no normalising)."""
    url = endpoint("https://api.example.com/v2", "accounts", segment, "conferences")
    assert isinstance(url, httpx.URL)
    assert (url.scheme, url.host, url.port) == ("https", "api.example.com", None)
    assert url.query == b""
    assert url.fragment == ""
    raw = url.raw_path.decode("ascii")
    assert raw.startswith("/v2/accounts/")
    assert raw.endswith("/conferences")
    assert raw.count("/") == 4
    assert raw.split("/")[3] == quote(segment, safe="")
    assert unquote(raw.split("/")[3]) == segment
    assert str(url) == f"https://api.example.com{raw}"


def test_endpoint_is_cached() -> None:
    """The same target gives the same URL object (parsed once, then from the cache)."""
    first = endpoint("https://api.example.com/v2", "conferences", "c-1")
    assert endpoint("https://api.example.com/v2", "conferences", "c-1") is first


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


API_KEY = "k" * 64
BASE = "https://provider.test/v2"
TARGET = endpoint(BASE, "conferences", "c-1", "actions", "update")
TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def _config(base_url: str = BASE, timeout_s: float = 2.0, pool_size: int = 4) -> ProviderConfig:
    return ProviderConfig(
        name="telnyx",
        base_url=base_url,
        api_key=SecretStr(API_KEY),
        timeout_s=timeout_s,
        pool_size=pool_size,
    )


class Transport(httpx.MockTransport):
    """A MockTransport that keeps every request it got and notes that it was closed."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(self._record)
        self._handler = handler
        self.requests: list[httpx.Request] = []
        self.closed = False

    async def _record(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self._handler(request)
        return answer if isinstance(answer, httpx.Response) else await answer

    async def aclose(self) -> None:
        self.closed = True


def answering(status: int, content: bytes = b"", **headers: str) -> Transport:
    """A transport that answers every request with ``status``, ``content`` and ``headers``."""
    return Transport(lambda _: httpx.Response(status, content=content, headers=headers))


def raising(error: Exception) -> Transport:
    """A transport whose every request fails with ``error``."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    return Transport(fail)


class Watcher:
    """A RequestObserver that remembers what it was told; it adds a ``traceparent``."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, httpx.URL, dict[str, str]]] = []
        self.finished: list[tuple[Any, str, int | None, str | None, float]] = []

    def request_started(
        self, provider: str, method: str, url: httpx.URL, headers: Any
    ) -> tuple[Any, dict[str, str]]:
        self.started.append((provider, method, url, dict(headers)))
        return "span", {**headers, "traceparent": TRACEPARENT}

    def request_finished(
        self, span: Any, provider: str, status: int | None, error: str | None, seconds: float
    ) -> None:
        self.finished.append((span, provider, status, error, seconds))


async def _send(
    transport: httpx.AsyncBaseTransport,
    *,
    timeout_s: float = 2.0,
    observer: Watcher | None = None,
    body: Any = None,
) -> HttpAnswer:
    """One POST of ``body`` (default ``{"a": 1}``) to TARGET through a fresh JsonHttp."""
    http = JsonHttp(_config(timeout_s=timeout_s), observer, transport=transport)
    try:
        return await http.request(
            "POST",
            TARGET,
            headers={"X-Request-ID": "r1"},
            body={"a": 1} if body is None else body,
            request_id="r1",
        )
    finally:
        await http.aclose()


async def test_an_answer_leaves_no_reference_cycle_behind() -> None:
    """httpx ties each response to its stream in a cycle (encode/httpx#3733); JsonHttp breaks it
    once the body is read, so a dropped answer is freed at once, not by the cycle collector."""
    http = JsonHttp(_config(), transport=answering(200, b'{"data": {}}'))

    async def call() -> HttpAnswer:
        return await http.request("POST", TARGET, headers={}, body={"a": 1})

    try:
        await call()  # warm: the pool and the client's lazy state
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            answer = await call()
            assert answer.body == {"data": {}}
            del answer
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, httpx.Response | httpx.Request)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == []
    finally:
        await http.aclose()


async def _unavailable(transport: httpx.AsyncBaseTransport, **kwargs: Any) -> ProviderUnavailable:
    with pytest.raises(ProviderUnavailable) as caught:
        await _send(transport, **kwargs)
    return caught.value


# --- JsonHttp over a mock transport ---------------------------------------------------------


async def test_request_is_orjson_with_json_headers() -> None:
    """The body goes out as orjson bytes (``content=``) with JSON Content-Type and Accept, to
    the URL as built, with the caller's headers and their spelling."""
    transport = answering(200, b"{}")
    body = {"é": [1.5, None, True], "n": 2**40, "s": "x\u2028y"}
    await _send(transport, body=body)
    [request] = transport.requests
    assert request.method == "POST"
    assert request.url == TARGET
    assert request.url.raw_path == TARGET.raw_path
    assert request.content == orjson.dumps(body)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert ("X-Request-ID", "r1") in [(k.decode(), v.decode()) for k, v in request.headers.raw]


async def test_answer_has_status_headers_body_and_request_id() -> None:
    """Status, case-insensitive headers (Retry-After readable), parsed body, x-request-id."""
    headers = {"X-Request-ID": "abc", "Retry-After": "7"}
    answer = await _send(answering(201, b'{"data": {"id": 1}}', **headers))
    assert (answer.status, answer.body, answer.request_id) == (201, {"data": {"id": 1}}, "abc")
    assert answer.headers.get("retry-after") == answer.headers["RETRY-AFTER"] == "7"
    assert retry_after(answer.headers, now=0.0) == 7.0


async def test_request_id_falls_back_to_ours() -> None:
    """Without an x-request-id header the answer carries the id we sent."""
    answer = await _send(answering(200, b"{}"))
    assert answer.request_id == "r1"


@pytest.mark.parametrize("status", [200, 204, 404, 503])
async def test_empty_body_is_none(status: int) -> None:
    """An empty (or blank) body is None whatever the status."""
    assert (await _send(answering(status, b" \r\n"))).body is None


async def test_invalid_json_on_success_is_unavailable() -> None:
    """A 2xx whose body is not JSON gives ProviderUnavailable carrying the answer's status."""
    error = await _unavailable(answering(200, b"<html/>!!", **{"x-request-id": "abc"}))
    assert error.code == "provider_unavailable"
    assert "answered HTTP 200 with a body that is not JSON" in error.message
    assert error.provider is not None
    assert (error.provider.status_code, error.provider.request_id) == (200, "abc")


async def test_invalid_json_on_error_status_leaves_the_status_in_charge() -> None:
    """A non-JSON error page (e.g. a proxy's) comes back with body None; the status decides."""
    answer = await _send(answering(404, b"<html/>!!"))
    assert (answer.status, answer.body, answer.request_id) == (404, None, "r1")


@pytest.mark.parametrize(
    "error", [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout]
)
async def test_timeout_is_unavailable(error: type[httpx.TimeoutException]) -> None:
    """Every httpx timeout gives ProviderUnavailable 'timed out after …s', error label timeout."""
    watcher = Watcher()
    caught = await _unavailable(raising(error("slow")), observer=watcher)
    assert caught.code == "provider_unavailable"
    assert caught.message == "telnyx did not answer: timed out after 2.0s"
    assert caught.provider is not None
    assert caught.provider.request_id == "r1"
    assert isinstance(caught.__cause__, error)
    assert [f[2:4] for f in watcher.finished] == [(None, "timeout")]


async def test_deadline_covers_the_whole_request() -> None:
    """timeout_s bounds the whole request, not only each phase: a transport that never answers
    (no httpx timeout of its own fires) still ends in 'timed out' after about timeout_s."""

    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    started = time.monotonic()
    caught = await _unavailable(Transport(never), timeout_s=0.1)
    assert caught.message == "telnyx did not answer: timed out after 0.1s"
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError,
        httpx.ReadError,
        httpx.WriteError,
        httpx.CloseError,
        httpx.RemoteProtocolError,
        httpx.LocalProtocolError,
        httpx.ProxyError,
        httpx.UnsupportedProtocol,
    ],
)
async def test_transport_error_is_unavailable(error: type[httpx.TransportError]) -> None:
    """Every other transport error gives ProviderUnavailable named by its class (message and
    error label), the httpx error as the cause; nothing of it but the class name is shown."""
    watcher = Watcher()
    caught = await _unavailable(raising(error(f"boom {API_KEY}")), observer=watcher)
    assert caught.code == "provider_unavailable"
    assert caught.message == f"telnyx did not answer: {error.__name__}"
    assert "timed out" not in caught.message
    assert API_KEY not in f"{caught} {caught!r} {caught.message} {caught.details}"
    assert isinstance(caught.__cause__, error)
    assert [f[2:4] for f in watcher.finished] == [(None, error.__name__)]


async def test_connect_error_is_unavailable() -> None:
    """A refused connection (httpx.ConnectError) is a transient provider_unavailable."""
    caught = await _unavailable(raising(httpx.ConnectError("[Errno 111] Connection refused")))
    assert caught.code == "provider_unavailable"
    assert caught.message == "telnyx did not answer: ConnectError"
    assert caught.retryable


async def test_undecodable_body_is_unavailable() -> None:
    """A body its Content-Encoding cannot decode gives ProviderUnavailable 'DecodingError'."""
    caught = await _unavailable(answering(200, b"not gzip", **{"Content-Encoding": "gzip"}))
    assert caught.message == "telnyx did not answer: DecodingError"


async def test_redirects_are_not_followed() -> None:
    """A 3xx is the answer (classified as unavailable by the caller), never followed."""
    transport = answering(302, b"", Location="https://elsewhere.test/steal")
    answer = await _send(transport)
    assert answer.status == 302
    assert len(transport.requests) == 1
    assert classify(answer.status) == "provider_unavailable"


async def test_timeout_s_reaches_every_phase() -> None:
    """httpx's connect, read, write and pool timeouts are all timeout_s."""
    transport = answering(200, b"{}")
    await _send(transport, timeout_s=3.5)
    timeout = transport.requests[0].extensions["timeout"]
    assert timeout == {"connect": 3.5, "read": 3.5, "write": 3.5, "pool": 3.5}


async def test_one_client_for_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """JsonHttp makes its httpx.AsyncClient once, when built, and every request reuses it."""
    made: list[httpx.AsyncClient] = []

    class Counted(http_module.ProviderClient):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(http_module, "ProviderClient", Counted)
    transport = answering(200, b"{}")
    http = JsonHttp(_config(), transport=transport)
    assert len(made) == 1
    for _ in range(3):
        await http.request("POST", TARGET, headers={}, body={})
    await http.aclose()
    assert len(made) == 1
    assert len(transport.requests) == 3
    assert made[0].is_closed


async def test_cookies_are_neither_kept_nor_sent() -> None:
    """A cookie a provider sets is not stored and never sent back: providers authenticate with
    headers, and one client serves every tenant's commands."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Set-Cookie": "session=abc; Path=/"}, content=b"{}")

    http = JsonHttp(_config(), transport=httpx.MockTransport(handler))
    for _ in range(2):
        await http.request("POST", TARGET, headers={}, body={})
    await http.aclose()
    assert [request.headers.get("cookie") for request in seen] == [None, None]
    with pytest.raises(ValueError, match="no cookies"):
        http._client.cookies = {"session": "abc"}


async def test_closed_client_is_unavailable() -> None:
    """aclose() closes the client and its transport; a request after it is refused as
    transient ('client is closed') and never reaches the transport."""
    transport = answering(200, b"{}")
    http = JsonHttp(_config(), transport=transport)
    await http.aclose()
    assert transport.closed
    with pytest.raises(ProviderUnavailable) as caught:
        await http.request("POST", TARGET, headers={}, body={})
    assert caught.value.code == "provider_unavailable"
    assert caught.value.message == "telnyx client is closed"
    assert transport.requests == []
    await http.aclose()  # closing twice is harmless


async def test_observer_sees_the_request_and_adds_headers() -> None:
    """request_started gets provider, method, the httpx.URL and our headers; the headers it
    returns (traceparent) are the ones sent; request_finished gets the status."""
    watcher = Watcher()
    transport = answering(200, b"{}")
    await _send(transport, observer=watcher)
    [(provider, method, url, headers)] = watcher.started
    assert (provider, method, headers) == ("telnyx", "POST", {"X-Request-ID": "r1"})
    assert isinstance(url, httpx.URL)
    assert url == TARGET
    assert transport.requests[0].headers["traceparent"] == TRACEPARENT
    [(span, provider, status, error, seconds)] = watcher.finished
    assert (span, provider, status, error) == ("span", "telnyx", 200, None)
    assert seconds >= 0


def _role_change() -> SupervisorRoleChange:
    return SupervisorRoleChange.model_validate(
        {"command_id": f"cmd-{uuid.uuid4().hex}", "type": "conference.supervisor_role",
         "conference_id": "conf?1#x", "call_control_id": "v3:abc", "supervisor_role": "monitor"}
    )  # fmt: skip


def _update() -> ConferenceUpdate:
    return ConferenceUpdate.model_validate(
        {"command_id": f"cmd-{uuid.uuid4().hex}", "type": "conference.update",
         "account_id": "0" * 32, "conference_id": "f" * 32, "mode": "merge",
         "conference": {"name": "Weekly"}}
    )  # fmt: skip


async def test_make_provider_passes_the_transport_to_telnyx() -> None:
    """make_provider(transport=) puts Telnyx's requests on that transport (no socket)."""
    transport = answering(200, b'{"data": {"result": "ok"}}')
    provider = make_provider(_config(), transport=transport)
    result = await provider.execute(_role_change())
    await provider.aclose()
    assert result.data == {"result": "ok"}
    [request] = transport.requests
    assert request.url.raw_path == b"/v2/conferences/conf%3F1%23x/actions/update"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert transport.closed


async def test_make_provider_passes_the_transport_to_vinix_auth_too() -> None:
    """Vinix's PUT /v2/api_auth and its conference call both go through the one transport."""

    def vinix(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/api_auth"):
            return httpx.Response(201, content=b'{"auth_token": "tok-1"}')
        return httpx.Response(200, content=b'{"data": {"name": "Weekly"}}')

    transport = Transport(vinix)
    config = ProviderConfig("vinix", BASE, SecretStr(API_KEY), 2.0, 4)
    provider = make_provider(config, transport=transport)
    result = await provider.execute(_update())
    await provider.aclose()
    assert result.data == {"name": "Weekly"}
    calls = [(r.method, r.url.path) for r in transport.requests]
    assert calls == [
        ("PUT", "/v2/api_auth"),
        ("PATCH", f"/v2/accounts/{'0' * 32}/conferences/{'f' * 32}"),
    ]
    assert orjson.loads(transport.requests[0].content) == {"data": {"api_key": API_KEY}}
    assert transport.requests[1].headers["X-Auth-Token"] == "tok-1"


# --- the real transports against a local server -----------------------------------------------


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")


class LocalServer:
    """TCP servers on 127.0.0.1 that read each request (head and body) and answer it with
    canned bytes (``b""``: close without answering), optionally after ``delay_s`` or holding it
    until teardown, one request per connection unless ``keep_alive``.  They note each request
    line, the connections made and the most open at once."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.release = asyncio.Event()
        self.lines: list[bytes] = []
        self.connections = self.open = self.peak = 0

    async def start(
        self,
        response: bytes,
        *,
        hold: bool = False,
        keep_alive: bool = False,
        delay_s: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            self.connections += 1
            self.open += 1
            self.peak = max(self.peak, self.open)
            try:
                while await self._answer(reader, writer, response, hold, delay_s) and keep_alive:
                    pass
            finally:
                self.open -= 1
                writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: bytes,
        hold: bool,
        delay_s: float,
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            await reader.readexactly(int(length.group(1)) if length else 0)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        self.lines.append(head.split(b"\r\n", 1)[0])
        if hold:
            await self.release.wait()
        await asyncio.sleep(delay_s)
        writer.write(response)
        await writer.drain()
        return bool(response)

    async def close(self) -> None:
        self.release.set()
        await asyncio.sleep(0)
        for writer in self.writers:
            writer.close()
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """Local TCP servers for answers a real transport must handle; closed at teardown."""
    running = LocalServer()
    yield running
    await running.close()


@pytest.fixture(params=["aiohttp", "httpcore"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each real transport: aiohttp (the default) and httpx's own (httpcore)."""
    name: Backend = request.param
    return name


async def test_aiohttp_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """JsonHttp runs on the aiohttp transport unless told otherwise (the faster one measured)."""
    seen: list[httpx.Request] = []

    async def spy(self: AiohttpTransport, request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"{}")

    monkeypatch.setattr(AiohttpTransport, "handle_async_request", spy)
    answer = await _send_default()
    assert answer.status == 200
    assert [r.url for r in seen] == [TARGET]


async def _send_default() -> HttpAnswer:
    http = JsonHttp(_config())
    try:
        return await http.request("POST", TARGET, headers={}, body={})
    finally:
        await http.aclose()


async def _over(
    base_url: str, backend: Backend, *segments: str, timeout_s: float = 2.0, pool_size: int = 4
) -> HttpAnswer:
    """One POST to ``base_url``/``segments`` over a fresh JsonHttp on ``backend``."""
    http = JsonHttp(_config(base_url, timeout_s, pool_size), backend=backend)
    try:
        url = endpoint(base_url, *(segments or ("x",)))
        return await http.request("POST", url, headers={}, body={"a": 1}, request_id="r1")
    finally:
        await http.aclose()


async def _over_unavailable(base_url: str, backend: Backend, **kwargs: Any) -> ProviderUnavailable:
    with pytest.raises(ProviderUnavailable) as caught:
        await _over(base_url, backend, **kwargs)
    assert caught.value.code == "provider_unavailable"
    assert caught.value.provider is not None
    assert caught.value.provider.request_id == "r1"
    assert caught.value.__cause__ is not None
    return caught.value


def _local(port: int, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port}/v2"


def _unused_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_ids_reach_the_wire_exactly_as_encoded(server: LocalServer, backend: Backend) -> None:
    """The request line carries endpoint()'s encoding byte for byte: no transport decodes
    %3B, %40, %2F... back into ';', '@', '/' or re-encodes a '%25'."""
    port = await server.start(OK)
    segment = "a;b@c!d$e'f(g)*h+i,j=k:l%2Fm?n#o é/.."
    await _over(_local(port), backend, "conferences", segment)
    encoded = quote(segment, safe="").encode()
    assert server.lines == [b"POST /v2/conferences/" + encoded + b" HTTP/1.1"]


async def test_connections_are_kept_alive_within_the_pool_limit(
    server: LocalServer, backend: Backend
) -> None:
    """Concurrent requests share at most pool_size connections, kept alive between requests."""
    port = await server.start(OK, keep_alive=True, delay_s=0.05)
    http = JsonHttp(_config(_local(port), pool_size=2), backend=backend)
    try:
        url = endpoint(_local(port), "x")
        for _ in range(2):
            answers = await asyncio.gather(
                *(http.request("POST", url, headers={}, body={}) for _ in range(6))
            )
            assert [a.status for a in answers] == [200] * 6
    finally:
        await http.aclose()
    assert len(server.lines) == 12
    assert (server.connections, server.peak) == (2, 2)


async def test_server_disconnect_is_unavailable(server: LocalServer, backend: Backend) -> None:
    """A server that closes the connection without answering gives ProviderUnavailable."""
    port = await server.start(b"")
    caught = await _over_unavailable(_local(port), backend)
    assert caught.message == "telnyx did not answer: RemoteProtocolError"


async def test_truncated_payload_is_unavailable(server: LocalServer, backend: Backend) -> None:
    """An answer shorter than its Content-Length gives ProviderUnavailable."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    port = await server.start(head + b'{"data":')
    caught = await _over_unavailable(_local(port), backend)
    assert caught.message == "telnyx did not answer: RemoteProtocolError"


async def test_malformed_answer_is_unavailable(server: LocalServer, backend: Backend) -> None:
    """An answer that is not HTTP gives ProviderUnavailable, never an untranslated error."""
    port = await server.start(b"HELLO THERE\r\n\r\n")
    caught = await _over_unavailable(_local(port), backend)
    assert caught.message == "telnyx did not answer: RemoteProtocolError"


async def test_refused_connection_is_unavailable_not_a_timeout(backend: Backend) -> None:
    """Nothing listening gives ProviderUnavailable 'ConnectError', not 'timed out'."""
    caught = await _over_unavailable(_local(_unused_port()), backend)
    assert caught.message == "telnyx did not answer: ConnectError"


async def test_no_answer_in_time_is_unavailable(server: LocalServer, backend: Backend) -> None:
    """No answer within timeout_s gives ProviderUnavailable 'timed out'."""
    port = await server.start(OK, hold=True)
    caught = await _over_unavailable(_local(port), backend, timeout_s=0.2)
    assert caught.message == "telnyx did not answer: timed out after 0.2s"


async def test_real_answers_are_parsed(server: LocalServer, backend: Backend) -> None:
    """Status, headers and body come through: a non-JSON 404 is body None, a non-JSON 200
    ProviderUnavailable with the provider's request id, a JSON 200 parsed."""
    head = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n"
    answer = await _over(_local(await server.start(head + b"<html/>!!")), backend)
    assert (answer.status, answer.body, answer.request_id) == (404, None, "r1")
    head = b"HTTP/1.1 200 OK\r\nx-request-id: abc\r\nContent-Length: 9\r\n\r\n"
    with pytest.raises(ProviderUnavailable) as caught:
        await _over(_local(await server.start(head + b"<html/>!!")), backend)
    assert caught.value.provider is not None
    assert (caught.value.provider.status_code, caught.value.provider.request_id) == (200, "abc")
    head = (
        b"HTTP/1.1 201 Created\r\nX-Request-ID: rid\r\nRetry-After: 3\r\nContent-Length: 11\r\n\r\n"
    )
    answer = await _over(_local(await server.start(head + b'{"data":{}}')), backend)
    assert (answer.status, answer.body, answer.request_id) == (201, {"data": {}}, "rid")
    assert answer.headers.get("retry-after") == "3"


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 that no CA signed, and a server context using it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


async def test_tls_is_verified_by_default(
    server: LocalServer, backend: Backend, self_signed: tuple[Path, ssl.SSLContext]
) -> None:
    """An HTTPS provider whose certificate no trusted CA signed is refused ('ConnectError'),
    though the server itself speaks TLS fine to a client that trusts the certificate."""
    cert, context = self_signed
    port = await server.start(OK, tls=context)
    trusting = ssl.create_default_context(cafile=str(cert))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusting)
    writer.close()
    caught = await _over_unavailable(_local(port, "https"), backend)
    assert caught.message == "telnyx did not answer: ConnectError"
