"""Decoding commands: why a message is refused, what can still be read of it, fingerprints."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.contract import codec
from worker.errors import InvalidMessage

ACCOUNT = "a" * 32
CONF = "b" * 32
LIMIT = 256 * 1024


def update(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command_id": "c-1",
        "type": "conference.update",
        "account_id": ACCOUNT,
        "conference_id": CONF,
        "conference": {"name": "Bridge"},
    }
    body.update(overrides)
    return body


def role(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command_id": "r-1",
        "type": "conference.supervisor_role",
        "conference_id": "conf-1",
        "call_control_id": "v3:abc",
        "supervisor_role": "whisper",
    }
    body.update(overrides)
    return body


def code_of(body: bytes) -> str:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(body, LIMIT)
    return caught.value.code


def test_valid_commands_decode() -> None:
    """Both command types decode into their models."""
    assert codec.decode(orjson.dumps(update()), LIMIT).type == "conference.update"
    assert codec.decode(orjson.dumps(role()), LIMIT).type == "conference.supervisor_role"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"[1, 2]", "invalid_command"),
        (b'"a string"', "invalid_command"),
        (orjson.dumps({"command_id": "x"}), "invalid_command"),
        (orjson.dumps(update(type="conference.delete")), "unknown_type"),
        (orjson.dumps(update(type=7)), "unknown_type"),
        (orjson.dumps(update(extra=1)), "invalid_command"),
        (orjson.dumps(update(command_id="has space")), "invalid_command"),
        (orjson.dumps(role(supervisor_role="shout")), "invalid_command"),
        (
            b'{"command_id": "x", "type": "conference.update", "n": 1' + b"0" * 5000 + b"}",
            "invalid_command",
        ),
    ],
)
def test_invalid_messages_get_the_right_code(body: bytes, code: str) -> None:
    """Bad JSON, non-objects, unknown types and schema violations map to their error codes."""
    assert code_of(body) == code


def test_oversize_body_is_too_large() -> None:
    """A body over the limit is refused before it is parsed."""
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(orjson.dumps(update()), 10)
    assert caught.value.code == "too_large"


def test_schema_violation_lists_field_errors() -> None:
    """invalid_command carries every field error in details."""
    body = orjson.dumps(update(account_id="nope", conference={"profile": {"interval": 5}}))
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(body, LIMIT)
    fields = {error["field"] for error in caught.value.details}
    assert {"account_id", "conference.profile.interval"} <= fields


def test_identity_is_read_from_invalid_messages() -> None:
    """command_id and type of an invalid message are still echoed when readable."""
    ident = codec.identity(orjson.dumps(update(conference="x")), LIMIT)
    assert (ident.command_id, ident.type) == ("c-1", "conference.update")
    assert codec.identity(b"{nope", LIMIT) == codec.Identity()
    assert codec.identity(orjson.dumps({"command_id": 5}), LIMIT).command_id is None


def fp(body: dict[str, Any]) -> str:
    return codec.fingerprint(codec.decode(orjson.dumps(body), LIMIT))


def test_fingerprint_ignores_timing_fields() -> None:
    """issued_at and expires_at do not change a command's fingerprint."""
    assert fp(update()) == fp(
        update(issued_at="2026-01-01T00:00:00Z", expires_at="2026-01-02T00:00:00+01:00")
    )


def test_fingerprint_ignores_key_order_and_default_mode() -> None:
    """Key order and an explicit default mode do not change the fingerprint."""
    shuffled = dict(reversed(list(update().items())))
    assert fp(update()) == fp(shuffled) == fp(update(mode="replace"))


def test_fingerprint_sees_payload_changes() -> None:
    """A different document, mode, or a null that deletes a key changes the fingerprint."""
    base = fp(update(mode="merge"))
    assert base != fp(update(mode="merge", conference={"name": "Other"}))
    assert base != fp(update())
    assert base != fp(update(mode="merge", conference={"name": "Bridge", "flags": None}))
