"""The composition root: the one place that opens connections, files and servers.

:class:`Service` wires settings into the sandbox (when no provider is configured), the provider
clients, the dedup store, the RabbitMQ connection and topology, the pipeline and the consumer.
Importing this module does nothing; :meth:`Service.start` and :meth:`Service.stop` do it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from pydantic import SecretStr

from worker.app.health import Check, HealthServer, StoreProbe, broker_check, report
from worker.app.settle import Consumer, Publisher
from worker.app.topology import declare
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
from worker.sandbox import Sandbox
from worker.settings import ProviderConfig, Settings

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
    connection: AbstractRobustConnection | None = None
    dedup: DedupStore | None = None
    consumer: Consumer | None = None
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
        telemetry = self._telemetry()
        metrics = telemetry.metrics
        self.gates = {
            name: Gate(
                name, self.settings.gate(name), clock=time.time, on_change=metrics.breaker_changed
            )
            for name in PROVIDERS
        }
        metrics.track(
            inflight=lambda: self.consumer.inflight if self.consumer else 0,
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
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": f"conference-worker/{self.settings.instance()}"},
        )
        self.consumer = await self._consume(self.connection, dedup, observer)
        log.info("consuming %s (prefetch %d)", self.settings.commands_queue, self.settings.prefetch)

    def _telemetry(self) -> Telemetry:
        if self.telemetry is None:
            self.telemetry = Telemetry.from_env(instance=self.settings.instance())
            self._own_telemetry = True
        return self.telemetry

    async def _start_providers(self, observer: Observer) -> None:
        if needs_sandbox(self.settings) and self.sandbox is None:
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

    async def _consume(
        self, connection: AbstractRobustConnection, dedup: DedupStore, observer: Observer
    ) -> Consumer:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        topology = self.settings.topology()
        declared = await declare(channel, topology)
        delays = {topology.delay_queue(seconds) for seconds in topology.delay_tiers_s}
        publisher = Publisher(
            results=declared.results_exchange,
            dead=declared.dead_exchange,
            default=channel.default_exchange,
            topology=topology,
            own_queues=frozenset({topology.commands_queue, topology.dead_queue, *delays}),
            channel=channel,
            observer=observer,
        )
        pipeline = Pipeline(
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
        consumer = Consumer(declared.commands, pipeline, publisher, observer)
        await consumer.start()
        return consumer

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this worker should get traffic, and the checks that say so (``/readyz``)."""
        checks = {
            "broker": broker_check(self.connection, self.consumer),
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

        ``/readyz`` answers 503 from the first moment; calling it again does nothing.
        """
        if self._stopping:
            return
        self._stopping = True
        if self.consumer is not None:
            await self.consumer.stop(self.grace_s)
        if self._renewing is not None:
            self._renewing.cancel()
        await self._close()

    async def _close(self) -> None:
        """Close every connection, file and server :meth:`start` opened."""
        if self.connection is not None:
            await self.connection.close()
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
