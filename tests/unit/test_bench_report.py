"""The benchmark's verdicts and how it prints them (``ops/bench/verdict.py``,
``ops/bench/report.py``), on made-up runs."""

from __future__ import annotations

from typing import Any

from ops.bench.report import points_grid, shown, side_grid
from ops.bench.verdict import failed_points, noise_warnings, summarize


def _drain(throughput: float, cpu_us: float, rss_mb: float = 60.0) -> dict[str, Any]:
    return {
        "throughput_cmd_s": throughput,
        "consumer_cpu_us_per_cmd": cpu_us,
        "rss_hwm_mb": rss_mb,
        "rss_peak_mb": rss_mb - 1.0,
    }


def _paced(p99_ms: float, broker_p99_ms: float = 3.0) -> dict[str, Any]:
    return {"latency_ms": {"p99": p99_ms}, "broker_confirm_ms": {"p99": broker_p99_ms}}


def _run(**scenarios: Any) -> dict[str, Any]:
    return {"scenarios": scenarios, "tracing": {"on": True, "otel_env": {}}}


def _drains(*rounds: tuple[float, float], peer: float = 500.0) -> dict[str, Any]:
    """Drain rounds of the worker at the given (commands/s, µs per command); the floor at
    1,000/s and 500 µs, the peer at ``peer``/s and 2,000 µs."""
    return {
        "runs": [
            {
                "floor": _drain(1000.0, 500.0, 45.0),
                "worker": _drain(t, c, 90.0),
                "peer": _drain(peer, 2000.0, 70.0),
            }
            for t, c in rounds
        ]
    }


def test_the_acceptance_points_are_a_to_d_and_the_rest_is_information() -> None:
    """A full run is judged on (a) throughput vs the peer, (b) CPU vs the floor, (c) p99 and
    (d) RSS; throughput vs the floor, latency100 and the README command are information."""
    results = _run(
        drain=_drains((1100.0, 800.0)),
        latency100={"throughput_cmd_s": 1050.0, "inflight_max": 396},
        p99=_paced(12.0),
        rss={"rss_hwm_mb": 120.0, "rss_peak_mb": 119.0, "inflight_max": 2000},
    )
    summary = summarize(results)
    assert list(summary["acceptance"]) == [
        "a_throughput_vs_peer",
        "b_cpu_per_cmd_vs_floor",
        "c_p99_at_half_rate",
        "d_rss_2000_in_flight",
    ]
    assert list(summary["information"]) == [
        "throughput_vs_floor",
        "latency100_throughput",
        "one_command",
    ]
    assert failed_points(summary) == []


def test_the_worker_must_drain_twice_as_fast_as_the_peer() -> None:
    """(a) is the worker's median throughput over the peer's, bound ≥ 2.0: 1,100 against 600
    (1.8333) fails, against 550 (exactly 2.0) passes."""
    slow = summarize(_run(drain=_drains((1100.0, 800.0), peer=600.0)))
    assert slow["acceptance"]["a_throughput_vs_peer"]["measured"] == 1.8333
    assert failed_points(slow) == ["a_throughput_vs_peer"]
    even = summarize(_run(drain=_drains((1100.0, 800.0), peer=550.0)))
    assert even["acceptance"]["a_throughput_vs_peer"]["pass"] is True


def test_cpu_per_command_is_judged_at_two_and_reported_against_the_goal() -> None:
    """(b) passes up to 2.0 × the floor and says whether the 1.5 goal was met as well."""
    met = summarize(_run(drain=_drains((1100.0, 700.0))))["acceptance"]["b_cpu_per_cmd_vs_floor"]
    assert (met["measured"], met["pass"], met["meets_goal"]) == (1.4, True, True)
    missed = summarize(_run(drain=_drains((1100.0, 900.0))))["acceptance"]
    assert (
        missed["b_cpu_per_cmd_vs_floor"]["pass"],
        missed["b_cpu_per_cmd_vs_floor"]["meets_goal"],
    ) == (
        True,
        False,
    )
    over = summarize(_run(drain=_drains((1100.0, 1001.0))))
    assert failed_points(over) == ["b_cpu_per_cmd_vs_floor"]


def test_a_failed_information_figure_does_not_fail_the_run() -> None:
    """Throughput at 0.5 × the floor (the old ≥ 0.6) is shown as not held, but ``--strict``
    only looks at the acceptance points."""
    summary = summarize(_run(drain=_drains((500.0, 800.0), peer=200.0)))
    assert summary["information"]["throughput_vs_floor"]["pass"] is False
    assert failed_points(summary) == []


