"""Replay means retry, against the real broker, Redis and sandbox: provider rejections replayed
after the cause was fixed are carried out (or dead-lettered again with their new reason), a
command that succeeded meanwhile is answered without a provider call, and two operators
replaying at once, or a replay interrupted and resumed, carry each command out at most once and
lose none.  The worker and the ``dlq`` CLI share the dedup store in Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import pytest
from redis.asyncio import Redis

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    Admin,
    Bus,
    WorkerFactory,
    worker_settings,
)
from tests.integration.test_dlq import Cli, ready_count
from worker.dedup.redis import KEY_PREFIX
from worker.operators import dlq
from worker.operators.dlq_outcomes import Reopener, open_store
from worker.operators.dlq_render import TokenBucket, target_from

pytestmark = pytest.mark.integration


@pytest.fixture
async def run_id() -> AsyncIterator[str]:
    """A prefix for this test's command ids; their dedup keys are deleted afterwards."""
    value = f"rr-{uuid.uuid4().hex[:10]}-"
    yield value
    client = Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}{value}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def cli(prefix: str) -> AsyncIterator[Cli]:
    """The dlq CLI on the test's topology and on the workers' Redis dedup store."""
    runner = Cli(worker_settings(prefix), extra_env={"CW_DEDUP_URL": REDIS_URL})
    yield runner
    for process in runner.started:
        if process.returncode is None:
            process.kill()
            await process.wait()


def conferences(fixtures: dict[str, Any]) -> list[tuple[str, str]]:
    """(conference, first call) of each Telnyx conference of the sandbox."""
    calls = fixtures["telnyx"]["calls_by_conference"]
    return [(conference, calls[conference][0]) for conference in sorted(calls)]


def role(command_id: str, conference: tuple[str, str], supervisor_role: str = "monitor") -> Any:
    return {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": conference[0],
        "call_control_id": conference[1],
        "supervisor_role": supervisor_role,
    }


def not_found_on(conference: tuple[str, str]) -> dict[str, Any]:
    """A fault: Telnyx answers 404 for every update of ``conference`` (until deleted)."""
    return {
        "provider": "telnyx",
        "status": 404,
        "path_prefix": f"/v2/conferences/{conference[0]}/",
    }


async def provider_answers(admin: Admin, run_id: str) -> dict[str, list[int]]:
    """Per command id of this run, the status of each Telnyx answer, in order."""
    answers: dict[str, list[int]] = {}
    for request in await admin.requests():
        command_id = (request.get("body") or {}).get("command_id", "")
        if request["provider"] == "telnyx" and command_id.startswith(run_id):
            answers.setdefault(command_id, []).append(request["status"])
    return answers


async def dead_letters(bus: Bus) -> list[dict[str, Any]]:
    """Everything in the dead-letter queue (taken and acked): id, code, replay count."""
    count = await ready_count(bus.settings, -1, timeout_s=0.5)
    return [
        {
            "command_id": orjson.loads(message.body)["command_id"],
            "code": (message.headers or {}).get("x-error-code"),
            "replays": (message.headers or {}).get("x-replay-count"),
        }
        for message in await bus.dead_letters(count)
    ]


async def rejected_dead_letters(bus: Bus, commands: list[dict[str, Any]]) -> None:
    """Publish ``commands`` (the provider answers 404) and wait until all are dead letters."""
    for command in commands:
        await bus.publish(command)
    events = await bus.events(len(commands))
    assert {(e["status"], e["error"]["code"]) for e in events} == {
        ("rejected", "provider_not_found")
    }
    assert await ready_count(bus.settings, len(commands)) == len(commands)


async def test_replayed_rejections_are_carried_out_or_dead_lettered_again(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin, cli: Cli, run_id: str
) -> None:
    """The issue's scenario: 20 Telnyx commands rejected 404, the cause fixed for 15 of them,
    ``dlq replay --code provider_not_found``: the 15 succeed (not duplicates), the 5 whose cause
    is still there are back in the dead-letter queue with their reason; none vanishes."""
    fixed, broken = conferences(fixtures)[:2]
    commands = [role(f"{run_id}{i:02d}", fixed if i < 15 else broken) for i in range(20)]
    await admin.fault(**not_found_on(fixed))
    await admin.fault(**not_found_on(broken))
    async with worker_factory(dedup_url=REDIS_URL) as (_, bus):
        await rejected_dead_letters(bus, commands)
        code, out, _ = await cli("replay", "--dry-run", "--code", "provider_not_found")
        assert code == 0
        [counts] = [line for line in out.splitlines() if line.startswith("│ provider_not_found")]
        assert [cell.strip() for cell in counts.split("│")[2:5]] == ["20", "0", "0"]
        await admin.call("DELETE", "/__admin/faults")
        await admin.fault(**not_found_on(broken))  # the cause of 5 of them is still there
        code, out, err = await cli("replay", "--code", "provider_not_found")
        assert code == 0, err
        assert "replayed 20 of 20" in out
        assert "20 non-success(es) forgotten" in out
        events = {e["command_id"]: e for e in await bus.events(20)}
        assert await ready_count(bus.settings, 5) == 5
        left = await dead_letters(bus)
    succeeded = {i for i, e in events.items() if e["status"] == "succeeded" and not e["duplicate"]}
    assert succeeded == {c["command_id"] for c in commands[:15]}
    again = {i for i, e in events.items() if e["status"] == "rejected" and not e["duplicate"]}
    assert again == {c["command_id"] for c in commands[15:]}
    assert sorted(d["command_id"] for d in left) == sorted(again)
    assert {(d["code"], d["replays"]) for d in left} == {("provider_not_found", 1)}
    answers = await provider_answers(admin, run_id)
    assert all(answers[c["command_id"]] == [404, 200] for c in commands[:15])
    assert all(answers[c["command_id"]] == [404, 404] for c in commands[15:])


