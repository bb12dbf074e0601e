"""TelnyxClient against a small fake Telnyx Call Control API (aiohttp.web) defined in this file."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from tests.component.fake_provider import FakeProvider, all_text, refused_url, serving
from worker.contract.messages import SupervisorRoleChange
from worker.errors import ProviderRejected, ProviderUnavailable
from worker.providers.factory import make_provider
from worker.providers.telnyx import TelnyxClient
from worker.settings import ProviderConfig

API_KEY = "KEY0123456789ABCDEFtelnyx_secret_value"
CONFERENCE = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


@dataclass
class FakeTelnyx(FakeProvider):
    """Answers 200 {"data": {"result": "ok"}} to a valid Bearer key, or what a test scripted."""

    def refuse(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _errors(401, "10009", "Authentication failed", "bad headers")
        return None

    def success(self, request: web.Request, body: Any) -> web.Response:
        headers = {"x-request-id": "tx-rid-1"}
        return web.json_response({"data": {"result": "ok"}}, headers=headers)


def _errors(status: int, code: str, title: str, detail: str) -> web.Response:
    payload = {"errors": [{"code": code, "title": title, "detail": detail}]}
    return web.json_response(payload, status=status)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelnyx]:
    """A running fake Telnyx; its URL is ``fake.url``."""
    async with serving(FakeTelnyx()) as running:
        yield running


def _config(base_url: str, timeout_s: float = 5.0, key: str = API_KEY) -> ProviderConfig:
    return ProviderConfig("telnyx", base_url, SecretStr(key), timeout_s, 16)


@pytest.fixture
async def client(fake: FakeTelnyx) -> AsyncIterator[TelnyxClient]:
    """A TelnyxClient pointed at the fake."""
    telnyx = TelnyxClient(_config(fake.url))
    yield telnyx
    await telnyx.aclose()


def _command(**overrides: Any) -> SupervisorRoleChange:
    fields = {
        "command_id": f"cmd-{uuid.uuid4().hex}",
        "type": "conference.supervisor_role",
        "conference_id": CONFERENCE,
        "call_control_id": "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0",
        "supervisor_role": "monitor",
        **overrides,
    }
    return SupervisorRoleChange.model_validate(fields)


async def test_success_posts_update_with_command_id(fake: FakeTelnyx, client) -> None:
    """The call is a Bearer POST to /conferences/{id}/actions/update forwarding command_id."""
    command = _command()
    result = await client.execute(command)
    seen = fake.seen[-1]
    assert seen.method == "POST"
    assert seen.raw_path == f"/v2/conferences/{CONFERENCE}/actions/update"
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "call_control_id": command.call_control_id,
        "supervisor_role": "monitor",
        "command_id": command.command_id,
    }
    assert result.data == {"result": "ok"}
    assert (result.answer.name, result.answer.status_code) == ("telnyx", 200)
    assert result.answer.request_id == "tx-rid-1"


async def test_optional_fields_sent_when_set(fake: FakeTelnyx, client) -> None:
    """whisper_call_control_ids and region are sent only when the command has them."""
    await client.execute(
        _command(supervisor_role="whisper", whisper_call_control_ids=["v3:a", "v3:b"], region="US")
    )
    body = fake.seen[-1].body
    assert body["whisper_call_control_ids"] == ["v3:a", "v3:b"]
    assert body["region"] == "US"
    assert body["supervisor_role"] == "whisper"


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (400, "provider_rejected", ProviderRejected),
        (422, "provider_rejected", ProviderRejected),
        (401, "provider_unauthorized", ProviderRejected),
        (403, "provider_unauthorized", ProviderRejected),
        (404, "provider_not_found", ProviderRejected),
        (408, "provider_unavailable", ProviderUnavailable),
        (409, "provider_unavailable", ProviderUnavailable),
        (429, "rate_limited", ProviderUnavailable),
        (500, "provider_unavailable", ProviderUnavailable),
        (502, "provider_unavailable", ProviderUnavailable),
        (503, "provider_unavailable", ProviderUnavailable),
    ],
)
async def test_status_mapping(fake: FakeTelnyx, client, status, code, error_type) -> None:
    """Each status maps to its code; message is title + detail, details the errors list."""
    errors = [
        {"code": "90019", "title": "Conference has already ended", "detail": "No longer active.",
         "source": {"pointer": "/call_control_id"}},
        {"code": "10004", "title": "Second"},
    ]  # fmt: skip
    fake.answers.append((status, {"errors": errors}, {"x-request-id": "tx-err"}))
    with pytest.raises(error_type) as caught:
        await client.execute(_command())
    error = caught.value
    assert error.code == code
    assert "Conference has already ended: No longer active." in error.message
    assert str(status) in error.message
    assert error.details == errors
    assert (error.provider.name, error.provider.status_code) == ("telnyx", status)
    assert error.provider.request_id == "tx-err"


async def test_wrong_key_is_unauthorized(fake: FakeTelnyx) -> None:
    """A key the provider refuses (401) ends provider_unauthorized."""
    telnyx = TelnyxClient(_config(fake.url, key="wrong-key"))
    try:
        with pytest.raises(ProviderRejected) as caught:
            await telnyx.execute(_command())
    finally:
        await telnyx.aclose()
    assert caught.value.code == "provider_unauthorized"
    assert "Authentication failed" in caught.value.message


async def test_error_without_body(fake: FakeTelnyx, client) -> None:
    """An error with no JSON body still maps by status, with no details."""
    fake.answers.append((503, None, {}))
    with pytest.raises(ProviderUnavailable) as caught:
        await client.execute(_command())
    assert caught.value.details is None
    assert caught.value.provider is not None
    assert caught.value.provider.request_id is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "4"}, 4.0),
        ({"Retry-After": "junk"}, None),
        ({"Retry-After": "junk", "x-ratelimit-reset": "12"}, 12.0),
        ({"x-ratelimit-reset": "12"}, 12.0),
        ({"retry-after-ms": "1500", "x-ratelimit-reset": "12"}, 1.5),
        ({}, None),
    ],
)
async def test_rate_limit_wait(fake: FakeTelnyx, client, headers, expected) -> None:
    """429 takes retry_after_s from retry-after-ms, Retry-After, then x-ratelimit-reset."""
    body = {"errors": [{"code": "10011", "title": "Too many requests"}]}
    fake.answers.append((429, body, headers))
    with pytest.raises(ProviderUnavailable) as caught:
        await client.execute(_command())
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after_s == expected


async def test_retry_after_http_date(fake: FakeTelnyx, client) -> None:
    """A Retry-After HTTP-date gives the seconds until then."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    fake.answers.append((429, {"errors": []}, {"Retry-After": when}))
    with pytest.raises(ProviderUnavailable) as caught:
        await client.execute(_command())
    assert caught.value.retry_after_s is not None
    assert 17 <= caught.value.retry_after_s <= 20
    assert "no error message" in caught.value.message


