"""Load for the benchmark: realistic commands, fast preloading, paced publishing, result collection.

* :class:`CommandFactory` makes command ``i`` of a run deterministically: even ``i`` are
  ``conference.update`` (replace and merge alternate; Kazoo documents of ~150–500 bytes) on the
  Vinix conferences, odd ``i`` are ``conference.supervisor_role`` on the Telnyx conferences' calls.
  Targets go round robin (Vinix conference ``k``, then Telnyx conference ``k`` / call), so commands
  that are in flight together never queue behind the worker's per-target lock unless more than
  ``3 × conferences`` are in flight.  ``issued_at`` grows with ``i`` (nothing is superseded).
* :func:`preload` publishes many commands with confirms, thousands in flight.
* :class:`PacedPublisher` offers a fixed rate and remembers each command's send time.
* :class:`ResultCollector` counts result events (routing key ``<type>.<status>``) on a queue
  bound to the results exchange, calls hooks at given counts (the runner samples ``/proc``
  there) and computes publish→result latencies from ``correlation_id`` (the command id).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractQueue

UPDATE = "conference.update"
ROLE = "conference.supervisor_role"
ROLES = ("monitor", "whisper", "barge", "none")
SOUNDS = ("tone_stream://%(500,500,440)", "/system_media/conf-muted", "/system_media/conf-unmuted")


@dataclass(frozen=True, slots=True)
class SandboxFixtures:
    """What the commands need from ``GET /__admin/fixtures``."""

    vinix_api_key: str
    account_id: str
    vinix_conferences: tuple[str, ...]
    telnyx_api_key: str
    telnyx_conferences: tuple[str, ...]
    calls: dict[str, tuple[str, str]]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SandboxFixtures:
        vx, tx = doc["vinix"], doc["telnyx"]
        calls = {conf: (pair[0], pair[1]) for conf, pair in tx["calls_by_conference"].items()}
        return cls(
            vinix_api_key=vx["api_key"],
            account_id=vx["account_id"],
            vinix_conferences=tuple(vx["conference_ids"]),
            telnyx_api_key=tx["api_key"],
            telnyx_conferences=tuple(tx["conference_ids"]),
            calls=calls,
        )


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    routing_key: str
    body: bytes


@dataclass(slots=True)
class CommandFactory:
    """Deterministic, realistic commands: ``make(i)`` for ``i`` = 0, 1, 2, ..."""

    fixtures: SandboxFixtures
    id_prefix: str
    issued_base: datetime = field(default_factory=lambda: datetime.now(UTC))

    def make(self, i: int) -> Command:
        command_id = f"{self.id_prefix}-{i:07d}"
        slot = i // 2
        issued = self.issued_base + timedelta(microseconds=i)
        body = (
            self._update(command_id, slot, issued)
            if i % 2 == 0
            else self._role(command_id, slot, issued)
        )
        return Command(command_id, body["type"], orjson.dumps(body))

    def _update(self, command_id: str, slot: int, issued: datetime) -> dict[str, Any]:
        confs = self.fixtures.vinix_conferences
        k = slot % len(confs)
        rnd = slot // len(confs)
        merge = slot % 2 == 1
        body: dict[str, Any] = {
            "command_id": command_id,
            "type": UPDATE,
            "account_id": self.fixtures.account_id,
            "conference_id": confs[k],
            "mode": "merge" if merge else "replace",
            "issued_at": issued.isoformat(),
            "expires_at": (issued + timedelta(minutes=10)).isoformat(),
            "conference": _merge_doc(k, rnd) if merge else _replace_doc(k, rnd),
        }
        return body

    def _role(self, command_id: str, slot: int, issued: datetime) -> dict[str, Any]:
        confs = self.fixtures.telnyx_conferences
        k = slot % len(confs)
        rnd = slot // len(confs)
        conference = confs[k]
        supervisor, agent = self.fixtures.calls[conference]
        call, other = (supervisor, agent) if rnd % 2 == 0 else (agent, supervisor)
        role = ROLES[(slot + rnd) % len(ROLES)]
        body: dict[str, Any] = {
            "command_id": command_id,
            "type": ROLE,
            "conference_id": conference,
            "call_control_id": call,
            "supervisor_role": role,
            "issued_at": issued.isoformat(),
        }
        if role == "whisper":
            body["whisper_call_control_ids"] = [other]
        if slot % 3 == 0:
            body["region"] = "US"
        return body

    def make_many(self, start: int, count: int) -> list[Command]:
        return [self.make(i) for i in range(start, start + count)]


def _replace_doc(k: int, rnd: int) -> dict[str, Any]:
    """A full conference document as a PBX admin UI would save it (~450 bytes)."""
    base = 5_550_000 + k * 10
    return {
        "name": f"Support bridge {k:04d} (rev {rnd})",
        "conference_numbers": [str(base), str(base + 1)],
        "member": {
            "join_muted": rnd % 2 == 0,
            "join_deaf": False,
            "numbers": [str(base + 2)],
            "pins": [f"{(k * 7919 + rnd) % 10000:04d}"],
            "play_entry_prompt": True,
        },
        "moderator": {"join_muted": False, "join_deaf": False, "pins": [f"{k % 10000:04d}99"]},
        "play_name": True,
        "play_welcome": rnd % 3 != 0,
        "play_entry_tone": True,
        "play_exit_tone": SOUNDS[rnd % len(SOUNDS)],
        "max_participants": 10 + (k + rnd) % 40,
        "language": "en-us",
        "profile": {
            "max-members": 10 + (k + rnd) % 40,
            "interval": 20,
            "caller-controls": "default",
            "moh-sound": "local_stream://default",
            "rate": 16000,
        },
        "flags": ["bench", f"team-{k % 17}"],
    }


def _merge_doc(k: int, rnd: int) -> dict[str, Any]:
    """A partial change (~150 bytes): mute on join, a new size, the welcome prompt."""
    return {
        "member": {"join_muted": rnd % 2 == 1},
        "play_welcome": rnd % 2 == 0,
        "max_participants": 12 + (k + rnd) % 30,
        "profile": {"max-members": 12 + (k + rnd) % 30, "interval": 30},
    }


@dataclass(slots=True)
class CommandPublisher:
    """Publishes commands persistent, mandatory, with confirms, on the raw aiormq channel.

    aio-pika's ``Message`` and ``Exchange.publish`` cost the runner about as much CPU as a
    command costs the floor; the runner shares the machine with what it measures.
    """

    channel: aiormq.abc.AbstractChannel
    exchange: str

    @classmethod
    async def open(cls, channel: AbstractChannel, exchange: str) -> CommandPublisher:
        """``channel`` must have been opened with ``publisher_confirms=True``."""
        return cls(await channel.get_underlay_channel(), exchange)

    async def send(self, command: Command) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=command.command_id
        )
        confirmation = await self.channel.basic_publish(
            command.body,
            exchange=self.exchange,
            routing_key=command.routing_key,
            properties=properties,
            mandatory=True,
        )
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise RuntimeError(f"the broker did not take {command.command_id}: {confirmation!r}")


async def preload(
    publisher: CommandPublisher, commands: Sequence[Command], *, window: int = 2000
) -> float:
    """Publish ``commands`` with confirms, ``window`` unconfirmed at a time; returns msg/s."""
    started = time.perf_counter()
    for offset in range(0, len(commands), window):
        chunk = commands[offset : offset + window]
        await asyncio.gather(*(publisher.send(c) for c in chunk))
    elapsed = time.perf_counter() - started
    return len(commands) / elapsed if elapsed > 0 else float("inf")


Hook = Callable[[int], None]


@dataclass(slots=True)
class ResultCollector:
    """Counts result events arriving on ``queue`` (consumed with auto-ack, no JSON parsing)."""

    hooks: dict[int, Hook] = field(default_factory=dict)
    count: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    first_at: float | None = None
    last_at: float | None = None
    sent_at: dict[str, float] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)
    _done: dict[int, asyncio.Event] = field(default_factory=dict)
    _tag: str | None = None
    _channel: aiormq.abc.AbstractChannel | None = None

    async def start(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        """Consume ``queue`` on the raw aiormq channel (cheaper than aio-pika's messages)."""
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=2000)
        ok = await raw.basic_consume(queue.name, self._on_message, no_ack=True)
        self._channel, self._tag = raw, ok.consumer_tag

    async def stop(self) -> None:
        if self._channel is not None and self._tag is not None and not self._channel.is_closed:
            await self._channel.basic_cancel(self._tag)
        self._tag = None

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        now = time.perf_counter()
        self.count += 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        key = message.routing_key or ""
        self.statuses[key.rsplit(".", 1)[-1]] += 1
        if self.sent_at:
            cid = message.header.properties.correlation_id
            sent = self.sent_at.pop(cid, None) if cid else None
            if sent is not None:
                self.latencies.append((sent, now - sent))
        hook = self.hooks.get(self.count)
        if hook is not None:
            hook(self.count)
        event = self._done.get(self.count)
        if event is not None:
            event.set()

    async def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` events have arrived; False on timeout."""
        if self.count >= count:
            return True
        event = self._done.setdefault(count, asyncio.Event())
        if self.count >= count:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return True


@dataclass(slots=True)
class PacedPublisher:
    """Offers ``rate`` commands per second, each stamped in ``collector.sent_at`` when sent."""

    publisher: CommandPublisher
    factory: CommandFactory
    collector: ResultCollector
    rate: float
    tick_s: float = 0.002
    max_unconfirmed: int = 5000
    sent: int = 0
    lag_max_s: float = 0.0
    confirms: list[float] = field(default_factory=list)  # publish→confirm, seconds
    _pending: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self, duration_s: float) -> float:
        """Publish for ``duration_s`` (again and again: numbering goes on); returns the rate."""
        first = self.sent
        total = first + int(self.rate * duration_s)
        start = time.perf_counter()
        next_wake = start
        while self.sent < total:
            now = time.perf_counter()
            self.lag_max_s = max(self.lag_max_s, now - next_wake)
            due = min(total, first + int((now - start) * self.rate) + 1)
            while self.sent < due:
                command = self.factory.make(self.sent)
                self.sent += 1
                sent_at = self.collector.sent_at[command.command_id] = time.perf_counter()
                task = asyncio.create_task(self._send(command, sent_at))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            if len(self._pending) > self.max_unconfirmed:
                raise RuntimeError("the broker does not confirm publishes fast enough")
            next_wake += self.tick_s
            await asyncio.sleep(max(0.0, next_wake - time.perf_counter()))
        elapsed = time.perf_counter() - start
        if self._pending:
            await asyncio.gather(*self._pending)
        return (self.sent - first) / elapsed if elapsed > 0 else 0.0

    async def _send(self, command: Command, sent_at: float) -> None:
        """Publish; record how long the broker took to confirm (its own share of the latency:
        a quorum queue confirms, and delivers, only once the command is on disk)."""
        await self.publisher.send(command)
        self.confirms.append(time.perf_counter() - sent_at)


def percentiles(values: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` (in the values' unit), keyed ``p50`` etc."""
    if not values:
        return {f"p{p:g}": float("nan") for p in points}
    ordered = sorted(values)
    out: dict[str, float] = {}
    for p in points:
        rank = max(1, min(len(ordered), math.ceil(p / 100.0 * len(ordered))))
        out[f"p{p:g}"] = ordered[rank - 1]
    return out
