"""The console's pure parts: dead-letter keys and groups, redaction, the token check, ages, the
worker's metrics as the live panel reads them, and the request checks (aiohttp's test client,
nothing else running)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.test_dlq import letter
from worker.console import live, snapshot
from worker.console.jobs import Job, Jobs
from worker.console.server import TOKEN_HEADER, Console, age, token_ok
from worker.settings import Settings


def test_key_ignores_the_brokers_redelivery_count_and_names_content() -> None:
    """A dead letter keeps its key across browses (x-delivery-count aside); content changes it."""
    base = letter(headers={"x-error-code": "expired", "x-delivery-count": 1})
    again = letter(headers={"x-error-code": "expired", "x-delivery-count": 4})
    other = letter(headers={"x-error-code": "expired"}, body=b'{"command_id": "c-2"}')
    assert snapshot.key_of(base) == snapshot.key_of(again)
    assert snapshot.key_of(base) != snapshot.key_of(other)


def test_groups_by_code_and_type_largest_first_and_filters() -> None:
    """Groups count and age their dead letters; matching filters by code, type and id text."""
    letters = [letter(command_id=f"a-{i}", body=b"%d" % i) for i in range(3)]
    letters.append(letter(command_id="b-1", code="expired", body=b"x"))
    taken = snapshot.Snapshot(snapshot.entries_of(letters, None), letters[0].failed_at)  # type: ignore[arg-type]
    groups = taken.groups()
    assert [(g.code, g.count) for g in groups] == [("provider_not_found", 3), ("expired", 1)]
    assert groups[0].oldest_s is not None
    assert [e.letter.command_id for e in taken.matching(code="expired")] == ["b-1"]
    assert len(taken.matching(text="a-")) == 3
    assert taken.find(groups[1].keys[0]) is not None


def test_secret_looking_headers_are_masked_and_the_trace_id_read() -> None:
    """Authorization, tokens, passwords and keys never reach the page; traceparent gives the id."""
    shown = snapshot.shown({"Authorization": "Bearer x", "api_key": "k", "x-error-code": "e"})
    assert shown == {
        "Authorization": snapshot.REDACTED,
        "api_key": snapshot.REDACTED,
        "x-error-code": "e",
    }
    assert snapshot.trace_id({"traceparent": "00-4bf92f35-00f067aa-01"}) == "4bf92f35"
    assert snapshot.trace_id({}) == ""


def test_token_check_and_ages() -> None:
    """No token configured or given: refused; ages read as s, m, h, d."""
    assert token_ok("s3cret", "s3cret")
    assert not token_ok("s3cret", "nope")
    assert not token_ok(None, "s3cret")
    assert not token_ok("s3cret", None)
    assert [age(5), age(120), age(7200), age(172800), age(None)] == ["5s", "2m", "2h", "2d", ""]


def test_worker_metrics_as_the_live_panel_reads_them() -> None:
    """In flight, breakers by provider and results by status, from the Prometheus text."""
    text = (
        "conference_worker_inflight 3.0\n"
        'conference_worker_breaker_state{provider="telnyx"} 2.0\n'
        'conference_worker_commands_total{type="conference.update",status="succeeded"} 5.0\n'
        'conference_worker_commands_total{type="unknown",status="succeeded"} 2.0\n'
    )
    assert live.read_metrics(text) == {
        "inflight": 3,
        "breakers": {"telnyx": "open"},
        "commands": {"succeeded": 7},
    }


@pytest.fixture
async def client() -> Any:
    """The console's app with a job runner that records what it was asked (no broker)."""
    console = Console(Settings(console_token="s3cret"))
    started: list[tuple[str, list[str]]] = []

    class Recording(Jobs):
        def start(self, kind: Any, keys: Any) -> Any:
            started.append((kind, list(keys)))
            return Job(1, kind, len(keys))

    console.jobs = Recording(None, "dead", "commands", None, 1024)  # type: ignore[arg-type]
    async with TestClient(TestServer(console.app())) as test_client:
        test_client.started = started  # type: ignore[attr-defined]
        yield test_client


async def test_changes_need_the_token_a_json_body_and_the_same_origin(client: Any) -> None:
    """Without the token, with a wrong one, as a form or from another origin: 403, nothing done."""
    good = {TOKEN_HEADER: "s3cret"}
    refused = [
        await client.post("/api/replay", json={"keys": ["k"]}),
        await client.post("/api/purge", json={"keys": ["k"]}, headers={TOKEN_HEADER: "x"}),
        await client.post("/api/replay", data={"keys": "k"}, headers=good),
        await client.post(
            "/api/replay", json={"keys": ["k"]}, headers={**good, "Origin": "https://evil"}
        ),
    ]
    assert [answer.status for answer in refused] == [403, 403, 403, 403]
    assert client.started == []
    answer = await client.post("/api/replay", json={"keys": ["k"]}, headers=good)
    assert answer.status == 202
    assert client.started == [("replay", ["k"])]


async def test_requests_for_another_host_are_refused(client: Any) -> None:
    """A Host other than the console's own address is refused (no DNS rebinding)."""
    answer = await client.get("/api/jobs/1", headers={"Host": "evil.example"})
    assert answer.status == 421
    refused = await client.post("/api/replay", json={"keys": ["k"]})
    assert "frame-ancestors 'none'" in refused.headers["Content-Security-Policy"]
