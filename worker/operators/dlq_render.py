"""The command-line side of ``conference-worker dlq``: reading options (durations, rates, ids),
pacing (a token bucket), output (rich tables, JSON lines, the progress bar) and the glue that
opens one connection per command around the operations of :mod:`worker.operators.dlq`.

Each command uses one channel with publisher confirms and closes it at the end: the dead letters
it browsed but did not remove go back to the queue then.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import click
import orjson
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import AMQPError
from rich.console import Console, Group, RenderableType
from rich.pretty import Pretty
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from worker.errors import StoreUnavailable
from worker.operators import dlq
from worker.operators.dlq import DeadLetter, DeadLetterError, Filter
from worker.operators.dlq_outcomes import (
    FATES,
    Outlook,
    Reopener,
    fates_by_code,
    looks_of,
    open_store,
)
from worker.settings import DedupConfig, Settings

T = TypeVar("T")
PLAIN_PROGRESS_EVERY_S = 5.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``, or a sum like ``1h30m``."""
    cleaned = text.strip().lower()
    if not _DURATION.fullmatch(cleaned):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 2h, 1d or 1h30m)")
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(cleaned))
    return timedelta(seconds=seconds)


def parse_rate(text: str) -> float:
    """Messages per second from ``500``, ``500/s``, ``600/m`` or ``3600/h``."""
    found = _RATE.fullmatch(text.strip().lower())
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"not a rate: {text!r} (use e.g. 500/s or 600/m)")
    return float(found.group(1)) / _SECONDS[found.group(2) or "s"]


