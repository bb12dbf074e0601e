"""The sandbox's admin API: fixtures, request log, faults, state, settings, lifecycle."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from worker.sandbox import Sandbox

if TYPE_CHECKING:
    from tests.component.conftest import SandboxClient

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def role_body(client: SandboxClient, role: str = "none") -> tuple[str, dict[str, Any]]:
    """A valid Telnyx update for the first demo conference."""
    telnyx = client.fx["telnyx"]
    conference_id = telnyx["conference_ids"][0]
    supervisor = telnyx["calls_by_conference"][conference_id][0]
    return conference_id, {"call_control_id": supervisor, "supervisor_role": role}


async def add_fault(client: SandboxClient, fault: dict[str, Any]) -> dict[str, Any]:
    """POST one fault and return its description."""
    answer = await client.admin_call("POST", "/faults", fault)
    assert answer.status == 201, answer.body
    added: dict[str, Any] = answer.body["faults"][0]
    return added


def test_fixtures_shape_and_determinism() -> None:
    """Fixtures have the documented shape, valid id formats, and are equal on every start."""
    fx = Sandbox(conferences=4).fixtures
    assert fx == Sandbox(conferences=4).fixtures
    vinix, telnyx = fx["vinix"], fx["telnyx"]
    assert re.fullmatch(r"[0-9a-f]{64}", vinix["api_key"])
    assert HEX32.match(vinix["account_id"])
    assert len(vinix["conference_ids"]) == len(set(vinix["conference_ids"])) == 4
    assert all(HEX32.match(conf) for conf in vinix["conference_ids"])
    assert telnyx["api_key"].startswith("KEY")
    assert all(uuid.UUID(conf).version == 4 for conf in telnyx["conference_ids"])
    assert len(telnyx["call_control_ids"]) == 8
    assert all(call.startswith("v3:") for call in telnyx["call_control_ids"])
    flat = [
        call for conf in telnyx["conference_ids"] for call in telnyx["calls_by_conference"][conf]
    ]
    assert flat == telnyx["call_control_ids"]


def test_ten_thousand_conferences_start_fast() -> None:
    """``--conferences 10000`` builds its demo data in well under two seconds."""
    started = time.perf_counter()
    sandbox = Sandbox(conferences=10_000)
    assert len(sandbox.fixtures["telnyx"]["conference_ids"]) == 10_000
    assert time.perf_counter() - started < 2.0


def test_at_least_one_conference() -> None:
    """Zero conferences is refused."""
    with pytest.raises(ValueError, match="at least one"):
        Sandbox(conferences=0)


async def test_fixtures_endpoint_matches_the_property(client: SandboxClient) -> None:
    """``GET /__admin/fixtures`` is the same document as :attr:`Sandbox.fixtures`."""
    answer = await client.admin_call("GET", "/fixtures")
    assert answer.status == 200
    assert answer.body == client.sandbox.fixtures


async def test_health_and_unknown_admin_paths(client: SandboxClient) -> None:
    """Health is 200; an unknown admin path is 404."""
    assert (await client.admin_call("GET", "/health")).body == {"status": "ok"}
    assert (await client.admin_call("GET", "/nope")).status == 404


async def test_base_url_needs_a_running_sandbox() -> None:
    """``base_url`` fails before start and after stop; starting twice fails."""
    sandbox = Sandbox()
    with pytest.raises(RuntimeError):
        _ = sandbox.base_url
    url = await sandbox.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v2", url)
        with pytest.raises(RuntimeError):
            await sandbox.start()
    finally:
        await sandbox.stop()
    with pytest.raises(RuntimeError):
        _ = sandbox.base_url


async def test_request_log_records_every_provider_request_in_order(client: SandboxClient) -> None:
    """Auth calls and provider calls are logged oldest first with the documented fields."""
    await client.send(
        "PUT", "/api_auth", json={"data": {"api_key": "k" * 64}}, headers={"X-Request-ID": "r1"}
    )
    conference_id, body = role_body(client)
    await client.telnyx(conference_id, body)
    await client.admin_call("GET", "/state")  # admin calls are not logged
    log = (await client.admin_call("GET", "/requests")).body["requests"]
    assert [(e["provider"], e["method"], e["status"]) for e in log] == [
        ("vinix", "PUT", 404),
        ("telnyx", "POST", 200),
    ]
    first = log[0]
    assert set(first) == {"provider", "method", "path", "body", "status", "headers", "at"}
    assert first["path"] == "/v2/api_auth"
    assert first["body"] == {"data": {"api_key": "k" * 64}}
    assert first["headers"]["x-request-id"] == "r1"
    assert abs(first["at"] - time.time()) < 60
    assert log[1]["path"] == f"/v2/conferences/{conference_id}/actions/update"
    only_telnyx = await client.send("GET", client.admin + "/requests?provider=telnyx")
    assert len(only_telnyx.body["requests"]) == 1
    assert (await client.admin_call("DELETE", "/requests")).body == {"deleted": 2}
    assert (await client.admin_call("GET", "/requests")).body == {"requests": []}


async def test_fault_with_count_applies_that_many_times(client: SandboxClient) -> None:
    """``count: 2`` fails the next two matching requests, then the fault is gone."""
    fault = await add_fault(client, {"provider": "telnyx", "status": 503, "count": 2})
    assert fault["remaining"] == 2
    conference_id, body = role_body(client)
    statuses = [(await client.telnyx(conference_id, body)).status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert (await client.admin_call("GET", "/faults")).body == {"faults": []}
    log = (await client.admin_call("GET", "/requests")).body["requests"]
    assert [entry["status"] for entry in log] == [503, 503, 200]


async def test_fault_without_count_lasts_until_deleted(client: SandboxClient) -> None:
    """A fault without ``count`` applies until ``DELETE /__admin/faults``."""
    await add_fault(client, {"provider": "vinix", "status": 500})
    for _ in range(3):
        answer = await client.auth()
        assert answer.status == 500
        assert answer.body["message"] == "unspecified_fault"
        assert answer.body["status"] == "fatal"
    assert (await client.admin_call("DELETE", "/faults")).body == {"deleted": 1}
    assert (await client.auth()).status == 201


async def test_fault_can_be_deleted_by_id(client: SandboxClient) -> None:
    """``DELETE /__admin/faults/{id}`` removes just that fault."""
    first = await add_fault(client, {"status": 503})
    second = await add_fault(client, {"status": 502})
    assert (await client.admin_call("DELETE", f"/faults/{first['id']}")).status == 200
    assert (await client.admin_call("DELETE", f"/faults/{first['id']}")).status == 404
    assert [f["id"] for f in (await client.admin_call("GET", "/faults")).body["faults"]] == [
        second["id"]
    ]


async def test_faults_use_each_providers_error_shape(client: SandboxClient) -> None:
    """Vinix faults answer Kazoo envelopes; Telnyx faults answer ``errors[]``."""
    await add_fault(client, {"provider": "vinix", "status": 503, "count": 1})
    await add_fault(client, {"provider": "telnyx", "status": 503, "count": 1})
    vinix = await client.auth()
    assert vinix.status == 503
    assert vinix.body["message"] == "datastore_fault"
    assert vinix.body["error"] == "503"
    conference_id, body = role_body(client)
    telnyx = await client.telnyx(conference_id, body)
    assert telnyx.status == 503
    assert telnyx.body["errors"][0]["code"] == "10007"


async def test_vinix_401_fault_looks_like_an_expired_token(client: SandboxClient) -> None:
    """A 401 fault on Vinix answers ``invalid credentials`` with empty data."""
    token = await client.token()
    await add_fault(client, {"provider": "vinix", "status": 401, "count": 1})
    answer = await client.vinix("GET", client.conference_path(0), token)
    assert answer.status == 401
    assert answer.body["message"] == "invalid credentials"
    assert answer.body["data"] == {}
    assert (await client.vinix("GET", client.conference_path(0), token)).status == 200


async def test_fault_429_and_retry_after(client: SandboxClient) -> None:
    """``retry_after_s`` adds ``Retry-After``; a Vinix 429 fault says too_many_requests."""
    await add_fault(client, {"provider": "vinix", "status": 429, "retry_after_s": 2, "count": 1})
    await add_fault(client, {"provider": "telnyx", "status": 429, "retry_after_s": 0.5, "count": 1})
    vinix = await client.auth()
    assert vinix.status == 429
    assert vinix.headers["Retry-After"] == "2"
    assert vinix.body["data"] == {"message": "too many requests"}
    conference_id, body = role_body(client)
    telnyx = await client.telnyx(conference_id, body)
    assert telnyx.headers["Retry-After"] == "0.5"
    assert telnyx.body["errors"][0]["code"] == "10011"


async def test_fault_filters_by_method_and_path_prefix(client: SandboxClient) -> None:
    """``method`` and ``path_prefix`` (raw path) select which requests fail."""
    conference_id, body = role_body(client)
    other = client.fx["telnyx"]["conference_ids"][1]
    prefix = f"/v2/conferences/{conference_id}/"
    await add_fault(client, {"method": "post", "path_prefix": prefix, "status": 502})
    assert (await client.telnyx(conference_id, body)).status == 502
    assert (await client.telnyx(other, body)).status == 422  # not in that conference
    assert (await client.auth()).status == 201


async def test_latency_fault_delays_then_answers_normally(client: SandboxClient) -> None:
    """``latency_ms`` alone delays the request and lets the simulator answer."""
    await add_fault(client, {"latency_ms": 150, "count": 1})
    started = time.perf_counter()
    answer = await client.auth()
    assert answer.status == 201
    assert time.perf_counter() - started >= 0.14


async def test_sandbox_wide_latency(client: SandboxClient) -> None:
    """The ``latency_ms`` setting delays every provider request."""
    await client.admin_call("POST", "/config", {"latency_ms": 100})
    started = time.perf_counter()
    await client.auth()
    assert time.perf_counter() - started >= 0.09


async def test_disconnect_fault_closes_without_an_answer(client: SandboxClient) -> None:
    """``error: disconnect`` drops the connection; the log shows no status."""
    await add_fault(client, {"provider": "telnyx", "error": "disconnect", "count": 1})
    conference_id, body = role_body(client)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.telnyx(conference_id, body)
    assert (await client.telnyx(conference_id, body)).status == 200
    log = (await client.admin_call("GET", "/requests")).body["requests"]
    assert log[0]["status"] is None
    assert log[0]["error"] == "disconnect"


async def test_probability_fails_about_that_fraction(client: SandboxClient) -> None:
    """``probability: 0.33`` fails roughly a third of matching requests, repeatably with a seed."""
    await add_fault(client, {"provider": "telnyx", "status": 503, "probability": 0.33, "seed": 7})
    conference_id, body = role_body(client)
    statuses = [(await client.telnyx(conference_id, body)).status for _ in range(300)]
    failed = statuses.count(503)
    assert 60 <= failed <= 140
    assert set(statuses) == {200, 503}
    await client.admin_call("POST", "/reset")
    await add_fault(client, {"provider": "telnyx", "status": 503, "probability": 0.33, "seed": 7})
    again = [(await client.telnyx(conference_id, body)).status for _ in range(300)]
    assert again == statuses


async def test_fault_body_override(client: SandboxClient) -> None:
    """``body`` replaces the answer's body verbatim."""
    await add_fault(client, {"provider": "vinix", "status": 200, "body": {"odd": True}, "count": 1})
    answer = await client.auth()
    assert answer.status == 200
    assert answer.body == {"odd": True}


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"status": 99},
        {"status": 503, "error": "disconnect"},
        {"status": 503, "count": 0},
        {"status": 503, "probability": 1.5},
        {"status": 503, "unknown": 1},
        [{"status": 503}, {"provider": "nope", "status": 503}],
    ],
)
async def test_invalid_faults_are_400(client: SandboxClient, fault: Any) -> None:
    """Faults that do nothing or are malformed are refused and nothing is added."""
    answer = await client.admin_call("POST", "/faults", fault)
    assert answer.status == 400
    assert (await client.admin_call("GET", "/faults")).body == {"faults": []}


