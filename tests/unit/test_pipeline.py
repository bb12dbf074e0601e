"""The pipeline, with no I/O: a memory dedup store and scripted providers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from worker.dedup.memory import MemoryDedupStore
from worker.errors import ProviderAnswer, ProviderName, ProviderRejected, ProviderUnavailable
from worker.pipeline import Pipeline
from worker.providers import ProviderSuccess
from worker.retry import Retrier
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


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def make(vinix: FakeProvider | None = None, telnyx: FakeProvider | None = None) -> Pipeline:
    return Pipeline(
        providers={
            "vinix": vinix or FakeProvider("vinix"),
            "telnyx": telnyx or FakeProvider("telnyx"),
        },
        dedup=MemoryDedupStore(DedupConfig(url="memory://", lease_s=60)),
        retrier=Retrier(RetryPolicy(max_attempts=3), sleep=no_sleep),
        max_body_bytes=LIMIT,
    )


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
    outcome = await make().process(role())
    assert outcome.status == "succeeded"
    assert outcome.routing_key == "conference.supervisor_role.succeeded"
    assert not outcome.dead_letter
    event = outcome.event
    assert (event["attempts"], event["duplicate"], event["data"]) == (1, False, {"result": "ok"})
    assert event["provider"] == {"name": "telnyx", "status_code": 200, "request_id": "req-1"}


async def test_invalid_message_is_rejected_without_a_provider_call() -> None:
    """A schema violation ends rejected/invalid_command, dead-lettered, with 0 attempts."""
    telnyx = FakeProvider("telnyx")
    outcome = await make(telnyx=telnyx).process(role(supervisor_role="shout"))
    assert (outcome.status, outcome.event["error"]["code"], outcome.dead_letter) == (
        "rejected",
        "invalid_command",
        True,
    )
    assert outcome.event["command_id"] == "r-1"
    assert telnyx.calls == 0


async def test_unreadable_type_routes_as_unknown() -> None:
    """A message whose type cannot be read is answered on unknown.rejected."""
    outcome = await make().process(b"{oops")
    assert outcome.routing_key == "unknown.rejected"
    assert outcome.event["command_id"] is None


async def test_duplicate_after_success_is_replayed_without_calling() -> None:
    """The same command again is answered from the store with duplicate: true and 0 attempts."""
    telnyx = FakeProvider("telnyx")
    pipeline = make(telnyx=telnyx)
    first = await pipeline.process(role())
    again = await pipeline.process(role(issued_at="2026-01-01T00:00:00Z"))
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
    await pipeline.process(role())
    conflict = await pipeline.process(role(supervisor_role="barge"))
    assert (conflict.status, conflict.event["error"]["code"]) == (
        "rejected",
        "idempotency_conflict",
    )
    assert conflict.dead_letter
    replay = await pipeline.process(role())
    assert replay.event["duplicate"] is True


async def test_concurrent_duplicates_never_run_in_parallel() -> None:
    """A duplicate arriving mid-flight waits and is answered from the first one's result."""
    telnyx = FakeProvider("telnyx")
    telnyx.gate = asyncio.Event()
    pipeline = make(telnyx=telnyx)
    first = asyncio.create_task(pipeline.process(role()))
    second = asyncio.create_task(pipeline.process(role()))
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
    first = await pipeline.process(role())
    again = await pipeline.process(role())
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
    failed = await pipeline.process(role())
    assert (failed.status, failed.event["attempts"], failed.dead_letter) == ("failed", 3, True)
    retried = await pipeline.process(role())
    assert (retried.status, retried.event["duplicate"], telnyx.calls) == ("succeeded", False, 4)


async def test_expired_command_is_not_sent_and_released() -> None:
    """A command past expires_at ends expired with 0 attempts, and is forgotten."""
    telnyx = FakeProvider("telnyx")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    pipeline = make(telnyx=telnyx)
    outcome = await pipeline.process(role(expires_at=past))
    assert (outcome.status, outcome.event["error"]["code"], outcome.event["attempts"]) == (
        "expired",
        "expired",
        0,
    )
    assert telnyx.calls == 0
    again = await pipeline.process(role())
    assert again.status == "succeeded"


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b"{}", b"\x00" * 10, b'{"type": null}'])
async def test_hostile_bodies_end_rejected(body: bytes) -> None:
    """Whatever the body, the pipeline returns a rejected outcome rather than raising."""
    outcome = await make().process(body)
    assert outcome.status == "rejected"
    assert outcome.dead_letter
