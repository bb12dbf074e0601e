"""The official Telnyx SDK (4.x) pointed at the sandbox works like against Telnyx itself."""

from __future__ import annotations

import pytest
import telnyx

from worker.sandbox import Sandbox


def test_sync_sdk_updates_a_conference(threaded_sandbox: Sandbox) -> None:
    """``Telnyx(...).conferences.actions.update`` returns ``data.result == "ok"``."""
    fx = threaded_sandbox.fixtures["telnyx"]
    conference_id = fx["conference_ids"][0]
    supervisor, agent = fx["calls_by_conference"][conference_id]
    client = telnyx.Telnyx(api_key=fx["api_key"], base_url=threaded_sandbox.base_url, max_retries=0)
    with client:
        response = client.conferences.actions.update(
            conference_id,
            call_control_id=supervisor,
            supervisor_role="whisper",
            whisper_call_control_ids=[agent],
            command_id="sdk-1",
        )
    assert response.data is not None
    assert response.data.result == "ok"
    assert threaded_sandbox.state()["telnyx"][conference_id][supervisor] == "whisper"


def test_sync_sdk_raises_unprocessable_entity_for_a_bad_role(threaded_sandbox: Sandbox) -> None:
    """An invalid ``supervisor_role`` raises ``telnyx.UnprocessableEntityError`` (422)."""
    fx = threaded_sandbox.fixtures["telnyx"]
    conference_id = fx["conference_ids"][0]
    supervisor = fx["calls_by_conference"][conference_id][0]
    client = telnyx.Telnyx(api_key=fx["api_key"], base_url=threaded_sandbox.base_url, max_retries=0)
    with client, pytest.raises(telnyx.UnprocessableEntityError) as raised:
        client.conferences.actions.update(
            conference_id,
            call_control_id=supervisor,
            supervisor_role="none",
            extra_body={"supervisor_role": "shout"},
        )
    assert raised.value.status_code == 422
    assert raised.value.body["errors"][0]["code"] == "10032"  # type: ignore[index]


async def test_async_sdk_maps_errors_to_its_exceptions(sandbox: Sandbox) -> None:
    """AsyncTelnyx: unknown conference → NotFoundError, wrong key → AuthenticationError."""
    fx = sandbox.fixtures["telnyx"]
    supervisor = fx["call_control_ids"][0]
    async with telnyx.AsyncTelnyx(
        api_key=fx["api_key"], base_url=sandbox.base_url, max_retries=0
    ) as client:
        ok = await client.conferences.actions.update(
            fx["conference_ids"][0], call_control_id=supervisor, supervisor_role="monitor"
        )
        assert ok.data is not None
        assert ok.data.result == "ok"
        with pytest.raises(telnyx.NotFoundError):
            await client.conferences.actions.update(
                "a/b", call_control_id=supervisor, supervisor_role="monitor"
            )
    async with telnyx.AsyncTelnyx(
        api_key="KEYwrong", base_url=sandbox.base_url, max_retries=0
    ) as wrong:
        with pytest.raises(telnyx.AuthenticationError):
            await wrong.conferences.actions.update(
                fx["conference_ids"][0], call_control_id=supervisor, supervisor_role="monitor"
            )
    logged = [entry["path"] for entry in sandbox.requests.entries("telnyx")]
    assert "/v2/conferences/a%2Fb/actions/update" in logged
