"""Dead-letter tooling without a broker: parsing, filters, options, header cleaning, pacing and
the replay loop's order of publish, confirm and ack."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import click
import orjson
import pytest
from aiormq import spec
from aiormq.exceptions import DeliveryError
from rich.console import Console

from worker.app import settle as consumer
from worker.operators import dlq, dlq_render
from worker.operators.dlq import DeadLetter, Filter, Held
from worker.operators.dlq_render import TokenBucket, filter_from, parse_duration, parse_rate

FAILED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
COMMAND = {"command_id": "c-1", "type": "conference.update", "conference_id": "x"}
OUR_HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-error-code": "provider_not_found",
    "x-error-message": "no such conference",
    "x-attempts": 1,
    "x-original-routing-key": "conference.update",
    "x-failed-at": FAILED_AT.isoformat(),
}
DEATH = {
    "count": 1,
    "reason": "delivery_limit",
    "queue": "conference-worker.commands",
    "time": FAILED_AT,
    "exchange": "conference.commands",
    "routing-keys": ["conference.supervisor_role"],
}
# What RabbitMQ 3.10 puts on a message a quorum queue dead-letters at its delivery limit.
BROKER_HEADERS = {
    "traceparent": "00-abc",
    "x-death": [DEATH],
    "x-delivery-count": 0,
    "x-first-death-exchange": "conference.commands",
    "x-first-death-queue": "conference-worker.commands",
    "x-first-death-reason": "delivery_limit",
}


def letter(**fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "command_id": "c-1",
        "type": "conference.update",
        "code": "provider_not_found",
        "error": "",
        "attempts": 1,
        "failed_at": FAILED_AT,
        "routing_key": "conference.update",
        "body": b"{}",
    }
    values.update(fields)
    return DeadLetter(**values)


def test_parse_reads_the_worker_headers_and_the_body() -> None:
    """A worker dead letter: code, message, attempts, time and routing key from our headers."""
    got = dlq.parse(orjson.dumps(COMMAND), OUR_HEADERS, "ignored", {"correlation_id": "k"})
    assert (got.command_id, got.type) == ("c-1", "conference.update")
    assert (got.code, got.error, got.attempts) == ("provider_not_found", "no such conference", 1)
    assert (got.failed_at, got.routing_key) == (FAILED_AT, "conference.update")
    assert got.properties == {"correlation_id": "k"}
    assert (got.replay_count, got.replayed_at) == (0, None)


def test_parse_reads_a_broker_dead_letter_from_x_death() -> None:
    """No x-error-code: the newest x-death entry gives the code, the time and the routing key."""
    body = orjson.dumps({**COMMAND, "type": "conference.supervisor_role"})
    got = dlq.parse(body, BROKER_HEADERS, "conference.supervisor_role")
    assert got.code == "delivery_limit"
    assert got.failed_at == FAILED_AT
    assert got.routing_key == "conference.supervisor_role"
    assert (got.attempts, got.error) == (None, "")


def test_parse_falls_back_to_first_death_reason_and_the_delivery_routing_key() -> None:
    """Without x-death entries, x-first-death-reason and the message's own routing key serve."""
    got = dlq.parse(b"{}", {"x-first-death-reason": b"rejected"}, "conference.update")
    assert (got.code, got.routing_key, got.failed_at) == ("rejected", "conference.update", None)


def test_our_headers_win_over_x_death() -> None:
    """A message with both: the worker's code, time and routing key are the ones shown."""
    headers = {**BROKER_HEADERS, **OUR_HEADERS}
    got = dlq.parse(orjson.dumps(COMMAND), headers, "x")
    assert (got.code, got.routing_key) == ("provider_not_found", "conference.update")


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"command_id": 7, "type": null}', b""])
def test_unreadable_bodies_give_empty_id_and_type(body: bytes) -> None:
    """Command id and type come from a JSON object body only; otherwise they are empty."""
    got = dlq.parse(body, {"x-error-code": "invalid_json"}, "conference.update")
    assert (got.command_id, got.type, got.code) == ("", "", "invalid_json")


