"""The sandbox's request journal: order, bounds, in-flight entries, and no load on the GC."""

from __future__ import annotations

import gc
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from worker.sandbox.exchange import Call
from worker.sandbox.request_log import RequestLog


def call(n: int, body: Any = None) -> Call:
    return Call(
        method="POST",
        raw_path=f"/v2/conferences/c{n}/actions/update",
        segments=["v2", "conferences", f"c{n}", "actions", "update"],
        headers=CIMultiDictProxy(CIMultiDict({"Idempotency-Key": f"k{n}"})),
        query=CIMultiDictProxy(CIMultiDict()),
        client_ip="127.0.0.1",
        request_id=f"r{n}",
        json=body,
    )


def test_entries_are_in_arrival_order_and_show_the_status_once_answered() -> None:
    """An entry is listed from its arrival (status None) and shows its answer once completed."""
    log = RequestLog()
    first = log.record("telnyx", call(1, {"data": {"role": "barge"}}))
    second = log.record("vinix", call(2))
    log.complete(second, 200)
    entries = log.entries()
    assert [(e["path"], e["status"]) for e in entries] == [
        ("/v2/conferences/c1/actions/update", None),
        ("/v2/conferences/c2/actions/update", 200),
    ]
    assert entries[0]["body"] == {"data": {"role": "barge"}}
    assert entries[1]["headers"] == {"x-request-id": "r2", "idempotency-key": "k2"}
    log.complete(first, None, error="disconnect")
    assert log.entries("telnyx")[0] | {"at": 0} == {
        "provider": "telnyx",
        "method": "POST",
        "path": "/v2/conferences/c1/actions/update",
        "body": {"data": {"role": "barge"}},
        "status": None,
        "error": "disconnect",
        "headers": {"x-request-id": "r1", "idempotency-key": "k1"},
        "at": 0,
    }


def test_the_journal_keeps_the_newest_maxlen_entries() -> None:
    """Past ``maxlen`` the oldest entries go; clearing empties it and numbering goes on."""
    log = RequestLog(maxlen=3)
    for n in range(5):
        log.complete(log.record("vinix", call(n)), 200)
    assert [e["headers"]["x-request-id"] for e in log.entries()] == ["r2", "r3", "r4"]
    assert log.clear() == 3
    assert len(log) == 0
    log.complete(log.record("vinix", call(9)), 201)
    assert [e["status"] for e in log.entries()] == [201]


def test_answered_entries_put_no_objects_under_the_garbage_collector() -> None:
    """Thousands of journaled requests with nested JSON bodies add no GC-tracked objects (each
    full collection would otherwise scan them all: 150 ms with 40,000 entries)."""
    log = RequestLog()
    gc.collect()
    before = len(gc.get_objects())
    for n in range(2000):
        body = {"data": {"member": {"pins": ["1234"], "join_muted": False}}, "n": [n]}
        log.complete(log.record("vinix", call(n, body)), 200)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
