"""The benchmark's plan: which consumers run in which scenario, in which order, at which rate.

Consumers (``--consumers``, all three by default): the floor, the worker and the naive peer.
The drain runs every one of them, each repeat in a rotated order (:func:`drain_order`); the
other scenarios run the worker, and the peer too when ``--peer-scenarios`` names them
(``drain`` by default, ``all`` for every scenario).  p99's floor window is ``--p99-floor``.
Results are keyed by scenario for the worker and ``<scenario>_<kind>`` for the others
(``p99_floor``, ``p99_peer``, ``latency100_peer``, ``rss_peer``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import AsyncIterator
from typing import Any

from .procs import DEFAULT_KINDS, KINDS, Kind, console
from .scenarios import DrainSpec, drain, paced
from .stage import Ctx, SandboxProc, start_sandbox
from .verdict import BROKER_STALL_MS


def kinds_in(args: argparse.Namespace, scenario: str) -> tuple[Kind, ...]:
    """The consumers that run ``scenario``, in :data:`KINDS` order (p99's floor aside)."""
    chosen: tuple[Kind, ...] = args.consumers
    peer = "peer" in chosen and scenario in args.peer_scenarios
    if scenario == "drain":
        return tuple(k for k in chosen if k != "peer" or peer)
    return tuple(k for k in chosen if k == "worker" or (k == "peer" and peer))


def drain_order(index: int, kinds: tuple[Kind, ...] = DEFAULT_KINDS) -> tuple[Kind, ...]:
    """``kinds`` rotated by ``index``: floor, worker, peer; worker, peer, floor; peer, floor,
    worker; ...  Each kind goes first, middle and last in turn, so a host that slows down (or
    speeds up) during the run does not always favour the same side.  With two kinds this is
    the earlier pair order: floor, worker; worker, floor."""
    if not kinds:
        return ()
    shift = index % len(kinds)
    return kinds[shift:] + kinds[:shift]


def keyed(scenario: str, kind: Kind) -> str:
    """The results key: ``p99`` for the worker, ``p99_floor`` / ``p99_peer`` for the others."""
    return scenario if kind == "worker" else f"{scenario}_{kind}"


def spec_name(scenario: str, kind: Kind) -> str:
    """The stage (and log) name: ``latency100`` for the worker, ``latency100-peer`` ..."""
    return scenario if kind == "worker" else f"{scenario}-{kind}"


def drain_rate(scen: dict[str, Any], kind: Kind) -> float | None:
    """The median drain throughput of ``kind`` (None when it was not drained)."""
    runs = [r[kind]["throughput_cmd_s"] for r in scen.get("drain", {}).get("runs", []) if kind in r]
    return float(statistics.median(runs)) if runs else None


async def run_scenarios(ctx: Ctx, scenarios: list[str], results: dict[str, Any]) -> None:
    """One sandbox per latency.  Drain rounds and latency100 runs alternate (the host's speed
    drifts within minutes), and each is judged by its median; p99 follows the drains."""
    args = ctx.args
    scen = results["scenarios"]
    async with contextlib.AsyncExitStack() as stack:
        zero = slow = None
        if "drain" in scenarios or "p99" in scenarios:
            zero = await stack.enter_async_context(sandbox_at(ctx, 0.0))
        if "latency100" in scenarios and kinds_in(args, "latency100"):
            slow = await stack.enter_async_context(sandbox_at(ctx, args.latency_ms))
        await repeats(ctx, scen, zero if "drain" in scenarios else None, slow)
        if zero is not None and "p99" in scenarios:
            await p99(ctx, zero, scen)
    if "rss" in scenarios:
        await rss(ctx, scen)


async def repeats(
    ctx: Ctx, scen: dict[str, Any], zero: SandboxProc | None, slow: SandboxProc | None
) -> None:
    """``--repeat`` rounds, each the drains (on ``zero``) then the latency100 runs (``slow``)."""
    args = ctx.args
    rounds: list[dict[str, Any]] = []
    slows: dict[Kind, list[dict[str, Any]]] = {}
    for i in range(args.repeat):
        if zero is not None:
            rounds.append(await drain_round(ctx, zero, i))
        if slow is None:
            continue
        for kind in kinds_in(args, "latency100"):
            name = spec_name("latency100", kind)
            spec = drain_spec(ctx, name, kind, slow, index=i, prefetch=args.prefetch_latency)
            slows.setdefault(kind, []).append(await drain(ctx, spec))
    if rounds:
        scen["drain"] = {"runs": rounds}
    for kind, runs in slows.items():
        scen[keyed("latency100", kind)] = median_run(runs)


def drain_spec(
    ctx: Ctx, name: str, kind: Kind, sandbox: SandboxProc, *, index: int, prefetch: int
) -> DrainSpec:
    """A drain of ``--commands`` with the run's settings; ``index`` numbers repeated runs."""
    args = ctx.args
    return DrainSpec(
        name + (f"-{index + 1}" if args.repeat > 1 else ""),
        kind,
        sandbox,
        args.commands,
        args.warmup,
        prefetch,
        args.pool_size,
        profile=args.profile,
        max_window_s=args.max_window_s,
    )


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput, with every run's throughput beside it."""
    ordered = sorted(runs, key=lambda r: r["throughput_cmd_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        median["repeats_cmd_s"] = [r["throughput_cmd_s"] for r in runs]
    return median


@contextlib.asynccontextmanager
async def sandbox_at(ctx: Ctx, latency_ms: float) -> AsyncIterator[SandboxProc]:
    sandbox = await start_sandbox(ctx, latency_ms)
    try:
        yield sandbox
    finally:
        await sandbox.child.astop()


async def drain_round(ctx: Ctx, sandbox: SandboxProc, index: int) -> dict[str, Any]:
    """Every drained consumer, in :func:`drain_order`, on the same sandbox and command mix."""
    found: dict[str, Any] = {}
    for kind in drain_order(index, kinds_in(ctx.args, "drain")):
        spec = drain_spec(
            ctx, f"drain-{kind}", kind, sandbox, index=index, prefetch=ctx.args.prefetch
        )
        found[kind] = await drain(ctx, spec)
    return {kind: found[kind] for kind in KINDS if kind in found}


async def p99(ctx: Ctx, sandbox: SandboxProc, scen: dict[str, Any]) -> None:
    """Half the worker's measured drain rate (or ``--rate``/2): the worker, then the floor at
    the same offered rate; the peer (when asked) at half its own drain rate."""
    args = ctx.args
    base = args.rate or drain_rate(scen, "worker") or drain_rate(scen, "floor")
    if base is None:
        raise SystemExit("p99 needs the drain scenario or --rate (commands/s)")
    kinds = kinds_in(args, "p99")
    if "worker" in kinds:
        scen["p99"] = await paced_past_stalls(ctx, sandbox, "worker", base / 2.0, base)
    if args.p99_floor and "floor" in args.consumers:
        scen["p99_floor"] = await paced(ctx, sandbox, "floor", base / 2.0, base)
    if "peer" in kinds:  # at the worker's half rate a slower peer would only build a backlog
        own = args.rate or drain_rate(scen, "peer") or base
        scen["p99_peer"] = await paced(ctx, sandbox, "peer", own / 2.0, own)


async def paced_past_stalls(
    ctx: Ctx, sandbox: SandboxProc, kind: Kind, offered: float, measured: float
) -> dict[str, Any]:
    """A paced window, run again (``--p99-reruns`` times at most) while the broker stalled in it.

    When the broker alone takes over half the latency target to confirm (its quorum queue's disk
    write stalled), every consumer's latency measures the disk, not the consumer: such a window
    is kept in ``stalled_windows`` and the next one is judged (the last one if all stalled).
    """
    stalled: list[dict[str, Any]] = []
    while True:
        window = await paced(ctx, sandbox, kind, offered, measured)
        broker = window["broker_confirm_ms"]["p99"]
        if broker <= BROKER_STALL_MS or len(stalled) >= ctx.args.p99_reruns:
            break
        console.print(
            f"[yellow]{kind}: the broker took {broker:.1f} ms (p99, publish → confirm): "
            "its disk stalled; the window is run again"
        )
        stalled.append({k: window[k] for k in ("latency_ms", "broker_confirm_ms")})
    if stalled:
        window["stalled_windows"] = stalled
    return window


async def rss(ctx: Ctx, scen: dict[str, Any]) -> None:
    """2,500 commands at 2,000 ms latency with 2,000 in flight: the worker (and the peer)."""
    args = ctx.args
    kinds = kinds_in(args, "rss")
    if not kinds:
        return
    async with sandbox_at(ctx, args.rss_latency_ms) as sandbox:
        for kind in kinds:
            spec = DrainSpec(
                spec_name("rss", kind),
                kind,
                sandbox,
                args.rss_commands,
                0,
                args.rss_prefetch,
                args.rss_pool_size,
                sample_every_s=0.1,
                max_window_s=120.0,
            )
            scen[keyed("rss", kind)] = await drain(ctx, spec)
