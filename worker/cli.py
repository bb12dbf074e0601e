"""``conference-worker``: run the worker, the sandbox, publish commands, the demo, the schemas."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import BinaryIO

import click

from worker.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid settings: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Carry out telephony conference commands from RabbitMQ against Vinix and Telnyx."""


@main.command()
@click.option(
    "--grace-s",
    default=30.0,
    show_default=True,
    help="Time to finish in-flight commands on SIGTERM/SIGINT.",
)
def run(grace_s: float) -> None:
    """Consume commands until SIGTERM/SIGINT (uses the sandbox for unconfigured providers).

    Serves /healthz, /readyz, /metrics and /asyncapi.yaml on CW_HTTP_HOST:CW_HTTP_PORT; traces
    as the OTEL_* variables say (off by default).
    """
    import os

    from worker.app import service as app
    from worker.observability import log, telemetry

    settings = _settings()
    try:
        telemetry.tracing_config(os.environ)
    except ValueError as exc:
        raise click.ClickException(f"invalid tracing settings: {exc}") from None
    log.configure(settings.log_level)
    asyncio.run(app.run(settings, grace_s=grace_s))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option(
    "--conferences", default=3, show_default=True, type=int, help="Demo conferences per provider."
)
@click.option(
    "--latency-ms", default=0.0, show_default=True, type=float, help="Base latency of every answer."
)
def sandbox(host: str, port: int, conferences: int, latency_ms: float) -> None:
    """Serve both provider APIs (Vinix and Telnyx) on one local HTTP server."""
    from worker.sandbox import serve_forever

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(host, port, conferences=conferences, latency_ms=latency_ms))


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--exchange", default=None, help="Default: CW_COMMANDS_EXCHANGE (conference.commands)."
)
@click.option("--reply-to", default=None, help="Queue that should also receive the result events.")
@click.option("--correlation-id", default=None)
def publish(
    source: BinaryIO,
    exchange: str | None,
    reply_to: str | None,
    correlation_id: str | None,
) -> None:
    """Publish command(s) from a JSON file or stdin (an object, an array, or JSON lines).

    Every command is validated first; if any is invalid, nothing is published.
    """
    from worker.operators import publish as pub

    settings = _settings()
    try:
        messages = pub.validate(pub.split_input(source.read()), settings.max_body_bytes)
    except pub.InvalidInput as exc:
        for problem in exc.problems:
            click.echo(
                f"command #{problem.index} ({problem.command_id or 'no command_id'}): "
                f"{problem.code}: {problem.message}",
                err=True,
            )
        raise click.ClickException(str(exc)) from None
    sent = asyncio.run(
        pub.publish(
            settings.amqp_url.get_secret_value(),
            exchange or settings.commands_exchange,
            messages,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )
    )
    click.echo(f"published {sent} command(s), each confirmed by the broker")


@main.command()
@click.option("--keep", is_flag=True, help="Keep the demo's queues and exchanges afterwards.")
def demo(keep: bool) -> None:
    """Run the whole path end to end against the sandbox and print the result events."""
    from worker.operators import demo as demo_module

    sys.exit(asyncio.run(demo_module.main(keep=keep)))


@main.command()
@click.option("--check", is_flag=True, help="Exit 1 if schemas/ is not what the models generate.")
@click.option("--directory", default="schemas", show_default=True, type=click.Path(path_type=Path))
def schemas(check: bool, directory: Path) -> None:
    """Generate the JSON Schemas and the AsyncAPI document from the message models."""
    from worker.contract import schemas as contract

    if check:
        stale = contract.stale(directory)
        if stale:
            raise click.ClickException(f"stale: {', '.join(stale)}; run: conference-worker schemas")
        click.echo("schemas are current")
        return
    for path in contract.write(directory):
        click.echo(f"wrote {path}")


# --- dlq: dead-letter tooling (logic in worker/operators/dlq.py, options and output in
# worker/operators/dlq_render.py)