def _option(options: Mapping[str, object], name: str, parser: Callable[[str], T]) -> T | None:
    value = options.get(name)
    if value is None:
        return None
    try:
        return parser(str(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{name.replace('_', '-')}") from None


def filter_from(options: Mapping[str, object]) -> Filter:
    """The :class:`Filter` of the ``--type --code --older-than --newer-than --ids`` options."""
    ids = options.get("ids")
    return Filter(
        type=_option(options, "command_type", str),
        code=_option(options, "code", str),
        older_than=_option(options, "older_than", parse_duration),
        newer_than=_option(options, "newer_than", parse_duration),
        ids=None if ids is None else frozenset(filter(None, map(str.strip, str(ids).split(",")))),
    )


def rate_from(value: str | None) -> float | None:
    """The ``--rate`` option in messages per second."""
    return _option({"rate": value}, "rate", parse_rate)


@dataclass(slots=True)
class TokenBucket:
    """Reservations at ``rate`` per second, ``burst`` at most at once.

    :meth:`reserve` always takes a token (the balance may go negative) and says how long to wait
    before using it, so the waits add up to the rate exactly, whatever the sleep granularity.
    """

    rate: float
    burst: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(init=False)
    _stamp: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._tokens = self.burst
        self._stamp = self.clock()

    def reserve(self) -> float:
        """Take one token; the seconds to wait before using it (0 when one was there)."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - 1
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def when(moment: datetime | None) -> str:
    """A UTC time to the second, or empty."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else ""


def summary(letter: DeadLetter, look: Outlook | None = None) -> dict[str, Any]:
    """One dead letter as a JSON object (``dlq list --json`` prints one per line)."""
    return {
        "stored": look.stored if look else None,
        "replay": look.fate if look else None,
        "command_id": letter.command_id or None,
        "type": letter.type or None,
        "code": letter.code or None,
        "error": letter.error or None,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at.isoformat() if letter.failed_at else None,
        "routing_key": letter.routing_key,
        "replay_count": letter.replay_count,
    }


def letters_table(
    letters: list[DeadLetter], title: str, looks: list[Outlook] | None = None
) -> Table:
    """The ``dlq list`` table (with the stored outcome of each command when ``looks``)."""
    table = Table(title=title, title_justify="left")
    table.add_column("command id", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("error code", overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("failed at", no_wrap=True)
    table.add_column("routing key", overflow="fold")
    table.add_column("stored outcome", overflow="fold")
    for index, letter in enumerate(letters):
        attempts = "" if letter.attempts is None else str(letter.attempts)
        table.add_row(
            letter.command_id,
            letter.type,
            letter.code,
            attempts,
            when(letter.failed_at),
            letter.routing_key,
            looks[index].stored if looks else "?",
        )
    return table


def dry_run_table(letters: list[DeadLetter], looks: list[Outlook], title: str) -> Table:
    """``dlq replay --dry-run``: per error code, what a replay would do with its dead letters."""
    table = Table(title=title, title_justify="left")
    table.add_column("error code", overflow="fold")
    for fate in FATES:
        table.add_column(fate, justify="right")
    for code, fates in sorted(fates_by_code(letters, looks).items()):
        table.add_row(code, *(str(fates[fate]) for fate in FATES))
    return table


def body_text(body: bytes) -> str:
    """Pretty JSON when the body is JSON, else the ``repr`` of the bytes."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(body)


def _mapping_table(title: str, values: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("name", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in values.items():
        table.add_row(name, value if isinstance(value, str) else Pretty(value))
    return table


def letter_details(
    letter: DeadLetter, index: int, count: int, look: Outlook | None = None
) -> RenderableType:
    """Everything about one dead letter, for ``dlq show``."""
    stored = f"stored outcome: {look.stored}; a replay: {look.fate}" if look else ""
    return Group(
        Text(f"dead letter {index} of {count}: {letter.code or 'no code'}", style="bold"),
        Text(stored or "stored outcome: unknown (the dedup store is not reachable from here)"),
        _mapping_table("properties", {"routing_key": letter.routing_key, **letter.properties}),
        _mapping_table("headers", letter.headers),
        Text("body", style="bold"),
        Text(body_text(letter.body)),
    )


class RateColumn(ProgressColumn):
    """Messages per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("–/s" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


class RichProgress:
    """The replay progress bar; also a plain line every few seconds when not on a terminal."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._clock = clock
        self._bar = Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("replay", total=None)
        self._last_line = 0.0

    def start(self, total: int) -> None:
        self._bar.update(self._task, total=total)
        self._last_line = self._clock()
        self._bar.start()

    def advance(self) -> None:
        self._bar.advance(self._task)
        now = self._clock()
        if not self._console.is_interactive and now - self._last_line >= PLAIN_PROGRESS_EVERY_S:
            self._last_line = now
            task = self._bar.tasks[0]
            done, total, speed = task.completed, task.total or 0, task.speed or 0
            self._console.print(f"replayed {done:.0f}/{total:.0f} ({speed:,.0f}/s)")

    def stop(self) -> None:
        self._bar.stop()


@dataclass(frozen=True, slots=True)
class Target:
    """Where the dead letters are and where replayed commands go."""

    amqp_url: str
    dead_queue: str
    commands_exchange: str
    dedup: DedupConfig | None = None  # the workers' dedup store (None: not consulted)
    max_body_bytes: int = 256 * 1024


def target_from(settings: Settings) -> Target:
    """The broker, the names of the dead-letter queue and the commands exchange, the store."""
    url = settings.amqp_url.get_secret_value()
    return Target(
        url,
        settings.dead_queue,
        settings.commands_exchange,
        settings.dedup(),
        settings.max_body_bytes,
    )


def replay_summary(report: dlq.ReplayReport) -> str:
    """The line printed when a replay ends (interrupted or not)."""
    rate = report.replayed / report.elapsed_s if report.elapsed_s > 0 else 0.0
    line = (
        f"replayed {report.replayed} of {report.matched} in {report.elapsed_s:.1f} s "
        f"({rate:,.0f}/s); {report.remaining} remain"
    )
    if report.refused:
        line += f"; {report.refused} could not be published (see dlq show) and stay dead"
    return line


def confirm_purge(yes: bool) -> Callable[[list[DeadLetter]], bool]:
    """The question ``dlq purge`` asks (unless ``--yes``), with the count per error code."""

    def confirm(letters: list[DeadLetter]) -> bool:
        codes = Counter(letter.code or "no code" for letter in letters)
        detail = ", ".join(f"{code}: {count}" for code, count in codes.most_common())
        question = f"Remove {len(letters)} dead letter(s) ({detail}) for good?"
        return yes or click.confirm(question, err=True)

    return confirm


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run one operation; broker problems become one-line errors (never showing the URL)."""
    try:
        return asyncio.run(work)
    except DeadLetterError as exc:
        raise click.ClickException(str(exc)) from None
    except StoreUnavailable as exc:
        raise click.ClickException(f"dedup store: {exc}") from None
    except (AMQPError, OSError) as exc:
        raise click.ClickException(f"RabbitMQ: {type(exc).__name__}: {exc}") from None


@contextlib.asynccontextmanager
async def open_channel(target: Target) -> AsyncIterator[AbstractChannel]:
    """A channel with publisher confirms; closing it returns every dead letter not removed."""
    connection = await aio_pika.connect(
        target.amqp_url, client_properties={"connection_name": "conference-worker dlq"}
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        async with channel:
            yield channel


async def list_letters(
    target: Target, flt: Filter, limit: int | None
) -> tuple[list[DeadLetter], int]:
    """The matching dead letters (at most ``limit``), and how many the queue held."""
    async with open_channel(target) as channel:
        held = await dlq.browse(channel, target.dead_queue)
        return [item.letter for item in dlq.select(held, flt, limit)], len(held)


async def list_looked(
    target: Target, flt: Filter, limit: int | None
) -> tuple[list[DeadLetter], list[Outlook] | None, int]:
    """:func:`list_letters`, with the stored outcome of each (None: no store to ask)."""
    letters, total = await list_letters(target, flt, limit)
    return letters, await looks_of(target.dedup, letters, target.max_body_bytes), total


async def purge(
    target: Target, flt: Filter, limit: int | None, confirm: Callable[[list[DeadLetter]], bool]
) -> tuple[int, int]:
    """Remove the matching dead letters if ``confirm`` agrees: (matched, removed).

    ``confirm`` runs in a thread, so the connection keeps its heartbeats while the user thinks.
    """
    async with open_channel(target) as channel:
        chosen = dlq.select(await dlq.browse(channel, target.dead_queue), flt, limit)
        if not chosen or not await asyncio.to_thread(confirm, [c.letter for c in chosen]):
            return len(chosen), 0
        for item in chosen:
            await item.message.ack()
        return len(chosen), len(chosen)


async def replay(
    target: Target,
    flt: Filter,
    limit: int | None,
    *,
    rate: float | None,
    in_flight: int,
    console: Console,
) -> tuple[dlq.ReplayReport, Reopener | None]:
    """Replay with a progress bar, reopening each command in the dedup store first (when the
    target names one); SIGINT/SIGTERM finish the messages in hand, then stop."""
    stop = asyncio.Event()
    pace = TokenBucket(rate, burst=max(1.0, rate / 50)).reserve if rate else None
    with _stop_on_signals(stop):
        async with (
            open_store(target.dedup, required=True) as store,
            open_channel(target) as channel,
        ):
            reopener = None if store is None else Reopener(store, target.max_body_bytes)
            report = await dlq.replay(
                channel,
                target.dead_queue,
                target.commands_exchange,
                flt,
                limit=limit,
                pace=pace,
                in_flight=in_flight,
                stop=stop,
                progress=RichProgress(console),
                prepare=reopener,
            )
            return report, reopener


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
