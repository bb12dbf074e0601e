"""The composition root: the one place that opens connections, files and servers.

:class:`Service` wires settings into the sandbox (when no provider is configured), the provider
clients, the dedup store, the FastStream broker with its subscriber and publishers
(:mod:`worker.app.broker`), the topology, the pipeline and the command handler.  Importing this
module does nothing; :meth:`Service.start` and :meth:`Service.stop` do it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from faststream.rabbit.subscriber import RabbitSubscriber
from pydantic import SecretStr

from worker.app import broker as app_broker
from worker.app import hardening
from worker.app.handler import CommandHandler
from worker.app.health import Check, HealthServer, StoreProbe, broker_check, report
from worker.app.intake import Intake
from worker.app.settle import Publisher
from worker.app.topology import adopt_legacy, declare, declare_on
from worker.dedup import DedupStore, make_dedup_store
from worker.dedup.keeper import LeaseKeeper
from worker.errors import ProviderName
from worker.observability.observe import Observer
from worker.observability.telemetry import Telemetry
from worker.pipeline.allowlist import AllowList
from worker.pipeline.gate import Gate
from worker.pipeline.process import Pipeline
from worker.pipeline.retry import Retrier
from worker.pipeline.sequencer import Sequencer
from worker.providers import Provider
from worker.providers.factory import make_provider
from worker.settings import ProviderConfig, Settings, Topology

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection

    from worker.sandbox import Sandbox

log = logging.getLogger("worker")

PROVIDERS: tuple[ProviderName, ...] = ("vinix", "telnyx")


def provider_configs(
    settings: Settings, sandbox: Sandbox | None
) -> dict[ProviderName, ProviderConfig]:
    """Each provider's configuration; the sandbox stands in for those not configured."""
    configs: dict[ProviderName, ProviderConfig] = {}
    for name in PROVIDERS:
        config = settings.provider(name)
        if config is None:
            if sandbox is None:
                raise ValueError(f"{name} is not configured and no sandbox is running")
            key = SecretStr(sandbox.fixtures[name]["api_key"])
            config = settings.provider_at(name, sandbox.base_url, key)
        configs[name] = config
    return configs


def needs_sandbox(settings: Settings) -> bool:
    return any(settings.provider(name) is None for name in PROVIDERS)