def test_times_without_offset_are_utc_and_bad_times_are_unknown() -> None:
    """A naive x-failed-at is read as UTC; one that is not a time leaves failed_at unknown."""
    naive = dlq.parse(b"{}", {"x-failed-at": "2024-05-01T12:00:00"}, None)
    assert naive.failed_at == FAILED_AT
    assert dlq.parse(b"{}", {"x-failed-at": "yesterday"}, None).failed_at is None
    assert dlq.parse(b"{}", {"x-attempts": "many"}, None).attempts is None


def test_parse_reads_earlier_replays() -> None:
    """x-replay-count and x-replayed-at of a command that was replayed before are kept."""
    headers = {"x-replay-count": 2, "x-replayed-at": FAILED_AT.isoformat()}
    got = dlq.parse(b"{}", headers, None)
    assert (got.replay_count, got.replayed_at) == (2, FAILED_AT)


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Filter(), True),
        (Filter(type="conference.update"), True),
        (Filter(type="conference.supervisor_role"), False),
        (Filter(code="provider_not_found"), True),
        (Filter(code="expired"), False),
        (Filter(ids=frozenset({"c-1", "c-2"})), True),
        (Filter(ids=frozenset({"c-2"})), False),
        (Filter(older_than=timedelta(minutes=10), now=FAILED_AT + timedelta(hours=1)), True),
        (Filter(older_than=timedelta(hours=2), now=FAILED_AT + timedelta(hours=1)), False),
        (Filter(newer_than=timedelta(hours=2), now=FAILED_AT + timedelta(hours=1)), True),
        (Filter(newer_than=timedelta(minutes=10), now=FAILED_AT + timedelta(hours=1)), False),
        (Filter(type="conference.update", code="expired"), False),
    ],
)
def test_filter_matches_every_field_that_is_set(flt: Filter, expected: bool) -> None:
    """Type, code, ids and age (from failed_at to the filter's now) must all match."""
    assert flt.matches(letter()) is expected


def test_age_filters_never_match_an_unknown_time() -> None:
    """A dead letter without a failure time matches no --older-than / --newer-than filter."""
    assert not Filter(older_than=timedelta(0)).matches(letter(failed_at=None))
    assert not Filter(newer_than=timedelta(days=999)).matches(letter(failed_at=None))
    assert Filter(code="provider_not_found").matches(letter(failed_at=None))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), (" 1.5M ", 90)],
)
def test_durations_are_parsed(text: str, seconds: float) -> None:
    """s, m, h and d, alone or summed, with decimals; case and spaces around do not matter."""
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "10x", "m", "-5m", "1h 30m", "10 m"])
def test_bad_durations_are_refused(text: str) -> None:
    """Anything but number-unit pairs is a ValueError (so the CLI reports a bad option)."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "per_s"), [("500", 500), ("500/s", 500), ("600/m", 10), ("3600/h", 1), ("0.5/s", 0.5)]
)
def test_rates_are_parsed_per_second(text: str, per_s: float) -> None:
    """--rate N, N/s, N/m and N/h all become messages per second."""
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["0", "0/s", "fast", "5/d", "-1/s"])
def test_bad_rates_are_refused(text: str) -> None:
    """A rate must be positive, per second, minute or hour."""
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_filter_from_cli_options() -> None:
    """The CLI options become a Filter: durations parsed, ids split on commas, blanks dropped."""
    flt = filter_from(
        {"command_type": "conference.update", "older_than": "10m", "ids": " a, b,,c ", "code": None}
    )
    assert (flt.type, flt.code, flt.older_than) == (
        "conference.update",
        None,
        timedelta(minutes=10),
    )
    assert (flt.newer_than, flt.ids) == (None, frozenset({"a", "b", "c"}))


def test_filter_from_reports_the_bad_option() -> None:
    """A bad duration is a click.BadParameter naming the option."""
    with pytest.raises(click.BadParameter) as caught:
        filter_from({"newer_than": "soon"})
    assert caught.value.param_hint == "--newer-than"


def test_replay_headers_drop_dead_letter_headers_and_count_the_replay() -> None:
    """Ours and the broker's x-death/x-first-death-*/x-last-death-* go; the trace stays."""
    now = datetime(2024, 5, 2, tzinfo=UTC)
    headers = {**OUR_HEADERS, **BROKER_HEADERS, "x-last-death-reason": "delivery_limit"}
    got = dlq.replay_headers(headers, now)
    assert got == {
        "traceparent": "00-abc",
        "x-replayed-at": "2024-05-02T00:00:00+00:00",
        "x-replay-count": 1,
    }
    assert dlq.replay_headers({"x-replay-count": 2}, now)["x-replay-count"] == 3


