"""Helpers of the scale-out tests: named worker replicas, who is active on which queue, and the
per-target order check over the sandbox's request log.

A replica is a ``worker run`` process named by ``CW_INSTANCE_NAME``; the broker knows it by its
connection name (``conference-worker/<name>``), so ``ops.bench.brokerctl.active_replicas`` can
say which replica is the single active consumer of each partition.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson

from ops.bench.brokerctl import took_over
from tests.integration.conftest import Admin, Processes, workers_consume
from worker.settings import Settings

ROLES = ("barge", "monitor", "none", "whisper")
Target = tuple[str, str]  # (conference_id, call_control_id)


@dataclass
class Replicas:
    """Named worker processes on one topology."""

    processes: Processes
    env: dict[str, str]
    settings: Settings
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0

    def spawn(self, **env_extra: str) -> str:
        """Start one more replica (``env_extra``: variables of its own, e.g. ``CW_HTTP_PORT``)."""
        self.started += 1
        name = f"replica-{self.started}"
        env = {**self.env, **env_extra, "CW_INSTANCE_NAME": name}
        self.running[name] = self.processes.spawn(env, "--grace-s", "10")
        return name

    async def wait_consuming(self) -> None:
        """Until every running replica consumes every command queue."""
        await workers_consume(self.settings, len(self.running))

    def kill(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    async def stop(self, name: str) -> int:
        """SIGTERM (graceful); the exit code."""
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(proc.wait, 60)


async def takeover_s(queue: str, dead: str, timeout_s: float = 30.0) -> float:
    """Seconds until a replica other than ``dead`` is the active consumer of ``queue``."""
    return (await took_over(queue, dead, timeout_s))[0]


@dataclass
class OrderRun:
    """Role changes for several targets, each issued in increasing ``issued_at``; the results."""

    settings: Settings
    results: aio_pika.abc.AbstractQueue
    commands: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def make(self, targets: list[Target], per_target: int) -> None:
        """``per_target`` commands per target, interleaved over the targets (as a contact centre
        would publish them), ``issued_at`` increasing by a millisecond each."""
        run, start = uuid.uuid4().hex[:8], datetime.now(UTC)
        for n in range(per_target):
            for t, (conf, call) in enumerate(targets):
                seq = n * len(targets) + t
                self.commands.append(
                    {
                        "command_id": f"order-{run}-{t}-{n}",
                        "type": "conference.supervisor_role",
                        "issued_at": (start + timedelta(milliseconds=seq)).isoformat(),
                        "conference_id": conf,
                        "call_control_id": call,
                        "supervisor_role": ROLES[n % len(ROLES)],
                    }
                )

    async def publish(
        self, channel: aio_pika.abc.AbstractChannel, start: int = 0, stop: int | None = None
    ) -> None:
        exchange = await channel.get_exchange(self.settings.commands_exchange)
        for command in self.commands[start:stop]:
            message = aio_pika.Message(orjson.dumps(command), delivery_mode=2)
            await exchange.publish(message, command["type"])

    async def drain(self) -> None:
        while (message := await self.results.get(fail=False)) is not None:
            await message.ack()
            event = orjson.loads(message.body)
            self.events[event["command_id"]].append(event)

    async def collect(self, timeout_s: float) -> None:
        """Until every command has a result (then a moment more, for late repeats)."""
        wanted = {c["command_id"] for c in self.commands}
        async with asyncio.timeout(timeout_s):
            while not wanted <= self.events.keys():
                await self.drain()
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await self.drain()

    def lost(self) -> list[str]:
        return [c["command_id"] for c in self.commands if not self.events.get(c["command_id"])]

    def first_results(self) -> dict[str, int]:
        """How many non-duplicate results each command got."""
        return {
            c["command_id"]: sum(1 for e in self.events[c["command_id"]] if not e["duplicate"])
            for c in self.commands
        }

    async def applied_order(self, admin: Admin) -> tuple[dict[Target, list[int]], int]:
        """Per target, the sequence numbers of the commands the provider applied (2xx), in the
        order the provider received them; and how many 2xx requests no result names (a request
        a killed replica made, repeated by the one that took over)."""
        by_request: dict[str, dict[str, Any]] = {}
        index = {c["command_id"]: n for n, c in enumerate(self.commands)}
        for command_id, events in self.events.items():
            for event in events:
                request_id = (event.get("provider") or {}).get("request_id")
                if request_id and not event["duplicate"] and command_id in index:
                    by_request[request_id] = self.commands[index[command_id]]
        order: dict[Target, list[int]] = defaultdict(list)
        unnamed = 0
        for request in await admin.requests():
            if request["provider"] != "telnyx" or request["status"] != 200:
                continue
            command = by_request.get(request["headers"]["x-request-id"])
            if command is None:
                unnamed += 1
                continue
            target = (command["conference_id"], command["call_control_id"])
            order[target].append(index[command["command_id"]])
        return order, unnamed

    def newest(self) -> dict[Target, int]:
        last: dict[Target, int] = {}
        for n, command in enumerate(self.commands):
            last[(command["conference_id"], command["call_control_id"])] = n
        return last


def assert_order_held(order: dict[Target, list[int]], newest: dict[Target, int]) -> None:
    """Per target: never an older command applied after a newer one, and the newest applied last."""
    for target, applied in order.items():
        inversions = [(a, b) for a, b in itertools.pairwise(applied) if b < a]
        assert not inversions, f"{target}: older applied after newer: {inversions[:5]}"
        assert applied[-1] == newest[target], f"{target}: last applied {applied[-1]}"
    assert set(order) == set(newest), "a target had nothing applied"
