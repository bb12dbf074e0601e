"""The Telnyx simulator: ``POST /v2/conferences/{id}/actions/update`` (Update conference).

Checks, in order: the path and verb (else 404 ``10005``); ``Authorization: Bearer <key>`` (else
401 ``10009``); the optional requests-per-second limit (429 ``10011`` with ``x-ratelimit-*``
headers); a JSON object body (else 400 ``10015``); ``UpdateConferenceRequest``, every problem
at once (422: ``10004`` missing or blank required field, ``10020`` wrong JSON type, ``10032``
value outside the enum, each with ``source.pointer``); the conference (404 ``90058``); the
call and the whisper targets, which must be in that conference (422 ``90015``).  Then the
supervisor's role is recorded and the answer is 200 ``{"data": {"result": "ok"}}``.

A ``command_id`` already carried out for the same call within 60 s is answered 200 ``ok``
again without being applied again.  The conference id is the percent-decoded path segment,
looked up verbatim: an id containing an encoded ``/`` is simply an unknown conference.
"""

from __future__ import annotations

import re
from typing import Any

from worker.sandbox.exchange import Call, Reply
from worker.sandbox.fixtures import TelnyxFixtures
from worker.sandbox.limits import Clock, RateWindow

DEDUP_TTL_S = 60.0
ROLES = ("barge", "monitor", "none", "whisper")
REGIONS = ("Australia", "Europe", "Middle East", "US")
OK = {"data": {"result": "ok"}}
ERRORS_URL = "https://developers.telnyx.com/docs/overview/errors/"

_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)

# (code, title, detail) for a bare HTTP status, from Telnyx's error code list.
_STATUS_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("10015", "Bad Request", "The request failed because it was not well-formed."),
    401: (
        "10009",
        "Authentication failed",
        "The required authentication headers were either invalid or not included in the request.",
    ),
    403: (
        "10010",
        "Authorization failed",
        "You do not have permission to perform the requested action on the specified resource "
        "or resources.",
    ),
    404: ("10005", "Resource not found", "The requested resource or URL could not be found."),
    408: ("10008", "Request timeout", "The request timed out."),
    422: (
        "90019",
        "Conference has already ended",
        "This conference is no longer active and can't receive commands.",
    ),
    429: (
        "10011",
        "Too many requests",
        "You have exceeded the maximum number of allowed requests.",
    ),
}
_UNEXPECTED = ("10007", "Unexpected error", "An unexpected error occured.")


def error(code: str, title: str, detail: str, pointer: str | None = None) -> dict[str, Any]:
    """One entry of Telnyx's ``errors`` array."""
    entry: dict[str, Any] = {"code": code, "title": title, "detail": detail}
    if pointer is not None:
        entry["source"] = {"pointer": pointer}
    return entry


def errors_reply(status: int, *errors: dict[str, Any]) -> Reply:
    """``{"errors": [...]}`` with ``status``."""
    return Reply(status, {"errors": list(errors)})


def _missing(name: str) -> dict[str, Any]:
    detail = f"The '{name}' parameter is required and cannot be blank."
    return error("10004", "Missing required parameter", detail, f"/{name}")


def _wrong_type(pointer: str, name: str, type_name: str) -> dict[str, Any]:
    detail = f"The '{name}' parameter must be of type '{type_name}'."
    return error("10020", "Invalid resource type", detail, pointer)


def _not_in_enum(name: str, options: tuple[str, ...]) -> dict[str, Any]:
    detail = f"The value must be one of: {', '.join(options)}."
    return error("10032", "Invalid enumerated value", detail, f"/{name}")


def _check_string(body: dict[str, Any], name: str, *, required: bool = False) -> list[Any]:
    value = body.get(name)
    if value is None or (required and value == ""):
        return [_missing(name)] if required else []
    if not isinstance(value, str):
        return [_wrong_type(f"/{name}", name, "string")]
    return []


def _check_enum(
    body: dict[str, Any], name: str, options: tuple[str, ...], *, required: bool
) -> list[Any]:
    problems = _check_string(body, name, required=required)
    value = body.get(name)
    if not problems and value is not None and value not in options:
        problems.append(_not_in_enum(name, options))
    return problems


def _check_whisper(body: dict[str, Any]) -> list[Any]:
    name = "whisper_call_control_ids"
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        return [_wrong_type(f"/{name}", name, "array")]
    return [
        _wrong_type(f"/{name}/{index}", name, "string")
        for index, item in enumerate(value)
        if not isinstance(item, str)
    ]


