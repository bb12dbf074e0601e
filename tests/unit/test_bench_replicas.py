"""The replicas benchmark's pure parts: which rows it drains, and how a result gap is measured."""

from __future__ import annotations

import argparse

from ops.bench.replicas import plan, result_gap


def test_the_rows_are_the_single_queue_then_p_with_one_and_n_replicas() -> None:
    """``--replicas 3 --partitions 16``: single queue ×1, P=16 ×1, P=16 ×3; N=1 adds no row."""
    assert plan(argparse.Namespace(partitions=16, replicas=3)) == [(0, 1), (16, 1), (16, 3)]
    assert plan(argparse.Namespace(partitions=8, replicas=1)) == [(0, 1), (8, 1)]


def test_the_result_gap_is_the_longest_silence_around_the_kill() -> None:
    """Results every 10 ms, none from the kill at t=1.0 until t=2.5: the gap is 1.5 s; results
    outside the span do not count."""
    arrivals = [n / 100 for n in range(100)] + [2.5 + n / 100 for n in range(50)] + [60.0]
    assert abs(result_gap(arrivals, 1.0, 20.0) - 1.5) < 1e-9
