"""The benchmark's verdicts and how it prints them (``ops/bench/report.py``), on made-up runs."""

from __future__ import annotations

from typing import Any

from ops.bench.report import noise_warnings, shown, summarize


def _drain(throughput: float, cpu_us: float) -> dict[str, Any]:
    return {"throughput_cmd_s": throughput, "consumer_cpu_us_per_cmd": cpu_us}


def _paced(p99_ms: float, broker_p99_ms: float = 3.0) -> dict[str, Any]:
    return {"latency_ms": {"p99": p99_ms}, "broker_confirm_ms": {"p99": broker_p99_ms}}


def _run(**scenarios: Any) -> dict[str, Any]:
    return {"scenarios": scenarios, "tracing": {"on": True, "otel_env": {}}}


def _drains(*pairs: tuple[float, float]) -> dict[str, Any]:
    """Drain runs of the worker at the given (commands/s, µs per command); the floor at 1,000/s."""
    return {"runs": [{"worker": _drain(t, c), "floor": _drain(1000.0, 500.0)} for t, c in pairs]}


def test_a_ratio_just_under_its_bound_is_kept_and_printed_as_under_it() -> None:
    """996 of 1,106 commands/s is 0.8998: it fails ">= 0.9", and neither the JSON nor the table
    may show it as 0.9 (they used to: a failing 0.90)."""
    results = _run(
        drain=_drains((1106.4, 780.0)),
        latency100={"throughput_cmd_s": 995.5, "inflight_max": 396},
    )
    point = summarize(results)["acceptance"]["2_latency100_throughput"]
    assert point["measured"] == 0.8998
    assert point["pass"] is False
    assert shown(point) == "0.8998 (396 in flight)"


def test_a_value_away_from_its_bound_is_printed_with_two_decimals() -> None:
    """The usual case: two decimals, thousands separated, in flight when counted."""
    assert shown({"measured": 1.2424, "bound": 1.6}) == "1.24"
    assert shown({"measured": 1234.5, "bound": 200.0}) == "1,234.50"
    assert shown({"measured": "./scripts/bench"}) == "./scripts/bench"


def test_a_value_on_its_bound_or_without_samples_is_printed_as_such() -> None:
    """Exactly the bound (a pass) reads with four decimals; a window without samples, a dash."""
    assert shown({"measured": 0.9, "bound": 0.9, "inflight_max": 400}) == "0.9000 (400 in flight)"
    assert shown({"measured": float("nan"), "bound": 25.0}) == "–"


def test_the_p99_point_carries_the_floors_p99_and_the_stalled_windows() -> None:
    """Point 3 is judged on the worker's window; the floor's p99 at the same rate and the
    windows run again after a broker stall are kept beside it for the reader."""
    worker = _paced(21.0) | {"stalled_windows": [_paced(80.0, 40.0)]}
    results = _run(p99=worker, p99_floor=_paced(9.5))
    point = summarize(results)["acceptance"]["3_p99_at_half_rate"]
    assert point["pass"] is True
    assert point["floor_p99_ms"] == 9.5
    assert point["stalled_windows_p99_ms"] == [(80.0, 40.0)]


def test_a_floor_over_the_p99_bound_is_reported_as_the_hosts_noise() -> None:
    """When even the bare pipeline misses 25 ms at the same offered rate, the run says so."""
    noisy = noise_warnings(_run(p99=_paced(42.0), p99_floor=_paced(204.5)))
    assert any("floor itself" in w and "204.5 ms" in w for w in noisy)
    quiet = noise_warnings(_run(p99=_paced(42.0), p99_floor=_paced(7.5)))
    assert not any("floor itself" in w for w in quiet)
