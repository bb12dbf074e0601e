"""The command models behave as CONTRACT.md says, validated from JSON as the worker does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from worker.contract.messages import Command, ConferenceUpdate, SupervisorRoleChange

COMMAND: TypeAdapter[ConferenceUpdate | SupervisorRoleChange] = TypeAdapter(Command)
UUID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def update(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command_id": "c-1",
        "type": "conference.update",
        "account_id": "a" * 32,
        "conference_id": "b" * 32,
        "conference": {"name": "Bridge"},
    }
    return body | overrides


def role(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command_id": "r-1",
        "type": "conference.supervisor_role",
        "conference_id": "conf-1",
        "call_control_id": "v3:abc",
        "supervisor_role": "whisper",
    }
    return body | overrides


def parse(body: dict[str, Any]) -> ConferenceUpdate | SupervisorRoleChange:
    return COMMAND.validate_json(json.dumps(body))


def accepted(body: dict[str, Any]) -> bool:
    try:
        parse(body)
    except ValidationError:
        return False
    return True


def parse_update(body: dict[str, Any]) -> ConferenceUpdate:
    command = parse(body)
    assert isinstance(command, ConferenceUpdate)
    return command


@pytest.mark.parametrize("make", [update, role])
def test_unknown_top_level_field_is_rejected(make: Any) -> None:
    """A field the contract does not define is refused at the top level of either command."""
    assert accepted(make())
    assert not accepted(make(priority="high"))


def test_unknown_type_is_rejected() -> None:
    """Only the two command types exist."""
    assert not accepted(update(type="conference.delete"))


@pytest.mark.parametrize("command_id", ["x", "x" * 200, "café-☕", "a:b/c#d", UUID])
def test_command_id_accepts_printable_ids_up_to_200(command_id: str) -> None:
    """command_id: 1..200 printable characters without white space."""
    assert accepted(update(command_id=command_id))


@pytest.mark.parametrize(
    "command_id",
    [
        *["", "x" * 201],
        *["a b", "a\tb", "a\nb", "ab\n", "a\u00a0b", "a\u2003b", "a\u3000b"],
        *["a\x00b", "a\x1fb", "a\x7fb", "a\x85b", "a\x9fb"],
    ],
)
def test_command_id_rejects_empty_long_space_and_control(command_id: str) -> None:
    """Empty, over 200, any white space (Unicode too) and control characters are refused."""
    assert not accepted(update(command_id=command_id))


@pytest.mark.parametrize("field", ["account_id", "conference_id"])
@pytest.mark.parametrize("value", ["0123456789abcdef" * 2, UUID, UUID.upper()])
def test_kazoo_ids_accept_hex_and_dashed_uuids(field: str, value: str) -> None:
    """account_id / conference_id: 32 lower-case hex characters, or a dashed UUID."""
    assert accepted(update(**{field: value}))


@pytest.mark.parametrize("field", ["account_id", "conference_id"])
@pytest.mark.parametrize(
    "value",
    [
        *["A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 32 + "\n", " " + "a" * 31, ""],
        *[f"{{{UUID}}}", UUID.replace("-", "", 1), UUID + "0", "urn:uuid:" + UUID],
    ],
)
def test_kazoo_ids_reject_anything_else(field: str, value: str) -> None:
    """Upper-case 32-hex, wrong lengths, non-hex, braces or a trailing newline are refused."""
    assert not accepted(update(**{field: value}))


def test_mode_defaults_to_replace() -> None:
    """A conference.update without mode replaces the document."""
    assert parse_update(update()).mode == "replace"
    assert parse_update(update(mode="merge")).mode == "merge"
    assert not accepted(update(mode="patch"))


@pytest.mark.parametrize(
    "conference",
    [{"name": None}, {"profile": {"max-members": None}}, {"member": {"pins": None}}],
)
def test_null_is_allowed_only_in_merge_mode(conference: dict[str, Any]) -> None:
    """null deletes a key in merge mode; in replace mode it is refused, however deep."""
    assert not accepted(update(conference=conference))
    assert not accepted(update(conference=conference, mode="replace"))
    assert parse_update(update(conference=conference, mode="merge")).conference.to_wire() == (
        conference
    )


@pytest.mark.parametrize("conference_id", ["conf-1", "My Conference", "...", ".a", "x" * 128])
def test_telnyx_conference_id_accepts_names(conference_id: str) -> None:
    """A Telnyx conference id or name: 1..128 characters, spaces and dots allowed."""
    assert accepted(role(conference_id=conference_id))


@pytest.mark.parametrize(
    "conference_id", ["", "/", "a/b", ".", "..", "a\x00b", "a\nb", "a\x1f", "a\x7f", "x" * 129]
)
def test_telnyx_conference_id_rejects_unsafe_path_segments(conference_id: str) -> None:
    """'/', dot segments, control characters and more than 128 characters are refused."""
    assert not accepted(role(conference_id=conference_id))


@pytest.mark.parametrize("conference_id", ["a\x85b", "a\x9bb"])
def test_telnyx_conference_id_rejects_c1_controls(conference_id: str) -> None:
    """C1 control characters (U+0080..U+009F) are control characters too."""
    assert not accepted(role(conference_id=conference_id))


@pytest.mark.parametrize("supervisor_role", ["barge", "monitor", "none", "whisper"])
def test_supervisor_role_accepts_the_four_roles(supervisor_role: str) -> None:
    """supervisor_role is one of barge, monitor, none, whisper."""
    assert accepted(role(supervisor_role=supervisor_role))


@pytest.mark.parametrize("supervisor_role", ["Whisper", "coach", "", None])
def test_supervisor_role_rejects_other_values(supervisor_role: str | None) -> None:
    """Any other role, a different case or null is refused."""
    assert not accepted(role(supervisor_role=supervisor_role))


@pytest.mark.parametrize("region", ["Australia", "Europe", "Middle East", "US"])
def test_region_accepts_the_four_regions(region: str) -> None:
    """region is one of Australia, Europe, Middle East, US (or absent)."""
    assert accepted(role(region=region))
    assert accepted(role())


@pytest.mark.parametrize("region", ["us", "EU", "Asia", "MiddleEast"])
def test_region_rejects_other_values(region: str) -> None:
    """Any other region spelling is refused."""
    assert not accepted(role(region=region))


def test_whisper_ids_are_a_list_of_call_control_ids() -> None:
    """whisper_call_control_ids is an array of strings, not one string."""
    assert accepted(role(whisper_call_control_ids=["v3:a", "v3:b"]))
    assert not accepted(role(whisper_call_control_ids="v3:a"))
    assert not accepted(role(whisper_call_control_ids=[""]))


@pytest.mark.parametrize("field", ["expires_at", "issued_at"])
@pytest.mark.parametrize("value", ["2025-01-15T10:00:00Z", "2025-01-15T12:00:00.5+02:00"])
def test_times_with_an_offset_are_accepted(field: str, value: str) -> None:
    """expires_at / issued_at are RFC 3339 times with an offset."""
    assert accepted(update(**{field: value}))
    assert accepted(role(**{field: value}))


@pytest.mark.parametrize("field", ["expires_at", "issued_at"])
@pytest.mark.parametrize("value", ["2025-01-15T10:00:00", "2025-01-15", "soon", 1736935200])
def test_naive_or_malformed_times_are_rejected(field: str, value: object) -> None:
    """A time without an offset, a bare date, text or an epoch number is refused."""
    assert not accepted(update(**{field: value}))


@pytest.mark.parametrize(
    "overrides",
    [
        {"command_id": 5},
        {"account_id": 12345678901234567890123456789012},
        {"conference": "name=Bridge"},
        {"conference": [["name", "Bridge"]]},
        {"mode": ["merge"]},
        {"type": ["conference.update"]},
    ],
)
def test_top_level_types_are_strict(overrides: dict[str, Any]) -> None:
    """No coercion at the top level: a number is not a string, a string is not an object."""
    assert not accepted(update(**overrides))


def test_role_top_level_types_are_strict() -> None:
    """The supervisor_role command does not coerce either."""
    assert not accepted(role(call_control_id=123))
    assert not accepted(role(conference_id=7))


def test_conference_document_coerces_like_kazoo() -> None:
    """Inside conference, "5" becomes 5 and "true"/"false" become booleans, as Kazoo does."""
    conference: dict[str, Any] = {"max_participants": "5", "play_name": "true"}
    conference |= {"play_welcome": "false"}
    conference |= {"profile": {"max-members": "10"}, "member": {"join_muted": "true"}}
    wire = parse_update(update(conference=conference)).conference.to_wire()
    assert wire == {
        "max_participants": 5,
        "play_name": True,
        "play_welcome": False,
        "profile": {"max-members": 10},
        "member": {"join_muted": True},
    }


@pytest.mark.parametrize(
    "conference",
    [
        {"max_participants": "five"},
        {"play_name": "maybe"},
        {"profile": {"interval": "200"}},
        {"name": 5},
        {"flags": "a"},
    ],
)
def test_conference_document_rejects_what_kazoo_cannot_coerce(conference: dict[str, Any]) -> None:
    """Text that is no number or boolean, out-of-range numbers and numbers for text are refused."""
    assert not accepted(update(conference=conference))


def test_to_wire_keeps_only_what_was_set_in_kazoo_spelling() -> None:
    """to_wire() drops unset fields, keeps hyphenated profile keys and keeps unknown keys."""
    conference = {
        "name": "Bridge",
        "profile": {"max-members": 8, "enter-sound": "tone://", "x-custom": [1]},
        "member": {"pins": ["1"], "vendor_flag": {"a": 1}},
        "custom_field": {"nested": True},
    }
    assert parse_update(update(conference=conference)).conference.to_wire() == conference


def test_to_wire_of_an_empty_document_is_empty() -> None:
    """No defaults are invented: an empty document stays empty."""
    assert parse_update(update(conference={})).conference.to_wire() == {}
