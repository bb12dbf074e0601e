"""The Vinix (Kazoo Crossbar) simulator over HTTP: auth, conference updates, errors, throttling."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.component.conftest import FakeClock, SandboxClient

KAZOO_SUCCESS_KEYS = {
    "auth_token",
    "data",
    "node",
    "request_id",
    "revision",
    "status",
    "timestamp",
    "version",
}
DEFAULTS = {
    "conference_numbers": [],
    "member": {"join_deaf": False, "join_muted": True, "numbers": [], "pins": []},
    "moderator": {"join_deaf": False, "join_muted": False, "numbers": [], "pins": []},
    "play_name": False,
}


async def test_api_auth_issues_a_new_token_each_time(client: SandboxClient) -> None:
    """``PUT /v2/api_auth`` answers 201 with a top-level token (new per call) and account data."""
    first, second = await client.auth(), await client.auth()
    assert first.status == second.status == 201
    body = first.body
    assert body["status"] == "success"
    assert len(body["auth_token"]) >= 32
    assert body["auth_token"] != second.body["auth_token"]
    assert body["data"] == {
        "account_id": client.fx["vinix"]["account_id"],
        "apps": [],
        "is_reseller": False,
        "language": "en-us",
        "reseller_id": body["data"]["reseller_id"],
    }
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert first.headers["x-request-id"] == body["request_id"]


async def test_api_auth_validates_the_key_with_kazoo_messages(client: SandboxClient) -> None:
    """A short key and an extra field give a 400 validation error listing both."""
    answer = await client.send("PUT", "/api_auth", json={"data": {"api_key": "abc", "x": 1}})
    assert answer.status == 400
    assert answer.body["message"] == "validation error"
    assert answer.body["error"] == "400"
    assert answer.body["data"]["api_key"]["minLength"]["message"] == (
        "String must be at least 64 characters"
    )
    assert "additionalProperties" in answer.body["data"]["x"]


async def test_api_auth_unknown_key_is_404_bad_identifier(client: SandboxClient) -> None:
    """A well-formed but unknown key answers 404 ``bad identifier`` with the key as data."""
    answer = await client.auth("0" * 64)
    assert answer.status == 404
    assert answer.body["message"] == "bad identifier"
    assert answer.body["data"] == ["0" * 64]


async def test_api_auth_empties_the_bucket_on_the_third_call(clocked_client: SandboxClient) -> None:
    """Auth costs 35 of 100 tokens: the third call in a row is 429 without ``Retry-After``."""
    client = clocked_client
    assert (await client.auth()).status == 201
    assert (await client.auth()).status == 201
    answer = await client.auth()
    assert answer.status == 429
    assert answer.body["message"] == "too_many_requests"
    assert answer.body["data"] == {"message": "too many requests"}
    assert "Retry-After" not in answer.headers


async def test_bucket_refills_ten_tokens_per_second(
    clocked_client: SandboxClient, clock: FakeClock
) -> None:
    """After a 429 the bucket is empty; 3.5 s later it holds the 35 tokens an auth needs."""
    client = clocked_client
    for _ in range(2):
        await client.auth()
    assert (await client.auth()).status == 429
    clock.advance(3.0)
    assert (await client.auth()).status == 429
    clock.advance(3.5)
    assert (await client.auth()).status == 201


async def test_post_replaces_the_document_and_writes_defaults(client: SandboxClient) -> None:
    """POST drops every field left out, inserts schema defaults and bumps the revision."""
    token = await client.token()
    path = client.conference_path(0)
    before = await client.vinix("GET", path, token)
    assert "profile" in before.body["data"]
    answer = await client.vinix("POST", path, token, {"name": "Support", "extra": {"a": 1}})
    assert answer.status == 200
    assert set(answer.body) == KAZOO_SUCCESS_KEYS
    conference_id = client.fx["vinix"]["conference_ids"][0]
    expected = {"name": "Support", "extra": {"a": 1}, **DEFAULTS}
    assert answer.body["data"] == {**expected, "id": conference_id}
    assert answer.body["revision"].startswith("2-")
    assert re.fullmatch(r"2-[0-9a-f]{32}", answer.body["revision"])
    assert answer.body["auth_token"] == token
    state = await client.admin_call("GET", "/state")
    assert state.body["vinix"][conference_id] == expected
    after = await client.vinix("GET", path, token)
    assert after.body["revision"] == answer.body["revision"]


async def test_post_with_empty_data_wipes_the_configuration(client: SandboxClient) -> None:
    """``{"data": {}}`` leaves only the defaults, as Crossbar does."""
    token = await client.token()
    answer = await client.vinix("POST", client.conference_path(1), token, {})
    data = answer.body["data"]
    del data["id"]
    assert data == DEFAULTS


async def test_post_strips_private_fields(client: SandboxClient) -> None:
    """Keys starting with ``_`` or ``pvt_`` are not stored."""
    token = await client.token()
    data = {"name": "A", "_rev": "9-x", "pvt_type": "hack", "_read_only": {}}
    answer = await client.vinix("POST", client.conference_path(0), token, data)
    assert answer.status == 200
    assert not any(key.startswith(("_", "pvt_")) for key in answer.body["data"])


async def test_post_coerces_strings_in_non_strict_mode(client: SandboxClient) -> None:
    """``"5"`` and ``"true"`` for integer and boolean fields are stored converted."""
    token = await client.token()
    data = {"max_participants": "5", "play_name": "true", "profile": {"interval": "20"}}
    answer = await client.vinix("POST", client.conference_path(0), token, data)
    assert answer.status == 200
    assert answer.body["data"]["max_participants"] == 5
    assert answer.body["data"]["play_name"] is True
    assert answer.body["data"]["profile"] == {"interval": 20}


async def test_post_validation_reports_every_error(client: SandboxClient) -> None:
    """A 400 ``validation error`` lists every problem by dotted path with Kazoo's messages."""
    token = await client.token()
    data = {"name": "", "profile": {"rate": 11025, "interval": 5}, "member": {"numbers": ["1a"]}}
    answer = await client.vinix("POST", client.conference_path(0), token, data)
    assert answer.status == 400
    assert answer.body["status"] == "error"
    assert answer.body["error"] == "400"
    assert answer.body["message"] == "validation error"
    assert "revision" not in answer.body
    errors = answer.body["data"]
    assert set(errors) == {"name", "profile.rate", "profile.interval", "member.numbers.0"}
    assert errors["profile.interval"] == {
        "minimum": {"message": "Value must be at least 10", "target": 10, "value": 5}
    }


