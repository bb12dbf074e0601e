"""VinixClient against a small fake Kazoo Crossbar (aiohttp.web) defined in this file."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from tests.component.fake_provider import FakeProvider, all_text, json_body, refused_url, serving
from worker.contract.messages import ConferenceUpdate
from worker.errors import ProviderAnswer, ProviderRejected, ProviderUnavailable, WorkerError
from worker.providers.factory import make_provider
from worker.providers.http import TRANSIENT_CODES
from worker.providers.vinix import VinixClient
from worker.settings import ProviderConfig

API_KEY = "a1" * 32
ACCOUNT = "0123456789abcdef0123456789abcdef"
CONFERENCE = "fedcba9876543210fedcba9876543210"


@dataclass
class FakeVinix(FakeProvider):
    """Issues tokens for API_KEY, saves conferences, or answers what a test scripted."""

    auth_calls: int = 0
    auth_delay_s: float = 0.0
    auth_answers: deque[tuple[int, Any]] = field(default_factory=deque)
    valid_tokens: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/v2/api_auth":
            return await self.auth(request, await json_body(request))
        return await super().handle(request)

    def refuse(self, request: web.Request) -> web.Response | None:
        if request.headers.get("X-Auth-Token") not in self.valid_tokens:
            return _kazoo(401, "invalid_credentials", {"message": "invalid credentials"})
        return None

    def success(self, request: web.Request, body: Any) -> web.Response:
        data = {**body["data"], "id": CONFERENCE}
        rid = request.headers.get("X-Request-ID", "none")
        return _json(200, {"status": "success", "data": data, "request_id": rid})

    async def auth(self, request: web.Request, body: Any) -> web.Response:
        assert request.method == "PUT"
        self.auth_calls += 1
        await asyncio.sleep(self.auth_delay_s)
        if self.auth_answers:
            status, payload = self.auth_answers.popleft()
            return _json(status, payload)
        if body != {"data": {"api_key": API_KEY}}:
            return _kazoo(404, "bad identifier", [body["data"]["api_key"]])
        token = f"tok{len(self.issued)}-{uuid.uuid4().hex}"
        self.issued.append(token)
        self.valid_tokens.add(token)
        return _json(
            201, {"auth_token": token, "status": "success", "data": {"account_id": ACCOUNT}}
        )

    def revoke(self) -> None:
        self.valid_tokens.clear()


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _kazoo(status: int, message: str, data: Any) -> web.Response:
    envelope = {"status": "error", "error": str(status), "message": message, "data": data}
    return _json(status, {**envelope, "request_id": "kz-rid", "auth_token": "undefined"})


@pytest.fixture
async def fake() -> AsyncIterator[FakeVinix]:
    """A running fake Vinix; its URL is ``fake.url``."""
    async with serving(FakeVinix()) as running:
        yield running


MakeClient = Callable[..., VinixClient]


@pytest.fixture
async def make_client(fake: FakeVinix) -> AsyncIterator[MakeClient]:
    """Build VinixClients (pointed at the fake unless told otherwise); all closed at teardown."""
    made: list[VinixClient] = []

    def make(
        url: str = "", *, key: str = API_KEY, timeout_s: float = 5.0, **kw: Any
    ) -> VinixClient:
        config = ProviderConfig("vinix", url or fake.url, SecretStr(key), timeout_s, 100)
        made.append(VinixClient(config, **kw))
        return made[-1]

    yield make
    for vinix in made:
        await vinix.aclose()


@pytest.fixture
def client(make_client: MakeClient) -> VinixClient:
    """A VinixClient pointed at the fake."""
    return make_client()


def _command(mode: str = "replace") -> ConferenceUpdate:
    return ConferenceUpdate.model_validate(
        {"command_id": f"cmd-{uuid.uuid4().hex}", "type": "conference.update",
         "account_id": ACCOUNT, "conference_id": CONFERENCE, "mode": mode,
         "conference": {"name": "Weekly", "member": {"pins": ["1234"]}}}
    )  # fmt: skip


async def _failure(
    client: VinixClient, command: ConferenceUpdate | None = None
) -> tuple[WorkerError, ProviderAnswer]:
    """The error execute raises, and the provider answer it names (always there)."""
    with pytest.raises(WorkerError) as caught:
        await client.execute(command or _command())
    assert caught.value.provider is not None
    assert caught.value.provider.name == "vinix"
    return caught.value, caught.value.provider


def _expected_type(code: str) -> type[WorkerError]:
    return ProviderUnavailable if code in TRANSIENT_CODES else ProviderRejected


@pytest.mark.parametrize(("mode", "method"), [("replace", "POST"), ("merge", "PATCH")])
async def test_saves_document(fake: FakeVinix, client, mode: str, method: str) -> None:
    """replace POSTs, merge PATCHes {"data": document} with the token and a 32-hex request id."""
    result = await client.execute(_command(mode))
    seen = fake.seen[-1]
    path = f"/v2/accounts/{ACCOUNT}/conferences/{CONFERENCE}"
    assert (seen.method, seen.raw_path) == (method, path)
    assert seen.body == {"data": {"name": "Weekly", "member": {"pins": ["1234"]}}}
    assert seen.headers["X-Auth-Token"] == fake.issued[0]
    assert seen.headers["Content-Type"] == "application/json"
    assert len(seen.headers["X-Request-ID"]) == 32
    assert result.data == {"name": "Weekly", "member": {"pins": ["1234"]}, "id": CONFERENCE}
    assert result.answer == ProviderAnswer("vinix", 200, seen.headers["X-Request-ID"])


async def test_one_token_for_a_burst_of_1000(fake: FakeVinix, client) -> None:
    """1,000 concurrent commands on a cold client fetch exactly one token."""
    fake.auth_delay_s = 0.05
    results = await asyncio.gather(*(client.execute(_command()) for _ in range(1000)))
    assert len(results) == 1000
    assert fake.auth_calls == 1
    assert {s.headers["X-Auth-Token"] for s in fake.seen} == {fake.issued[0]}


async def test_401_refreshes_once_and_repeats_once(fake: FakeVinix, client) -> None:
    """A 401 fetches a new token and repeats the call once with it."""
    await client.execute(_command())
    fake.revoke()
    result = await client.execute(_command())
    assert result.answer.status_code == 200
    assert fake.auth_calls == 2
    tokens = [s.headers["X-Auth-Token"] for s in fake.seen]
    assert tokens == [fake.issued[0], fake.issued[0], fake.issued[1]]


async def test_second_401_is_unauthorized(fake: FakeVinix, client) -> None:
    """A 401 with the fresh token too ends provider_unauthorized after exactly two calls."""
    await client.execute(_command())
    fake.revoke()
    fake.answers.append((401, {"status": "error", "error": "401", "message": "x"}, {}))
    fake.auth_answers.append((201, {"auth_token": "tok-fresh", "data": {}}))
    error, answer = await _failure(client)
    assert (type(error), error.code, answer.status_code) == (
        ProviderRejected, "provider_unauthorized", 401
    )  # fmt: skip
    assert (fake.auth_calls, len(fake.seen)) == (2, 3)


async def test_concurrent_401s_refresh_once(fake: FakeVinix, client) -> None:
    """Many calls that get 401 for the same stale token share one refresh, each retried once."""
    await client.execute(_command())
    fake.revoke()
    fake.auth_delay_s = 0.05
    results = await asyncio.gather(*(client.execute(_command()) for _ in range(50)))
    assert all(r.answer.status_code == 200 for r in results)
    assert fake.auth_calls == 2
    assert len(fake.seen) == 1 + 50 + 50


async def test_token_renewed_after_ttl(fake: FakeVinix, make_client: MakeClient) -> None:
    """The token is renewed proactively once token_ttl_s has passed on the injected clock."""
    now = [1000.0]
    vinix = make_client(token_ttl_s=3300, clock=lambda: now[0])
    await vinix.execute(_command())
    now[0] += 3299
    await vinix.execute(_command())
    assert fake.auth_calls == 1
    now[0] += 1
    await vinix.execute(_command())
    assert fake.auth_calls == 2
    assert fake.seen[-1].headers["X-Auth-Token"] == fake.issued[1]


async def test_failed_auth_is_shared_by_waiters(fake: FakeVinix, client) -> None:
    """Commands queued behind a failing token fetch get its error instead of fetching again,
    marked as shared (a circuit breaker counts the one failed fetch once, not 20 times)."""
    fake.auth_delay_s = 0.05
    fake.auth_answers.append((503, {"status": "fatal", "error": "503", "message": "fault"}))
    burst = (client.execute(_command()) for _ in range(20))
    outcomes = await asyncio.gather(*burst, return_exceptions=True)
    assert all(isinstance(o, ProviderUnavailable) for o in outcomes)
    assert (
        sorted(o.shared for o in outcomes if isinstance(o, ProviderUnavailable))
        == [False] + [True] * 19
    )
    assert fake.auth_calls == 1
    await client.execute(_command())
    assert fake.auth_calls == 2


AUTH_CODES = {400: "provider_unauthorized", 401: "provider_unauthorized",
              403: "provider_unauthorized", 404: "provider_unauthorized", 429: "rate_limited",
              500: "provider_unavailable", 503: "provider_unavailable",
              200: "provider_unavailable"}  # fmt: skip


@pytest.mark.parametrize(("status", "code"), sorted(AUTH_CODES.items()))
async def test_auth_failures(fake: FakeVinix, client, status: int, code: str) -> None:
    """api_auth errors map to unauthorized, rate_limited or unavailable (also 200 without token)."""
    fake.auth_answers.append((status, {"status": "error", "error": str(status), "message": "m"}))
    error, answer = await _failure(client)
    assert (type(error), error.code, answer.status_code) == (_expected_type(code), code, status)
    assert fake.seen == []


CALL_CODES = {400: "provider_rejected", 402: "provider_rejected", 405: "provider_rejected",
              413: "provider_rejected", 418: "provider_rejected", 423: "provider_rejected",
              403: "provider_unauthorized", 404: "provider_not_found",
              408: "provider_unavailable", 409: "provider_unavailable", 429: "rate_limited",
              500: "provider_unavailable", 502: "provider_unavailable",
              503: "provider_unavailable", 504: "provider_unavailable"}  # fmt: skip
FIELD_ERRORS = {"profile.rate": {"enum": {"message": "Value not found in enumerated list"}}}


def _error_body(shape: str, status: int) -> dict[str, Any]:
    """Kazoo's error envelope, or the seed doc's {code, message, request_id}."""
    if shape == "kazoo":
        return {"status": "error", "error": str(status), "message": "validation error",
                "data": FIELD_ERRORS, "request_id": "r1"}  # fmt: skip
    return {"code": "conference_invalid", "message": "validation error", "request_id": "r1"}


@pytest.mark.parametrize("shape", ["kazoo", "seed"])
@pytest.mark.parametrize(("status", "code"), sorted(CALL_CODES.items()))
async def test_status_mapping(fake: FakeVinix, client, status: int, code: str, shape: str) -> None:
    """Each error status maps to its code; message, request id, details come from either shape."""
    fake.answers.append((status, _error_body(shape, status), {}))
    error, answer = await _failure(client)
    assert (type(error), error.code) == (_expected_type(code), code)
    assert f"HTTP {status}: validation error" in error.message
    assert (answer.status_code, answer.request_id) == (status, "r1")
    assert error.details == (FIELD_ERRORS if shape == "kazoo" else {"code": "conference_invalid"})


async def test_error_without_body_uses_header_request_id(fake: FakeVinix, client) -> None:
    """A bare error page still maps by status and takes the x-request-id header."""
    fake.answers.append((502, None, {"x-request-id": "hdr-rid"}))
    error, answer = await _failure(client)
    assert (error.code, answer.request_id, error.details) == (
        "provider_unavailable",
        "hdr-rid",
        None,
    )


async def test_success_without_envelope_is_unavailable(fake: FakeVinix, client) -> None:
    """A 2xx whose JSON is not an envelope object is not taken as success."""
    fake.answers.append((200, [1, 2], {}))
    error, answer = await _failure(client)
    assert (type(error), answer.status_code) == (ProviderUnavailable, 200)


RETRY_AFTER = [({"Retry-After": "7"}, 7.0), ({"Retry-After": "-2"}, 0.0),
               ({"Retry-After": "later"}, None), ({"retry-after-ms": "250"}, 0.25),
               ({}, None)]  # fmt: skip


@pytest.mark.parametrize(("headers", "expected"), RETRY_AFTER)
async def test_retry_after(fake: FakeVinix, client, headers, expected) -> None:
    """429 carries retry_after_s from Retry-After seconds / retry-after-ms; garbage gives None."""
    fake.answers.append((429, {"message": "too_many_requests"}, headers))
    error, _ = await _failure(client)
    assert isinstance(error, ProviderUnavailable)
    assert (error.code, error.retry_after_s) == ("rate_limited", expected)


async def test_retry_after_http_date(fake: FakeVinix, client) -> None:
    """A Retry-After HTTP-date gives the seconds until then (on a 503 too)."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    fake.answers.append((503, {"message": "datastore_fault"}, {"Retry-After": when}))
    error, _ = await _failure(client)
    assert isinstance(error, ProviderUnavailable)
    assert error.retry_after_s is not None
    assert 27 <= error.retry_after_s <= 30


