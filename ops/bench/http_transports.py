"""Provider HTTP transports compared: client CPU per request and requests/s against the sandbox.

Starts the sandbox as a process of its own (``python -m worker sandbox``, so its CPU is not
counted), then, for each client, sends ``--requests`` Telnyx ``POST
/v2/conferences/{id}/actions/update`` calls (the worker's request: Bearer key, JSON body with a
fresh ``command_id``, answer read and parsed) with ``--concurrency`` in flight, after a warm-up
that opens the pool.  The clients, one pool each of ``--pool-size`` connections:

* ``aiohttp (floor)``: a bare ``aiohttp.ClientSession`` configured as the worker's pool used to be;
* ``httpx default``: ``httpx.AsyncClient`` on its default transport (httpcore);
* ``httpx + aiohttp``: ``httpx.AsyncClient`` on ``httpx_aiohttp.AiohttpTransport`` over an aiohttp
  ``TCPConnector`` of the same size;
* ``JsonHttp (…)``: the worker's own :class:`worker.providers.http.JsonHttp` on each transport
  (deadline, error translation, answer parsing included).

CPU is ``time.process_time()`` of this process over the measured requests (µs per request).
Rounds are interleaved (every client once per repeat) so that a busy neighbour hurts all alike;
the table gives the range over the repeats.

    python -m ops.bench.http_transports [--requests 5000] [--concurrency 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport
from pydantic import SecretStr
from yarl import URL

from worker.providers.http import Backend, JsonHttp, endpoint
from worker.settings import ProviderConfig

from .procs import free_port

Post = Callable[[str, dict[str, Any], dict[str, str]], Awaitable[tuple[int, Any]]]
KEEPALIVE_S = 30.0
TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Target:
    """The running sandbox: Telnyx base URL, key, and (conference, supervisor call) pairs."""

    base_url: str
    api_key: str
    calls: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Result:
    """One client's samples over the repeats."""

    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


class Client:
    """A pool under test: ``post(url, body, headers)`` gives (status, parsed body)."""

    def __init__(self, post: Post, close: Callable[[], Awaitable[None]]) -> None:
        self.post = post
        self.aclose = close


def _aiohttp_session(pool_size: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=pool_size, limit_per_host=pool_size, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_S
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
    )


def aiohttp_floor(pool_size: int) -> Client:
    """A bare aiohttp session (the floor)."""
    session = _aiohttp_session(pool_size)

    async def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        async with session.post(
            URL(url, encoded=True), data=orjson.dumps(body), headers=headers, allow_redirects=False
        ) as response:
            raw = await response.read()
        return response.status, orjson.loads(raw)

    return Client(post, session.close)


def _httpx_client(pool_size: int, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=pool_size, max_keepalive_connections=pool_size, keepalive_expiry=KEEPALIVE_S
    )
    return httpx.AsyncClient(
        transport=transport,
        limits=limits,
        timeout=TIMEOUT_S,
        follow_redirects=False,
        trust_env=False,
    )


def _httpx(client: httpx.AsyncClient) -> Client:
    async def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        response = await client.post(url, content=orjson.dumps(body), headers=headers)
        return response.status_code, orjson.loads(response.content)

    return Client(post, client.aclose)


def httpx_default(pool_size: int) -> Client:
    """httpx on its default transport (httpcore)."""
    return _httpx(_httpx_client(pool_size, None))


def httpx_aiohttp(pool_size: int) -> Client:
    """httpx on httpx_aiohttp's transport, over a TCPConnector configured as the floor's."""
    transport = AiohttpTransport(client=lambda: _aiohttp_session(pool_size))
    return _httpx(_httpx_client(pool_size, transport))


def json_http(backend: Backend) -> Callable[[int], Client]:
    """The worker's JsonHttp on ``backend`` (its URLs from ``endpoint``, as the clients do)."""

    def make(pool_size: int) -> Client:
        config = ProviderConfig(
            "telnyx", "http://unused", SecretStr("unused"), timeout_s=TIMEOUT_S, pool_size=pool_size
        )
        http = JsonHttp(config, backend=backend)

        async def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
            base, _, path = url.partition("/conferences/")
            target = endpoint(base, "conferences", *path.split("/"))
            answer = await http.request("POST", target, headers=headers, body=body)
            return answer.status, answer.body

        return Client(post, http.aclose)

    return make


