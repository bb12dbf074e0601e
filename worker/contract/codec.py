"""Bytes in, commands out; result events back to bytes.

Decoding is one pass of pydantic-core over the raw body on the hot path.  Only when that fails is
the body parsed again (with the stdlib, which copes with huge integers and reports deep nesting)
to tell *why*: ``invalid_json``, ``unknown_type`` or ``invalid_command``.  pydantic and JSON errors
are translated into :class:`worker.errors.InvalidMessage` here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from worker.contract.messages import COMMAND_TYPES, Command, ConferenceUpdate, SupervisorRoleChange
from worker.errors import InvalidMessage

AnyCommand = ConferenceUpdate | SupervisorRoleChange

_COMMAND: TypeAdapter[AnyCommand] = TypeAdapter(Command)
_MAX_ECHO = 200  # longest command_id / type echoed back from an invalid message


@dataclass(frozen=True, slots=True)
class Identity:
    """What could be read of a message's identity, even when the message is invalid."""

    command_id: str | None = None
    type: str | None = None


def decode(body: bytes, max_bytes: int) -> AnyCommand:
    """Validate ``body`` as a command or raise :class:`InvalidMessage`."""
    if len(body) > max_bytes:
        raise InvalidMessage("too_large", f"message body is {len(body)} bytes; limit {max_bytes}")
    try:
        return _COMMAND.validate_json(body)
    except ValidationError as exc:
        raise _explain(body, exc) from None


def identity(body: bytes, max_bytes: int) -> Identity:
    """Best-effort ``command_id`` and ``type`` of a message that did not validate."""
    if len(body) > max_bytes:
        return Identity()
    parsed = _loads(body)
    if not isinstance(parsed, dict):
        return Identity()
    return Identity(_short_str(parsed.get("command_id")), _short_str(parsed.get("type")))


def fingerprint(command: AnyCommand) -> str:
    """Hash of the canonical command, ``issued_at`` and ``expires_at`` aside.

    ``null`` at the top level means "absent"; inside a merge document it means "delete", so
    explicit nulls there are kept.
    """
    canonical: dict[str, Any] = {
        key: value
        for key, value in command.model_dump(
            mode="json", by_alias=True, exclude={"issued_at", "expires_at", "conference"}
        ).items()
        if value is not None
    }
    if isinstance(command, ConferenceUpdate):
        canonical["conference"] = command.conference.to_wire()
    digest = hashlib.blake2b(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS), digest_size=16)
    return digest.hexdigest()


def encode(document: dict[str, Any]) -> bytes:
    """A result event (or any JSON document) as compact UTF-8 JSON."""
    return orjson.dumps(document)


_UNREADABLE = object()


def _int(text: str) -> int:
    # Only the message's shape matters here; digits past Python's int limit are not an error.
    return int(text) if len(text) < 4000 else 0


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body, parse_int=_int)
    except (ValueError, RecursionError):
        return _UNREADABLE


def _short_str(value: Any) -> str | None:
    """``value`` if it is a short string that can be sent as UTF-8 (no lone surrogates)."""
    if not (isinstance(value, str) and 0 < len(value) <= _MAX_ECHO):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _explain(body: bytes, exc: ValidationError) -> InvalidMessage:
    parsed = _loads(body)
    if parsed is _UNREADABLE:
        return InvalidMessage("invalid_json", "message body is not valid UTF-8 JSON")
    if not isinstance(parsed, dict):
        return InvalidMessage("invalid_command", "message body must be a JSON object")
    kind = parsed.get("type")
    if kind is None:
        return InvalidMessage("invalid_command", "field 'type' is required")
    if kind not in COMMAND_TYPES:
        return InvalidMessage(
            "unknown_type", f"unknown command type; expected one of {', '.join(COMMAND_TYPES)}"
        )
    errors = [_field_error(error) for error in exc.errors(include_url=False, include_input=False)]
    summary = "; ".join(f"{e['field'] or '(body)'}: {e['message']}" for e in errors[:5])
    return InvalidMessage("invalid_command", summary, details=errors)


def _field_error(error: Any) -> dict[str, str]:
    # loc starts with the union tag (the command type); drop it.
    loc = [str(part) for part in error["loc"][1:]]
    return {"field": ".".join(loc), "message": str(error["msg"]), "type": str(error["type"])}