async def test_timeout_is_unavailable(fake: FakeVinix, make_client: MakeClient) -> None:
    """A call slower than timeout_s gives ProviderUnavailable naming the sent request id."""
    fake.delay_s = 1.0
    error, answer = await _failure(make_client(timeout_s=0.2))
    assert (type(error), error.code) == (ProviderUnavailable, "provider_unavailable")
    assert answer.request_id == fake.seen[-1].headers["X-Request-ID"]


async def test_connection_refused_is_unavailable(make_client: MakeClient) -> None:
    """Nothing listening on the port gives ProviderUnavailable."""
    error, answer = await _failure(make_client(refused_url()))
    assert (type(error), error.code, answer.status_code) == (
        ProviderUnavailable, "provider_unavailable", None
    )  # fmt: skip


@pytest.mark.parametrize("evil", ["a%2Fb", "x?x=1", "a#b", "../../api_auth", "..%2F..", "a/b"])
async def test_ids_cannot_change_the_path(fake: FakeVinix, client, evil: str) -> None:
    """Reserved characters in ids are percent-encoded, so the server sees the intended path."""
    fields = {**dict(_command()), "account_id": evil, "conference_id": evil}
    await client.execute(ConferenceUpdate.model_construct(**fields))
    quoted = evil.replace("%", "%25").replace("/", "%2F").replace("?", "%3F")
    quoted = quoted.replace("=", "%3D").replace("#", "%23")
    assert fake.seen[-1].raw_path == f"/v2/accounts/{quoted}/conferences/{quoted}"
    assert fake.auth_calls == 1


