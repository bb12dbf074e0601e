"""The pipeline, with no I/O: a memory dedup store and scripted providers."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from worker.dedup.memory import MemoryDedupStore
from worker.errors import ProviderAnswer, ProviderName, ProviderRejected, ProviderUnavailable
from worker.pipeline.gate import Gate, GateConfig
from worker.pipeline.process import Delivery, DeliveryGone, Outcome, Pipeline
from worker.pipeline.retry import Retrier, RetryState
from worker.providers import ProviderSuccess
from worker.settings import DedupConfig, RetryPolicy

LIMIT = 256 * 1024


class FakeProvider:
    """Answers from a script (default: success) and counts calls; may block until released."""

    def __init__(self, name: ProviderName, *script: Any) -> None:
        self.name: ProviderName = name
        self.script = list(script)
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def execute(self, command: Any) -> ProviderSuccess:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        answer = self.script.pop(0) if self.script else None
        if isinstance(answer, Exception):
            raise answer
        return ProviderSuccess({"result": "ok"}, ProviderAnswer(self.name, 200, "req-1"))

    async def aclose(self) -> None:
        pass


async def no_sleep(_: float, stopping: asyncio.Event) -> bool:
    await asyncio.sleep(0)
    return stopping.is_set()


def make(
    vinix: FakeProvider | None = None,
    telnyx: FakeProvider | None = None,
    dedup: MemoryDedupStore | None = None,
) -> Pipeline:
    return Pipeline(
        providers={
            "vinix": vinix or FakeProvider("vinix"),
            "telnyx": telnyx or FakeProvider("telnyx"),
        },
        gates={
            name: Gate(name, GateConfig(failure_threshold=1000)) for name in ("vinix", "telnyx")
        },
        dedup=dedup or MemoryDedupStore(DedupConfig(url="memory://", lease_s=60)),
        retrier=Retrier(RetryPolicy(max_attempts=3), sleep=no_sleep),
        max_body_bytes=LIMIT,
    )


async def process(pipeline: Pipeline, body: bytes) -> Outcome:
    return await pipeline.process(Delivery(body))


def role(**overrides: Any) -> bytes:
    body = {
        "command_id": "r-1",
        "type": "conference.supervisor_role",
        "conference_id": "conf-1",
        "call_control_id": "v3:abc",
        "supervisor_role": "monitor",
    }
    body.update(overrides)
    return orjson.dumps(body)


async def test_success_builds_a_succeeded_event() -> None:
    """A provider 2xx gives status succeeded, attempts 1, the provider's data, no dead letter."""
    outcome = await process(make(), role())
    assert outcome.status == "succeeded"
    assert outcome.routing_key == "conference.supervisor_role.succeeded"
    assert not outcome.dead_letter
    event = outcome.event
    assert (event["attempts"], event["duplicate"], event["data"]) == (1, False, {"result": "ok"})
    assert event["provider"] == {"name": "telnyx", "status_code": 200, "request_id": "req-1"}


async def test_invalid_message_is_rejected_without_a_provider_call() -> None:
    """A schema violation ends rejected/invalid_command, dead-lettered, with 0 attempts."""
    telnyx = FakeProvider("telnyx")
    outcome = await process(make(telnyx=telnyx), role(supervisor_role="shout"))
    assert (outcome.status, outcome.event["error"]["code"], outcome.dead_letter) == (
        "rejected",
        "invalid_command",
        True,
    )
    assert outcome.event["command_id"] == "r-1"
    assert telnyx.calls == 0


async def test_unreadable_type_routes_as_unknown() -> None:
    """A message whose type cannot be read is answered on unknown.rejected."""
    outcome = await process(make(), b"{oops")
    assert outcome.routing_key == "unknown.rejected"
    assert outcome.event["command_id"] is None


async def test_duplicate_after_success_is_replayed_without_calling() -> None:
    """The same command again is answered from the store with duplicate: true and 0 attempts."""
    telnyx = FakeProvider("telnyx")
    pipeline = make(telnyx=telnyx)
    first = await process(pipeline, role())
    again = await process(pipeline, role(issued_at="2026-01-01T00:00:00Z"))
    assert telnyx.calls == 1
    assert (again.status, again.event["duplicate"], again.event["attempts"]) == (
        "succeeded",
        True,
        0,
    )
    assert again.event["data"] == first.event["data"]
    assert not again.dead_letter


async def test_conflicting_payload_is_rejected_and_store_untouched() -> None:
    """Same command_id, other payload: rejected idempotency_conflict; the original still replays."""
    pipeline = make()
    await process(pipeline, role())
    conflict = await process(pipeline, role(supervisor_role="barge"))
    assert (conflict.status, conflict.event["error"]["code"]) == (
        "rejected",
        "idempotency_conflict",
    )
    assert conflict.dead_letter
    replay = await process(pipeline, role())
    assert replay.event["duplicate"] is True


