"""Two worker processes sharing Redis never carry out one command_id twice."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import redis

from tests.integration.conftest import (
    REDIS_URL,
    Admin,
    Broker,
    Processes,
    wait_for_workers,
    worker_env,
)
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration


async def test_burst_of_duplicates_reaches_the_provider_once_per_command(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """200 commands x 5 copies through two workers: every command_id reaches Telnyx exactly once."""
    env = worker_env(prefix, sandbox, prefetch=50)
    for _ in range(2):
        processes.spawn(env)
    await wait_for_workers(broker.channel, broker.settings, 2)
    fx = sandbox.fixtures
    conf = fx["telnyx"]["conference_ids"][0]
    calls = fx["telnyx"]["calls_by_conference"][conf]
    run = uuid.uuid4().hex[:8]
    ids = [f"dup-{run}-{n}" for n in range(200)]
    bodies: list[dict[str, Any]] = [
        {
            "command_id": command_id,
            "type": "conference.supervisor_role",
            "conference_id": conf,
            "call_control_id": calls[n % 2],
            "supervisor_role": ("monitor", "whisper")[n % 2],
        }
        for n, command_id in enumerate(ids)
    ]
    await broker.publish_all(bodies * 5)
    events = await broker.collect(1000, timeout_s=120)
    statuses = Counter((e["status"], e["duplicate"]) for e in events)
    assert statuses == Counter({("succeeded", False): 200, ("succeeded", True): 800})
    reached = Counter(
        r["body"]["command_id"] for r in await admin.requests() if r["provider"] == "telnyx"
    )
    assert set(reached) == set(ids)
    assert max(reached.values()) == 1
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*[f"cw:dedup:{i}" for i in ids])
    client.close()
