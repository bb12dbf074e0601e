"""The sandbox: both provider simulators behind one aiohttp server, plus the admin API.

Every request outside ``/__admin/`` is a provider request: paths under ``/v2/conferences``
belong to Telnyx, everything else to Vinix (Kazoo has no top-level ``conferences``).  For each
one the server reads the body once, parses it, appends it to the request log, waits the
configured latency, applies the first matching fault (see :mod:`worker.sandbox.faults`) and
otherwise lets the provider answer.  Handlers are synchronous and small; there is no access
log, so thousands of requests per second cost little.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import orjson
from aiohttp import web

from worker.sandbox.admin import add_admin_routes
from worker.sandbox.exchange import Call, Reply
from worker.sandbox.faults import Fault, FaultBook
from worker.sandbox.fixtures import Fixtures
from worker.sandbox.limits import Clock
from worker.sandbox.request_log import RequestLog
from worker.sandbox.telnyx import TelnyxApi
from worker.sandbox.vinix import VinixApi

MAX_BODY_BYTES = 8_000_000  # Crossbar's max_upload_size
SHUTDOWN_TIMEOUT_S = 1.0


class ProviderApi(Protocol):
    """What the server needs from a provider simulator."""

    name: str

    def handle(self, call: Call) -> Reply:
        """The answer to ``call``."""
        ...

    def fault_reply(self, call: Call, status: int) -> Reply:
        """The provider's own answer for a bare HTTP ``status``."""
        ...


class _Disconnect(Exception):
    """A ``disconnect`` fault: close the connection without answering."""


class Sandbox:
    """Both provider APIs on one HTTP server, with deterministic demo data."""

    vinix: VinixApi
    telnyx: TelnyxApi

    def __init__(
        self, *, conferences: int = 3, latency_ms: float = 0.0, clock: Clock = time.monotonic
    ) -> None:
        self._fixtures = Fixtures.generate(conferences)
        self._fixtures_json = orjson.dumps(self._fixtures.document())
        self.clock = clock
        self.latency_ms = self._initial_latency_ms = latency_ms
        self.requests = RequestLog()
        self.faults = FaultBook()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the demo data: documents, roles, tokens, buckets and settings (not the log)."""
        self.latency_ms = self._initial_latency_ms
        self.vinix = VinixApi(self._fixtures.vinix, self.clock)
        self.telnyx = TelnyxApi(self._fixtures.telnyx, self.clock)

    @property
    def fixtures(self) -> dict[str, Any]:
        """The demo data (a fresh copy): the same document as ``GET /__admin/fixtures``."""
        fixtures: dict[str, Any] = orjson.loads(self._fixtures_json)
        return fixtures

    @property
    def fixtures_json(self) -> bytes:
        """The fixtures document, serialized once."""
        return self._fixtures_json

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v2`` (the providers' base URLs include ``/v2``) once started."""
        if self._base_url is None:
            raise RuntimeError("the sandbox is not running: await start() first")
        return self._base_url

    @property
    def token_ttl_s(self) -> float:
        """How long a Vinix auth token lives (Kazoo: 3600 s)."""
        return self.vinix.token_ttl_s

    @token_ttl_s.setter
    def token_ttl_s(self, seconds: float) -> None:
        self.vinix.token_ttl_s = seconds

    def state(self) -> dict[str, Any]:
        """The Vinix documents and the Telnyx roles, for ``GET /__admin/state``."""
        return {"vinix": self.vinix.store.documents(), "telnyx": self.telnyx.roles}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return :attr:`base_url`."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        runner = web.AppRunner(
            self._application(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self._runner = runner
        self._base_url = f"http://{url_host}:{bound_port}/v2"
        return self._base_url

    async def stop(self) -> None:
        """Stop listening (requests in flight get a second to finish)."""
        runner, self._runner, self._base_url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        add_admin_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self._provider_request)
        return app

    def _api_for(self, segments: list[str]) -> ProviderApi:
        return self.telnyx if segments[:2] == ["v2", "conferences"] else self.vinix

    async def _provider_request(self, request: web.Request) -> web.StreamResponse:
        too_big = False
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body, too_big = b"", True
        call = Call.from_request(request, body)
        api = self._api_for(call.segments)
        key = self.requests.record(api.name, call)
        try:
            reply = api.fault_reply(call, 413) if too_big else await self._answer(api, call)
        except _Disconnect:
            self.requests.complete(key, None, error="disconnect")
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError from None
        self.requests.complete(key, reply.status)
        return reply.response()

    async def _answer(self, api: ProviderApi, call: Call) -> Reply:
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000.0)
        fault = self.faults.pick(api.name, call.method, call.raw_path)
        if fault is None:
            return api.handle(call)
        if fault.latency_s > 0:
            await asyncio.sleep(fault.latency_s)
        if fault.disconnects:
            raise _Disconnect
        status = fault.spec.status
        if status is None:
            return api.handle(call)
        return _faulted(api, call, fault, status)


def _faulted(api: ProviderApi, call: Call, fault: Fault, status: int) -> Reply:
    reply = api.fault_reply(call, status)
    if fault.has_body:
        reply.body = fault.spec.body
    retry_after_s = fault.spec.retry_after_s
    if retry_after_s is not None:
        reply.headers["Retry-After"] = format(retry_after_s, "g")
    return reply


async def serve_forever(
    host: str, port: int, *, conferences: int = 3, latency_ms: float = 0.0
) -> None:
    """Run the sandbox until cancelled; print one line with the base URL and the fixtures' keys."""
    sandbox = Sandbox(conferences=conferences, latency_ms=latency_ms)
    base_url = await sandbox.start(host, port)
    fixtures = sandbox.fixtures
    admin = base_url.removesuffix("/v2") + "/__admin/fixtures"
    print(
        f"sandbox listening on {base_url} · vinix api_key={fixtures['vinix']['api_key']} "
        f"account_id={fixtures['vinix']['account_id']} · "
        f"telnyx api_key={fixtures['telnyx']['api_key']} · "
        f"{conferences} conference(s) each, all ids at {admin}",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
