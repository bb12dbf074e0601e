"""The Redis dedup store through Sentinel, across a failover, and its outages.

Each test starts its own Redis primary, one replica and one Sentinel (quorum 1) on free ports of
127.0.0.1, with a password and temporary directories, and stops them all at the end (SIGKILL
after a grace) and removes the directories, whatever happened.  Nothing touches the shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from tests.integration.conftest import (
    Admin,
    Broker,
    Processes,
    settled_command_counts,
    worker_env,
)
from tests.integration.replicas import OrderRun, Replicas, assert_order_held
from worker.dedup import Applied, Claimed, Done, make_dedup_store
from worker.dedup.redis import RedisDedupStore
from worker.errors import StoreUnavailable
from worker.sandbox import Sandbox
from worker.settings import DedupConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="no redis-server binary on PATH to start a primary, a replica and a Sentinel",
    ),
]

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]
SERVICE = "cw"
FP, RESULT = "fp", b'{"status":"succeeded"}'
READY_S = 20.0
FAILOVER_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Servers:
    """The processes of one test, their ports, and the directory that holds their files."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> int:
        port = self.ports[name] = _free_port()
        work = self.root / name
        work.mkdir()
        log = (work / "log").open("wb")
        self.procs[name] = subprocess.Popen(
            ["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        log.close()
        return port

    def data_node(self, name: str, *extra: str) -> int:
        auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD)
        quick = ("--repl-diskless-sync-delay", "0")  # the replica in sync at once, not after 5 s
        return self.start(name, "--save", "", "--appendonly", "no", *auth, *quick, *extra)

    def sentinel(self, primary_port: int) -> int:
        conf = self.root / "sentinel.conf"
        conf.write_text(
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
            f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} 400\n"
            f"sentinel failover-timeout {SERVICE} 2000\n"
        )
        return self.start("sentinel", str(conf), "--sentinel")

    def log(self, name: str) -> str:
        path = self.root / name / "log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def _command(client: Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def _primary_port(sentinel: Redis) -> int:
    """The port of the primary the Sentinel names now."""
    address: Any = await sentinel.sentinel_get_master_addr_by_name(SERVICE)
    return int(address[1])


def _client(port: int, password: str | None = PASSWORD) -> Redis:
    return Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)


async def _replicating(servers: Servers, *, sentinel_too: bool = True) -> None:
    """Wait until the replica is in sync (and the Sentinel knows both nodes)."""
    replica, sentinel = _client(servers.ports["replica"]), _client(servers.ports["sentinel"], None)

    async def synced() -> bool:
        info = await replica.info("replication")
        return bool(info.get("master_link_status") == "up")

    async def known() -> bool:  # connected to the replica, and it to the primary
        replicas: list[dict[str, Any]] = await sentinel.sentinel_slaves(SERVICE)
        state = replicas[0] if replicas else {}
        healthy = not (state.get("is_sdown") or state.get("is_disconnected"))
        return healthy and state.get("master-link-status") == "ok"

    try:
        await _until("the replica in sync", synced, READY_S)
        if sentinel_too:
            await _until("the Sentinel aware of the replica", known, READY_S)
    except AssertionError as exc:
        logs = "\n".join(f"--- {name}:\n{servers.log(name)}" for name in servers.procs)
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        await replica.aclose()
        await sentinel.aclose()


