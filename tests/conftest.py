"""Fixtures for every test: the shared Redis is left as the test session found it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
OURS = "cw:*"  # every key the worker's Redis dedup store writes


def our_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(match=OURS, count=1000))


@pytest.fixture(scope="session", autouse=True)
def redis_left_as_found() -> Iterator[None]:
    """The dedup records (kept a day) and applied marks that the integration and chaos tests'
    workers write are deleted at the end of the session; keys there before are kept. Without a
    reachable Redis (unit tests alone) this does nothing."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        before = our_keys(client)
    except redis.ConnectionError:
        client.close()
        yield
        return
    yield
    try:
        new = list(our_keys(client) - before)
        for start in range(0, len(new), 1000):
            client.delete(*new[start : start + 1000])
    finally:
        client.close()