def test_replay_drops_the_workers_retry_headers() -> None:
    """A command back from a delay queue carries cw-* retry state; its replay starts afresh."""
    headers = {"cw-attempts": 3, "cw-routing-key": "conference.update", "traceparent": "00-a"}
    got = dlq.replay_headers(headers, FAILED_AT)
    assert set(got) == {"traceparent", "x-replayed-at", "x-replay-count"}


def test_a_delayed_retry_dead_lettered_by_the_broker_keeps_its_routing_key() -> None:
    """A retry back from a delay queue: its cw-routing-key, not the queue name, is replayed to."""
    headers = {
        **BROKER_HEADERS,
        "cw-routing-key": "conference.update",
        "x-death": [{**DEATH, "routing-keys": ["w.commands"]}],
    }
    got = dlq.parse(orjson.dumps(COMMAND), headers, "w.commands")
    assert (got.code, got.routing_key) == ("delivery_limit", "conference.update")


def test_header_names_agree_with_the_consumer() -> None:
    """The dead-letter and retry header names here are the ones worker.app.settle writes."""
    assert consumer.H_ROUTING_KEY == dlq.CARRIED_ROUTING_KEY
    assert all(name.startswith(dlq.RETRY_PREFIX) for name in consumer.RETRY_HEADERS)


def test_replay_message_keeps_body_and_properties_and_is_persistent() -> None:
    """The replayed command is the original: body, correlation id, reply_to, message id, type."""
    props = {"content_type": "application/json", "correlation_id": "k", "reply_to": "q"}
    original = dlq.parse(orjson.dumps(COMMAND), OUR_HEADERS, "x", {**props, "message_id": "m"})
    message = dlq.replay_message(original, FAILED_AT)
    assert message.body == orjson.dumps(COMMAND)
    assert (message.content_type, message.correlation_id) == ("application/json", "k")
    assert (message.reply_to, message.message_id) == ("q", "m")
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["x-replay-count"] == 1
    assert "x-error-code" not in message.headers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_spends_its_burst_then_spaces_reservations() -> None:
    """Rate 10/s, burst 2: two at once, then waits of 0.1 s, 0.2 s... as the debt grows."""
    clock = Clock()
    bucket = TokenBucket(10, burst=2, clock=clock)
    waits = [bucket.reserve() for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2])


def test_token_bucket_refills_with_time_up_to_its_burst() -> None:
    """Tokens come back at the rate, but never more than the burst accumulates."""
    clock = Clock()
    bucket = TokenBucket(10, burst=2, clock=clock)
    assert [bucket.reserve() for _ in range(2)] == [0.0, 0.0]
    clock.now += 0.1
    assert [bucket.reserve(), bucket.reserve()] == pytest.approx([0.0, 0.1], abs=1e-9)
    clock.now += 60
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])


def test_token_bucket_holds_the_rate_over_many_reservations() -> None:
    """Honouring every wait, N reservations take (N - burst) / rate seconds."""
    clock = Clock()
    bucket = TokenBucket(500, burst=50, clock=clock)
    start = clock.now
    for _ in range(5000):
        clock.now += bucket.reserve()
    assert clock.now - start == pytest.approx((5000 - 50) / 500)


def test_token_bucket_refuses_nonsense() -> None:
    """Rate must be positive and the burst at least one token."""
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(5, burst=0.5)


