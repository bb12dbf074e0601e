"""The journal of provider requests the sandbox received, oldest first, for ``/__admin/requests``.

An entry is a small dict appended when the request arrives (so the order is arrival order even
when answers overlap) and completed with the answer's status::

    {"provider": "telnyx", "method": "POST", "path": "/v2/conferences/a%2Fb/actions/update",
     "body": {...} | null, "status": 404, "headers": {"x-request-id": "..."}, "at": 1714.25}

``path`` is the raw path as received, still percent-encoded; ``status`` is None while the
request is in flight and for a connection closed by a ``disconnect`` fault (then ``error`` says
so).  The journal keeps the newest ``maxlen`` entries.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from worker.sandbox.exchange import Call

MAX_ENTRIES = 200_000
LOGGED_HEADERS = ("idempotency-key", "x-stainless-retry-count")


class RequestLog:
    """A bounded, append-only list of request summaries."""

    def __init__(self, maxlen: int = MAX_ENTRIES) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def record(self, provider: str, call: Call) -> dict[str, Any]:
        """Append the entry for ``call`` and return it, to be completed with the status."""
        headers = {"x-request-id": call.request_id}
        for name in LOGGED_HEADERS:
            value = call.headers.get(name)
            if value is not None:
                headers[name] = value
        entry = {
            "provider": provider,
            "method": call.method,
            "path": call.raw_path,
            "body": call.json,
            "status": None,
            "headers": headers,
            "at": time.time(),
        }
        self._entries.append(entry)
        return entry

    def entries(self, provider: str | None = None) -> list[dict[str, Any]]:
        """Every entry (or one provider's), oldest first."""
        if provider is None:
            return list(self._entries)
        return [entry for entry in self._entries if entry["provider"] == provider]

    def clear(self) -> int:
        """Forget every entry; how many there were."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def __len__(self) -> int:
        return len(self._entries)