async def test_no_secret_in_auth_errors(fake: FakeVinix, make_client: MakeClient) -> None:
    """Kazoo echoes an unknown API key in its 404; the error carries neither key nor echo."""
    error, _ = await _failure(make_client(key="f" * 64))
    assert error.code == "provider_unauthorized"
    assert "f" * 64 not in all_text(error)


async def test_no_secret_in_conference_errors(fake: FakeVinix, client) -> None:
    """Key and token echoed back by the provider are redacted from message and details."""
    await client.execute(_command())
    token = fake.issued[0]
    body = {"status": "error", "error": "400", "message": f"bad {token} {API_KEY}",
            "data": {token: {"api_key": API_KEY}}}  # fmt: skip
    fake.answers.append((400, body, {}))
    error, _ = await _failure(client)
    text = all_text(error)
    assert token not in text
    assert API_KEY not in text
    assert "[REDACTED]" in text


async def test_factory_builds_vinix(fake: FakeVinix) -> None:
    """make_provider returns a VinixClient for a vinix config."""
    provider = make_provider(ProviderConfig("vinix", fake.url, SecretStr(API_KEY)))
    assert isinstance(provider, VinixClient)
    assert provider.name == "vinix"
    await provider.aclose()


async def test_closed_client_refuses(client) -> None:
    """After aclose() execute raises ProviderUnavailable instead of reopening connections."""
    await client.aclose()
    error, _ = await _failure(client)
    assert isinstance(error, ProviderUnavailable)
