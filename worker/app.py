"""The composition root: the one place that opens connections, files and servers.

:class:`Service` wires settings into the sandbox (when no provider is configured), the provider
clients, the dedup store, the RabbitMQ connection and topology, the pipeline and the consumer.
Importing this module does nothing; :meth:`Service.start` and :meth:`Service.stop` do it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from pydantic import SecretStr

from worker.consumer import Consumer, Publisher
from worker.dedup import DedupStore, make_dedup_store
from worker.errors import ProviderName
from worker.gate import Gate
from worker.pipeline import Pipeline
from worker.providers import Provider
from worker.providers.factory import make_provider
from worker.retry import Retrier
from worker.sandbox import Sandbox
from worker.settings import ProviderConfig, Settings
from worker.topology import declare

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
    """The running worker: start it, let it consume, stop it gracefully."""

    settings: Settings
    grace_s: float = 30.0
    sandbox: Sandbox | None = None
    connection: AbstractRobustConnection | None = None
    dedup: DedupStore | None = None
    consumer: Consumer | None = None
    _providers: dict[str, Provider] = field(default_factory=dict)
    _own_sandbox: bool = False

    async def start(self) -> None:
        """Open everything and start consuming."""
        if needs_sandbox(self.settings) and self.sandbox is None:
            self.sandbox = Sandbox()
            await self.sandbox.start()
            self._own_sandbox = True
            log.info(
                "no provider configured: using the built-in sandbox at %s", self.sandbox.base_url
            )
        for name, config in provider_configs(self.settings, self.sandbox).items():
            self._providers[name] = make_provider(config)
        self.dedup = make_dedup_store(self.settings.dedup())
        await self.dedup.ping()
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": "conference-worker"},
        )
        self.consumer = await self._consume(self.connection, self.dedup)
        log.info("consuming %s (prefetch %d)", self.settings.commands_queue, self.settings.prefetch)

    async def _consume(self, connection: AbstractRobustConnection, dedup: DedupStore) -> Consumer:
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
        )
        pipeline = Pipeline(
            providers=self._providers,
            gates={
                name: Gate(name, self.settings.gate(name), clock=time.time) for name in PROVIDERS
            },
            dedup=dedup,
            retrier=Retrier(self.settings.retry()),
            max_body_bytes=self.settings.max_body_bytes,
        )
        consumer = Consumer(declared.commands, pipeline, publisher)
        await consumer.start()
        return consumer

    async def stop(self) -> None:
        """Stop consuming, finish what is in flight (within the grace period), close all."""
        if self.consumer is not None:
            await self.consumer.stop(self.grace_s)
        if self.connection is not None:
            await self.connection.close()
        for provider in self._providers.values():
            await provider.aclose()
        if self.dedup is not None:
            await self.dedup.close()
        if self.sandbox is not None and self._own_sandbox:
            await self.sandbox.stop()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run(settings: Settings, grace_s: float = 30.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = Service(settings, grace_s=grace_s)
    try:
        await service.start()
        await stop.wait()
        log.info("stopping: no new commands; finishing those in flight")
    finally:
        await service.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def describe(settings: Settings) -> dict[str, Any]:
    """The effective configuration with secrets masked (for the first log lines)."""
    return settings.model_dump(mode="json")