@pytest.fixture
def servers() -> Iterator[Servers]:
    """A primary, a replica and a Sentinel, all stopped and their files removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="cw-sentinel-"))
    servers = Servers(root)
    try:
        primary = servers.data_node("primary", "--unixsocket", str(root / "primary.sock"))
        servers.data_node("replica", "--replicaof", "127.0.0.1", str(primary))
        servers.sentinel(primary)
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)


def _sentinel_url(servers: Servers) -> str:
    sentinel = f"127.0.0.1:{servers.ports['sentinel']}"
    return f"redis+sentinel://:{PASSWORD}@{sentinel}/{SERVICE}/0?socket_timeout=1"


async def _first_success(store: RedisDedupStore, prefix: str) -> tuple[Claimed, list[str]]:
    """Claim fresh ids until one succeeds; the StoreUnavailable messages on the way."""
    outages: list[str] = []
    deadline = time.monotonic() + FAILOVER_S
    while time.monotonic() < deadline:
        try:
            outcome = await store.claim(f"{prefix}probe-{len(outages)}", FP)
        except StoreUnavailable as exc:  # anything else fails the test
            outages.append(str(exc))
            await asyncio.sleep(0.1)
            continue
        assert isinstance(outcome, Claimed)
        return outcome, outages
    raise AssertionError(f"no primary within {FAILOVER_S} s; outages: {outages[-3:]}")


async def test_failover_keeps_done_commands_and_the_store_recovers(servers: Servers) -> None:
    """Through redis+sentinel://, a command done before the primary is killed is still Done after
    the failover, through the same store object; the calls in between raise StoreUnavailable
    (whose messages never show the password), nothing else."""
    await _replicating(servers)
    store = make_dedup_store(DedupConfig(url=_sentinel_url(servers), lease_s=60.0))
    assert isinstance(store, RedisDedupStore)
    target = "telnyx|conf|call"
    try:
        await store.ping()
        claim = await store.claim("done-1", FP, target=target)
        assert isinstance(claim, Claimed)
        await store.complete("done-1", claim.token, RESULT, applied=Applied(target, 1000.5))
        primary = _client(servers.ports["primary"])
        assert await _command(primary, "WAIT", 1, 1000) == 1, "not replicated"
        await primary.aclose()

        servers.procs["primary"].kill()
        servers.procs["primary"].wait(timeout=5)
        _, outages = await _first_success(store, "after-")

        assert outages, "the kill went unnoticed"
        assert not [message for message in outages if PASSWORD in message]
        assert await store.claim("done-1", FP, target=target) == Done(RESULT)
        assert await store.last_applied(target) == 1000.5
        fresh = await store.claim("new-1", FP)
        assert isinstance(fresh, Claimed)
        await store.complete("new-1", fresh.token, RESULT)
        assert await store.claim("new-1", FP) == Done(RESULT)
        sentinel = _client(servers.ports["sentinel"], None)
        port = await _primary_port(sentinel)
        await sentinel.aclose()
        assert port == servers.ports["replica"], "the replica was promoted"
    finally:
        await store.close()


async def test_a_coordinated_failover_moves_the_store_to_the_new_primary(servers: Servers) -> None:
    """After SENTINEL FAILOVER, once the old primary is demoted (answering READONLY), the same
    store writes to the new primary; calls caught in between raise StoreUnavailable only.

    (Between the promotion and the demotion the old primary still takes writes, which it drops
    when it resyncs: Sentinel's own limit, which ``min-replicas-to-write`` narrows.)"""
    await _replicating(servers)
    store = RedisDedupStore(DedupConfig(url=_sentinel_url(servers)))
    sentinel = _client(servers.ports["sentinel"], None)
    new_primary = _client(servers.ports["replica"])
    old_primary = _client(servers.ports["primary"])
    try:
        assert isinstance(await store.claim("before", FP), Claimed)
        # Refused (NOGOODSLAVE) until the Sentinel has heard from the replica recently enough.
        await _until(
            "the failover accepted",
            lambda: _command(sentinel, "SENTINEL", "FAILOVER", SERVICE),
            READY_S,
        )

        async def promoted() -> bool:
            return await _primary_port(sentinel) == servers.ports["replica"]

        async def demoted() -> bool:  # until then the old primary takes writes (and loses them)
            info = await old_primary.info("replication")
            return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

        await _until("the replica promoted", promoted, FAILOVER_S)
        await _until("the old primary demoted", demoted, FAILOVER_S)
        claimed, outages = await _first_success(store, "moved-")
        assert not [message for message in outages if PASSWORD in message]
        keys = [key async for key in new_primary.scan_iter(match="cw:dedup:moved-*")]
        assert keys, "the claim after the failover went to the new primary"
        assert claimed.token
    finally:
        await sentinel.aclose()
        await new_primary.aclose()
        await old_primary.aclose()
        await store.close()


async def test_a_replica_refusing_writes_is_an_outage(servers: Servers) -> None:
    """A plain redis:// URL that reaches a replica (as a client of a demoted primary does): the
    READONLY error is StoreUnavailable, and the replica's data is still readable."""
    await _replicating(servers, sentinel_too=False)
    url = f"redis://:{PASSWORD}@127.0.0.1:{servers.ports['replica']}/0?socket_timeout=1"
    store = RedisDedupStore(DedupConfig(url=url))
    try:
        await store.ping()
        with pytest.raises(StoreUnavailable, match=r"READONLY|read only") as caught:
            await store.claim("a", FP)
        assert PASSWORD not in str(caught.value)
        assert await store.last_applied("nothing|here|yet") is None
    finally:
        await store.close()


async def test_an_unanswered_call_times_out_and_the_store_recovers(servers: Servers) -> None:
    """A call Redis does not answer within socket_timeout (CLIENT PAUSE) raises StoreUnavailable
    after about that long; once Redis answers again the same store works."""
    port = servers.ports["primary"]
    store = RedisDedupStore(
        DedupConfig(url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0?socket_timeout=0.3")
    )
    admin = _client(port)
    try:
        await _until("the primary up", admin.ping, READY_S)
        await store.ping()
        await _command(admin, "CLIENT", "PAUSE", 1500, "ALL")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"0\.3 s"):
            await store.claim("paused", FP)
        assert 0.25 <= time.monotonic() - started < 1.2
        await asyncio.sleep(1.4)
        assert isinstance(await store.claim("resumed", FP), Claimed)
    finally:
        await admin.aclose()
        await store.close()


def test_sentinel_urls_are_read() -> None:
    """Hosts (default port 26379, IPv6 in brackets), service, db, options and Sentinel auth."""
    url = (
        "redis+sentinel://user:pw@10.0.0.1,[::1]:26380/my%20service/3"
        "?socket_timeout=2&client_name=w1&sentinel_password=spw"
    )
    store = RedisDedupStore(DedupConfig(url=url))
    sentinel = store._sentinel
    assert sentinel is not None
    hosts = [s.connection_pool.connection_kwargs for s in sentinel.sentinels]
    assert [(h["host"], h["port"]) for h in hosts] == [("10.0.0.1", 26379), ("::1", 26380)]
    assert hosts[0]["password"] == "spw"
    assert hosts[0]["socket_timeout"] == 2.0
    pool: Any = store._client.connection_pool
    assert pool.service_name == "my service"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "pw", 3)
    assert kwargs["client_name"] == "w1"
    with pytest.raises(ValueError, match="service_name"):
        RedisDedupStore(DedupConfig(url="redis+sentinel://10.0.0.1/"))