async def test_state_shows_documents_and_roles(client: SandboxClient) -> None:
    """``GET /__admin/state`` lists every Vinix document and every Telnyx call's role."""
    state = (await client.admin_call("GET", "/state")).body
    fx = client.fx
    assert set(state["vinix"]) == set(fx["vinix"]["conference_ids"])
    assert state["vinix"][fx["vinix"]["conference_ids"][0]]["name"] == "Sandbox conference 1"
    assert set(state["telnyx"]) == set(fx["telnyx"]["conference_ids"])
    assert all(set(roles.values()) == {"none"} for roles in state["telnyx"].values())


async def test_config_round_trip_and_validation(client: SandboxClient) -> None:
    """Settings can be read and changed; bad settings are 400."""
    config = (await client.admin_call("GET", "/config")).body
    assert config["token_ttl_s"] == 3600.0
    assert config["vinix_error_shape"] == "kazoo"
    changed = await client.admin_call(
        "POST", "/config", {"token_ttl_s": 5, "provider": "vinix", "rate_limit_rps": 10}
    )
    assert changed.body["token_ttl_s"] == 5
    assert changed.body["rate_limit_rps"] == {"vinix": 10, "telnyx": None}
    assert client.sandbox.token_ttl_s == 5
    for bad in ({"rate_limit_rps": 5}, {"vinix_error_shape": "xml"}, {"nope": 1}):
        assert (await client.admin_call("POST", "/config", bad)).status == 400


