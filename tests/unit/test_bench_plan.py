"""The order in which the benchmark runs its drains (``ops/bench/bench.py``)."""

from __future__ import annotations

from ops.bench.bench import pair_order


def test_drain_pairs_alternate_which_side_goes_first() -> None:
    """Floor, worker; worker, floor; floor, worker: a drifting host does not always
    favour the side that runs first, and every pair still has both sides."""
    orders = [pair_order(i) for i in range(4)]
    assert orders == [
        ("floor", "worker"),
        ("worker", "floor"),
        ("floor", "worker"),
        ("worker", "floor"),
    ]