async def test_timeout_is_unavailable(fake: FakeTelnyx) -> None:
    """An answer slower than timeout_s gives ProviderUnavailable."""
    telnyx = TelnyxClient(_config(fake.url, timeout_s=0.2))
    fake.delay_s = 1.0
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await telnyx.execute(_command())
    finally:
        await telnyx.aclose()
    assert caught.value.code == "provider_unavailable"
    assert caught.value.provider is not None
    assert caught.value.provider.name == "telnyx"


async def test_connection_refused_is_unavailable() -> None:
    """Nothing listening on the port gives ProviderUnavailable."""
    telnyx = TelnyxClient(_config(refused_url()))
    try:
        with pytest.raises(ProviderUnavailable):
            await telnyx.execute(_command())
    finally:
        await telnyx.aclose()


@pytest.mark.parametrize(
    ("evil", "quoted"),
    [
        ("a%2Fb", "a%252Fb"),
        ("x?x=1", "x%3Fx%3D1"),
        ("room#1", "room%231"),
        ("../../calls", "..%2F..%2Fcalls"),
        ("..%2F..", "..%252F.."),
        ("my room", "my%20room"),
    ],
)
async def test_ids_cannot_change_the_path(fake: FakeTelnyx, client, evil, quoted) -> None:
    """Reserved characters in the conference id are percent-encoded; the path stays put."""
    command = _command().model_copy(update={"conference_id": evil})
    await client.execute(command)
    assert fake.seen[-1].raw_path == f"/v2/conferences/{quoted}/actions/update"


async def test_no_secret_in_errors(fake: FakeTelnyx, client) -> None:
    """A key echoed back in an error is redacted from message and details."""
    echo = f"Bearer {API_KEY}"
    fake.answers.append((422, {"errors": [{"title": echo, "detail": echo, "meta": echo}]}, {}))
    with pytest.raises(ProviderRejected) as caught:
        await client.execute(_command())
    text = all_text(caught.value)
    assert API_KEY not in text
    assert "[REDACTED]" in text


async def test_factory_builds_telnyx(fake: FakeTelnyx) -> None:
    """make_provider returns a TelnyxClient for a telnyx config."""
    provider = make_provider(_config(fake.url))
    assert isinstance(provider, TelnyxClient)
    assert provider.name == "telnyx"
    await provider.aclose()
