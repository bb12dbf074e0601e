"""The dead letters as the console shows them: each with a key, its stored outcome, and grouped.

A snapshot browses the dead-letter queue (:func:`worker.operators.dlq.browse`) on a channel of its
own and closes it at once, so every dead letter goes back (as ``dlq list`` does).  A dead letter
has no id of its own; its **key** is a hash of its body, properties and headers (the broker's
redelivery count aside), so that the page can name a selection and a later browse can find the
same messages again.  Two identical copies share a key, and an action on it takes both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractConnection

from worker.dedup import OutcomeStore
from worker.operators import dlq
from worker.operators.dlq import DeadLetter
from worker.operators.dlq_outcomes import Outlook, outlooks

#: Header names whose values the page never shows.
SECRET_NAME = re.compile(r"auth|token|secret|passw|api[-_]?key|cookie", re.IGNORECASE)
REDACTED = "••••••"


def key_of(letter: DeadLetter) -> str:
    """A short, stable name for a dead letter (its content, not its place in the queue)."""
    headers = {k: v for k, v in letter.headers.items() if k not in dlq.BROKER_HEADERS}
    described = repr((sorted(headers.items()), sorted(letter.properties.items())))
    digest = hashlib.blake2b(letter.body + b"\0" + described.encode(), digest_size=10)
    return digest.hexdigest()


def trace_id(headers: Mapping[str, Any]) -> str:
    """The trace id of the command's W3C ``traceparent`` header ('' when none)."""
    value = headers.get("traceparent")
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
    parts = text.split("-")
    return parts[1] if len(parts) >= 4 else ""


def shown(values: Mapping[str, Any]) -> dict[str, str]:
    """Headers or properties as text for the page, secret-looking ones redacted."""
    return {
        name: REDACTED if SECRET_NAME.search(name) else _text(value)
        for name, value in values.items()
    }


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return value if isinstance(value, str) else repr(value)


def body_text(body: bytes) -> str:
    """Pretty JSON when the body is JSON, else the ``repr`` of the bytes."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(body)


@dataclass(frozen=True, slots=True)
class Entry:
    """One dead letter on the page."""

    key: str
    letter: DeadLetter
    look: Outlook | None  # None: the dedup store could not be asked

    @property
    def age_s(self) -> float | None:
        failed = self.letter.failed_at
        return None if failed is None else (datetime.now(UTC) - failed).total_seconds()

    @property
    def trace_id(self) -> str:
        return trace_id(self.letter.headers)


@dataclass(frozen=True, slots=True)
class Group:
    """The dead letters of one error code and type."""

    code: str
    type: str
    keys: tuple[str, ...]
    oldest_s: float | None
    newest_s: float | None

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every dead letter ready when it was taken."""

    entries: tuple[Entry, ...]
    taken_at: datetime

    def groups(self) -> list[Group]:
        """By error code and type, largest first."""
        found: dict[tuple[str, str], list[Entry]] = {}
        for entry in self.entries:
            name = (entry.letter.code or "no code", entry.letter.type or "unknown")
            found.setdefault(name, []).append(entry)
        groups = [_group(code, kind, entries) for (code, kind), entries in found.items()]
        return sorted(groups, key=lambda g: (-g.count, g.code, g.type))

    def matching(self, code: str = "", kind: str = "", text: str = "") -> list[Entry]:
        """The entries of ``code`` and ``kind`` (when given) whose command id contains ``text``."""
        return [
            e
            for e in self.entries
            if (not code or (e.letter.code or "no code") == code)
            and (not kind or (e.letter.type or "unknown") == kind)
            and (not text or text in e.letter.command_id)
        ]

    def find(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)


def _group(code: str, kind: str, entries: list[Entry]) -> Group:
    ages = [age for e in entries if (age := e.age_s) is not None]
    keys = tuple(dict.fromkeys(e.key for e in entries))
    return Group(code, kind, keys, max(ages, default=None), min(ages, default=None))


def entries_of(letters: Iterable[DeadLetter], looks: list[Outlook] | None) -> tuple[Entry, ...]:
    """Entries for ``letters`` (with their outlooks, when known)."""
    return tuple(
        Entry(key_of(letter), letter, None if looks is None else looks[index])
        for index, letter in enumerate(letters)
    )


async def take(
    connection: AbstractConnection,
    queue_name: str,
    store: OutcomeStore | None,
    max_body_bytes: int,
) -> Snapshot:
    """Browse the dead-letter queue, give everything back, ask the store about each."""
    channel = await connection.channel()
    async with channel:
        held = await dlq.browse(channel, queue_name, idle_s=1.0)
    letters = [item.letter for item in held]
    looks = None if store is None else await outlooks(store, letters, max_body_bytes)
    return Snapshot(entries_of(letters, looks), datetime.now(UTC))