def test_side_by_side_has_the_three_consumers_and_the_workers_ratios() -> None:
    """The medians of each consumer (cmd/s, CPU µs/cmd, RSS MB) are in the JSON and in one table
    with the worker ÷ floor and worker ÷ peer columns."""
    summary = summarize(_run(drain=_drains((1100.0, 800.0), (1300.0, 700.0), (1200.0, 900.0))))
    side = summary["side_by_side"]
    assert side["worker"] == {
        "throughput_cmd_s": 1200.0,
        "consumer_cpu_us_per_cmd": 800.0,
        "rss_mb": 90.0,
        "runs": 3,
    }
    assert side["peer"]["throughput_cmd_s"] == 500.0
    assert summary["ratios"]["throughput_worker_over_peer"] == 2.4
    assert summary["ratios"]["cpu_us_per_cmd_worker_over_floor"] == 1.6
    _, columns, rows = side_grid(summary)
    assert columns == [
        "median of 3 drain run(s)",
        "worker",
        "floor",
        "peer",
        "worker ÷ floor",
        "worker ÷ peer",
    ]
    assert rows[0] == ["throughput cmd/s", "1,200", "1,000", "500", "1.20", "2.40"]
    assert rows[2] == ["consumer RSS MB", "90.0", "45.0", "70.0", "2.00", "1.29"]


def test_without_the_worker_nothing_is_judged_and_the_table_says_so() -> None:
    """A run of the floor and the peer alone (``--consumers floor,peer``) has no acceptance
    point, fails nothing, and its acceptance table says the points were not measured."""
    drains = {"runs": [{"floor": _drain(1000.0, 500.0), "peer": _drain(400.0, 2000.0)}]}
    summary = summarize(_run(drain=drains))
    assert summary["acceptance"] == {}
    assert failed_points(summary) == []
    _, _, rows = points_grid("acceptance", summary["acceptance"])
    assert rows[0][1].startswith("not measured")


def test_a_ratio_just_under_its_bound_is_kept_and_printed_as_under_it() -> None:
    """996 of 1,106 commands/s is 0.8998: it fails ">= 0.9", and neither the JSON nor the table
    may show it as 0.9 (they used to: a failing 0.90)."""
    results = _run(
        drain=_drains((1106.4, 780.0)),
        latency100={"throughput_cmd_s": 995.5, "inflight_max": 396},
    )
    point = summarize(results)["information"]["latency100_throughput"]
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


def test_the_p99_point_carries_the_floors_and_peers_p99_and_the_stalled_windows() -> None:
    """Point (c) is judged on the worker's window; the floor's and the peer's p99 and the
    windows run again after a broker stall are kept beside it for the reader."""
    worker = _paced(21.0) | {"stalled_windows": [_paced(80.0, 40.0)]}
    results = _run(p99=worker, p99_floor=_paced(9.5), p99_peer=_paced(60.0))
    point = summarize(results)["acceptance"]["c_p99_at_half_rate"]
    assert point["pass"] is True
    assert point["floor_p99_ms"] == 9.5
    assert point["peer_p99_ms"] == 60.0
    assert point["stalled_windows_p99_ms"] == [(80.0, 40.0)]


def test_rss_needs_both_the_bound_and_the_commands_in_flight() -> None:
    """Point (d) fails at 120 MB when only 1,500 commands were in flight: the load was not met."""
    point = summarize(_run(rss={"rss_hwm_mb": 120.0, "rss_peak_mb": 118.0, "inflight_max": 1500}))
    entry = point["acceptance"]["d_rss_2000_in_flight"]
    assert (entry["measured"], entry["pass"]) == (120.0, False)
    assert shown(entry) == "120.00 (1500 in flight)"


def test_a_floor_over_the_p99_bound_is_reported_as_the_hosts_noise() -> None:
    """When even the bare pipeline misses 25 ms at the same offered rate, the run says so."""
    noisy = noise_warnings(_run(p99=_paced(42.0), p99_floor=_paced(204.5)))
    assert any("floor itself" in w and "204.5 ms" in w for w in noisy)
    quiet = noise_warnings(_run(p99=_paced(42.0), p99_floor=_paced(7.5)))
    assert not any("floor itself" in w for w in quiet)


def test_information_rows_say_whether_the_earlier_bound_held_never_fail() -> None:
    """The information table reads "held" / "not held": a missed earlier bound is not a FAIL."""
    summary = summarize(_run(drain=_drains((500.0, 800.0), peer=200.0)))
    _, columns, rows = points_grid("information", summary["information"], judged=False)
    assert columns[-1] == "earlier bound"
    verdicts = {row[0]: row[-1] for row in rows}
    assert verdicts["throughput_vs_floor"] == "not held"
    assert not any("FAIL" in row[-1] for row in rows)
