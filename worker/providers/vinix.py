"""Vinix (white-label Kazoo Crossbar): ``conference.update`` as POST (replace) or PATCH (merge).

Authentication is an account API key exchanged for a token (``PUT /api_auth``).  The token is
shared by every command: fetched once under a lock (a burst of commands fetches one token),
renewed ``token_ttl_s`` after it was fetched (Kazoo tokens live about an hour), and renewed once
more when a conference call answers 401.  Error bodies come in two shapes, both understood:
Kazoo's envelope ``{status, error, message, data, request_id}`` and ``{code, message, request_id}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from worker.contract.messages import ConferenceUpdate
from worker.errors import ProviderAnswer, ProviderName, ProviderUnavailable, WorkerError
from worker.providers import ProviderSuccess
from worker.providers.http import (
    HttpAnswer,
    JsonHttp,
    RequestObserver,
    classify,
    endpoint,
    new_request_id,
    provider_error,
    redact,
    retry_after,
)
from worker.settings import ProviderConfig

DEFAULT_TOKEN_TTL_S = 3300.0
_JSON = {"Content-Type": "application/json", "Accept": "application/json"}


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    renew_at: float


class VinixClient:
    """The Vinix provider: one HTTP pool (``PUT /api_auth`` too) and one shared auth token.

    ``transport`` replaces the pool's transport (tests hand in ``httpx.MockTransport``).
    """

    name: ProviderName = "vinix"

    def __init__(
        self,
        config: ProviderConfig,
        *,
        token_ttl_s: float = DEFAULT_TOKEN_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        observer: RequestObserver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base = config.base_url
        self._api_key = config.api_key
        self._http = JsonHttp(config, observer, transport=transport)
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: _Token | None = None
        self._auth_fetches = 0  # finished token fetches, ok or not
        self._auth_failure: WorkerError | None = None

    async def execute(self, command: ConferenceUpdate) -> ProviderSuccess:
        """Save the conference document once (after at most one token renewal on 401)."""
        url = endpoint(
            self._base, "accounts", command.account_id, "conferences", command.conference_id
        )
        method = "POST" if command.mode == "replace" else "PATCH"
        body = {"data": command.conference.to_wire()}
        token = await self._current_token()
        answer = await self._send(method, url, body, token)
        if answer.status == 401:
            token = await self._current_token(stale=token)
            answer = await self._send(method, url, body, token)
        return self._conclude(answer, token)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def _send(self, method: str, url: httpx.URL, body: Any, token: str) -> HttpAnswer:
        request_id = new_request_id()
        headers = {**_JSON, "X-Auth-Token": token, "X-Request-ID": request_id}
        return await self._http.request(
            method, url, headers=headers, body=body, request_id=request_id
        )

    def _conclude(self, answer: HttpAnswer, token: str) -> ProviderSuccess:
        envelope = answer.body if isinstance(answer.body, dict) else {}
        provider = ProviderAnswer("vinix", answer.status, _request_id(envelope, answer))
        code = classify(answer.status)
        if code is None:
            if not isinstance(answer.body, dict | None):
                raise ProviderUnavailable(
                    "provider_unavailable",
                    "vinix answered 2xx without an envelope",
                    provider=provider,
                )
            data = envelope.get("data")
            return ProviderSuccess(data if isinstance(data, dict) else None, provider)
        secrets = (self._api_key.get_secret_value(), token)
        raise provider_error(
            code,
            redact(f"vinix answered HTTP {answer.status}: {_message(envelope)}", secrets),
            answer=provider,
            details=redact(_details(envelope), secrets),
            retry_after_s=retry_after(answer.headers),
        )

    async def _current_token(self, stale: str | None = None) -> str:
        """The shared token; a new one when it is due for renewal or is ``stale`` (got a 401).

        Callers that queued behind a failed fetch get that failure instead of fetching again.
        """
        token = self._valid(stale)
        if token is not None:
            return token
        fetches = self._auth_fetches
        async with self._lock:
            token = self._valid(stale)
            if token is not None:
                return token
            if self._auth_fetches != fetches and self._auth_failure is not None:
                raise _copy(self._auth_failure) from self._auth_failure
            return await self._authenticate()

    def _valid(self, stale: str | None) -> str | None:
        """The current token unless it is missing, due for renewal, or ``stale``."""
        token = self._token
        if token is None or token.value == stale or self._clock() >= token.renew_at:
            return None
        return token.value

    async def _authenticate(self) -> str:
        renew_at = self._clock() + self._token_ttl_s
        self._auth_failure = None
        try:
            value = await self._fetch_token()
        except WorkerError as exc:
            self._auth_failure = exc
            raise
        finally:
            self._auth_fetches += 1
        self._token = _Token(value, renew_at)
        return value

    async def _fetch_token(self) -> str:
        request_id = new_request_id()
        key = self._api_key.get_secret_value()
        answer = await self._http.request(
            "PUT",
            endpoint(self._base, "api_auth"),
            headers={**_JSON, "X-Request-ID": request_id},
            body={"data": {"api_key": key}},
            request_id=request_id,
        )
        envelope = answer.body if isinstance(answer.body, dict) else {}
        provider = ProviderAnswer("vinix", answer.status, _request_id(envelope, answer))
        code = classify(answer.status)
        token = envelope.get("auth_token")
        if code is None and isinstance(token, str) and token and token != "undefined":
            return token
        if code is None:
            code = "provider_unavailable"
        elif code in ("provider_rejected", "provider_not_found"):
            code = "provider_unauthorized"
        raise provider_error(
            code,
            redact(f"vinix api_auth answered HTTP {answer.status}: {_message(envelope)}", [key]),
            answer=provider,
            retry_after_s=retry_after(answer.headers),
        )


def _request_id(envelope: dict[str, Any], answer: HttpAnswer) -> str | None:
    request_id = envelope.get("request_id")
    return request_id if isinstance(request_id, str) else answer.request_id


def _message(envelope: dict[str, Any]) -> str:
    """Kazoo's ``message`` (and ``data.message`` when it adds something), else a placeholder."""
    message = envelope.get("message")
    text = message if isinstance(message, str) and message else "no error message"
    data = envelope.get("data")
    inner = data.get("message") if isinstance(data, dict) else None
    if isinstance(inner, str) and inner and inner != text:
        text = f"{text} ({inner})"
    return text


def _details(envelope: dict[str, Any]) -> Any:
    """Kazoo's ``data`` (e.g. field errors), or the ``code`` of the ``{code, message}`` shape."""
    data = envelope.get("data")
    if data not in (None, {}, []):
        return data
    if "code" in envelope and "error" not in envelope:
        return {"code": envelope["code"]}
    return None


def _copy(error: WorkerError) -> WorkerError:
    """A fresh exception equal to ``error`` (re-raising one instance grows its traceback),
    marked as shared."""
    retry_after_s = getattr(error, "retry_after_s", None)
    copy = provider_error(
        error.code,
        error.message,
        answer=error.provider,
        details=error.details,
        retry_after_s=retry_after_s,
    )
    copy.shared = True  # one failed fetch counts once in the breaker, not once per caller
    return copy