class Journal:
    """Records publishes and acks in order; fakes an exchange, messages and a progress bar."""

    def __init__(
        self, refuse: frozenset[str] = frozenset(), unencodable: frozenset[str] = frozenset()
    ) -> None:
        self.events: list[tuple[str, str]] = []
        self.started: list[str] = []
        self.refuse, self.unencodable = refuse, unencodable
        self.gate: asyncio.Event | None = None
        self.publishing = asyncio.Event()
        self.totals: list[int] = []
        self.on_advance: Any = None

    async def publish(self, message: aio_pika.Message, routing_key: str, mandatory: bool) -> None:
        assert mandatory
        name = orjson.loads(message.body)["command_id"]
        self.started.append(name)
        self.publishing.set()
        if self.gate is not None:
            await self.gate.wait()
        if name in self.refuse:
            raise DeliveryError(None, spec.Basic.Nack(delivery_tag=1))
        if name in self.unencodable:
            raise TypeError("Unknown type: <class 'bytes'>")
        self.events.append(("publish", name))

    def held(self, *names: str) -> list[Held]:
        return [
            Held(
                letter(command_id=name, body=orjson.dumps({"command_id": name})),
                cast(Any, Ack(self, name)),
            )
            for name in names
        ]

    def start(self, total: int) -> None:
        self.totals.append(total)

    def advance(self) -> None:
        if self.on_advance is not None:
            self.on_advance()

    def stop(self) -> None:
        self.totals.append(-1)


class Ack:
    def __init__(self, journal: Journal, name: str) -> None:
        self.journal, self.name = journal, name

    async def ack(self) -> None:
        self.journal.events.append(("ack", self.name))


async def test_replay_publishes_and_confirms_before_it_acks_each_dead_letter() -> None:
    """One at a time: publish (confirmed), then ack, then the next; progress starts and stops."""
    journal = Journal()
    report = await dlq.replay_held(
        cast(Any, journal), journal.held("a", "b"), None, stop=asyncio.Event(), progress=journal
    )
    assert journal.events == [("publish", "a"), ("ack", "a"), ("publish", "b"), ("ack", "b")]
    assert (report.matched, report.replayed, report.remaining, report.interrupted) == (
        2,
        2,
        0,
        False,
    )
    assert journal.totals == [2, -1]


async def test_a_refused_publish_leaves_the_dead_letter_unacked() -> None:
    """A nacked, unroutable or unencodable publish is refused: that dead letter stays, others go."""
    journal = Journal(refuse=frozenset({"b"}), unencodable=frozenset({"c"}))
    report = await dlq.replay_held(
        cast(Any, journal),
        journal.held("a", "b", "c", "d"),
        None,
        stop=asyncio.Event(),
        progress=journal,
    )
    assert [name for kind, name in journal.events if kind == "ack"] == ["a", "d"]
    assert (report.replayed, report.refused, report.remaining) == (2, 2, 2)


async def test_stop_ends_the_replay_after_the_message_in_hand() -> None:
    """Setting stop mid-run: the current message completes, the rest stay; interrupted."""
    journal, stop = Journal(), asyncio.Event()
    journal.on_advance = stop.set
    report = await dlq.replay_held(
        cast(Any, journal), journal.held("a", "b", "c"), None, stop=stop, progress=journal
    )
    assert journal.events == [("publish", "a"), ("ack", "a")]
    assert (report.replayed, report.remaining, report.interrupted) == (1, 2, True)


