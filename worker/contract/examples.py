"""Examples of the contract's messages, for the AsyncAPI document.

Each one validates against its schema and its model (tests/unit/test_contract.py): commands
(:data:`COMMAND_EXAMPLES`), result events of every status (:data:`RESULT_EXAMPLES`) and a dead
letter (:data:`DEAD_EXAMPLES`).
"""

from __future__ import annotations

from typing import Any

from worker.contract.messages import COMMAND_TYPES

_TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
_CONF = "8d0ee5a1b6f04a4c9a3e7b2f1c6d9e20"
_IDS = {"account_id": "4b31dd1d32ce6d249897c06332375d65", "conference_id": _CONF}
_DOC = {
    "name": "Weekly sales call",
    "conference_numbers": ["5001"],
    "member": {"pins": ["1234"], "join_muted": True},
    "play_entry_tone": True,
    "profile": {"max-members": 50, "rate": 16000},
}
_UPDATE: dict[str, Any] = {"command_id": "crm-7f3a9c1e-0001", "type": "conference.update", **_IDS}
_UPDATE |= {"expires_at": "2025-01-15T10:05:00+00:00", "conference": _DOC}
_MERGE: dict[str, Any] = {"command_id": "crm-7f3a9c1e-0002", "type": "conference.update", **_IDS}
_MERGE |= {"mode": "merge", "conference": {"name": "EMEA sales", "profile": {"max-members": None}}}
_ROLE = {
    "command_id": "cc-4411-whisper-1",
    "type": "conference.supervisor_role",
    "issued_at": "2025-01-15T10:00:00Z",
    "conference_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "call_control_id": "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg",
    "supervisor_role": "whisper",
    "whisper_call_control_ids": ["v3:Sg1xxxQ_U3ixxx7XTkAItg1rKMatL6qIgbkYc"],
    "region": "Europe",
}
UPDATE_EXAMPLES = [
    {"name": "replace", "summary": "Replace a conference", "headers": _TRACE, "payload": _UPDATE},
    {"name": "merge", "summary": "Rename it; null deletes max-members", "payload": _MERGE},
]
ROLE_EXAMPLES = [{"name": "whisper", "summary": "Whisper to an agent", "payload": _ROLE}]
COMMAND_EXAMPLES = UPDATE_EXAMPLES + ROLE_EXAMPLES


def _event(command: dict[str, Any], status: str, code: int | None, **extra: Any) -> Any:
    """A result event for ``command`` as the worker publishes it: every field present."""
    name = "telnyx" if command.get("type") == "conference.supervisor_role" else "vinix"
    provider = {"name": name, "status_code": code, "request_id": f"req-{name}-{code}"}
    return {
        "command_id": command.get("command_id"),
        "type": command.get("type"),
        "status": status,
        "duplicate": False,
        "attempts": 1 if code and not extra.get("duplicate") else 0,
        "error": None,
        "provider": provider if code else None,
        "data": None,
        "received_at": "2025-01-15T10:00:00.120000+00:00",
        "completed_at": "2025-01-15T10:00:00.480000+00:00",
    } | extra


def _error(code: str, message: str, retryable: bool = False, details: Any = None) -> Any:
    return {"code": code, "message": message, "retryable": retryable, "details": details}


_SAVED = {"id": _CONF} | _DOC
_INVALID = _error(
    "invalid_command",
    "account_id: String should match pattern",
    details=[{"field": "account_id", "message": "String should match pattern", "type": "pattern"}],
)
_UNKNOWN = _error(
    "unknown_type", "unknown command type; expected one of " + ", ".join(COMMAND_TYPES)
)
_NOT_FOUND = _error("provider_not_found", "vinix answered 404: bad identifier")
_UNAVAILABLE = _error("provider_unavailable", "vinix answered 503", retryable=True)
_EXPIRED = _error("expired", "expires_at passed before the command could succeed")
_BAD = {"command_id": "crm-bad-1", "type": "conference.update"}
_RESULTS = [
    ("Vinix saved the conference", _event(_UPDATE, "succeeded", 200, data=_SAVED)),
    ("Telnyx accepted the change", _event(_ROLE, "succeeded", 200, data={"result": "ok"})),
    ("A duplicate delivery", _event(_UPDATE, "succeeded", 200, duplicate=True, data=_SAVED)),
    ("Invalid, so never sent", _event(_BAD, "rejected", None, error=_INVALID)),
    ("An unknown type", _event({"type": "conference.delete"}, "rejected", None, error=_UNKNOWN)),
    ("Vinix answered 404", _event(_UPDATE, "rejected", 404, error=_NOT_FOUND)),
    ("Out of retries", _event(_UPDATE, "failed", 503, attempts=5, error=_UNAVAILABLE)),
    ("expires_at passed", _event(_ROLE, "expired", 429, attempts=2, error=_EXPIRED)),
]


def _result_example(number: int, summary: str, event: dict[str, Any]) -> dict[str, Any]:
    key = f"{event['type'] if event['type'] in COMMAND_TYPES else 'unknown'}.{event['status']}"
    summary = f"{summary} (routing key {key})"
    return {"name": f"{key}-{number}", "summary": summary, "headers": _TRACE, "payload": event}


RESULT_EXAMPLES = [_result_example(n, text, event) for n, (text, event) in enumerate(_RESULTS, 1)]
_X_HEADERS = {
    "x-error-code": "provider_unavailable",
    "x-error-message": "vinix answered 503",
    "x-attempts": 5,
    "x-original-routing-key": "conference.update",
    "x-failed-at": "2025-01-15T10:00:31.002000+00:00",
}
DEAD_EXAMPLES = [{"name": "failed", "headers": _TRACE | _X_HEADERS, "payload": _UPDATE}]
