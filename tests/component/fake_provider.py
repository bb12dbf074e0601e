"""What the fake provider APIs of the provider-client component tests have in common.

:class:`FakeProvider` is a small aiohttp.web handler: it records every call, waits ``delay_s``,
answers a refused call with the provider's refusal, then the next scripted answer if a test queued
one, else the provider's own success.  A subclass says what a refusal and a success look like.
:func:`serving` runs one on a free local port and sets its ``url`` (``http://127.0.0.1:port/v2``).
"""

from __future__ import annotations

import abc
import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from worker.errors import WorkerError

Scripted = tuple[int, Any, dict[str, str]]
"""A scripted answer: status, JSON payload (``None`` for ``null``), headers."""


@dataclass
class Seen:
    """One call as the fake received it."""

    method: str
    raw_path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeProvider(abc.ABC):
    """Records calls in ``seen``; answers refusal, else ``answers`` in order, else success."""

    answers: deque[Scripted] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    delay_s: float = 0.0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        await asyncio.sleep(self.delay_s)
        refusal = self.refuse(request)
        if refusal is not None:
            return refusal
        if self.answers:
            status, payload, headers = self.answers.popleft()
            return web.Response(status=status, body=orjson.dumps(payload), headers=headers)
        return self.success(request, body)

    @abc.abstractmethod
    def refuse(self, request: web.Request) -> web.Response | None:
        """The answer to a call without valid credentials; None when they are valid."""

    @abc.abstractmethod
    def success(self, request: web.Request, body: Any) -> web.Response:
        """The answer to an authorized call when no scripted answer is queued."""


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; None when it has none."""
    return orjson.loads(await request.read() or b"null")


FakeT = TypeVar("FakeT", bound=FakeProvider)


@asynccontextmanager
async def serving(fake: FakeT) -> AsyncIterator[FakeT]:
    """``fake`` listening on a free local port, its ``url`` set, until the block ends."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app)
    await server.start_server()
    fake.url = str(server.make_url("/v2"))
    try:
        yield fake
    finally:
        await server.close()


def refused_url() -> str:
    """A base URL (``.../v2``) on a local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v2"


def all_text(error: WorkerError) -> str:
    """Everything of ``error`` that could reach a log or an event, as one string."""
    details = orjson.dumps(error.details).decode()
    return " ".join([str(error), repr(error), error.message, details, *map(str, error.args)])
