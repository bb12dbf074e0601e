"""Sandbox fixtures: an in-process sandbox on a free port, an HTTP session, small clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import IO, Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from worker.sandbox import Sandbox


@dataclass
class Answer:
    """A sandbox answer: status, headers (case-insensitive), parsed JSON body (None if not JSON)."""

    status: int
    headers: CIMultiDict[str]
    body: Any


@dataclass
class SandboxClient:
    """Raw HTTP access to a running sandbox: providers under ``base``, admin under ``admin``."""

    sandbox: Sandbox
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return self.sandbox.base_url

    @property
    def admin(self) -> str:
        return self.sandbox.base_url.removesuffix("/v2") + "/__admin"

    @property
    def fx(self) -> dict[str, Any]:
        return self.sandbox.fixtures

    async def send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; ``url`` may be relative to the base (``/api_auth``) or absolute."""
        target = url if url.startswith("http") else self.base + url
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if data is not None:
            kwargs["data"] = data
        elif json is not None:
            kwargs["json"] = json
        async with self.http.request(method, URL(target, encoded=True), **kwargs) as r:
            raw = await r.read()
            try:
                body = await r.json(content_type=None) if raw else None
            except ValueError:
                body = None
            return Answer(r.status, CIMultiDict(r.headers), body)

    async def auth(self, api_key: str | None = None) -> Answer:
        """``PUT /v2/api_auth`` with the demo key (or ``api_key``)."""
        key = self.fx["vinix"]["api_key"] if api_key is None else api_key
        return await self.send("PUT", "/api_auth", json={"data": {"api_key": key}})

    async def token(self) -> str:
        """A fresh Vinix auth token."""
        answer = await self.auth()
        assert answer.status == 201, answer.body
        token: str = answer.body["auth_token"]
        return token

    def conference_path(self, index: int = 0, *, account: str | None = None) -> str:
        """``/accounts/{account}/conferences/{id}`` of demo conference ``index``."""
        vinix = self.fx["vinix"]
        account = vinix["account_id"] if account is None else account
        return f"/accounts/{account}/conferences/{vinix['conference_ids'][index]}"

    async def vinix(
        self, method: str, path: str, token: str | None, data: Any = None, **extra: Any
    ) -> Answer:
        """A Vinix conference call with ``X-Auth-Token`` and body ``{"data": data}``."""
        headers = {"X-Auth-Token": token} if token else {}
        body = None if data is None else {"data": data}
        return await self.send(method, path, json=body, headers=headers, **extra)

    async def telnyx(self, conference_id: str, body: Any, *, api_key: str | None = None) -> Answer:
        """``POST /v2/conferences/{id}/actions/update`` with the Bearer key (id sent as given)."""
        key = self.fx["telnyx"]["api_key"] if api_key is None else api_key
        path = f"/conferences/{conference_id}/actions/update"
        return await self.send("POST", path, json=body, headers={"Authorization": f"Bearer {key}"})

    async def admin_call(self, method: str, path: str, json: Any = None) -> Answer:
        """An admin API call (``path`` below ``/__admin``)."""
        return await self.send(method, self.admin + path, json=json)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox with the default 3 conferences, listening on a free port."""
    async with Sandbox() as running:
        yield running


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[SandboxClient]:
    """An HTTP client for ``sandbox``."""
    async with aiohttp.ClientSession() as http:
        yield SandboxClient(sandbox, http)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A hand-driven clock for token expiry, buckets and dedup windows."""
    return FakeClock()


@pytest.fixture
async def clocked_client(clock: FakeClock) -> AsyncIterator[SandboxClient]:
    """A client for a sandbox that runs on ``clock``."""
    async with Sandbox(clock=clock) as running, aiohttp.ClientSession() as http:
        yield SandboxClient(running, http)


@pytest.fixture
def threaded_sandbox() -> Iterator[Sandbox]:
    """A sandbox on its own event loop in a background thread, for blocking clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sandbox", daemon=True)
    thread.start()
    running = Sandbox()
    asyncio.run_coroutine_threadsafe(running.start(), loop).result(timeout=10)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
