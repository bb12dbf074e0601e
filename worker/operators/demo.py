"""``conference-worker demo``: the whole path, end to end, on the local RabbitMQ and the sandbox.

It starts the sandbox and a worker on a topology of its own (names prefixed ``demo-<id>.``, so a
running worker is not disturbed), publishes commands that reach every status, a duplicate and a
conflict, prints the result events as a table, checks each against what was expected, and removes
what it declared.  Exit status 0 means every result was as expected.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from worker.app import topology
from worker.app.service import Service
from worker.sandbox import Sandbox
from worker.settings import Settings

console = Console(width=140) if not Console().is_terminal else Console()


@dataclass(frozen=True, slots=True)
class Case:
    """One command of the demo and the result it must get."""

    label: str
    routing_key: str
    body: bytes
    command_id: str
    expect_status: str
    expect_code: str | None = None
    expect_duplicate: bool = False


def _cmd(label: str, expect: str, code: str | None = None, **fields: Any) -> Case:
    body = orjson.dumps(fields)
    return Case(label, str(fields.get("type")), body, str(fields["command_id"]), expect, code)


def _cases(fx: dict[str, Any], run: str) -> tuple[list[Case], list[Case]]:
    """The commands of both phases (the second needs the first's results)."""
    vx, tx = fx["vinix"], fx["telnyx"]
    acct, confs = vx["account_id"], vx["conference_ids"]
    tconf, calls = tx["conference_ids"], tx["calls_by_conference"]

    def role_in(n: int) -> dict[str, Any]:
        conference = tconf[n % len(tconf)]
        return {
            "type": "conference.supervisor_role",
            "conference_id": conference,
            "call_control_id": calls[conference][0],
        }

    update = {"type": "conference.update", "account_id": acct}
    replace = {
        **update,
        "command_id": f"{run}-replace",
        "conference_id": confs[0],
        "conference": {"name": "Support bridge", "profile": {"max-members": 10}},
    }
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    first = [
        _cmd("update (replace)", "succeeded", **replace),
        _cmd(
            "update (merge)",
            "succeeded",
            **update,
            command_id=f"{run}-merge",
            mode="merge",
            conference_id=confs[1],
            conference={"play_name": True, "member": {"join_muted": False}},
        ),
        _cmd(
            "supervisor role: whisper",
            "succeeded",
            **role_in(0),
            command_id=f"{run}-whisper",
            supervisor_role="whisper",
            whisper_call_control_ids=calls[tconf[0]][1:],
        ),
        _cmd(
            "provider 503 twice, then ok",
            "succeeded",
            **role_in(1),
            command_id=f"{run}-flaky",
            supervisor_role="monitor",
        ),
        _cmd(
            "schema violation",
            "rejected",
            "invalid_command",
            **update,
            command_id=f"{run}-bad",
            conference_id=confs[0],
            conference={"profile": {"interval": 5}},
        ),
        _cmd(
            "unknown type",
            "rejected",
            "unknown_type",
            type="conference.delete",
            command_id=f"{run}-type",
        ),
        _cmd(
            "unknown conference (404)",
            "rejected",
            "provider_not_found",
            **update,
            command_id=f"{run}-404",
            conference_id="f" * 32,
            conference={"name": "Ghost"},
        ),
        _cmd(
            "deadline passed",
            "expired",
            "expired",
            **role_in(0),
            command_id=f"{run}-late",
            supervisor_role="barge",
            expires_at=past,
        ),
        _cmd(
            "provider down past the budget",
            "failed",
            "provider_unavailable",
            **role_in(2),
            command_id=f"{run}-down",
            supervisor_role="none",
        ),
        Case("not JSON", "conference.update", b"{not json", "", "rejected", "invalid_json"),
    ]
    conflict = {**replace, "conference": {"name": "Another name"}}
    second = [
        Case(
            "same command again",
            "conference.update",
            orjson.dumps(replace),
            replace["command_id"],
            "succeeded",
            expect_duplicate=True,
        ),
        _cmd("same id, other payload", "rejected", "idempotency_conflict", **conflict),
    ]
    return first, second


async def _faults(sandbox: Sandbox, fx: dict[str, Any]) -> None:
    tconf = fx["telnyx"]["conference_ids"]
    base = sandbox.base_url.removesuffix("/v2")
    faults = [
        {
            "provider": "telnyx",
            "status": 503,
            "count": 2,
            "path_prefix": f"/v2/conferences/{tconf[1 % len(tconf)]}/",
        },
        {
            "provider": "telnyx",
            "status": 503,
            "path_prefix": f"/v2/conferences/{tconf[2 % len(tconf)]}/",
        },
    ]
    async with aiohttp.ClientSession() as http:
        for fault in faults:
            async with http.post(f"{base}/__admin/faults", json=fault) as answer:
                answer.raise_for_status()


async def _collect(
    queue: aio_pika.abc.AbstractQueue, want: int, timeout_s: float
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s), queue.iterator() as messages:
        async for message in messages:
            async with message.process():
                events.append(orjson.loads(message.body))
            if len(events) >= want:
                break
    return events


Row = tuple[Case, dict[str, Any] | None, bool]


def _matches(case: Case, event: dict[str, Any]) -> bool:
    return (
        event["status"] == case.expect_status
        and (event.get("error") or {}).get("code") == case.expect_code
        and bool(event.get("duplicate")) == case.expect_duplicate
    )


def _check(cases: list[Case], events: list[dict[str, Any]]) -> list[Row]:
    """Pair each case with its result event and say whether it is the one expected."""
    pool = list(events)
    rows: list[Row] = []
    for case in cases:
        mine = [e for e in pool if e.get("command_id") == (case.command_id or None)]
        event = next((e for e in mine if _matches(case, e)), mine[0] if mine else None)
        if event is not None:
            pool.remove(event)
        rows.append((case, event, event is not None and _matches(case, event)))
    return rows


def _table(rows: list[Row]) -> Table:
    table = Table(title="Result events", header_style="bold")
    for column in (
        "case",
        "command_id",
        "status",
        "duplicate",
        "attempts",
        "error code",
        "provider",
        "ok",
    ):
        table.add_column(column, no_wrap=True)
    colours = {"succeeded": "green", "rejected": "red", "failed": "magenta", "expired": "yellow"}
    for case, event, ok in rows:
        if event is None:
            table.add_row(case.label, case.command_id, "[red]missing", "", "", "", "", "✗")
            continue
        provider = event.get("provider") or {}
        status = event["status"]
        table.add_row(
            case.label,
            str(event.get("command_id")),
            f"[{colours[status]}]{status}",
            str(event.get("duplicate")).lower(),
            str(event.get("attempts")),
            (event.get("error") or {}).get("code") or "",
            f"{provider.get('name', '')} {provider.get('status_code') or ''}".strip(),
            "[green]✓" if ok else "[red]✗",
        )
    return table


async def main(*, keep: bool = False) -> int:
    """Run the demo; 0 when every result event is what was expected."""
    run = f"demo-{uuid.uuid4().hex[:8]}"
    state = Path(tempfile.mkdtemp(prefix="cw-demo-"))
    settings = Settings(
        commands_exchange=f"{run}.commands",
        commands_queue=f"{run}.worker.commands",
        results_exchange=f"{run}.results",
        dead_exchange=f"{run}.dead",
        dead_queue=f"{run}.worker.dead",
        dedup_url=f"sqlite:///{state}/dedup.sqlite3",
        http_port=0,
        retry_max_attempts=3,
        retry_base_delay_s=0.05,
        retry_budget_s=5.0,
        vinix_base_url=None,
        telnyx_base_url=None,
    )
    broker = urlsplit(settings.amqp_url.get_secret_value())
    console.print(
        f"[bold]conference-worker demo[/] {run}: RabbitMQ at "
        f"{broker.hostname}:{broker.port or 5672}, the sandbox and a worker in this process"
    )
    async with Sandbox() as sandbox, Service(settings, sandbox=sandbox, grace_s=5.0):
        fx = sandbox.fixtures
        await _faults(sandbox, fx)
        first, second = _cases(fx, run)
        rows = await _publish_and_collect(settings, first, second)
        expected_dead = sum(1 for case in first + second if case.expect_status != "succeeded")
        dead = await _dead_count(settings, expected_dead)
    console.print(_table(rows))
    console.print(
        f"dead-letter queue {settings.dead_queue}: {dead} message(s) (expected {expected_dead})"
    )
    if not keep:
        await _cleanup(settings)
    ok = all(row[2] for row in rows) and dead == expected_dead
    console.print("[bold green]demo passed" if ok else "[bold red]demo FAILED")
    return 0 if ok else 1


async def _publish_and_collect(
    settings: Settings, first: list[Case], second: list[Case]
) -> list[Any]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(settings.results_exchange, "#")
        exchange = await channel.get_exchange(settings.commands_exchange)
        events: list[dict[str, Any]] = []
        for phase in (first, second):
            for case in phase:
                await exchange.publish(
                    aio_pika.Message(
                        case.body,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    case.routing_key,
                )
            events += await _collect(results, len(phase), timeout_s=60)
    return _check(first + second, events)


async def _dead_count(settings: Settings, expected: int) -> int:
    """Messages in the dead-letter queue, once they are all there (or after 5 s)."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    count = 0
    async with connection:
        channel = await connection.channel()
        for _ in range(50):
            queue = await channel.declare_queue(settings.dead_queue, passive=True)
            count = queue.declaration_result.message_count or 0
            if count >= expected:
                break
            await asyncio.sleep(0.1)
    return count


async def _cleanup(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        await topology.delete(await connection.channel(), settings.topology())
