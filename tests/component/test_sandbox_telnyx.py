"""The Telnyx simulator over HTTP: Update conference, its errors, dedup and rate limiting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.component.conftest import FakeClock, SandboxClient

ROLES_DETAIL = "The value must be one of: barge, monitor, none, whisper."


def calls_of(client: SandboxClient, index: int = 0) -> tuple[str, str, str]:
    """Conference ``index`` of the demo data: its id, its supervisor's and its agent's call."""
    telnyx = client.fx["telnyx"]
    conference_id = telnyx["conference_ids"][index]
    supervisor, agent = telnyx["calls_by_conference"][conference_id]
    return conference_id, supervisor, agent


async def roles(client: SandboxClient, conference_id: str) -> dict[str, Any]:
    """The roles ``GET /__admin/state`` reports for one conference."""
    state = await client.admin_call("GET", "/state")
    result: dict[str, Any] = state.body["telnyx"][conference_id]
    return result


async def test_update_sets_the_supervisor_role(client: SandboxClient) -> None:
    """A valid update answers 200 ``{"data": {"result": "ok"}}`` and records the role."""
    conference_id, supervisor, agent = calls_of(client)
    body = {"call_control_id": supervisor, "supervisor_role": "whisper", "region": "US"}
    answer = await client.telnyx(
        conference_id, {**body, "whisper_call_control_ids": [agent], "command_id": "c-1"}
    )
    assert answer.status == 200
    assert answer.body == {"data": {"result": "ok"}}
    assert await roles(client, conference_id) == {supervisor: "whisper", agent: "none"}


async def test_missing_or_wrong_key_is_401(client: SandboxClient) -> None:
    """No Bearer header, or the wrong key, answers 401 with code 10009."""
    conference_id, supervisor, _ = calls_of(client)
    body = {"call_control_id": supervisor, "supervisor_role": "none"}
    no_header = await client.send("POST", f"/conferences/{conference_id}/actions/update", json=body)
    wrong = await client.telnyx(conference_id, body, api_key="KEYnope")
    for answer in (no_header, wrong):
        assert answer.status == 401
        (error,) = answer.body["errors"]
        assert error["code"] == "10009"
        assert error["title"] == "Authentication failed"
        assert error["meta"] == {"url": "https://developers.telnyx.com/docs/overview/errors/10009"}


async def test_validation_reports_every_problem(client: SandboxClient) -> None:
    """422 lists the missing, mistyped and out-of-enum fields together, with pointers."""
    conference_id, _, _ = calls_of(client)
    body = {"supervisor_role": "shout", "region": "Mars", "whisper_call_control_ids": [1, "v3:x"]}
    answer = await client.telnyx(conference_id, {**body, "command_id": 7})
    assert answer.status == 422
    found = [(e["code"], e["source"]["pointer"]) for e in answer.body["errors"]]
    assert found == [
        ("10004", "/call_control_id"),
        ("10020", "/command_id"),
        ("10032", "/region"),
        ("10032", "/supervisor_role"),
        ("10020", "/whisper_call_control_ids/0"),
    ]
    role_error = answer.body["errors"][3]
    assert role_error["title"] == "Invalid enumerated value"
    assert role_error["detail"] == ROLES_DETAIL


async def test_blank_required_fields_are_missing(client: SandboxClient) -> None:
    """An empty ``call_control_id`` and an absent role are both 10004."""
    conference_id, _, _ = calls_of(client)
    answer = await client.telnyx(conference_id, {"call_control_id": ""})
    assert answer.status == 422
    assert [e["code"] for e in answer.body["errors"]] == ["10004", "10004"]
    assert answer.body["errors"][0]["detail"] == (
        "The 'call_control_id' parameter is required and cannot be blank."
    )


async def test_unknown_conference_is_404(client: SandboxClient) -> None:
    """A conference that does not exist answers 404 with code 90058."""
    _, supervisor, _ = calls_of(client)
    answer = await client.telnyx(
        "no-such-conference", {"call_control_id": supervisor, "supervisor_role": "none"}
    )
    assert answer.status == 404
    assert answer.body == {
        "errors": [
            {
                "code": "90058",
                "title": "Invalid conference_id",
                "detail": "The conference does not exist.",
            }
        ]
    }


async def test_encoded_slash_stays_inside_the_id(client: SandboxClient) -> None:
    """``%2F`` in the id is part of the id: an unknown conference, and the raw path is logged."""
    conference_id, supervisor, _ = calls_of(client)
    injected = f"{conference_id}%2Factions%2Fupdate"
    body = {"call_control_id": supervisor, "supervisor_role": "none"}
    answer = await client.telnyx(injected, body)
    assert answer.status == 404
    assert answer.body["errors"][0]["code"] == "90058"
    log = await client.admin_call("GET", "/requests")
    assert log.body["requests"][-1]["path"] == f"/v2/conferences/{injected}/actions/update"


async def test_call_from_another_conference_is_422(client: SandboxClient) -> None:
    """A call that is not in this conference answers 422 with code 90015."""
    conference_id, _, _ = calls_of(client, 0)
    _, other_supervisor, _ = calls_of(client, 1)
    answer = await client.telnyx(
        conference_id, {"call_control_id": other_supervisor, "supervisor_role": "monitor"}
    )
    assert answer.status == 422
    assert answer.body["errors"] == [
        {
            "code": "90015",
            "title": "Invalid Call Control ID",
            "detail": "The call_control_id provided was not valid.",
            "source": {"pointer": "/call_control_id"},
        }
    ]


async def test_unknown_whisper_target_is_422(client: SandboxClient) -> None:
    """Whisper targets must be calls of the same conference."""
    conference_id, supervisor, _ = calls_of(client)
    body = {"call_control_id": supervisor, "supervisor_role": "whisper"}
    answer = await client.telnyx(conference_id, {**body, "whisper_call_control_ids": ["v3:nope"]})
    assert answer.status == 422
    assert answer.body["errors"][0]["source"] == {"pointer": "/whisper_call_control_ids/0"}


async def test_repeated_command_id_is_not_applied_again_within_60_s(
    clocked_client: SandboxClient, clock: FakeClock
) -> None:
    """A repeat of a command_id within 60 s answers ok without effect; after 60 s it applies."""
    client = clocked_client
    conference_id, supervisor, _ = calls_of(client)
    first = {"call_control_id": supervisor, "supervisor_role": "monitor", "command_id": "cmd-1"}
    assert (await client.telnyx(conference_id, first)).status == 200
    clock.advance(59.0)
    repeat = await client.telnyx(conference_id, {**first, "supervisor_role": "barge"})
    assert repeat.status == 200
    assert repeat.body == {"data": {"result": "ok"}}
    assert (await roles(client, conference_id))[supervisor] == "monitor"
    clock.advance(1.0)
    assert (await client.telnyx(conference_id, {**first, "supervisor_role": "barge"})).status == 200
    assert (await roles(client, conference_id))[supervisor] == "barge"


async def test_without_command_id_every_update_applies(client: SandboxClient) -> None:
    """Updates without ``command_id`` are never deduplicated."""
    conference_id, supervisor, _ = calls_of(client)
    for role in ("monitor", "barge", "none"):
        body = {"call_control_id": supervisor, "supervisor_role": role}
        assert (await client.telnyx(conference_id, body)).status == 200
        assert (await roles(client, conference_id))[supervisor] == role


async def test_body_that_is_not_a_json_object_is_400(client: SandboxClient) -> None:
    """Unparsable JSON and non-object bodies answer 400 with code 10015."""
    conference_id, _, _ = calls_of(client)
    headers = {"Authorization": f"Bearer {client.fx['telnyx']['api_key']}"}
    path = f"/conferences/{conference_id}/actions/update"
    for data in (b"{nope", b"[1, 2]", b""):
        answer = await client.send("POST", path, data=data, headers=headers)
        assert answer.status == 400
        assert answer.body["errors"][0]["code"] == "10015"


async def test_other_paths_and_verbs_are_404(client: SandboxClient) -> None:
    """Only ``POST …/actions/update`` is simulated; the rest is 404 with code 10005."""
    conference_id, _, _ = calls_of(client)
    headers = {"Authorization": f"Bearer {client.fx['telnyx']['api_key']}"}
    for method, path in (
        ("GET", f"/conferences/{conference_id}/actions/update"),
        ("POST", f"/conferences/{conference_id}/actions/mute"),
        ("GET", "/conferences"),
    ):
        answer = await client.send(method, path, headers=headers)
        assert answer.status == 404
        assert answer.body["errors"][0]["code"] == "10005"


async def test_rate_limit_answers_429_with_headers(
    clocked_client: SandboxClient, clock: FakeClock
) -> None:
    """With ``rate_limit_rps`` 2, the third request in a second is 429 (code 10011)."""
    client = clocked_client
    await client.admin_call("POST", "/config", {"provider": "telnyx", "rate_limit_rps": 2})
    conference_id, supervisor, _ = calls_of(client)
    body = {"call_control_id": supervisor, "supervisor_role": "none"}
    answers = [await client.telnyx(conference_id, body) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "2"
    assert answers[0].headers["x-ratelimit-remaining"] == "1"
    assert answers[2].headers["x-ratelimit-remaining"] == "0"
    assert answers[2].headers["x-ratelimit-reset"] == "1"
    assert answers[2].body["errors"] == [
        {
            "code": "10011",
            "title": "Too many requests",
            "detail": "You have exceeded the maximum number of allowed requests.",
        }
    ]
    clock.advance(1.0)
    assert (await client.telnyx(conference_id, body)).status == 200
    await client.admin_call("POST", "/config", {"provider": "telnyx", "rate_limit_rps": None})
    assert "x-ratelimit-limit" not in (await client.telnyx(conference_id, body)).headers
