"""The Vinix token: fetched once for a burst, refreshed once after a forced 401."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.integration.conftest import Admin, WorkerFactory

pytestmark = pytest.mark.integration


def update(fx: dict[str, Any], n: int) -> dict[str, Any]:
    confs = fx["vinix"]["conference_ids"]
    return {
        "command_id": f"burst-{uuid.uuid4().hex[:8]}-{n}",
        "type": "conference.update",
        "account_id": fx["vinix"]["account_id"],
        "conference_id": confs[n % len(confs)],
        "conference": {"name": f"Bridge {n}"},
    }


def auth_calls(requests: list[dict[str, Any]]) -> int:
    return sum(1 for r in requests if r["provider"] == "vinix" and r["path"].endswith("/api_auth"))


async def test_one_token_for_a_burst_and_a_refresh_after_401(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """1,000 commands share one token; a forced 401 causes exactly one more auth call."""
    async with worker_factory() as (_, bus):
        for n in range(1000):
            await bus.publish(update(fixtures, n))
        events = await bus.events(1000, timeout_s=120)
        assert {e["status"] for e in events} == {"succeeded"}
        assert auth_calls(await admin.requests()) == 1

        await admin.fault(provider="vinix", status=401, count=1, path_prefix="/v2/accounts/")
        await bus.publish(update(fixtures, 1))
        (event,) = await bus.events(1)
        assert (event["status"], event["attempts"]) == ("succeeded", 1)
        requests = await admin.requests()
        assert auth_calls(requests) == 2
        assert [r["status"] for r in requests[-3:]] == [401, 201, 200] or [
            r["status"] for r in requests[-3:]
        ] == [401, 200, 200]