async def test_vinix_rate_limit_setting(client: SandboxClient) -> None:
    """A Vinix ``rate_limit_rps`` answers Kazoo's 429 beyond the limit."""
    await client.admin_call("POST", "/config", {"provider": "vinix", "rate_limit_rps": 1})
    token = await client.token()
    answer = await client.vinix("GET", client.conference_path(0), token)
    assert answer.status == 429
    assert answer.body["message"] == "too_many_requests"


async def test_token_buckets_can_be_switched_off(client: SandboxClient) -> None:
    """With ``vinix_token_buckets: false`` repeated auth calls are never throttled."""
    await client.admin_call("POST", "/config", {"vinix_token_buckets": False})
    for _ in range(5):
        assert (await client.auth()).status == 201


async def test_reset_restores_the_demo_data(client: SandboxClient) -> None:
    """``POST /__admin/reset`` brings documents, roles, settings, faults and log back."""
    token = await client.token()
    await client.vinix("POST", client.conference_path(0), token, {"name": "changed"})
    await client.admin_call("POST", "/config", {"vinix_error_shape": "seed"})
    await add_fault(client, {"status": 503})
    await client.admin_call("POST", "/reset")
    state = (await client.admin_call("GET", "/state")).body
    assert state["vinix"][client.fx["vinix"]["conference_ids"][0]]["name"] == "Sandbox conference 1"
    assert (await client.admin_call("GET", "/config")).body["vinix_error_shape"] == "kazoo"
    assert (await client.admin_call("GET", "/faults")).body == {"faults": []}
    assert (await client.admin_call("GET", "/requests")).body == {"requests": []}
    assert (await client.vinix("GET", client.conference_path(0), token)).status == 401


async def test_concurrent_requests_are_all_answered(client: SandboxClient) -> None:
    """A burst of 200 concurrent updates is answered and logged completely."""
    conference_id, body = role_body(client)
    answers = await asyncio.gather(*(client.telnyx(conference_id, body) for _ in range(200)))
    assert {answer.status for answer in answers} == {200}
    assert len(client.sandbox.requests) == 200


async def test_oversized_body_is_413(client: SandboxClient) -> None:
    """A body over Crossbar's 8 MB upload limit answers 413 in the provider's shape."""
    answer = await client.send("PUT", "/api_auth", data=io.BytesIO(b"x" * 8_000_001))
    assert answer.status == 413
    assert answer.body["error"] == "413"