def _dlq_filters(command: click.decorators.FC) -> click.decorators.FC:
    """--type, --code, --older-than, --newer-than, --ids, --limit."""
    options = [
        click.option("--type", "command_type", help="Command type, e.g. conference.update."),
        click.option("--code", help="Error code, e.g. provider_not_found or delivery_limit."),
        click.option("--older-than", help="Failed longer ago than this: 90s, 10m, 2h, 1d."),
        click.option("--newer-than", help="Failed within this: 90s, 10m, 2h, 1d."),
        click.option("--ids", help="Only these command ids (comma-separated)."),
        click.option("--limit", type=click.IntRange(min=1), help="At most N dead letters."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group()
def dlq() -> None:
    """List, show, replay and purge the dead-letter queue (CW_DEAD_QUEUE).

    Every command holds the dead letters it reads unacknowledged and gives back those it does not
    remove when it ends: nothing is lost, but they may come back in another order.
    """


@dlq.command("list")
@_dlq_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, not a table.")
def dlq_list(as_json: bool, limit: int | None, **filters: str | None) -> None:
    """List dead letters: command id, type, error code, attempts, failed at, routing key, and
    the stored outcome of the command in the dedup store (CW_DEDUP_URL)."""
    import orjson
    from rich.console import Console

    from worker.operators import dlq_render as r

    flt = r.filter_from(filters)
    letters, looks, total = r.run(r.list_looked(r.target_from(_settings()), flt, limit))
    if as_json:
        for index, letter in enumerate(letters):
            look = looks[index] if looks else None
            click.echo(orjson.dumps(r.summary(letter, look)).decode())
    else:
        title = f"{len(letters)} of {total} dead letter(s)"
        Console().print(r.letters_table(letters, title, looks))


@dlq.command("show")
@click.argument("command_id")
def dlq_show(command_id: str) -> None:
    """Body, properties and headers of the dead letter(s) of one command id ('' for those
    whose body has none)."""
    from rich.console import Console

    from worker.operators import dlq_render as r
    from worker.operators.dlq import Filter

    flt = Filter(ids=frozenset({command_id}))
    letters, looks, _ = r.run(r.list_looked(r.target_from(_settings()), flt, None))
    if not letters:
        raise click.ClickException(f"no dead letter with command id {command_id!r}")
    console = Console()
    for index, letter in enumerate(letters, 1):
        look = looks[index - 1] if looks else None
        console.print(r.letter_details(letter, index, len(letters), look))


@dlq.command("replay")
@_dlq_filters
@click.option("--rate", help="At most N per second (a token bucket), e.g. 500/s.")
@click.option(
    "--in-flight",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Publishes awaiting their confirm at once; each dead letter is removed after its own.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only list what would be replayed and, per error code, how many would be carried out "
    "or answered from the store.",
)
def dlq_replay(
    rate: str | None, in_flight: int, dry_run: bool, limit: int | None, **filters: str | None
) -> None:
    """Publish dead letters back to the commands exchange, each confirmed before it is removed.

    Replay means retry: each command's stored outcome in the dedup store (CW_DEDUP_URL) is
    forgotten first unless it succeeded, so rejected, failed and expired commands are carried out
    again; a stored success is answered as a duplicate, without a provider call.

    Ctrl-C finishes the messages in hand (at most --in-flight) and exits 130; run the same
    command again to resume.
    """
    from rich.console import Console

    from worker.operators import dlq_render as r

    flt, per_s, target = r.filter_from(filters), r.rate_from(rate), r.target_from(_settings())
    if dry_run:
        letters, looks, total = r.run(r.list_looked(target, flt, limit))
        title = f"would replay {len(letters)} of {total} dead letter(s)"
        Console().print(r.letters_table(letters, title, looks))
        if looks is not None:
            Console().print(r.dry_run_table(letters, looks, "what the replay would do"))
        return
    console = Console(stderr=True)
    work = r.replay(target, flt, limit, rate=per_s, in_flight=in_flight, console=console)
    report, reopener = r.run(work)
    click.echo(r.replay_summary(report))
    if reopener is not None:
        click.echo(reopener.summary())
    if report.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    if report.refused:
        sys.exit(1)


@dlq.command("purge")
@_dlq_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(yes: bool, limit: int | None, **filters: str | None) -> None:
    """Remove the matching dead letters for good (asks first unless --yes)."""
    from worker.operators import dlq_render as r

    confirm = r.confirm_purge(yes)
    flt = r.filter_from(filters)
    matched, purged = r.run(r.purge(r.target_from(_settings()), flt, limit, confirm))
    if matched and not purged:
        raise click.ClickException("not confirmed; nothing was purged")
    click.echo(f"purged {purged} dead letter(s)")


@main.command()
@click.option("--host", default=None, help="Default: CW_CONSOLE_HOST (127.0.0.1).")
@click.option("--port", default=None, type=int, help="Default: CW_CONSOLE_PORT (8081).")
def console(host: str | None, port: int | None) -> None:
    """Serve the dead-letter console: a web page to inspect, replay and purge dead letters.

    Replays and purges need the token of CW_CONSOLE_TOKEN (without it the page is read-only);
    the live panel reads the worker's /metrics at CW_CONSOLE_WORKER_URL.
    """
    from worker.console.server import serve
    from worker.observability import log

    settings = _settings()
    updates = {"console_host": host, "console_port": port}
    settings = settings.model_copy(update={k: v for k, v in updates.items() if v is not None})
    log.configure(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