async def test_a_command_that_succeeded_meanwhile_is_answered_without_a_provider_call(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin, cli: Cli, run_id: str
) -> None:
    """A failed command re-sent by its publisher succeeds; replaying its dead letter afterwards
    is answered as a duplicate (``dlq list`` says it succeeded) and calls Telnyx zero times."""
    command = role(f"{run_id}down", conferences(fixtures)[0])
    await admin.fault(provider="telnyx", status=503)
    async with worker_factory(dedup_url=REDIS_URL) as (_, bus):
        await bus.publish(command)
        [failed] = await bus.events(1)
        assert failed["status"] == "failed"
        await admin.call("DELETE", "/__admin/faults")
        await bus.publish(command)  # the publisher tries again itself
        [done] = await bus.events(1)
        assert (done["status"], done["duplicate"]) == ("succeeded", False)
        calls_before = len((await provider_answers(admin, run_id))[command["command_id"]])
        code, out, _ = await cli("list", "--json")
        assert code == 0
        [row] = map(orjson.loads, out.splitlines())
        assert (row["stored"], row["replay"]) == ("succeeded", "answered from the store")
        code, out, _ = await cli("replay")
        assert code == 0
        assert "1 success(es) kept" in out
        [event] = await bus.events(1)
        assert (event["status"], event["duplicate"], event["attempts"]) == ("succeeded", True, 0)
        assert await ready_count(bus.settings, 0) == 0
    answers = (await provider_answers(admin, run_id))[command["command_id"]]
    assert len(answers) == calls_before
    assert answers.count(200) == 1


async def put_copies(bus: Bus, count: int) -> None:
    """Add a second copy of the first ``count`` dead letters (as a replay killed between a
    confirm and its ack, or a command dead-lettered twice, leaves them)."""
    channel = await bus.connection.channel(publisher_confirms=True)
    queue = await channel.get_queue(bus.settings.dead_queue)
    exchange = await channel.get_exchange(bus.settings.dead_exchange)
    await channel.set_qos(prefetch_count=count)
    copies: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with queue.iterator() as messages:
        async for message in messages:
            copies.append(message)
            if len(copies) == count:
                break
    for message in copies:
        copy = aio_pika.Message(message.body, headers=dict(message.headers or {}))
        await exchange.publish(copy, message.routing_key or "x")
    await channel.close()  # the originals go back unacked


class StopAfter:
    """A progress sink that sets ``stop`` after ``count`` replays (None: never)."""

    def __init__(self, stop: asyncio.Event, count: int | None) -> None:
        self.event, self.left = stop, count

    def start(self, total: int) -> None:
        pass

    def advance(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                self.event.set()

    def stop(self) -> None:
        pass


async def operator(bus: Bus, *, stop_after: int | None) -> dlq.ReplayReport:
    """One operator's replay, in process, with the CLI's reopen step on its own store client."""
    target = target_from(bus.settings)  # the worker's: Redis
    stop = asyncio.Event()
    progress = StopAfter(stop, stop_after)
    async with (
        open_store(target.dedup, required=True) as store,
        await aio_pika.connect(AMQP_URL) as connection,
    ):
        assert store is not None
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return await dlq.replay(
            channel,
            target.dead_queue,
            target.commands_exchange,
            dlq.Filter(),
            pace=TokenBucket(20).reserve,
            stop=stop,
            progress=progress,
            prepare=Reopener(store, target.max_body_bytes),
        )


async def test_two_operators_and_an_interrupted_replay_carry_each_command_out_once(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin, cli: Cli, run_id: str
) -> None:
    """40 rejected dead letters (10 of them twice): two operators replay the same queue at once,
    one of them interrupted after 5 (as Ctrl-C does), then the CLI resumes.  Each command succeeds
    at Telnyx exactly once, every command gets a non-duplicate success, the queue ends empty."""
    conference = conferences(fixtures)[0]
    commands = [role(f"{run_id}{i:02d}", conference) for i in range(40)]
    await admin.fault(**not_found_on(conference))
    async with worker_factory(dedup_url=REDIS_URL) as (_, bus):
        await rejected_dead_letters(bus, commands)
        await put_copies(bus, 10)
        assert await ready_count(bus.settings, 50) == 50
        await admin.call("DELETE", "/__admin/faults")
        # Both at once: the broker shares the dead letters between their consumers, so the
        # two copies of a command may be reopened and replayed by both at the same moment.  The
        # first operator stops (as on Ctrl-C) after 5 replays.
        first, second = await asyncio.gather(
            operator(bus, stop_after=5), operator(bus, stop_after=None)
        )
        # Who got which dead letters is the broker's choice; the interrupted one stopped at 5.
        assert first.replayed <= 5
        assert first.replayed + second.replayed <= 50
        assert not second.interrupted
        code, _, err = await cli("replay")  # resume whatever is left
        assert code == 0, err
        events = await bus.events(50, timeout_s=60)
        assert await ready_count(bus.settings, 0) == 0
    fresh = Counter(e["command_id"] for e in events if not e["duplicate"])
    answers = await provider_answers(admin, run_id)
    assert {i: a.count(200) for i, a in answers.items()} == {c["command_id"]: 1 for c in commands}
    assert {e["status"] for e in events} == {"succeeded"}
    assert fresh == Counter({c["command_id"]: 1 for c in commands})