async def test_unix_socket_url(servers: Servers) -> None:
    """unix:///path?password=...&db=N reaches Redis over its socket, with the store's client name
    and the default 5 s timeout."""
    admin = _client(servers.ports["primary"])
    try:
        await _until("the primary up", admin.ping, READY_S)
        url = f"unix://{servers.root}/primary.sock?db=2&password={PASSWORD}"
        store = make_dedup_store(DedupConfig(url=url))
        assert isinstance(store, RedisDedupStore)
        try:
            await store.claim("over-unix", FP)
            clients: list[dict[str, Any]] = await admin.client_list()
            assert [c["db"] for c in clients if c.get("name") == "conference-worker"] == ["2"]
        finally:
            await store.close()
        await admin.select(2)
        assert await admin.exists("cw:dedup:over-unix") == 1
    finally:
        await admin.aclose()


def test_tls_and_unix_urls_are_read() -> None:
    """rediss:// builds TLS connections with its ssl_* options; unix:// a socket connection; the
    store's defaults (client name, 5 s) apply unless the URL says otherwise."""
    tls = RedisDedupStore(DedupConfig(url="rediss://cache:6380/1?ssl_cert_reqs=none"))
    pool = tls._client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert pool.connection_kwargs["client_name"] == "conference-worker"
    assert tls._batch._timeout_s == 5.0
    unix = RedisDedupStore(DedupConfig(url="unix:///run/r.sock?db=1&socket_timeout=0.5"))
    pool = unix._client.connection_pool
    assert pool.connection_class is UnixDomainSocketConnection
    assert (pool.connection_kwargs["path"], pool.connection_kwargs["db"]) == ("/run/r.sock", 1)
    assert unix._batch._timeout_s == 0.5


@pytest.mark.timeout(300)
async def test_replicas_ride_out_a_failover_of_the_primary(
    servers: Servers,
    *,
    prefix: str,
    sandbox: Sandbox,
    admin: Admin,
    broker: Broker,
    processes: Processes,
) -> None:
    """Three worker replicas dedup through Sentinel; the primary is SIGKILLed mid-run: every
    command gets its result and succeeds, per-target order holds, and no command reaches the
    provider twice beyond what was in flight (one prefetch window)."""
    await _replicating(servers)
    prefetch = 32
    env = worker_env(prefix, sandbox, dedup_url=_sentinel_url(servers), prefetch=prefetch)
    group = Replicas(processes, env, broker.settings)
    for _ in range(3):
        group.spawn()
    await group.wait_consuming()
    await admin.fault(provider="telnyx", latency_ms=10)
    run = OrderRun(broker.settings, broker.results)
    calls = sandbox.fixtures["telnyx"]["calls_by_conference"]
    run.make([(conf, call) for conf, ids in calls.items() for call in ids], per_target=800)
    await run.publish(broker.channel)
    await asyncio.sleep(1.0)
    await run.drain()
    before = len(run.events)
    assert 0 < before < len(run.commands), "the run was not under way at the kill"
    servers.procs["primary"].kill()
    servers.procs["primary"].wait(timeout=5)
    await run.collect(timeout_s=200)
    assert not run.lost()
    assert {events[-1]["status"] for events in run.events.values()} == {"succeeded"}
    order, unnamed = await run.applied_order(admin)
    assert unnamed <= prefetch
    assert_order_held(order, run.newest())
    assert await settled_command_counts(broker.settings) == (0, 0)
    print(f"\nsentinel failover: {before} results before the kill, {unnamed} repeated requests")