@dataclass(slots=True)
class Service:
    """The running worker: start it, let it consume, stop it gracefully.

    ``telemetry`` is the seam for traces and metrics: left out, it is built from the ``OTEL_*``
    variables at :meth:`start` (and shut down at :meth:`stop`); tests pass
    ``Telemetry.in_memory()`` and read its spans.
    """

    settings: Settings
    grace_s: float = 30.0
    sandbox: Sandbox | None = None
    telemetry: Telemetry | None = None
    app: app_broker.App | None = None
    connection: AbstractRobustConnection | None = None
    subscriber: RabbitSubscriber | None = None
    dedup: DedupStore | None = None
    handler: CommandHandler | None = None
    intake: Intake | None = None
    legacy: bool = False  # an old single-queue layout is being drained through the intake
    http: HealthServer | None = None
    gates: dict[str, Gate] = field(default_factory=dict)
    _providers: dict[str, Provider] = field(default_factory=dict)
    _own_sandbox: bool = False
    _own_telemetry: bool = False
    _probe: StoreProbe | None = None
    _stopping: bool = False
    _renewing: asyncio.Task[None] | None = None

    @property
    def http_port(self) -> int | None:
        """The port the HTTP server listens on (None before it does)."""
        return None if self.http is None else self.http.port

    async def start(self) -> None:
        """Open everything and start consuming (waits for the dedup store to answer)."""
        hardening.install()
        telemetry = self._telemetry()
        metrics = telemetry.metrics
        self.gates = {
            name: Gate(
                name, self.settings.gate(name), clock=time.time, on_change=metrics.breaker_changed
            )
            for name in PROVIDERS
        }
        metrics.track(
            inflight=lambda: self.handler.inflight if self.handler else 0,
            ready=lambda: float(self.readiness()[0]),
        )
        self.http = HealthServer(
            self.settings.http_host,
            self.settings.http_port,
            readiness=self.readiness,
            metrics=metrics,
        )
        await self.http.start()
        observer = Observer(
            telemetry,
            exchange=self.settings.commands_exchange,
            queue=self.settings.commands_queue,
            log_successes=self.settings.log_successes,
        )
        await self._start_providers(observer)
        dedup = await self._open_store()
        await self._consume(dedup, observer)
        topology = self.settings.topology()
        if topology.partitioned:
            log.info(
                "consuming %s and %d partitions (prefetch %d in all)%s",
                topology.intake_queue,
                topology.partitions,
                self.settings.prefetch,
                f"; draining the old {topology.commands_queue}" if self.legacy else "",
            )
        else:
            log.info("consuming %s (prefetch %d)", topology.commands_queue, self.settings.prefetch)

    def _telemetry(self) -> Telemetry:
        if self.telemetry is None:
            self.telemetry = Telemetry.from_env(instance=self.settings.instance())
            self._own_telemetry = True
        return self.telemetry

    async def _start_providers(self, observer: Observer) -> None:
        if needs_sandbox(self.settings) and self.sandbox is None:
            from worker.sandbox import Sandbox  # only for local use: no provider configured

            self.sandbox = Sandbox()
            await self.sandbox.start()
            self._own_sandbox = True
            log.info(
                "no provider configured: using the built-in sandbox at %s", self.sandbox.base_url
            )
        for name, config in provider_configs(self.settings, self.sandbox).items():
            self._providers[name] = make_provider(config, observer)

    async def _open_store(self) -> DedupStore:
        """The dedup store, pinged in the background from now on; waits for a first answer."""
        config = self.settings.dedup()
        self.dedup = store = make_dedup_store(config)
        self._probe = StoreProbe(store.ping, secrets=_url_secrets(config.url))
        self._probe.start()
        await self._probe.reachable()
        return store

    def _pipeline(self, dedup: DedupStore) -> Pipeline:
        return Pipeline(
            providers=self._providers,
            gates=self.gates,
            dedup=dedup,
            retrier=Retrier(self.settings.retry()),
            max_body_bytes=self.settings.max_body_bytes,
            allowlist=(
                AllowList.from_file(self.settings.allowlist_file)
                if self.settings.allowlist_file
                else None
            ),
            sequencer=Sequencer(),
            keeper=self._keeper(dedup),
        )

    async def _consume(self, dedup: DedupStore, observer: Observer) -> None:
        """Build the FastStream app around the handler, declare the topology, subscribe."""
        topology = self.settings.topology()
        self.app = app = app_broker.build(self.settings.broker(), topology, grace_s=self.grace_s)
        pipeline = self._pipeline(dedup)
        if not topology.partitioned:
            self.handler, self.subscriber = attach(app, topology, pipeline, observer)
            self.connection = await app.broker.connect()
            await declare_on(app.broker, topology)
            await app.broker.start()
            return
        self.handler, self.intake, self.subscriber = attach_partitioned(
            app,
            topology,
            pipeline,
            observer,
            prefetch=self.settings.prefetch,
            instance=self.settings.instance(),
        )
        self.connection = connection = await app.broker.connect()
        async with connection.channel() as channel:
            await declare(channel, topology)  # the intake is bound before the old queue is not
        async with connection.channel() as channel:
            self.legacy = await adopt_legacy(channel, topology)
        if self.legacy:
            app_broker.subscribe_legacy(app.broker, topology, self.intake.handle)
        await declare_on(app.broker, topology)
        await app.broker.start()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this worker should get traffic, and the checks that say so (``/readyz``)."""
        checks = {
            "broker": broker_check(self.connection, self.subscriber),
            "dedup": self._probe.check() if self._probe else Check(False, "not opened yet"),
            "shutdown": Check(False, "shutting down") if self._stopping else Check(True, "no"),
        }
        breakers = {name: gate.state.name.lower() for name, gate in self.gates.items()}
        return report(checks, breakers)

    def _keeper(self, dedup: DedupStore) -> LeaseKeeper:
        """Claims are renewed a few times per lease while their commands run."""
        keeper = LeaseKeeper(dedup, interval_s=self.settings.dedup_lease_s / 3)
        self._renewing = asyncio.create_task(keeper.run())
        return keeper

    async def stop(self) -> None:
        """Stop consuming, finish what is in flight (within the grace period), close all.

        ``/readyz`` answers 503 from the first moment; calling it again does nothing.  Commands
        waiting in a backoff or for an open circuit breaker are handed to the broker-held delay
        at once and acknowledged.
        """
        if self._stopping:
            return
        self._stopping = True
        if self.handler is not None:
            self.handler.stopping()
        if self.intake is not None:
            self.intake.holding = True
        if self.intake is not None and self.handler is not None:
            # Partitions: finish what is in flight while holding what arrives, then close the
            # connection, which returns the held deliveries ahead of the rest and only then
            # makes another replica active (a cancel first would let it start meanwhile).
            await self.handler.drain(self.grace_s)
            if self.connection is not None:
                await _quiet_close(self.connection)
        elif self.subscriber is not None and self.handler is not None:
            started = time.monotonic()
            await _quiet_stop(self.subscriber)  # FastStream waits for those in flight, too
            await self.handler.drain(max(self.grace_s - (time.monotonic() - started), 0.0))
        if self._renewing is not None:
            self._renewing.cancel()
        await self._close()

    async def _close(self) -> None:
        """Close every connection, file and server :meth:`start` opened."""
        if self.app is not None:
            await self.app.broker.stop()
        for provider in self._providers.values():
            await provider.aclose()
        if self._probe is not None:
            await self._probe.stop()
        if self.dedup is not None:
            await self.dedup.close()
        if self.sandbox is not None and self._own_sandbox:
            await self.sandbox.stop()
        if self.http is not None:
            await self.http.stop()
        if self.telemetry is not None and self._own_telemetry:
            await self.telemetry.shutdown()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _publisher(app: app_broker.App, topology: Topology, observer: Observer) -> Publisher:
    delays = {topology.delay_queue(seconds) for seconds in topology.delay_tiers_s}
    own = {topology.commands_queue, topology.intake_queue, topology.dead_queue, *delays}
    return Publisher(
        results=app.results,
        reply=app.reply,
        dead=app.dead,
        delay=app.delay,
        topology=topology,
        own_queues=frozenset({*own, *topology.partition_queues()}),
        tracing=observer,
    )


def attach(
    app: app_broker.App, topology: Topology, pipeline: Pipeline, observer: Observer
) -> tuple[CommandHandler, RabbitSubscriber]:
    """The command handler on ``app``'s publishers, subscribed to the command queue."""
    handler = CommandHandler(pipeline, _publisher(app, topology, observer), observer)
    return handler, app_broker.subscribe(app.broker, topology, handler.handle)


