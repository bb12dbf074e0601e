"""Two worker processes sharing Redis never carry out one command_id twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aio_pika
import orjson
import pytest
import redis

from tests.integration.conftest import AMQP_URL, REDIS_URL, Admin, worker_settings
from worker import topology
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration


def worker_env(prefix: str, sandbox: Sandbox) -> dict[str, str]:
    settings = worker_settings(prefix)
    fx = sandbox.fixtures
    env = {k: v for k, v in os.environ.items() if not k.startswith("CW_")}
    env.update(
        {
            "CW_AMQP_URL": AMQP_URL,
            "CW_DEDUP_URL": REDIS_URL,
            "CW_COMMANDS_EXCHANGE": settings.commands_exchange,
            "CW_COMMANDS_QUEUE": settings.commands_queue,
            "CW_RESULTS_EXCHANGE": settings.results_exchange,
            "CW_DEAD_EXCHANGE": settings.dead_exchange,
            "CW_DEAD_QUEUE": settings.dead_queue,
            "CW_VINIX_BASE_URL": sandbox.base_url,
            "CW_VINIX_API_KEY": fx["vinix"]["api_key"],
            "CW_TELNYX_BASE_URL": sandbox.base_url,
            "CW_TELNYX_API_KEY": fx["telnyx"]["api_key"],
            "CW_PREFETCH": "50",
        }
    )
    return env


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def wait_for_consumers(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    async with asyncio.timeout(30):
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if (declared.declaration_result.consumer_count or 0) >= count:
                return
            await asyncio.sleep(0.2)


async def test_burst_of_duplicates_reaches_the_provider_once_per_command(
    prefix: str, sandbox: Sandbox, admin: Admin, processes: list[subprocess.Popen[bytes]]
) -> None:
    """200 commands × 5 copies through two workers: every command_id reaches Telnyx exactly once."""
    env = worker_env(prefix, sandbox)
    settings = worker_settings(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, settings.topology())
        results = await channel.declare_queue(f"{prefix}.test-results", auto_delete=False)
        await results.bind(settings.results_exchange, "#")
        for _ in range(2):
            processes.append(subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env))
        await wait_for_consumers(channel, settings.commands_queue, 2)
        fx = sandbox.fixtures
        conf = fx["telnyx"]["conference_ids"][0]
        call = fx["telnyx"]["calls_by_conference"][conf][0]
        run = uuid.uuid4().hex[:8]
        ids = [f"dup-{run}-{n}" for n in range(200)]
        exchange = await channel.get_exchange(settings.commands_exchange)
        for _copy in range(5):
            for n, command_id in enumerate(ids):
                body: dict[str, Any] = {
                    "command_id": command_id,
                    "type": "conference.supervisor_role",
                    "conference_id": conf,
                    "call_control_id": call,
                    "supervisor_role": ("monitor", "whisper")[n % 2],
                }
                await exchange.publish(
                    aio_pika.Message(orjson.dumps(body), delivery_mode=2),
                    "conference.supervisor_role",
                )
        statuses: Counter[tuple[str, bool]] = Counter()
        async with asyncio.timeout(120):
            while sum(statuses.values()) < 1000:
                message = await results.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                await message.ack()
                event = orjson.loads(message.body)
                statuses[(event["status"], event["duplicate"])] += 1
        await channel.queue_delete(f"{prefix}.test-results")
        await topology.delete(channel, settings.topology())
    assert statuses == Counter({("succeeded", False): 200, ("succeeded", True): 800})
    calls = Counter(
        r["body"]["command_id"] for r in await admin.requests() if r["provider"] == "telnyx"
    )
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*[f"cw:dedup:{i}" for i in ids])
    client.close()