async def test_post_validates_before_looking_the_document_up(client: SandboxClient) -> None:
    """On a missing id an invalid body is 400 and a valid one is 404 ``bad_identifier``."""
    token = await client.token()
    account = client.fx["vinix"]["account_id"]
    path = f"/accounts/{account}/conferences/{'f' * 32}"
    invalid = await client.vinix("POST", path, token, {"name": ""})
    assert invalid.status == 400
    missing = await client.vinix("POST", path, token, {"name": "ok"})
    assert missing.status == 404
    assert missing.body["message"] == "bad_identifier"
    assert missing.body["data"] == {"cause": "f" * 32, "message": "bad identifier"}


async def test_patch_merges_deeply_and_null_deletes(client: SandboxClient) -> None:
    """PATCH keeps other fields, merges objects and removes keys set to null."""
    token = await client.token()
    path = client.conference_path(0)
    before = (await client.vinix("GET", path, token)).body["data"]
    patch = {"member": {"join_muted": False}, "profile": {"rate": None}, "play_name": True}
    answer = await client.vinix("PATCH", path, token, patch)
    assert answer.status == 200
    data = answer.body["data"]
    assert data["name"] == before["name"]
    assert data["member"] == {**before["member"], "join_muted": False}
    assert "rate" not in data["profile"]
    assert data["profile"]["max-members"] == before["profile"]["max-members"]
    assert data["play_name"] is True
    assert answer.body["revision"].startswith("2-")


async def test_patch_validates_the_merged_document(client: SandboxClient) -> None:
    """A PATCH that makes the document invalid is a 400 and changes nothing."""
    token = await client.token()
    path = client.conference_path(0)
    answer = await client.vinix("PATCH", path, token, {"profile": {"interval": 500}})
    assert answer.status == 400
    assert "maximum" in answer.body["data"]["profile.interval"]
    after = await client.vinix("GET", path, token)
    assert after.body["revision"].startswith("1-")