def attach_partitioned(
    app: app_broker.App,
    topology: Topology,
    pipeline: Pipeline,
    observer: Observer,
    *,
    prefetch: int,
    instance: str,
) -> tuple[CommandHandler, Intake, RabbitSubscriber]:
    """The intake on the commands exchange's queue, the command handler on every partition."""
    if app.partitions is None:
        raise ValueError("the app was built without the partitions publisher")
    publisher = _publisher(app, topology, observer)
    handler = CommandHandler(pipeline, publisher, observer, routed=True)
    app_broker.subscribe_partitions(
        app.broker, topology, handler.handle, prefetch=prefetch, instance=instance
    )
    intake = Intake(app.partitions)
    return handler, intake, app_broker.subscribe(app.broker, topology, intake.handle)


async def _quiet_close(connection: AbstractRobustConnection) -> None:
    """Close the broker connection (the broker requeues every unacknowledged delivery)."""
    try:
        await connection.close()
    except CONNECTION_EXCEPTIONS as exc:
        log.warning("could not close the broker connection cleanly: %r", exc)


async def _quiet_stop(subscriber: RabbitSubscriber) -> None:
    """Stop taking deliveries (FastStream waits for those in flight, up to its grace period)."""
    try:
        await subscriber.stop()
    except CONNECTION_EXCEPTIONS as exc:
        log.warning("could not cancel the consumer: %r", exc)


def _url_secrets(url: str) -> list[str]:
    """The password in a URL, to keep it out of messages."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def tune_collector(threshold: int) -> None:
    """Keep the cycle collector off what lives as long as the process, and off the hot path.

    What the imports made is frozen out of the full passes, which otherwise stall the event loop
    ~30 ms each; the young generation collects every ``threshold`` net container allocations
    (the older generations keep their thresholds).  The commands leave no cycles behind, so a
    pass every 700 (Python's default) only re-scanned the objects of the commands in flight
    (ops/bench/RESULTS.md).
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


async def run(settings: Settings, grace_s: float = 30.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (also while still starting)."""
    tune_collector(settings.gc_threshold)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = Service(settings, grace_s=grace_s)
    starting = asyncio.ensure_future(service.start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            await stopped
            log.info("stopping: no new commands; finishing those in flight")
        else:
            log.info("stopping before the worker was ready")
    finally:
        for task in (starting, stopped):
            task.cancel()
        await asyncio.gather(starting, stopped, return_exceptions=True)
        await service.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