CLIENTS: dict[str, Callable[[int], Client]] = {
    "aiohttp (floor)": aiohttp_floor,
    "httpx default": httpx_default,
    "httpx + aiohttp": httpx_aiohttp,
    "JsonHttp (httpcore)": json_http("httpcore"),
    "JsonHttp (aiohttp)": json_http("aiohttp"),
}


async def _round(client: Client, target: Target, requests: int, concurrency: int) -> Counter[int]:
    """``requests`` calls with ``concurrency`` in flight; how many answers of each status
    (0: the request failed, e.g. JsonHttp's ProviderUnavailable after its deadline)."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {target.api_key}",
    }
    calls = itertools.islice(itertools.cycle(target.calls), requests)
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        for conference, call_control_id in calls:
            url = f"{target.base_url}/conferences/{conference}/actions/update"
            body = {
                "call_control_id": call_control_id,
                "supervisor_role": "barge",
                "command_id": uuid.uuid4().hex,
            }
            try:
                status, _ = await client.post(url, body, headers)
            except Exception:  # counted (as status 0), not fatal: the table says how many
                status = 0
            statuses[status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def measure(
    make: Callable[[int], Client], target: Target, args: argparse.Namespace
) -> tuple[float, float, Counter[int]]:
    """CPU µs per request, requests/s and statuses of one measured round (after a warm-up)."""
    client = make(args.pool_size)
    try:
        await _round(client, target, args.concurrency * 2, args.concurrency)
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        statuses = await _round(client, target, args.requests, args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await client.aclose()
    return cpu / args.requests * 1e6, args.requests / wall, statuses


@contextmanager
def sandbox(conferences: int) -> Iterator[Target]:
    """``python -m worker sandbox`` on a free port, stopped when the block ends; its stderr
    (complaints about requests cut off at a deadline) is shown only if it does not start."""
    port = free_port()
    argv = [sys.executable, "-m", "worker", "sandbox", "--port", str(port)]
    argv += ["--conferences", str(conferences)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield _target(process, port, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _target(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> Target:
    """Wait for the sandbox's first line, then read its Telnyx fixtures."""
    assert process.stdout is not None
    if "listening on" not in process.stdout.readline().decode():
        log.seek(0)
        raise RuntimeError(f"the sandbox did not start: {log.read()[-2000:].decode()}")
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/__admin/fixtures", timeout=10) as answer:
        telnyx = orjson.loads(answer.read())["telnyx"]
    calls = tuple(
        (conference, pair[0]) for conference, pair in telnyx["calls_by_conference"].items()
    )
    return Target(f"{base}/v2", telnyx["api_key"], calls)


def _range(values: list[float], digits: int) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:.{digits}f}–{high:.{digits}f} (median {mid:.{digits}f})"


def report(results: dict[str, Result], args: argparse.Namespace) -> None:
    """The table: CPU µs per request and requests/s, ranges over the repeats."""
    print(
        f"\n{args.requests} Telnyx POSTs × {args.repeats} repeats, {args.concurrency} in flight, "
        f"pool {args.pool_size}; Python {sys.version.split()[0]}, httpx {httpx.__version__}, "
        f"aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n"
    )
    header = f"{'client':<20} {'CPU µs/request':<30} {'requests/s':<34} answers"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        answers = ", ".join(
            f"{status or 'failed'}×{n}" for status, n in sorted(result.statuses.items())
        )
        print(f"{name:<20} {_range(result.cpu_us, 1):<30} {_range(result.rps, 0):<34} {answers}")


async def run(args: argparse.Namespace, target: Target) -> dict[str, Result]:
    """Every selected client once per repeat, interleaved."""
    names = args.clients or list(CLIENTS)
    results = {name: Result() for name in names}
    for repeat in range(args.repeats):
        for name in names:
            cpu_us, rps, statuses = await measure(CLIENTS[name], target, args)
            result = results[name]
            result.cpu_us.append(cpu_us)
            result.rps.append(rps)
            result.statuses.update(statuses)
            print(f"  repeat {repeat + 1} {name:<20} {cpu_us:7.1f} µs/request {rps:8.0f} req/s")
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m ops.bench.http_transports", description=__doc__.split("\n")[0]
    )
    p.add_argument("--requests", type=int, default=5000, help="measured requests per round")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--pool-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--conferences", type=int, default=100, help="sandbox conferences to cycle")
    p.add_argument("--clients", nargs="*", choices=list(CLIENTS), help="default: all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the sandbox, measure, print the table."""
    args = parse(argv)
    with sandbox(args.conferences) as target:
        results = asyncio.run(run(args, target))
    report(results, args)


if __name__ == "__main__":
    main()
