"""The Vinix simulator: Kazoo Crossbar's ``api_auth`` and ``conferences/{id}`` endpoints.

Every answer is Kazoo's envelope (``auth_token, data, node, request_id, revision, status,
timestamp, version``; errors carry ``error`` = the HTTP status as a string and ``message``), or,
after ``POST /__admin/config {"vinix_error_shape": "seed"}``, errors take the Vinix seed-doc
shape ``{code, message, request_id}``.  ``request_id`` echoes ``X-Request-ID`` (else a random
32-hex id) and is also the ``x-request-id`` header.

Conference requests are processed in Crossbar's order: an expired token → 401; a verb other
than GET/POST/PATCH → 405; a malformed account segment (neither 32 lower-hex characters nor a
dashed UUID) or an unknown account → 404; no token or an unknown one → 401 (charged one token
of the account's bucket first, so 429 once it is empty); another account's token → 403; an
unparsable body → 400; then the :class:`~worker.sandbox.conferences.ConferenceStore` decides.
Requests with a valid token are not charged (see provider-apis.md §1.9); ``api_auth`` costs 35
tokens of the client's bucket and empties it when it holds fewer (429 without ``Retry-After``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from worker.sandbox.conferences import ConferenceStore, Rejected, StoredConference, not_found
from worker.sandbox.exchange import Call, Reply
from worker.sandbox.fixtures import VinixFixtures
from worker.sandbox.kazoo_schema import KazooSchema
from worker.sandbox.limits import Clock, RateWindow, TokenBuckets

KAZOO_VERSION = "4.3.142"
NODE = base64.urlsafe_b64encode(hashlib.md5(b"crossbar@vinix.sandbox").digest()).decode()
AUTH_COST = 35
REQUEST_COST = 1
DEFAULT_TOKEN_TTL_S = 3600.0
MAX_SESSIONS = 100_000
CONFERENCE_METHODS = frozenset({"GET", "POST", "PATCH"})
ErrorShape = Literal["kazoo", "seed"]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_READ_ONLY = {"members": 0, "moderators": 0, "duration": 0, "is_locked": False, "participants": []}

# (envelope message, data) Kazoo gives for a status when nothing more specific applies.
_SYSTEM_ERRORS: dict[int, tuple[str, Any]] = {
    400: ("invalid request", {"message": "invalid request"}),
    401: ("invalid credentials", {}),
    402: ("no_credit", {"message": "no credit"}),
    403: ("forbidden", {"message": "forbidden"}),
    404: ("bad_identifier", {"message": "bad identifier"}),
    405: ("invalid_method", {"message": "method not allowed"}),
    409: ("datastore_conflict", {"message": "conflicting documents"}),
    413: ("too_big", {"message": "request body too big"}),
    423: ("locked", {"message": "locked"}),
    429: ("too_many_requests", {"message": "too many requests"}),
    500: ("unspecified_fault", {"message": "unspecified fault"}),
    503: ("datastore_fault", {"message": "datastore fault"}),
}
_FAULTY_REQUEST = ("faulty_request", {"message": "faulty request"})


@lru_cache(maxsize=4)
def _iso8601(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def timestamp() -> str:
    """``kz_time:iso8601`` of now (formatted once per second)."""
    return _iso8601(int(time.time()))


def account_key(segment: str) -> str | None:
    """The account id in a path segment (dashed UUIDs lose dashes and case), or None."""
    if _HEX32.match(segment):
        return segment
    if _UUID.match(segment):
        return segment.replace("-", "").lower()
    return None


@dataclass(frozen=True, slots=True)
class Session:
    """What an auth token stands for."""

    account_id: str
    expires_at: float


class VinixApi:
    """Kazoo's API for the one demo account."""

    name = "vinix"

    def __init__(self, fixtures: VinixFixtures, clock: Clock) -> None:
        self.fixtures = fixtures
        self.token_ttl_s = DEFAULT_TOKEN_TTL_S
        self.error_shape: ErrorShape = "kazoo"
        self.buckets = TokenBuckets(clock)
        self.rate_limit: RateWindow | None = None
        self.store = ConferenceStore(
            KazooSchema.load("conferences", "conferences.profile"), fixtures.conference_ids
        )
        self._auth_schema = KazooSchema.load("api_auth")
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def handle(self, call: Call) -> Reply:
        """Route one request."""
        if self.rate_limit is not None and not self.rate_limit.admit().allowed:
            return self.fault_reply(call, 429)
        parts = call.segments
        if parts == ["v2", "api_auth"]:
            return self._api_auth(call)
        if len(parts) == 5 and parts[:2] == ["v2", "accounts"] and parts[3] == "conferences":
            return self._conference(call, parts[2], parts[4])
        return self._error(call, 404, "not_found", {"message": "not found"})

    def fault_reply(self, call: Call, status: int) -> Reply:
        """Kazoo's answer for a bare HTTP ``status`` (401 is the expired-token answer)."""
        token = self._token_of(call)
        if status < 400:
            return self._success(call, status, {}, token=token)
        fallback = _SYSTEM_ERRORS[500] if status >= 500 else _FAULTY_REQUEST
        message, data = _SYSTEM_ERRORS.get(status, fallback)
        return self._error(call, status, message, data, token)

    # PUT /v2/api_auth

    def _api_auth(self, call: Call) -> Reply:
        if call.method != "PUT":
            return self.fault_reply(call, 405)
        if not self.buckets.consume_until(call.client_ip, AUTH_COST):
            return self.fault_reply(call, 429)
        data = self._request_data(call)
        if isinstance(data, Reply):
            return data
        checked = self._auth_schema.validate_lenient(data)
        if not checked.ok:
            return self._error(call, 400, "validation error", checked.errors())
        api_key = checked.value["api_key"]
        if api_key != self.fixtures.api_key:
            return self._error(call, 404, "bad identifier", [api_key])
        token = self.issue_token(self.fixtures.account_id)
        account = {
            "account_id": self.fixtures.account_id,
            "apps": [],
            "is_reseller": False,
            "language": "en-us",
            "reseller_id": self.fixtures.reseller_id,
        }
        return self._success(call, 201, account, token=token)

    def issue_token(self, account_id: str) -> str:
        """A new token for ``account_id``, valid for :attr:`token_ttl_s` from now."""
        token = secrets.token_urlsafe(36)
        self._sessions[token] = Session(account_id, self._clock() + self.token_ttl_s)
        if len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return token

    # GET | POST | PATCH /v2/accounts/{account_id}/conferences/{conference_id}

    def _conference(self, call: Call, account_segment: str, conference_id: str) -> Reply:
        token = self._token_of(call)
        refused = self._authorize(call, token, account_segment)
        if refused is not None:
            return refused
        if call.method == "GET":
            stored = self.store.get(conference_id)
            if stored is None:
                return self._rejected(call, not_found(conference_id), token)
            return self._saved(call, stored, token, read_only=True)
        data = self._request_data(call, token)
        if isinstance(data, Reply):
            return data
        if call.method == "POST":
            outcome = self.store.replace(conference_id, data)
        else:
            outcome = self.store.merge(conference_id, data)
        if isinstance(outcome, Rejected):
            return self._rejected(call, outcome, token)
        return self._saved(call, outcome, token)

    def _authorize(self, call: Call, token: str | None, account_segment: str) -> Reply | None:
        """Crossbar's checks before the module sees the request; None when they all pass."""
        session = self._sessions.get(token) if token else None
        if session is not None and session.expires_at <= self._clock():
            return self._error(call, 401, "invalid credentials", {}, token)
        if call.method not in CONFERENCE_METHODS:
            not_allowed = {"message": "method not allowed"}
            return self._error(call, 405, "invalid_method", not_allowed, token)
        account = account_key(account_segment)
        if account is None:
            invalid = {"message": f"invalid account_id '{account_segment}'"}
            return self._error(call, 404, "bad identifier", invalid, token)
        if account != self.fixtures.account_id:
            return self._rejected(call, not_found(account), token)
        return self._session_refusal(call, token, session, account)

    def _session_refusal(
        self, call: Call, token: str | None, session: Session | None, account: str
    ) -> Reply | None:
        """401 without a known token (429 once its bucket is empty), 403 for another account."""
        if session is None:
            if not self.buckets.consume(f"{call.client_ip}/{account}", REQUEST_COST):
                return self.fault_reply(call, 429)
            return self._error(call, 401, "invalid_credentials", {"message": "invalid credentials"})
        if session.account_id != account:
            return self._error(call, 403, "forbidden", {"message": "forbidden"}, token)
        return None

    @staticmethod
    def _token_of(call: Call) -> str | None:
        token = call.headers.get("X-Auth-Token") or call.query.get("auth_token")
        if token is None and isinstance(call.json, dict):
            token = call.json.get("auth_token")
        return token if isinstance(token, str) and token else None

    def _request_data(self, call: Call, token: str | None = None) -> dict[str, Any] | Reply:
        """The envelope's ``data`` object, or Kazoo's 400 for a body that has none."""
        if call.json_error is not None:
            invalid = {"json": {"invalid": {"message": call.json_error, "target": "body"}}}
            return self._error(call, 400, "validation error", invalid, token)
        envelope = call.json if call.has_body else {}
        data = envelope.get("data", {}) if isinstance(envelope, dict) else envelope
        if not isinstance(data, dict):
            target = "object"
            wrong = {"message": f"Value did not match type(s): {target}", "target": target}
            detail = {"data": {"type": {**wrong, "value": data}}}
            return self._error(call, 400, "invalid request envelope", detail, token)
        return data

    # Envelopes

    def _saved(
        self, call: Call, stored: StoredConference, token: str | None, *, read_only: bool = False
    ) -> Reply:
        data = stored.data()
        if read_only:
            data["_read_only"] = dict(_READ_ONLY)
        reply = self._success(call, 200, data, token=token, revision=stored.revision)
        reply.headers["ETag"] = f'"{stored.revision}"'
        return reply

    def _rejected(self, call: Call, rejected: Rejected, token: str | None) -> Reply:
        return self._error(call, rejected.status, rejected.message, rejected.data, token)

    def _success(
        self, call: Call, status: int, data: Any, *, token: str | None, revision: str | None = None
    ) -> Reply:
        body: dict[str, Any] = {"auth_token": token or "", "data": data, "node": NODE}
        body["request_id"] = call.request_id
        if revision is not None:
            body["revision"] = revision
        body.update(status="success", timestamp=timestamp(), version=KAZOO_VERSION)
        return Reply(status, body, {"x-request-id": call.request_id})

    def _error(
        self, call: Call, status: int, message: str, data: Any, token: str | None = None
    ) -> Reply:
        headers = {"x-request-id": call.request_id}
        if self.error_shape == "seed":
            seed = {"code": str(status), "message": message, "request_id": call.request_id}
            return Reply(status, seed, headers)
        body: dict[str, Any] = {"auth_token": token} if token else {}
        body.update(data=data, error=str(status), message=message, node=NODE)
        body.update(request_id=call.request_id, status="fatal" if status == 500 else "error")
        body.update(timestamp=timestamp(), version=KAZOO_VERSION)
        return Reply(status, body, headers)
