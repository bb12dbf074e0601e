"""The journal of provider requests the sandbox received, oldest first, for ``/__admin/requests``.

An entry is a small dict appended when the request arrives (so the order is arrival order even
when answers overlap) and completed with the answer's status::

    {"provider": "telnyx", "method": "POST", "path": "/v2/conferences/a%2Fb/actions/update",
     "body": {...} | null, "status": 404, "headers": {"x-request-id": "..."}, "at": 1714.25}

``path`` is the raw path as received, still percent-encoded; ``status`` is None while the
request is in flight and for a connection closed by a ``disconnect`` fault (then ``error`` says
so).  The journal keeps the newest ``maxlen`` entries.

A completed entry is held as its JSON bytes and decoded when read.  Held as dicts (a parsed body
is a tree of dicts and lists), tens of thousands of entries made every full collection of the
garbage collector in the sandbox process take 150–600 ms: a stall the provider would never have,
which the benchmarks then measured as the worker's latency.  Bytes are not tracked by the
collector at all.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from worker.sandbox.exchange import Call

MAX_ENTRIES = 200_000
LOGGED_HEADERS = ("idempotency-key", "x-stainless-retry-count")


class RequestLog:
    """A bounded, append-only list of request summaries."""

    def __init__(self, maxlen: int = MAX_ENTRIES) -> None:
        self._maxlen = maxlen
        self._entries: dict[int, dict[str, Any] | bytes] = {}  # by arrival number, in order
        self._next = 0
        self._oldest = 0

    def record(self, provider: str, call: Call) -> int:
        """Append the entry for ``call``; its key, to :meth:`complete` it with the answer."""
        headers = {"x-request-id": call.request_id}
        for name in LOGGED_HEADERS:
            value = call.headers.get(name)
            if value is not None:
                headers[name] = value
        key, self._next = self._next, self._next + 1
        self._entries[key] = {
            "provider": provider,
            "method": call.method,
            "path": call.raw_path,
            "body": call.json,
            "status": None,
            "headers": headers,
            "at": time.time(),
        }
        while len(self._entries) > self._maxlen:
            self._entries.pop(self._oldest, None)
            self._oldest += 1
        return key

    def complete(self, key: int, status: int | None, *, error: str | None = None) -> None:
        """Record the answer's status (or why there was none); the entry is then frozen."""
        entry = self._entries.get(key)
        if isinstance(entry, dict):
            entry["status"] = status
            if error is not None:
                entry["error"] = error
            self._entries[key] = orjson.dumps(entry)

    def entries(self, provider: str | None = None) -> list[dict[str, Any]]:
        """Every entry (or one provider's), oldest first."""
        found = (
            orjson.loads(entry) if isinstance(entry, bytes) else dict(entry)
            for entry in self._entries.values()
        )
        return [entry for entry in found if provider is None or entry["provider"] == provider]

    def clear(self) -> int:
        """Forget every entry; how many there were."""
        count = len(self._entries)
        self._entries.clear()
        self._oldest = self._next
        return count

    def __len__(self) -> int:
        return len(self._entries)