async def test_concurrent_duplicates_never_run_in_parallel() -> None:
    """A duplicate arriving mid-flight waits and is answered from the first one's result."""
    telnyx = FakeProvider("telnyx")
    telnyx.gate = asyncio.Event()
    pipeline = make(telnyx=telnyx)
    first = asyncio.create_task(process(pipeline, role()))
    second = asyncio.create_task(process(pipeline, role()))
    await asyncio.sleep(0.1)
    assert telnyx.calls == 1
    telnyx.gate.set()
    results = await asyncio.gather(first, second)
    assert telnyx.calls == 1
    assert sorted(r.event["duplicate"] for r in results) == [False, True]


async def test_provider_rejection_is_remembered() -> None:
    """A provider 4xx ends rejected and is not carried out again when redelivered."""
    telnyx = FakeProvider("telnyx", ProviderRejected("provider_not_found", "gone"))
    pipeline = make(telnyx=telnyx)
    first = await process(pipeline, role())
    again = await process(pipeline, role())
    assert (first.status, first.event["error"]["code"], first.event["attempts"]) == (
        "rejected",
        "provider_not_found",
        1,
    )
    assert (again.status, again.event["duplicate"], telnyx.calls) == ("rejected", True, 1)


async def test_failed_command_is_released_and_runs_again() -> None:
    """A command that failed is not remembered: publishing it again carries it out."""
    down = [ProviderUnavailable("provider_unavailable", "503") for _ in range(3)]
    telnyx = FakeProvider("telnyx", *down)
    pipeline = make(telnyx=telnyx)
    failed = await process(pipeline, role())
    assert (failed.status, failed.event["attempts"], failed.dead_letter) == ("failed", 3, True)
    retried = await process(pipeline, role())
    assert (retried.status, retried.event["duplicate"], telnyx.calls) == ("succeeded", False, 4)


async def test_expired_command_is_not_sent_and_released() -> None:
    """A command past expires_at ends expired with 0 attempts, and is forgotten."""
    telnyx = FakeProvider("telnyx")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    pipeline = make(telnyx=telnyx)
    outcome = await process(pipeline, role(expires_at=past))
    assert (outcome.status, outcome.event["error"]["code"], outcome.event["attempts"]) == (
        "expired",
        "expired",
        0,
    )
    assert telnyx.calls == 0
    again = await process(pipeline, role())
    assert again.status == "succeeded"


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b"{}", b"\x00" * 10, b'{"type": null}'])
async def test_hostile_bodies_end_rejected(body: bytes) -> None:
    """Whatever the body, the pipeline returns a rejected outcome rather than raising."""
    outcome = await process(make(), body)
    assert outcome.status == "rejected"
    assert outcome.dead_letter


def at(seconds: int) -> str:
    return datetime(2026, 1, 1, tzinfo=UTC).replace(second=seconds).isoformat()


async def test_older_command_for_a_target_is_superseded() -> None:
    """A command issued before the last one applied to the same call ends rejected/superseded."""
    telnyx = FakeProvider("telnyx")
    pipeline = make(telnyx=telnyx)
    newer = await process(
        pipeline, role(command_id="new", issued_at=at(10), supervisor_role="barge")
    )
    older = await process(pipeline, role(command_id="old", issued_at=at(5)))
    assert newer.status == "succeeded"
    assert (older.status, older.event["error"]["code"], older.dead_letter) == (
        "rejected",
        "superseded",
        True,
    )
    assert telnyx.calls == 1


async def test_staleness_is_shared_through_the_dedup_store() -> None:
    """A worker that never saw the newer command (another process, or after a restart) still
    finds it in the shared store, read with the claim: the older command is superseded."""
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=60))
    telnyx = FakeProvider("telnyx")
    first, second = make(telnyx=telnyx, dedup=store), make(telnyx=telnyx, dedup=store)
    newer = await process(first, role(command_id="new", issued_at=at(10)))
    older = await process(second, role(command_id="old", issued_at=at(5)))
    assert newer.status == "succeeded"
    assert (older.status, older.event["error"]["code"]) == ("rejected", "superseded")
    assert telnyx.calls == 1


async def test_other_targets_are_not_superseded() -> None:
    """Staleness is per target: an older command for another call still runs."""
    pipeline = make()
    await process(pipeline, role(command_id="a", issued_at=at(10)))
    other = await process(
        pipeline, role(command_id="b", issued_at=at(5), call_control_id="v3:other")
    )
    assert other.status == "succeeded"


async def test_same_target_runs_in_arrival_order_one_at_a_time() -> None:
    """Commands for one target run one at a time, in the order they arrived."""
    order: list[str] = []

    class Recording(FakeProvider):
        async def execute(self, command: Any) -> ProviderSuccess:
            order.append(command.command_id)
            await asyncio.sleep(0.01 if command.command_id == "c0" else 0)
            return await super().execute(command)

    pipeline = make(telnyx=Recording("telnyx"))
    ids = [f"c{n}" for n in range(5)]
    await asyncio.gather(*(process(pipeline, role(command_id=i)) for i in ids))
    assert order == ids