async def test_patch_on_a_missing_document_is_404(client: SandboxClient) -> None:
    """PATCH loads first: a missing id is 404 even with an invalid body."""
    token = await client.token()
    path = f"/accounts/{client.fx['vinix']['account_id']}/conferences/nope"
    answer = await client.vinix("PATCH", path, token, {"name": ""})
    assert answer.status == 404
    assert answer.body["data"] == {"cause": "nope", "message": "bad identifier"}


async def test_get_returns_the_document(client: SandboxClient) -> None:
    """GET answers the public document, its id, a ``_read_only`` block and the revision."""
    token = await client.token()
    answer = await client.vinix("GET", client.conference_path(2), token)
    assert answer.status == 200
    assert answer.body["data"]["name"] == "Sandbox conference 3"
    assert answer.body["data"]["_read_only"]["participants"] == []
    assert answer.headers["ETag"] == f'"{answer.body["revision"]}"'


async def test_missing_or_garbage_token_is_invalid_credentials(client: SandboxClient) -> None:
    """No token and an unknown token: 401 ``invalid_credentials`` with data.message."""
    for token in (None, "garbage-token-" * 3):
        answer = await client.vinix("POST", client.conference_path(0), token, {"name": "x"})
        assert answer.status == 401
        assert answer.body["message"] == "invalid_credentials"
        assert answer.body["data"] == {"message": "invalid credentials"}
        assert answer.body["error"] == "401"


async def test_expired_token_is_invalid_credentials_with_empty_data(
    clocked_client: SandboxClient, clock: FakeClock
) -> None:
    """A token older than ``token_ttl_s`` gets 401 ``invalid credentials`` and data {}."""
    client = clocked_client
    client.sandbox.token_ttl_s = 10.0
    token = await client.token()
    assert (await client.vinix("GET", client.conference_path(0), token)).status == 200
    clock.advance(10.0)
    answer = await client.vinix("GET", client.conference_path(0), token)
    assert answer.status == 401
    assert answer.body["message"] == "invalid credentials"
    assert answer.body["data"] == {}


async def test_expired_token_is_checked_before_the_verb(
    clocked_client: SandboxClient, clock: FakeClock
) -> None:
    """Early auth comes first: an expired token on DELETE is 401, not 405."""
    client = clocked_client
    token = await client.token()
    clock.advance(3600.0)
    assert (await client.vinix("DELETE", client.conference_path(0), token)).status == 401


async def test_token_is_accepted_from_the_query_string(client: SandboxClient) -> None:
    """``?auth_token=`` works like ``X-Auth-Token``."""
    token = await client.token()
    answer = await client.send("GET", f"{client.conference_path(0)}?auth_token={token}")
    assert answer.status == 200


async def test_other_accounts_token_is_403(client: SandboxClient) -> None:
    """A valid token for another account is 403 ``forbidden``."""
    token = client.sandbox.vinix.issue_token("0" * 32)
    answer = await client.vinix("GET", client.conference_path(0), token)
    assert answer.status == 403
    assert answer.body["message"] == "forbidden"
    assert answer.body["data"] == {"message": "forbidden"}


async def test_account_segment_forms(client: SandboxClient) -> None:
    """32-hex and dashed-UUID account ids work; other shapes and unknown accounts are 404."""
    token = await client.token()
    account = client.fx["vinix"]["account_id"]
    dashed = f"{account[:8]}-{account[8:12]}-{account[12:16]}-{account[16:20]}-{account[20:]}"
    ok = await client.vinix("GET", client.conference_path(0, account=dashed.upper()), token)
    assert ok.status == 200
    bad = await client.vinix("GET", client.conference_path(0, account="abc"), token)
    assert bad.status == 404
    assert bad.body["message"] == "bad identifier"
    assert bad.body["data"] == {"message": "invalid account_id 'abc'"}
    unknown = await client.vinix("GET", client.conference_path(0, account="e" * 32), token)
    assert unknown.status == 404
    assert unknown.body["data"] == {"cause": "e" * 32, "message": "bad identifier"}