async def test_stop_interrupts_a_pacing_wait() -> None:
    """A long token-bucket wait does not delay Ctrl-C: the run stops at once."""
    journal, stop = Journal(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    async with asyncio.timeout(2):
        report = await dlq.replay_held(
            cast(Any, journal), journal.held("a"), lambda: 60.0, stop=stop, progress=journal
        )
    assert (report.replayed, report.interrupted, journal.events) == (0, True, [])


async def test_cancelling_mid_publish_still_acks_the_message_in_hand() -> None:
    """The publish + ack pair is shielded: cancelled during the publish, it completes first."""
    journal = Journal()
    journal.gate = asyncio.Event()
    task = asyncio.create_task(
        dlq.replay_held(
            cast(Any, journal), journal.held("a", "b"), None, stop=asyncio.Event(), progress=journal
        )
    )
    await journal.publishing.wait()
    task.cancel()
    await asyncio.sleep(0.01)
    journal.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert journal.events == [("publish", "a"), ("ack", "a")]


async def test_pairs_in_flight_overlap_but_each_ack_follows_its_own_confirm() -> None:
    """in_flight=3: three publishes overlap, a fourth waits; each ack follows its own confirm."""
    journal = Journal()
    journal.gate = asyncio.Event()
    task = asyncio.create_task(
        dlq.replay_held(
            cast(Any, journal),
            journal.held("a", "b", "c", "d"),
            None,
            stop=asyncio.Event(),
            progress=journal,
            in_flight=3,
        )
    )
    await asyncio.sleep(0.05)
    assert (journal.started, journal.events) == (["a", "b", "c"], [])
    journal.gate.set()
    report = await task
    for name in "abcd":
        assert journal.events.index(("publish", name)) < journal.events.index(("ack", name))
    assert (report.replayed, report.interrupted) == (4, False)


async def test_stop_with_pairs_in_flight_finishes_all_of_them() -> None:
    """Ctrl-C while three pairs are in flight: all three complete (acked), nothing new starts."""
    journal, stop = Journal(), asyncio.Event()
    journal.gate, journal.on_advance = asyncio.Event(), stop.set
    task = asyncio.create_task(
        dlq.replay_held(
            cast(Any, journal),
            journal.held("a", "b", "c", "d", "e"),
            None,
            stop=stop,
            progress=journal,
            in_flight=3,
        )
    )
    await journal.publishing.wait()
    await asyncio.sleep(0.01)
    journal.gate.set()
    report = await task
    assert sorted(name for kind, name in journal.events if kind == "ack") == ["a", "b", "c"]
    assert (report.replayed, report.remaining, report.interrupted) == (3, 2, True)


def test_select_keeps_queue_order_and_the_limit() -> None:
    """Matching dead letters in queue order, at most --limit of them."""
    journal = Journal()
    held = journal.held("a", "b", "c")
    chosen = dlq.select(held, Filter(ids=frozenset({"a", "c"})), limit=None)
    assert [item.letter.command_id for item in chosen] == ["a", "c"]
    assert len(dlq.select(held, Filter(), limit=2)) == 2


def test_select_skips_what_this_run_replayed_already() -> None:
    """A dead letter replayed since the run began (it failed again) is not replayed again."""
    run_began = datetime.now(UTC)
    held = [
        Held(letter(command_id="old", replayed_at=run_began - timedelta(hours=1)), cast(Any, None)),
        Held(letter(command_id="again", replayed_at=run_began), cast(Any, None)),
        Held(letter(command_id="never"), cast(Any, None)),
    ]
    chosen = dlq.select(held, Filter(), since=run_began)
    assert [item.letter.command_id for item in chosen] == ["old", "never"]


def test_plain_progress_lines_when_not_on_a_terminal() -> None:
    """Without a terminal the progress bar also prints 'replayed N/T (R/s)' every few seconds."""
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, force_terminal=False, force_interactive=False, width=100)
    progress = dlq_render.RichProgress(console, clock=clock)
    progress.start(10)
    for _ in range(4):
        clock.now += 2
        progress.advance()
    progress.stop()
    text = out.getvalue()
    assert "replayed 3/10" in text
    assert "4/10" in text  # the bar's final render


def test_summary_and_replay_line() -> None:
    """--json objects carry the table's fields; the final line says replayed, total, remain."""
    assert dlq_render.summary(letter(error="gone")) == {
        "stored": None,
        "replay": None,
        "command_id": "c-1",
        "type": "conference.update",
        "code": "provider_not_found",
        "error": "gone",
        "attempts": 1,
        "failed_at": "2024-05-01T12:00:00+00:00",
        "routing_key": "conference.update",
        "replay_count": 0,
    }
    report = dlq.ReplayReport(matched=10, replayed=4, refused=1, interrupted=True, elapsed_s=2.0)
    line = dlq_render.replay_summary(report)
    assert line == (
        "replayed 4 of 10 in 2.0 s (2/s); 6 remain; "
        "1 could not be published (see dlq show) and stay dead"
    )


def test_show_renders_json_pretty_and_other_bodies_as_bytes() -> None:
    """dlq show prints a JSON body indented, anything else as the repr of its bytes."""
    assert dlq_render.body_text(b'{"a":1}') == '{\n  "a": 1\n}'
    assert dlq_render.body_text(b"\xff oops") == "b'\\xff oops'"