async def test_a_delivery_whose_channel_closed_while_waiting_is_not_carried_out() -> None:
    """A command queued behind its target's running one, whose delivery's channel closes
    meanwhile (the broker returned it and redelivers it elsewhere), is not carried out here:
    DeliveryGone, no provider call, no claim left behind."""
    telnyx = FakeProvider("telnyx")
    telnyx.gate = asyncio.Event()
    pipeline = make(telnyx=telnyx)
    channel_open = True
    first = asyncio.create_task(process(pipeline, role(command_id="c0")))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(
        pipeline.process(Delivery(role(command_id="c1"), alive=lambda: channel_open))
    )
    await asyncio.sleep(0.01)
    channel_open = False
    telnyx.gate.set()
    assert (await first).status == "succeeded"
    with pytest.raises(DeliveryGone):
        await second
    assert telnyx.calls == 1
    again = await process(pipeline, role(command_id="c1"))  # the redelivered copy runs
    assert again.status == "succeeded"


async def test_a_delivery_whose_channel_closed_while_waiting_for_its_claim_is_not_carried_out() -> (
    None
):
    """A redelivered copy waiting for the claim that another replica's copy holds, whose own
    channel closes meanwhile, gets the claim only to give it back: DeliveryGone, no provider
    call, the claim free for the copy that is redelivered now."""
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=60))
    failing = FakeProvider("telnyx", *[ProviderUnavailable("telnyx", "down")] * 3)
    failing.gate = asyncio.Event()
    first = asyncio.create_task(process(make(telnyx=failing, dedup=store), role()))
    await asyncio.sleep(0.01)
    waiting = FakeProvider("telnyx")
    channel_open = True
    second = asyncio.create_task(
        make(telnyx=waiting, dedup=store).process(Delivery(role(), alive=lambda: channel_open))
    )
    await asyncio.sleep(0.05)
    channel_open = False
    failing.gate.set()  # the first copy fails and releases the claim
    assert (await first).status == "failed"
    with pytest.raises(DeliveryGone):
        await second
    assert waiting.calls == 0
    again = await process(make(telnyx=waiting, dedup=store), role())
    assert (again.status, waiting.calls) == ("succeeded", 1)


async def test_a_delivery_whose_channel_closed_during_a_backoff_makes_no_further_call() -> None:
    """The channel closes between two attempts: no second call from here, the claim is freed
    and the redelivered copy carries the command out."""
    telnyx = FakeProvider("telnyx", ProviderUnavailable("telnyx", "down"))
    pipeline = make(telnyx=telnyx)
    with pytest.raises(DeliveryGone):
        await pipeline.process(Delivery(role(), alive=lambda: telnyx.calls == 0))
    assert telnyx.calls == 1
    again = await process(pipeline, role())
    assert (again.status, telnyx.calls) == ("succeeded", 2)


async def test_a_retry_overtaken_by_a_newer_command_elsewhere_ends_superseded() -> None:
    """While a command's first call fails, another replica applies a newer command of the same
    target: the retry reads the target's mark again and the older command ends superseded, with
    no second call (it could land after the newer one's)."""
    store = MemoryDedupStore(DedupConfig(url="memory://", lease_s=60))
    now = datetime.now(UTC)
    older = FakeProvider("telnyx", ProviderUnavailable("telnyx", "down"))
    older.gate = asyncio.Event()
    first = asyncio.create_task(
        process(make(telnyx=older, dedup=store), role(command_id="old", issued_at=now.isoformat()))
    )
    await asyncio.sleep(0.01)
    newer = role(command_id="new", issued_at=(now + timedelta(seconds=1)).isoformat())
    assert (await process(make(dedup=store), newer)).status == "succeeded"
    older.gate.set()
    outcome = await first
    assert (outcome.status, outcome.event["error"]["code"]) == ("rejected", "superseded")
    assert older.calls == 1


async def test_long_backoff_defers_and_releases_the_claim() -> None:
    """A Retry-After beyond the inline limit defers the command and frees its command_id."""
    telnyx = FakeProvider("telnyx", ProviderUnavailable("rate_limited", "429", retry_after_s=30))
    pipeline = make(telnyx=telnyx)
    deferred = await process(pipeline, role())
    assert deferred.defer_s == 30
    assert deferred.retry is not None
    assert deferred.retry.attempts == 1
    pipeline.gates = {"telnyx": Gate("telnyx")}  # 30 s later: the Retry-After hold has passed
    back = await pipeline.process(Delivery(role(), deferred.retry))
    assert (back.status, back.event["attempts"]) == ("succeeded", 2)


async def test_a_deferred_command_returning_early_is_deferred_again() -> None:
    """Back before its not-before time (a short delay tier), the command waits again, uncalled."""
    telnyx = FakeProvider("telnyx")
    pipeline = make(telnyx=telnyx)
    outcome = await pipeline.process(
        Delivery(role(), RetryState(attempts=1), not_before=time.time() + 60)
    )
    assert outcome.defer_s is not None
    assert outcome.defer_s > 50
    assert telnyx.calls == 0
