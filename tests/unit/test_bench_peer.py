"""The naive peer's per-command work (``ops/bench/peer.py``): its provider call and its result
event, against a mocked provider (no broker, no Redis needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import httpx

from ops.bench.peer import Peer, parse, provider_request
from worker.contract.messages import ResultEvent

ROLE = {
    "command_id": "bench-1234abcd-drain-peer-0000001",
    "type": "conference.supervisor_role",
    "conference_id": "conf/1",
    "call_control_id": "v3:call",
    "supervisor_role": "whisper",
    "whisper_call_control_ids": ["v3:other"],
    "issued_at": "2026-12-05T10:00:00+00:00",
}
UPDATE = {
    "command_id": "bench-1234abcd-drain-peer-0000002",
    "type": "conference.update",
    "account_id": "acct",
    "conference_id": "c1",
    "mode": "merge",
    "issued_at": "2026-12-05T10:00:00+00:00",
    "conference": {"play_welcome": True},
}


def _peer(answer: Callable[[httpx.Request], httpx.Response]) -> Peer:
    """A peer whose two HTTP clients answer with ``answer`` (its broker is never used here)."""
    argv = ["--queue", "q", "--results-exchange", "x", "--telnyx-url", "http://tx/v2"]
    argv += ["--telnyx-key", "TK", "--vinix-url", "http://vx/v2", "--vinix-key", "VK"]
    args = parse(argv)
    peer = Peer(args, cast(Any, None))
    transport = httpx.MockTransport(answer)
    peer.clients = {name: httpx.AsyncClient(transport=transport) for name in peer.clients}
    peer.token = "tok"
    return peer


def test_the_provider_calls_are_the_floors() -> None:
    """Telnyx: POST …/actions/update with the Bearer key and our command_id (conference id
    quoted); Vinix: PATCH for a merge with the token and a ``{"data": ...}`` body."""
    name, method, url, body, headers = provider_request(
        ROLE, telnyx=("http://tx/v2", "TK"), vinix=("http://vx/v2", "tok")
    )
    assert (name, method, url) == (
        "telnyx",
        "POST",
        "http://tx/v2/conferences/conf%2F1/actions/update",
    )
    assert body["command_id"] == ROLE["command_id"]
    assert body["whisper_call_control_ids"] == ["v3:other"]
    assert headers == {"Authorization": "Bearer TK"}
    name, method, url, body, headers = provider_request(
        UPDATE, telnyx=("http://tx/v2", "TK"), vinix=("http://vx/v2", "tok")
    )
    assert (name, method, url) == ("vinix", "PATCH", "http://vx/v2/accounts/acct/conferences/c1")
    assert body == {"data": {"play_welcome": True}}
    assert headers["X-Auth-Token"] == "tok"


async def test_a_success_gives_a_result_event_of_the_workers_shape() -> None:
    """A 200 answer: ``succeeded`` with the provider's status, request id and data, valid as the
    worker's ``ResultEvent``."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": {"id": "c1"}}, headers={"x-request-id": "r1"})

    peer = _peer(answer)
    event = await peer.call(UPDATE, "2026-12-05T10:00:01+00:00")
    result = ResultEvent.model_validate(event)
    assert result.status == "succeeded"
    assert result.provider is not None
    assert (result.provider.name, result.provider.status_code) == ("vinix", 200)
    assert result.data == {"id": "c1"}
    await peer.close()


async def test_a_refusal_or_a_failed_request_still_gives_a_result_event() -> None:
    """A 4xx answer is ``rejected`` (``provider_rejected``); a request that fails is ``failed``
    (``provider_unavailable``, retryable): every command gets its event."""

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"errors": ["bad"]})

    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    refused = _peer(refuse)
    event = ResultEvent.model_validate(await refused.call(ROLE, "2026-12-05T10:00:01+00:00"))
    assert event.status == "rejected"
    assert event.error is not None
    assert event.error.code == "provider_rejected"
    await refused.close()
    failed = _peer(fail)
    event = ResultEvent.model_validate(await failed.call(ROLE, "2026-12-05T10:00:01+00:00"))
    assert event.status == "failed"
    assert event.error is not None
    assert (event.error.code, event.error.retryable) == ("provider_unavailable", True)
    await failed.close()
