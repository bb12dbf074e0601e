"""Which consumers the benchmark runs, where and in which order (``ops/bench/plan.py``), and how
it starts the naive peer (``ops/bench/stage.py``, ``ops/bench/options.py``)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, cast

import pytest

from ops.bench.load import SandboxFixtures
from ops.bench.options import parse
from ops.bench.plan import drain_order, keyed, kinds_in, spec_name
from ops.bench.procs import DEFAULT_KINDS, SCENARIOS
from ops.bench.stage import Ctx, SandboxProc, consumer_command, topology_for


def _ctx(*argv: str) -> Ctx:
    """A context with parsed options and a run id, nothing connected (none is needed here)."""
    none = cast(Any, None)
    return Ctx(
        args=parse(list(argv)),
        run_id="bench-1234abcd",
        logs=Path("/tmp"),
        connection=none,
        channel=none,
        probe=none,
        redis=none,
        http=none,
        beam=[],
        redis_server=[],
    )


def _sandbox() -> SandboxProc:
    fixtures = SandboxFixtures("vx-key", "acct", ("c1",), "tx-key", ("t1",), {"t1": ("a", "b")})
    return SandboxProc(cast(Any, None), "http://127.0.0.1:9/v2", 0.0, fixtures)


def test_drain_rounds_rotate_the_three_consumers() -> None:
    """Floor, worker, peer; worker, peer, floor; peer, floor, worker; then again: each consumer
    goes first, in the middle and last in turn, and every round has all three."""
    orders = [drain_order(i) for i in range(4)]
    assert orders == [
        ("floor", "worker", "peer"),
        ("worker", "peer", "floor"),
        ("peer", "floor", "worker"),
        ("floor", "worker", "peer"),
    ]


def test_with_two_consumers_the_rotation_is_the_earlier_pair_order() -> None:
    """Without the peer the drains alternate floor/worker as they always did."""
    assert [drain_order(i, ("floor", "worker")) for i in range(3)] == [
        ("floor", "worker"),
        ("worker", "floor"),
        ("floor", "worker"),
    ]
    assert drain_order(5, ()) == ()


def test_by_default_the_peer_runs_in_the_drain_only() -> None:
    """``--peer-scenarios drain`` (the default): the drain runs floor, worker and peer; latency100,
    p99 and rss run the worker alone (p99's floor window is ``--p99-floor``'s)."""
    args = parse([])
    assert args.consumers == DEFAULT_KINDS
    assert kinds_in(args, "drain") == ("floor", "worker", "peer")
    for scenario in ("latency100", "p99", "rss"):
        assert kinds_in(args, scenario) == ("worker",)


def test_peer_scenarios_all_adds_the_peer_everywhere() -> None:
    """``--peer-scenarios all`` names every scenario; the peer then runs beside the worker."""
    args = parse(["--peer-scenarios", "all"])
    assert args.peer_scenarios == SCENARIOS
    for scenario in ("latency100", "p99", "rss"):
        assert kinds_in(args, scenario) == ("worker", "peer")


def test_consumers_leave_out_the_worker_and_keep_their_canonical_order() -> None:
    """``--consumers peer,floor`` (the worker left out, e.g. while it is broken) drains the floor
    and the peer, in the usual order, and runs nothing in the worker-only scenarios."""
    args = parse(["--consumers", "peer,floor"])
    assert args.consumers == ("floor", "peer")
    assert kinds_in(args, "drain") == ("floor", "peer")
    assert kinds_in(args, "rss") == ()


@pytest.mark.parametrize(
    "argv", [["--consumers", "floor,robot"], ["--consumers", ""], ["--peer-scenarios", "soak"]]
)
def test_unknown_consumers_or_scenarios_are_refused(argv: list[str]) -> None:
    """A consumer or scenario name the benchmark does not know stops it before anything runs."""
    with pytest.raises(SystemExit):
        parse(argv)


def test_results_and_stages_are_named_by_scenario_and_consumer() -> None:
    """The worker keeps the scenario's own key (``p99``, ``rss``); the others get a suffix, as
    ``p99_floor`` always had, and their stages a ``-<kind>`` name."""
    assert keyed("p99", "worker") == "p99"
    assert keyed("p99", "floor") == "p99_floor"
    assert keyed("rss", "peer") == "rss_peer"
    assert spec_name("latency100", "peer") == "latency100-peer"
    assert spec_name("latency100", "worker") == "latency100"


def test_the_peer_is_started_like_the_floor_with_its_dedup_keys_under_the_run() -> None:
    """The peer gets the floor's broker, queue and provider arguments plus Redis and a run name
    that puts its keys under ``cw:peer:bench-<run id>-*``: the patterns the stage and
    ``--cleanup`` delete."""
    ctx = _ctx()
    topology = topology_for(f"{ctx.run_id}-drain-peer")
    common: dict[str, Any] = {
        "name": "drain-peer",
        "topology": topology,
        "sandbox": _sandbox(),
        "prefetch": 256,
        "pool_size": 256,
    }
    argv, env = consumer_command(ctx, "peer", **common)
    floor, _ = consumer_command(ctx, "floor", **common)
    assert argv[1:3] == ["-m", "ops.bench.peer"]
    assert argv[3 : floor.index("--pool-size")] == floor[3 : floor.index("--pool-size")]
    assert "--pool-size" not in argv
    assert argv[argv.index("--redis-url") + 1] == ctx.args.dedup_url
    run = argv[argv.index("--run") + 1]
    key = f"cw:peer:{run}:{ctx.run_id}-drain-peer-0000001"  # as ops/bench/peer.py names it
    assert fnmatchcase(key, f"cw:peer:{ctx.run_id}-drain-peer:*")
    assert fnmatchcase(key, f"cw:peer:{ctx.run_id}-*")
    assert fnmatchcase(key, "cw:peer:bench-*")
    assert not any(name.startswith("CW_") for name in env)