def validate_update(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every way ``body`` breaks ``UpdateConferenceRequest`` (``null`` counts as absent)."""
    return [
        *_check_string(body, "call_control_id", required=True),
        *_check_string(body, "command_id"),
        *_check_enum(body, "region", REGIONS, required=False),
        *_check_enum(body, "supervisor_role", ROLES, required=True),
        *_check_whisper(body),
    ]


def _invalid_call(pointer: str) -> dict[str, Any]:
    detail = "The call_control_id provided was not valid."
    return error("90015", "Invalid Call Control ID", detail, pointer)


class TelnyxApi:
    """Telnyx's conference update for the demo conferences and calls."""

    name = "telnyx"

    def __init__(self, fixtures: TelnyxFixtures, clock: Clock) -> None:
        self.fixtures = fixtures
        self.rate_limit: RateWindow | None = None
        self.dedup_ttl_s = DEDUP_TTL_S
        self.roles: dict[str, dict[str, str]] = {
            conf: {call.supervisor: "none", call.agent: "none"}
            for conf, call in fixtures.calls.items()
        }
        self._clock = clock
        self._done: dict[tuple[str, str], float] = {}

    def handle(self, call: Call) -> Reply:
        """Route, authenticate, throttle, then update."""
        parts = call.segments
        routed = len(parts) == 5 and parts[:2] == ["v2", "conferences"]
        if not routed or parts[3:] != ["actions", "update"] or call.method != "POST":
            return self.fault_reply(call, 404)
        if not self._authenticated(call):
            return self.fault_reply(call, 401)
        if self.rate_limit is None:
            return self._update(call, parts[2])
        admission = self.rate_limit.admit()
        reply = self._update(call, parts[2]) if admission.allowed else self.fault_reply(call, 429)
        reply.headers.update(admission.headers())
        return reply

    def fault_reply(self, call: Call, status: int) -> Reply:
        """Telnyx's ``errors`` body for a bare HTTP ``status``."""
        if status < 400:
            return Reply(status, OK, {"x-request-id": call.request_id})
        fallback = _UNEXPECTED if status >= 500 else _STATUS_ERRORS[400]
        code, title, detail = _STATUS_ERRORS.get(status, fallback)
        entry = error(code, title, detail)
        if status == 401:
            entry["meta"] = {"url": ERRORS_URL + code}
        return Reply(status, {"errors": [entry]}, {"x-request-id": call.request_id})

    def _authenticated(self, call: Call) -> bool:
        match = _BEARER.match(call.headers.get("Authorization", ""))
        return match is not None and match.group(1) == self.fixtures.api_key

    def _update(self, call: Call, conference_id: str) -> Reply:
        body = call.json
        if call.json_error is not None or not isinstance(body, dict):
            return self.fault_reply(call, 400)
        problems = validate_update(body)
        if problems:
            return errors_reply(422, *problems)
        calls = self.roles.get(conference_id)
        if calls is None:
            detail = "The conference does not exist."
            return errors_reply(404, error("90058", "Invalid conference_id", detail))
        problems = self._unknown_calls(calls, body)
        if problems:
            return errors_reply(422, *problems)
        call_control_id: str = body["call_control_id"]
        command_id = body.get("command_id")
        if command_id is None or self._first_time(call_control_id, command_id):
            calls[call_control_id] = body["supervisor_role"]
        return Reply(200, OK, {"x-request-id": call.request_id})

    @staticmethod
    def _unknown_calls(calls: dict[str, str], body: dict[str, Any]) -> list[dict[str, Any]]:
        problems = [] if body["call_control_id"] in calls else [_invalid_call("/call_control_id")]
        for index, target in enumerate(body.get("whisper_call_control_ids") or ()):
            if target not in calls:
                problems.append(_invalid_call(f"/whisper_call_control_ids/{index}"))
        return problems

    def _first_time(self, call_control_id: str, command_id: str) -> bool:
        """Remember the command for 60 s; False if it was carried out within the last 60 s."""
        now = self._clock()
        done = self._done
        while done:
            oldest = next(iter(done))
            if done[oldest] > now:
                break
            del done[oldest]
        key = (call_control_id, command_id)
        if key in done:
            return False
        done[key] = now + self.dedup_ttl_s
        return True
