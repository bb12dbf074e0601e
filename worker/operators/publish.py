"""Publishing commands from a file or stdin: everything is validated before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson

from worker.contract import codec
from worker.errors import InvalidMessage


@dataclass(frozen=True, slots=True)
class Invalid:
    """One command of the input that did not validate, and why."""

    index: int
    command_id: str | None
    code: str
    message: str


class InvalidInput(Exception):
    """The input holds commands that are not valid; nothing was published."""

    def __init__(self, problems: list[Invalid]) -> None:
        super().__init__(f"{len(problems)} invalid command(s); nothing was published")
        self.problems = problems


def split_input(text: bytes) -> list[Any]:
    """The commands in ``text``: one JSON object, a JSON array of them, or JSON lines."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return [orjson.loads(line) for line in lines]
        except orjson.JSONDecodeError as exc:
            raise InvalidInput([Invalid(0, None, "invalid_json", str(exc))]) from None
    return parsed if isinstance(parsed, list) else [parsed]


def validate(items: list[Any], max_bytes: int) -> list[tuple[str, bytes]]:
    """``(routing key, body)`` for every item, or :class:`InvalidInput` listing every problem."""
    ready: list[tuple[str, bytes]] = []
    problems: list[Invalid] = []
    for index, item in enumerate(items):
        body = orjson.dumps(item)
        try:
            command = codec.decode(body, max_bytes)
        except InvalidMessage as exc:
            ident = codec.identity(body, max_bytes)
            problems.append(Invalid(index, ident.command_id, exc.code, exc.message))
            continue
        ready.append((command.type, body))
    if problems:
        raise InvalidInput(problems)
    return ready


async def publish(
    amqp_url: str,
    exchange: str,
    messages: list[tuple[str, bytes]],
    *,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> int:
    """Publish persistent, publisher-confirmed messages; returns how many were confirmed."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=True)
        for routing_key, body in messages:
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=reply_to,
                correlation_id=correlation_id,
            )
            await target.publish(message, routing_key, mandatory=True)
        return len(messages)
    finally:
        await connection.close()
