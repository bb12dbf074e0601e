"""Telnyx Call Control: ``conference.supervisor_role`` as ``POST /conferences/{id}/actions/update``.

Bearer-key authentication, no token exchange.  The command's ``command_id`` is forwarded so
that Telnyx itself ignores a command it has already carried out.  Errors arrive as
``{"errors": [{code, title, detail, source}]}``; the first one names the failure.
"""

from __future__ import annotations

from typing import Any

import httpx

from worker.contract.messages import SupervisorRoleChange
from worker.errors import ProviderAnswer, ProviderName
from worker.providers import ProviderSuccess
from worker.providers.http import (
    JsonHttp,
    RequestObserver,
    classify,
    endpoint,
    provider_error,
    redact,
    retry_after,
)
from worker.settings import ProviderConfig


class TelnyxClient:
    """The Telnyx provider: one HTTP pool, the API key as a Bearer token.

    ``transport`` replaces the pool's transport (tests hand in ``httpx.MockTransport``).
    """

    name: ProviderName = "telnyx"

    def __init__(
        self,
        config: ProviderConfig,
        observer: RequestObserver | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base = config.base_url
        self._api_key = config.api_key
        self._http = JsonHttp(config, observer, transport=transport)

    async def execute(self, command: SupervisorRoleChange) -> ProviderSuccess:
        """Set the supervisor's role once."""
        key = self._api_key.get_secret_value()
        answer = await self._http.request(
            "POST",
            endpoint(self._base, "conferences", command.conference_id, "actions", "update"),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": f"Bearer {key}",
            },
            body=_request_body(command),
        )
        body = answer.body if isinstance(answer.body, dict) else {}
        provider = ProviderAnswer("telnyx", answer.status, answer.request_id)
        code = classify(answer.status)
        if code is None:
            data = body.get("data")
            return ProviderSuccess(data if isinstance(data, dict) else None, provider)
        errors = body.get("errors")
        raise provider_error(
            code,
            redact(f"telnyx answered HTTP {answer.status}: {_message(errors)}", [key]),
            answer=provider,
            details=redact(errors, [key]) if errors else None,
            retry_after_s=retry_after(answer.headers, reset_header="x-ratelimit-reset"),
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()


def _request_body(command: SupervisorRoleChange) -> dict[str, Any]:
    body: dict[str, Any] = {
        "call_control_id": command.call_control_id,
        "supervisor_role": command.supervisor_role,
        "command_id": command.command_id,
    }
    if command.whisper_call_control_ids is not None:
        body["whisper_call_control_ids"] = command.whisper_call_control_ids
    if command.region is not None:
        body["region"] = command.region
    return body


def _message(errors: Any) -> str:
    """``title: detail`` of the first error, or a placeholder when there is none."""
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return "no error message"
    parts = [str(first[key]) for key in ("title", "detail") if first.get(key)]
    return ": ".join(parts) or "no error message"
