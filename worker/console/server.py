"""The console's HTTP server (aiohttp, Jinja2 templates): pages, a JSON API, the checks.

Reading is open to whoever reaches it; it binds 127.0.0.1 by default, and answers only requests
whose ``Host`` is the address it serves (no DNS rebinding from a web page).  **Changing** (replay,
purge) needs the token of ``CW_CONSOLE_TOKEN`` in an ``X-Console-Token`` header of a JSON
``POST``: a page of another site can send neither a custom header nor a JSON body without a CORS
preflight, which the console never grants, so a forged request cannot change anything; an
``Origin`` other than the console's own is refused as well.  Without the token: 403, nothing
done.  The page never shows a URL with credentials, a key or the token; header values whose names
look secret are redacted.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import jinja2
import orjson
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from worker.console import live, snapshot
from worker.console.jobs import Jobs, Kind
from worker.console.snapshot import Snapshot
from worker.dedup import OutcomeStore, make_dedup_store
from worker.settings import Settings

log = logging.getLogger("worker.console.server")
TOKEN_HEADER = "X-Console-Token"
MAX_SHOWN = 500  # dead letters listed on the page (the groups count them all)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # bound to every address: any Host
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("worker.console", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def age(seconds: float | None) -> str:
    """``42s``, ``7m``, ``3h``, ``2d`` (empty when unknown)."""
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


_TEMPLATES.filters["age"] = age


def token_ok(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` is the console's token (never, when none is configured)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


@dataclass(slots=True)
class Console:
    """The console: its connections, its snapshot and jobs, and the aiohttp application."""

    settings: Settings
    connection: AbstractRobustConnection | None = None
    store: OutcomeStore | None = None
    jobs: Jobs | None = None
    feed: live.ResultFeed = field(default_factory=live.ResultFeed)
    metrics: live.WorkerMetrics | None = None
    http: aiohttp.ClientSession | None = None
    current: Snapshot | None = None
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        """Connect to RabbitMQ and the dedup store, and serve the console."""
        s = self.settings
        self.connection = await aio_pika.connect_robust(
            s.amqp_url.get_secret_value(),
            client_properties={"connection_name": "conference-worker console"},
        )
        if not s.dedup_url.get_secret_value().lower().startswith("memory:"):
            self.store = make_dedup_store(s.dedup())
        self.jobs = Jobs(
            self.connection, s.dead_queue, s.commands_exchange, self.store, s.max_body_bytes
        )
        await self.feed.start(self.connection, s.results_exchange)
        self.metrics = live.WorkerMetrics(s.console_worker_url)
        self.http = aiohttp.ClientSession()
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.console_host, s.console_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("console on http://%s:%d/", s.console_host, self.port)

    async def stop(self) -> None:
        """Finish the running job, stop serving, close everything."""
        if self.jobs is not None:
            await self.jobs.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.store is not None:
            await self.store.close()
        if self.connection is not None:
            await self.connection.close()

    def app(self) -> web.Application:
        """The routes, behind the host check and the security headers."""
        app = web.Application(middlewares=[self._guard], client_max_size=4 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/", self.index),
                web.get("/letters/{key}", self.letter),
                web.get("/api/state", self.state),
                web.get("/api/jobs/{id}", self.job),
                web.post("/api/replay", self.replay),
                web.post("/api/purge", self.purge),
                web.static("/static", str(_static_dir())),
            ]
        )
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        bound = self.settings.console_host
        host = urlsplit(f"//{request.host}").hostname or ""
        if bound not in WILDCARD_HOSTS and host not in LOCAL_HOSTS | {bound}:
            return web.Response(status=421, text="unknown host\n")
        response = await handler(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def _snapshot(self) -> tuple[Snapshot, bool]:
        """A fresh snapshot, or the last one (stale) while a job holds the queue."""
        assert self.jobs is not None
        assert self.connection is not None
        if self.jobs.lock.locked() and self.current is not None:
            return self.current, True
        async with self.jobs.lock:
            self.current = await snapshot.take(
                self.connection, self.settings.dead_queue, self.store, self.settings.max_body_bytes
            )
        return self.current, False

    async def index(self, request: web.Request) -> web.Response:
        """The page: groups, the filtered dead letters, the live state (filled by the script)."""
        taken, stale = await self._snapshot()
        code, kind = request.query.get("code", ""), request.query.get("type", "")
        text = request.query.get("q", "")
        matching = taken.matching(code, kind, text)
        return self._page(
            "index.html",
            snapshot=taken,
            stale=stale,
            groups=taken.groups(),
            entries=matching[:MAX_SHOWN],
            matching=len(matching),
            filters={"code": code, "type": kind, "q": text},
            codes=sorted({g.code for g in taken.groups()}),
            types=sorted({g.type for g in taken.groups()}),
        )

    async def letter(self, request: web.Request) -> web.Response:
        """One dead letter: body, headers, properties, attempts, trace id, stored outcome."""
        taken = self.current or (await self._snapshot())[0]
        entry = taken.find(request.match_info["key"])
        if entry is None:
            raise web.HTTPNotFound(text="no such dead letter (replayed or purged?)\n")
        return self._page(
            "letter.html",
            entry=entry,
            body=snapshot.body_text(entry.letter.body),
            headers=snapshot.shown(entry.letter.headers),
            properties=snapshot.shown(entry.letter.properties),
        )

    def _page(self, name: str, **values: Any) -> web.Response:
        values["read_only"] = self.settings.console_token is None
        html = _TEMPLATES.get_template(name).render(**values)
        return web.Response(text=html, content_type="text/html")

    async def state(self, request: web.Request) -> web.Response:
        """Queue depths, the worker's metrics, the results seen, the jobs."""
        assert self.connection is not None
        assert self.metrics is not None
        assert self.http is not None
        s = self.settings
        topology = s.topology()
        intake = [topology.intake_queue] if topology.partitioned else []
        names = [*intake, *topology.work_queues(), s.dead_queue]
        body = {
            "queues": await live.queue_depths(self.connection, names),
            "worker": await self.metrics.read(self.http),
            "results": self.feed.view(),
            "jobs": [job.view() for job in (self.jobs.jobs.values() if self.jobs else [])],
        }
        return web.json_response(body, dumps=lambda v: orjson.dumps(v).decode())

    async def job(self, request: web.Request) -> web.Response:
        assert self.jobs is not None
        found = self.jobs.jobs.get(int(request.match_info["id"]))
        if found is None:
            raise web.HTTPNotFound()
        return web.json_response(found.view())

    async def replay(self, request: web.Request) -> web.Response:
        return await self._change(request, "replay")

    async def purge(self, request: web.Request) -> web.Response:
        return await self._change(request, "purge")

    async def _change(self, request: web.Request, kind: Kind) -> web.Response:
        """Start a job, if the request passes every check."""
        assert self.jobs is not None
        refused = self._refusal(request)
        if refused:
            return web.json_response({"error": refused}, status=403)
        try:
            keys = (await request.json()).get("keys")
        except (ValueError, AttributeError):
            keys = None
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            return web.json_response({"error": "give the keys of the dead letters"}, status=400)
        job = self.jobs.start(kind, keys)
        return web.json_response({"job": job.view()}, status=202)

    def _refusal(self, request: web.Request) -> str:
        """Why a change request is refused ('' when it is not)."""
        token = self.settings.console_token
        if token is None:
            return "read-only: CW_CONSOLE_TOKEN is not set"
        if not token_ok(token.get_secret_value(), request.headers.get(TOKEN_HEADER)):
            return f"missing or wrong {TOKEN_HEADER}"
        if request.content_type != "application/json":
            return "changes are JSON requests"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return "cross-origin request"
        return ""


def _static_dir() -> Any:
    from importlib.resources import files

    return files("worker.console") / "static"


async def serve(settings: Settings) -> None:
    """Run the console until cancelled (Ctrl-C)."""
    import asyncio

    console = Console(settings)
    await console.start()
    print(f"dead-letter console on http://{settings.console_host}:{console.port}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await console.stop()
