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
    """Consume commands until SIGTERM/SIGINT (uses the sandbox for unconfigured providers)."""
    from worker import app, log

    settings = _settings()
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
    from worker import publish as pub

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
    from worker import demo as demo_module

    sys.exit(asyncio.run(demo_module.main(keep=keep)))


@main.command()
@click.option("--check", is_flag=True, help="Exit 1 if schemas/ is not what the models generate.")
@click.option("--directory", default="schemas", show_default=True, type=click.Path(path_type=Path))
def schemas(check: bool, directory: Path) -> None:
    """Generate the JSON Schemas and the AsyncAPI document from the message models."""
    from worker import contract

    if check:
        stale = contract.stale(directory)
        if stale:
            raise click.ClickException(f"stale: {', '.join(stale)}; run: conference-worker schemas")
        click.echo("schemas are current")
        return
    for path in contract.write(directory):
        click.echo(f"wrote {path}")
