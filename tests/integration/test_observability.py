"""Observability end to end: one trace from publisher to provider to result, /metrics, the
AsyncAPI document and the outcome log lines, against the real RabbitMQ, Redis and the sandbox."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.conftest import (
    Admin,
    Broker,
    Processes,
    WorkerFactory,
    wait_for_workers,
    worker_env,
)
from tests.integration.observing import (
    PAST,
    RecordingProxy,
    captured_logs,
    http_get,
    result_messages,
    role,
    scrape,
    secrets_in,
    span_texts,
    traced_worker,
    traceparent,
    until,
    update,
    value,
)
from worker.contract import schemas as contract
from worker.observability.telemetry import Telemetry
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration

OUTCOME_FIELDS = {
    "command_id",
    "type",
    "status",
    "attempts",
    "error_code",
    "duration_ms",
    "trace_id",
}

# --- (1) one trace ------------------------------------------------------------------------------


async def test_one_trace_from_publisher_to_provider_to_result(
    prefix: str, sandbox: Sandbox, admin: Admin, fixtures: dict[str, Any]
) -> None:
    """The publisher's trace goes on through the worker's spans, the provider call and the result
    event; one client span per attempt; no secret in any span or log line."""
    telemetry = Telemetry.in_memory()
    assert telemetry.exporter is not None
    fx = fixtures
    keys = {"vinix_api_key": fx["vinix"]["api_key"], "telnyx_api_key": fx["telnyx"]["api_key"]}
    async with (
        RecordingProxy(admin.root) as proxy,
        captured_logs() as logs,
        traced_worker(
            prefix,
            sandbox,
            telemetry,
            vinix_base_url=f"{proxy.url}/v2",
            telnyx_base_url=f"{proxy.url}/v2",
            **keys,
        ) as (_, bus),
    ):
        await admin.fault(provider="telnyx", status=503, count=1)
        telnyx_tp, telnyx_trace, publisher_span = traceparent()
        vinix_tp, vinix_trace, _ = traceparent()
        flaky = role(fx)
        await bus.publish(flaky, headers={"traceparent": telnyx_tp, "tracestate": "pub=1"})
        await bus.publish(update(fx), headers={"traceparent": vinix_tp})
        results = await result_messages(bus, 2)
        exporter = telemetry.exporter

        async def commands_ended() -> bool:  # each command span ends just after its ack
            return sum(s.name.startswith("process") for s in exporter.get_finished_spans()) == 2

        await until(commands_ended)
    spans = telemetry.exporter.get_finished_spans()
    trace = [s for s in spans if f"{s.context.trace_id:032x}" == telnyx_trace]
    by_kind: dict[str, list[Any]] = {}
    for span in trace:
        by_kind.setdefault(span.kind.name, []).append(span)
    (command,) = by_kind["CONSUMER"]
    assert command.parent is not None
    assert f"{command.parent.span_id:016x}" == publisher_span
    attributes = command.attributes or {}
    assert attributes["conference_worker.command.id"] == flaky["command_id"]
    assert (
        attributes["conference_worker.command.status"],
        attributes["conference_worker.command.attempts"],
    ) == ("succeeded", 2)
    assert attributes["messaging.system"] == "rabbitmq"
    attempts = by_kind["CLIENT"]
    assert len(attempts) == 2
    assert sorted((a.attributes or {})["http.response.status_code"] for a in attempts) == [200, 503]
    assert set(by_kind) == {"CONSUMER", "CLIENT"}  # dedup and publish are the command's facts
    assert attributes["conference_worker.dedup.outcome"] == "claimed"
    for child in attempts:
        assert child.parent is not None
        assert child.parent.span_id == command.context.span_id

    flaky_result = next(
        m for m in results if orjson.loads(m.body)["command_id"] == flaky["command_id"]
    )
    headers = flaky_result.headers or {}
    assert headers["traceparent"] == f"00-{telnyx_trace}-{command.context.span_id:016x}-01"
    assert headers["tracestate"] == "pub=1"

    sent = [r for r in proxy.requests if "traceparent" in r["headers"]]
    telnyx_sent = [
        r["headers"]["traceparent"]
        for r in sent
        if "/conferences/" in r["path"] and "/accounts/" not in r["path"]
    ]
    assert sorted(telnyx_sent) == sorted(
        f"00-{telnyx_trace}-{a.context.span_id:016x}-01" for a in attempts
    )
    assert any(r["headers"]["traceparent"].split("-")[1] == vinix_trace for r in sent)

    tokens = {
        r["headers"]["X-Auth-Token"] for r in proxy.requests if "X-Auth-Token" in r["headers"]
    }
    assert tokens  # the Vinix token the worker used, as the provider saw it
    secrets = [*keys.values(), *tokens, "guest"]
    lines = logs.getvalue().splitlines()
    assert lines
    assert secrets_in(span_texts(spans), secrets) == []
    assert secrets_in(lines, secrets) == []
    assert secrets_in([str(h) for m in results for h in (m.headers or {}).values()], secrets) == []


# --- (2) metrics ---------------------------------------------------------------------------------


async def test_metrics_count_the_commands_of_a_run(
    worker_factory: WorkerFactory, admin: Admin, fixtures: dict[str, Any]
) -> None:
    """/metrics counts every outcome by type and status, dead letters by code, retries, provider
    latencies and command ages, and shows breakers, readiness and nothing in flight."""
    fx = fixtures
    async with worker_factory() as (service, bus):
        port = service.http_port
        assert (await http_get(port, "/healthz"))[0] == 200
        await admin.fault(provider="telnyx", status=503, count=1)
        ok = role(fx)
        commands = [
            ok,
            update(fx),
            role(fx, supervisor_role="shout"),  # rejected: invalid_command
            update(fx, conference_id="e" * 32),  # rejected: provider_not_found
            role(fx, expires_at=PAST),  # expired
        ]
        for body in commands:
            await bus.publish(body, timestamp=datetime.now(UTC))
        await bus.events(len(commands))
        await bus.publish(ok)  # a duplicate of a finished command
        await bus.events(1)

        async def all_counted() -> dict[Any, float]:  # counted just after the ack
            got = await scrape(port)
            done = sum(v for (n, _), v in got.items() if n == "conference_worker_commands_total")
            return got if done == 6 else {}

        m = await until(all_counted)
    total = "conference_worker_commands_total"
    kind, other = "conference.supervisor_role", "conference.update"
    assert value(m, total, type=kind, status="succeeded") == 2
    assert value(m, total, type=other, status="succeeded") == 1
    assert value(m, total, type=kind, status="rejected") == 1
    assert value(m, total, type=other, status="rejected") == 1
    assert value(m, total, type=kind, status="expired") == 1
    assert value(m, "conference_worker_duplicates_total", type=kind) == 1
    dead = "conference_worker_dead_letters_total"
    for code in ("invalid_command", "provider_not_found", "expired"):
        assert value(m, dead, code=code) == 1
    assert value(m, dead, code="provider_unavailable") == 0
    assert value(m, "conference_worker_retries_total", provider="telnyx", kind="in_process") == 1
    latency = "conference_worker_provider_request_duration_seconds_count"
    assert value(m, latency, provider="telnyx", status_code="503") == 1
    assert value(m, latency, provider="telnyx", status_code="200") == 1
    assert value(m, latency, provider="vinix", status_code="404") == 1
    # Five publishes carry a timestamp; the duplicate has none, and the intake stamps it when it
    # routes it to its partition, so every command's age is observed.
    assert value(m, "conference_worker_command_age_seconds_count") == 6
    assert value(m, "conference_worker_breaker_state", provider="telnyx") == 0
    assert value(m, "conference_worker_ready") == 1
    assert value(m, "conference_worker_inflight") == 0


async def test_asyncapi_document_is_served(worker_factory: WorkerFactory) -> None:
    """GET /asyncapi.yaml serves the AsyncAPI document schemas/ holds (FastStream's, of the app)."""
    async with worker_factory() as (service, _):
        status, text = await http_get(service.http_port, "/asyncapi.yaml")
    assert status == 200
    assert text == contract.render()[contract.ASYNCAPI]


# --- (4) log lines -------------------------------------------------------------------------------


async def test_outcome_log_lines_are_json_with_stable_fields(
    prefix: str, sandbox: Sandbox, broker: Broker, processes: Processes
) -> None:
    """A worker process with CW_LOG_SUCCESSES on writes one JSON line per outcome with the
    stable event names and fields (and every other line is JSON too); no secret appears on
    stderr."""
    fx = sandbox.fixtures
    env = worker_env(prefix, sandbox, log_level="INFO", log_successes=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--grace-s", "5"],
        env=env,
        stderr=subprocess.PIPE,
    )
    processes.started.append(proc)
    await wait_for_workers(broker.channel, broker.settings, 1)
    tp, trace_id, _ = traceparent()
    ok = role(fx)
    exchange = await broker.channel.get_exchange(broker.settings.commands_exchange)
    await exchange.publish(
        aio_pika.Message(orjson.dumps(ok), headers={"traceparent": tp}), ok["type"]
    )
    await broker.publish_all(
        [
            role(fx, supervisor_role="shout"),
            update(fx, conference_id="e" * 32),
            role(fx, expires_at=PAST),
        ]
    )
    await broker.collect(4, timeout_s=30)
    await broker.publish_all([ok])
    await broker.collect(1, timeout_s=30)
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    parsed = [orjson.loads(line) for line in lines]  # every line is one JSON object
    outcomes = [line for line in parsed if line["logger"] == "worker.commands"]
    assert sorted(line["event"] for line in outcomes) == [
        "command.duplicate",
        "command.expired",
        "command.rejected",
        "command.rejected",
        "command.succeeded",
    ]
    for line in outcomes:
        assert set(line) >= OUTCOME_FIELDS, line
        assert line["level"] == "info"
        assert isinstance(line["duration_ms"], float)
    first = next(line for line in outcomes if line["event"] == "command.succeeded")
    assert (first["command_id"], first["attempts"], first["trace_id"]) == (
        ok["command_id"],
        1,
        trace_id,
    )
    codes = sorted(
        str(line["error_code"]) for line in outcomes if line["event"] == "command.rejected"
    )
    assert codes == ["invalid_command", "provider_not_found"]
    secrets = [fx["vinix"]["api_key"], fx["telnyx"]["api_key"], "guest:guest"]
    assert secrets_in(lines, secrets) == []


# --- (5) OTLP export ----------------------------------------------------------------------------


async def test_otlp_over_http_reaches_a_collector() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone sends spans as OTLP protobuf to <endpoint>/v1/traces."""
    posts: list[tuple[str, str, bytes]] = []

    async def collector(request: web.Request) -> web.Response:
        posts.append((request.path, request.content_type, await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collector)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}"
        telemetry = Telemetry.from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
        )
        assert telemetry.tracer is not None
        telemetry.tracer.start_span("probe").end()
        await telemetry.shutdown()  # flushes the batch
    finally:
        await runner.cleanup()
    ((path, content_type, body),) = posts
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["probe"]