async def test_unparsable_body_is_400(client: SandboxClient) -> None:
    """Invalid JSON answers 400 with Kazoo's ``json.invalid`` data targeting the body."""
    token = await client.token()
    headers = {"X-Auth-Token": token, "Content-Type": "application/json"}
    answer = await client.send("POST", client.conference_path(0), data=b"{nope", headers=headers)
    assert answer.status == 400
    invalid = answer.body["data"]["json"]["invalid"]
    assert invalid["target"] == "body"
    assert "around" in invalid["message"]


async def test_data_that_is_not_an_object_is_an_invalid_envelope(client: SandboxClient) -> None:
    """``{"data": 5}`` answers 400 ``invalid request envelope``."""
    token = await client.token()
    answer = await client.send(
        "POST", client.conference_path(0), json={"data": 5}, headers={"X-Auth-Token": token}
    )
    assert answer.status == 400
    assert answer.body["message"] == "invalid request envelope"


async def test_other_verbs_are_405(client: SandboxClient) -> None:
    """DELETE and PUT on a conference are not simulated: 405 ``invalid_method``."""
    token = await client.token()
    for method in ("DELETE", "PUT"):
        answer = await client.vinix(method, client.conference_path(0), token, {})
        assert answer.status == 405
        assert answer.body["message"] == "invalid_method"


async def test_numbers_must_be_unique_in_the_account(client: SandboxClient) -> None:
    """A number used by another conference answers 400 ``numbers.unique``."""
    token = await client.token()
    first = {"conference_numbers": ["5551000"], "member": {"numbers": ["5552000"]}}
    assert (await client.vinix("POST", client.conference_path(0), token, first)).status == 200
    again = await client.vinix("POST", client.conference_path(0), token, first)
    assert again.status == 200
    clash = {"moderator": {"numbers": ["5552000", "5553000"]}, "conference_numbers": ["5551000"]}
    answer = await client.vinix("POST", client.conference_path(1), token, clash)
    assert answer.status == 400
    assert answer.body["data"] == {
        "numbers": {"unique": {"message": "Numbers already in use", "cause": "5551000,5552000"}}
    }
    freed = await client.vinix("POST", client.conference_path(0), token, {})
    assert freed.status == 200
    assert (await client.vinix("POST", client.conference_path(1), token, clash)).status == 200


async def test_request_id_is_echoed(client: SandboxClient) -> None:
    """``X-Request-ID`` comes back in the envelope and the ``x-request-id`` header."""
    answer = await client.send(
        "PUT",
        "/api_auth",
        json={"data": {"api_key": client.fx["vinix"]["api_key"]}},
        headers={"X-Request-ID": "req-123"},
    )
    assert answer.body["request_id"] == "req-123"
    assert answer.headers["x-request-id"] == "req-123"


async def test_seed_error_shape_can_be_switched_on(client: SandboxClient) -> None:
    """With ``vinix_error_shape: seed`` errors are ``{code, message, request_id}``."""
    await client.admin_call("POST", "/config", {"vinix_error_shape": "seed"})
    answer = await client.send(
        "GET", client.conference_path(0), headers={"X-Request-ID": "r-1", "X-Auth-Token": "bad"}
    )
    assert answer.status == 401
    assert answer.body == {"code": "401", "message": "invalid_credentials", "request_id": "r-1"}


async def test_unknown_paths_are_404_in_kazoo_shape(client: SandboxClient) -> None:
    """Paths the simulator does not know answer a Kazoo error envelope with 404."""
    answer = await client.send("GET", "/accounts/x/users")
    assert answer.status == 404
    assert answer.body["status"] == "error"
    assert answer.body["error"] == "404"


async def test_requests_with_a_valid_token_are_not_charged(client: SandboxClient) -> None:
    """Two hundred token-authenticated calls in a row never hit the bucket (provider-apis §1.9)."""
    token = await client.token()
    for _ in range(200):
        answer = await client.vinix("GET", client.conference_path(0), token)
        assert answer.status == 200


async def test_missing_tokens_are_charged_one_token_each(clocked_client: SandboxClient) -> None:
    """Unauthenticated calls spend the account bucket: the 101st in a row is 429."""
    client = clocked_client
    statuses = [
        (await client.vinix("GET", client.conference_path(0), None)).status for _ in range(101)
    ]
    assert set(statuses[:100]) == {401}
    assert statuses[100] == 429
