"""Settings, read once at the edge from ``CW_*`` environment variables (and an optional ``.env``).

:class:`Settings` is built in the CLI and nowhere else; each component receives only its own
piece (:class:`RetryPolicy`, :class:`ProviderConfig`, :class:`Topology`, ...), never the whole.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ProviderName
from worker.pipeline.gate import GateConfig


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """In-process retries: exponential backoff with full jitter, capped three ways."""

    max_attempts: int = 6
    budget_s: float = 120.0
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0
    inline_max_s: float = 2.0
    delay_tiers_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Where one provider lives and how to authenticate to it."""

    name: ProviderName
    base_url: str
    api_key: SecretStr
    timeout_s: float = 10.0
    pool_size: int = 256

    def __repr__(self) -> str:
        return (
            f"ProviderConfig(name={self.name!r}, base_url={self.base_url!r}, api_key='**********')"
        )


@dataclass(frozen=True, slots=True)
class Topology:
    """Names of the exchanges and queues of CONTRACT.md, and the queue limits."""

    commands_exchange: str = "conference.commands"
    commands_queue: str = "conference-worker.commands"
    results_exchange: str = "conference.results"
    dead_exchange: str = "conference.dead"
    dead_queue: str = "conference-worker.dead"
    delivery_limit: int = 5
    delay_tiers_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0)
    # 0: the single command queue (one replica keeps per-target order, several do not); N > 0:
    # commands go through the intake queue to N single-active-consumer partitions by target.
    partitions: int = 0

    @property
    def partitioned(self) -> bool:
        return self.partitions > 0

    @property
    def intake_queue(self) -> str:
        """Where the commands exchange delivers: the intake (partitioned), else the work queue."""
        return f"{self.commands_queue}.intake" if self.partitioned else self.commands_queue

    @property
    def partitions_exchange(self) -> str:
        """The consistent-hash exchange over the partition queues (by ``x-cw-partition-key``)."""
        return f"{self.commands_queue}.partitions"

    def partition_queue(self, index: int) -> str:
        """Name of partition ``index`` (0-based); names do not change when P does."""
        return f"{self.commands_queue}.p{index:02d}"

    def partition_queues(self) -> list[str]:
        return [self.partition_queue(index) for index in range(self.partitions)]

    def work_queues(self) -> list[str]:
        """The queues commands are carried out from (what KEDA and the tests watch)."""
        return self.partition_queues() if self.partitioned else [self.commands_queue]

    def delay_queue(self, seconds: float) -> str:
        """Name of the broker-held delay queue of one tier (it returns commands to the intake)."""
        return f"{self.intake_queue}.delay.{seconds:g}s"

    def delay_tier(self, delay_s: float) -> float:
        """The shortest tier that covers ``delay_s`` (the longest tier if none does)."""
        return next((t for t in self.delay_tiers_s if t >= delay_s), self.delay_tiers_s[-1])


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """How the consumer takes work from the queue."""

    prefetch: int = 256
    max_body_bytes: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How the FastStream broker connects and consumes."""

    url: SecretStr
    prefetch: int = 256
    connection_name: str = "conference-worker"
    log_messages: bool = False  # FastStream's own line per message received and processed


@dataclass(frozen=True, slots=True)
class DedupConfig:
    """Which deduplication store, and how long it remembers."""

    url: str
    retention_s: float = 24 * 3600.0
    lease_s: float = 15.0


class Settings(BaseSettings):
    """Every setting of the service; see the README for the table of variables and defaults."""

    model_config = SettingsConfigDict(
        env_prefix="CW_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    dedup_url: SecretStr = SecretStr("sqlite:///.conference-worker/dedup.sqlite3")
    dedup_retention_s: float = Field(24 * 3600.0, gt=0)
    dedup_lease_s: float = Field(15.0, ge=1)

    vinix_base_url: str | None = None
    vinix_api_key: SecretStr | None = None
    telnyx_base_url: str | None = None
    telnyx_api_key: SecretStr | None = None
    http_timeout_s: float = Field(10.0, gt=0)
    http_pool_size: int = Field(256, ge=1)

    retry_max_attempts: int = Field(6, ge=1)
    retry_budget_s: float = Field(120.0, gt=0)
    retry_base_delay_s: float = Field(0.2, gt=0)
    retry_max_delay_s: float = Field(30.0, gt=0)
    retry_inline_max_s: float = Field(2.0, ge=0)
    retry_delay_tiers_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0)

    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(5.0, gt=0)
    breaker_max_cooldown_s: float = Field(30.0, gt=0)
    vinix_rate_limit_rps: float = Field(0.0, ge=0)
    telnyx_rate_limit_rps: float = Field(0.0, ge=0)

    prefetch: int = Field(256, ge=1, le=2000)
    # Container allocations (net of frees) between the cycle collector's young passes; Python's
    # default, 700, had it scan the in-flight commands' objects ~50 times a second for 7 to 13 % of
    # the worker's CPU, and find no garbage (ops/bench/RESULTS.md, fifth session).
    gc_threshold: int = Field(10_000, ge=100)
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    allowlist_file: str | None = None

    commands_exchange: str = "conference.commands"
    commands_queue: str = "conference-worker.commands"
    results_exchange: str = "conference.results"
    dead_exchange: str = "conference.dead"
    dead_queue: str = "conference-worker.dead"
    delivery_limit: int = Field(5, ge=1)
    # Partition queues by target (README, Scaling): every replica consumes all of them, the
    # broker lets one consume each at a time.  0: the single command queue of one replica.
    partitions: int = Field(16, ge=0, le=999)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Successes (and duplicates) are logged at DEBUG: the result event, the metrics and the traces
    # already tell them, and a line per command cost ~45 µs of CPU (ops/bench/RESULTS.md).
    # True logs them at INFO too (an audit trail in the logs).
    log_successes: bool = False
    # FastStream's own "Received" / "Processed" lines, one pair per message, off by default: the
    # outcome line above says more, and FastStream's pair cost ~110 µs of CPU per command.
    broker_log_messages: bool = False

    # The worker's own HTTP server: /healthz, /readyz, /metrics, /asyncapi.yaml.  127.0.0.1 keeps
    # a developer's worker private; containers set 0.0.0.0 so probes and Prometheus reach it.
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    # Names this worker in the broker's connection list (connection_name) and in traces;
    # empty: <host name>-<process id>.
    instance_name: str = Field("", max_length=100)

    # The dead-letter console (``conference-worker console``): where it listens (127.0.0.1 keeps
    # it private), the token every change (replay, purge) needs (unset: the console is
    # read-only), and the worker whose /metrics it shows beside the dead letters.
    console_host: str = "127.0.0.1"
    console_port: int = Field(8081, ge=0, le=65535)  # 0: any free port (tests)
    console_token: SecretStr | None = None
    console_worker_url: str = "http://127.0.0.1:8080"

    def instance(self) -> str:
        """This worker's name: :attr:`instance_name`, else ``<host name>-<process id>``."""
        return self.instance_name or f"{socket.gethostname()}-{os.getpid()}"

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            budget_s=self.retry_budget_s,
            base_delay_s=self.retry_base_delay_s,
            max_delay_s=self.retry_max_delay_s,
            inline_max_s=self.retry_inline_max_s,
            delay_tiers_s=tuple(sorted(self.retry_delay_tiers_s)),
        )

    def gate(self, name: ProviderName) -> GateConfig:
        return GateConfig(
            failure_threshold=self.breaker_failures,
            cooldown_s=self.breaker_cooldown_s,
            max_cooldown_s=self.breaker_max_cooldown_s,
            rate_limit_rps=self.vinix_rate_limit_rps
            if name == "vinix"
            else self.telnyx_rate_limit_rps,
        )

    def topology(self) -> Topology:
        return Topology(
            commands_exchange=self.commands_exchange,
            commands_queue=self.commands_queue,
            results_exchange=self.results_exchange,
            dead_exchange=self.dead_exchange,
            dead_queue=self.dead_queue,
            delivery_limit=self.delivery_limit,
            delay_tiers_s=tuple(sorted(self.retry_delay_tiers_s)),
            partitions=self.partitions,
        )

    def consumer(self) -> ConsumerConfig:
        return ConsumerConfig(prefetch=self.prefetch, max_body_bytes=self.max_body_bytes)

    def broker(self) -> BrokerConfig:
        return BrokerConfig(
            url=self.amqp_url,
            prefetch=self.prefetch,
            connection_name=f"conference-worker/{self.instance()}",
            log_messages=self.broker_log_messages,
        )

    def dedup(self) -> DedupConfig:
        return DedupConfig(
            url=self.dedup_url.get_secret_value(),
            retention_s=self.dedup_retention_s,
            lease_s=self.dedup_lease_s,
        )

    def provider(self, name: ProviderName) -> ProviderConfig | None:
        """The provider's configuration, or None when it is not configured (use the sandbox)."""
        base_url = self.vinix_base_url if name == "vinix" else self.telnyx_base_url
        api_key = self.vinix_api_key if name == "vinix" else self.telnyx_api_key
        if base_url is None:
            return None
        if api_key is None:
            raise ValueError(
                f"CW_{name.upper()}_BASE_URL is set but CW_{name.upper()}_API_KEY is not"
            )
        return self.provider_at(name, base_url, api_key)

    def provider_at(self, name: ProviderName, base_url: str, api_key: SecretStr) -> ProviderConfig:
        return ProviderConfig(
            name=name,
            base_url=base_url.rstrip("/"),
            api_key=api_key,
            timeout_s=self.http_timeout_s,
            pool_size=self.http_pool_size,
        )
