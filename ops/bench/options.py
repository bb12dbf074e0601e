"""The benchmark's command line (``python -m ops.bench.bench --help``)."""

from __future__ import annotations

import argparse

from .procs import DEFAULT_KINDS, KINDS, ROOT, SCENARIOS, Kind
from .verdict import BROKER_STALL_MS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ops.bench.bench",
        description="Benchmark the worker against the bare floor and the naive FastStream peer"
        " (see ops/bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--commands",
        type=int,
        default=None,
        help="measured commands per drain (default 5000, --quick 2000)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="commands before the measured window (default 10%%, at least 300)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 2000 commands, 5 s of paced load"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of " + ",".join(SCENARIOS),
    )
    p.add_argument(
        "--consumers",
        default=",".join(DEFAULT_KINDS),
        help=f"the consumers to run (a subset of {','.join(KINDS)}; default "
        f"{','.join(DEFAULT_KINDS)}; stack, the floor on the worker's libraries, drains only); "
        "without worker, only drain (and p99 with --rate) measure anything",
    )
    p.add_argument(
        "--peer-scenarios",
        default="drain",
        help="the scenarios the naive peer runs in besides the worker: a comma-separated subset "
        "of " + ",".join(SCENARIOS) + ", or all",
    )
    p.add_argument("--out", default=str(ROOT / "ops" / "bench" / "results" / "latest.json"))
    p.add_argument(
        "--max-window-s",
        type=float,
        default=20.0,
        help="cap on a drain's measured window (a busy machine still finishes in time)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="drain rounds (floor, worker, peer, the order rotated), the medians judged "
        "(default 3: one round swings ±10 %% on a shared box; --quick 1)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=256,
        help="CW_PREFETCH (and the floor's and the peer's prefetch)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=256,
        help="CW_HTTP_POOL_SIZE (and the floor's; the peer keeps httpx's default)",
    )
    p.add_argument("--conferences", type=int, default=1000, help="sandbox --conferences")
    p.add_argument("--latency-ms", type=float, default=100.0, help="sandbox latency of latency100")
    p.add_argument("--prefetch-latency", type=int, default=400, help="CW_PREFETCH in latency100")
    p.add_argument(
        "--rate", type=float, default=None, help="max rate for p99 when drain is not run"
    )
    p.add_argument(
        "--p99-seconds",
        type=float,
        default=None,
        help="paced load duration (default 10, --quick 5)",
    )
    p.add_argument(
        "--p99-warmup-s",
        type=float,
        default=2.0,
        help="paced load before the measured seconds (not counted)",
    )
    p.add_argument(
        "--p99-reruns",
        type=int,
        default=1,
        help="the worker's paced window is run again when the broker itself stalled in it"
        f" (publish → confirm p99 over {BROKER_STALL_MS:g} ms); every window is reported, the"
        " first without a stall is judged",
    )
    p.add_argument(
        "--p99-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the floor's latency at the same offered rate (the harness's own floor)",
    )
    rss_options(p)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--dedup-url", default="redis://127.0.0.1:6379/0", help="CW_DEDUP_URL")
    p.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the worker exports spans (OTLP/HTTP, default sampling) to a sink in the runner",
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra env for the worker (repeatable), e.g. tracing settings",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record the consumers during the measured windows",
    )
    p.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw")
    p.add_argument(
        "--profile-nonblocking",
        action="store_true",
        help="py-spy --nonblocking: no pauses, but inclusive shares suffer from torn stacks",
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)"
    )
    p.add_argument("--markdown", default=None, help="also write the run as Markdown to this file")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="only delete what killed runs left (bench-<id>-* queues, exchanges, dedup keys)",
    )
    replica_options(p)
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when an acceptance threshold fails"
    )
    args = p.parse_args(argv)
    if args.commands is None:
        args.commands = 2000 if args.quick else 5000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = max(300, args.commands // 10)
    if args.p99_seconds is None:
        args.p99_seconds = 5.0 if args.quick else 10.0
    for item in args.worker_env:
        if "=" not in item:
            p.error(f"--worker-env {item!r}: expected NAME=VALUE")
    if args.replicas is not None and (args.replicas < 1 or args.partitions < 1):
        p.error("--replicas and --partitions must be at least 1")
    args.consumers = consumers(p, args.consumers)
    args.peer_scenarios = peer_scenarios(p, args.peer_scenarios)
    return args


def rss_options(p: argparse.ArgumentParser) -> None:
    """The rss scenario's load."""
    p.add_argument("--rss-commands", type=int, default=2500)
    p.add_argument("--rss-prefetch", type=int, default=2000)
    p.add_argument(
        "--rss-pool-size", type=int, default=1024, help="per provider, so ~all are at the provider"
    )
    p.add_argument("--rss-latency-ms", type=float, default=2000.0)


def replica_options(p: argparse.ArgumentParser) -> None:
    """``--replicas`` and what goes with it (``ops/bench/replicas.py``)."""
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="instead of the scenarios: drain the single queue with 1 worker, P partitions with "
        "1 and with N replicas (CPU per command summed over them), then SIGKILL the active "
        "consumer under load and time the takeover (ops/bench/replicas.py)",
    )
    p.add_argument("--partitions", type=int, default=16, help="P of --replicas (CW_PARTITIONS)")
    p.add_argument(
        "--takeover",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --replicas N >= 2: measure the takeover after SIGKILL (twice when N >= 3)",
    )
    p.add_argument("--takeover-rate", type=float, default=200.0, help="paced cmd/s of takeover")
    p.add_argument(
        "--takeover-latency-ms", type=float, default=50.0, help="sandbox latency of takeover"
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def consumers(p: argparse.ArgumentParser, text: str) -> tuple[Kind, ...]:
    """``--consumers`` as kinds, in the order of :data:`KINDS`."""
    names = _names(text)
    unknown = sorted(set(names) - set(KINDS))
    if unknown or not names:
        p.error(f"--consumers {text!r}: expected a subset of {','.join(KINDS)}")
    return tuple(k for k in KINDS if k in names)


def peer_scenarios(p: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    """``--peer-scenarios`` as scenario names (``all``: every one)."""
    names = _names(text)
    if names == ["all"]:
        return SCENARIOS
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        p.error(f"--peer-scenarios {text!r}: expected all or a subset of {','.join(SCENARIOS)}")
    return tuple(s for s in SCENARIOS if s in names)
