"""The publisher allow-list: loading the file, and who may change which target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.contract.codec import AnyCommand, decode
from worker.errors import PermanentError
from worker.pipeline.allowlist import AllowList, AllowListError, Forbidden, Grant

ACCOUNT_A = "a" * 32
ACCOUNT_B = "b" * 32
CONF_1 = "1" * 32
CONF_2 = "2" * 32
DOCUMENT: dict[str, Any] = {
    "publishers": {
        "billing": {"vinix_accounts": [ACCOUNT_A], "telnyx_conferences": ["room-1"]},
        "narrow": {"vinix_accounts": [ACCOUNT_A], "vinix_conferences": [CONF_1]},
        "ops": {"vinix_accounts": ["*"], "telnyx_conferences": ["*"]},
        "nothing": {},
    }
}


def update(account: str = ACCOUNT_A, conference: str = CONF_1) -> AnyCommand:
    body = {
        "command_id": "c-1",
        "type": "conference.update",
        "account_id": account,
        "conference_id": conference,
        "conference": {"name": "Bridge"},
    }
    return decode(orjson.dumps(body), 1 << 20)


def role(conference: str = "room-1") -> AnyCommand:
    body = {
        "command_id": "r-1",
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": "v3:abc",
        "supervisor_role": "monitor",
    }
    return decode(orjson.dumps(body), 1 << 20)


@pytest.fixture
def allow() -> AllowList:
    return AllowList.from_document(DOCUMENT)


def forbidden(allow: AllowList, user_id: str | None, command: AnyCommand) -> Forbidden:
    with pytest.raises(Forbidden) as caught:
        allow.check(user_id, command)
    return caught.value


def test_forbidden_is_a_permanent_error_with_code_forbidden() -> None:
    """Forbidden ends a command rejected (never retried) with the error code "forbidden"."""
    error = Forbidden("no")
    assert isinstance(error, PermanentError)
    assert (error.code, error.status, error.retryable) == ("forbidden", "rejected", False)


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("billing", update()),
        ("billing", update(conference=CONF_2)),
        ("billing", role()),
        ("narrow", update()),
        ("ops", update(account=ACCOUNT_B, conference=CONF_2)),
        ("ops", role("any-room")),
    ],
)
def test_granted_targets_pass(allow: AllowList, user: str, command: AnyCommand) -> None:
    """A listed publisher may change the accounts, conferences and rooms it is granted."""
    allow.check(user, command)


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("billing", update(account=ACCOUNT_B)),
        ("billing", role("room-2")),
        ("narrow", update(conference=CONF_2)),
        ("narrow", role()),
        ("nothing", update()),
        ("nothing", role()),
    ],
)
def test_other_targets_are_forbidden(allow: AllowList, user: str, command: AnyCommand) -> None:
    """A publisher cannot act on another account, conference or Telnyx room."""
    error = forbidden(allow, user, command)
    assert repr(user) in error.message


@pytest.mark.parametrize("user", [None, ""])
def test_missing_user_id_is_forbidden(allow: AllowList, user: str | None) -> None:
    """With the list on, a command without an AMQP user_id is refused."""
    error = forbidden(allow, user, update())
    assert "no AMQP user_id" in error.message
    assert error.details["user_id"] == user


def test_unknown_publisher_is_forbidden(allow: AllowList) -> None:
    """A user id that is not on the list may not change anything."""
    error = forbidden(allow, "mallory", update())
    assert "'mallory' is not on the allow-list" in error.message


def test_ids_match_exactly_with_no_case_folding() -> None:
    """A different spelling of a granted id (upper-case UUID) is refused: fail closed."""
    lower = "0123abcd-0000-4000-8000-00000000abcd"
    allow = AllowList({"p": Grant(frozenset({ACCOUNT_A}), frozenset({lower}))})
    allow.check("p", update(conference=lower))
    forbidden(allow, "p", update(conference=lower.upper()))


def test_forbidden_message_names_user_and_target_and_escapes_controls(allow: AllowList) -> None:
    """The message names who and what, with control characters escaped and length bounded."""
    user = 'evil\n{"level": "INFO"}' + "x" * 500
    error = forbidden(allow, user, update(account=ACCOUNT_B, conference=CONF_2))
    assert "\n" not in error.message
    assert len(error.message) < 400
    assert error.details == {
        "user_id": user[:100],
        "provider": "vinix",
        "account_id": ACCOUNT_B,
        "conference_id": CONF_2,
    }
    narrow = forbidden(allow, "narrow", update(conference=CONF_2))
    assert f"vinix account '{ACCOUNT_A}' conference '{CONF_2}'" in narrow.message
    room = forbidden(allow, "billing", role("room-9"))
    assert "telnyx conference 'room-9'" in room.message


def test_publishers_lists_the_user_ids(allow: AllowList) -> None:
    """The set of listed publishers is exposed (for the start-up log line)."""
    assert allow.publishers == {"billing", "narrow", "ops", "nothing"}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_loads_json_and_yaml_files(tmp_path: Path, suffix: str) -> None:
    """The same document loads from JSON and from YAML."""
    path = tmp_path / f"allow{suffix}"
    path.write_text(json.dumps(DOCUMENT), encoding="utf-8")  # JSON is valid YAML
    allow = AllowList.from_file(path)
    allow.check("billing", role())
    forbidden(allow, "billing", role("room-2"))


@pytest.mark.parametrize(
    "document",
    [
        None,
        [],
        {},
        {"publishers": []},
        {"publishers": {"p": {"vinix_account": [ACCOUNT_A]}}},
        {"publishers": {"p": {"vinix_accounts": ACCOUNT_A}}},
        {"publishers": {"p": {"vinix_accounts": [""]}}},
        {"publishers": {"p": {"telnyx_conferences": [7]}}},
        {"publishers": {"": {}}},
        {"publishers": {}, "extra": 1},
    ],
)
def test_malformed_documents_are_refused(document: Any) -> None:
    """Typos, wrong types and empty ids fail at load time rather than granting silently."""
    with pytest.raises(AllowListError, match="invalid allow-list"):
        AllowList.from_document(document)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.json", "{not json"),
        ("deep.json", "[" * 100_000),
        ("bad.yaml", "publishers: [unclosed"),
        ("latin1.json", "\udcff"),
    ],
)
def test_unparsable_files_are_refused(tmp_path: Path, name: str, text: str) -> None:
    """A file that is not JSON/YAML (or not UTF-8) raises AllowListError, not a stray error."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AllowListError):
        AllowList.from_file(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing file is an AllowListError naming the path."""
    with pytest.raises(AllowListError, match="cannot read"):
        AllowList.from_file(tmp_path / "absent.json")
