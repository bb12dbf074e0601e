"""``./scripts/bench --replicas N``: the partitioned topology drained by 1 and N worker replicas,
and the takeover after SIGKILL of an active consumer (``ops/bench/README.md``, "Replicas").

Drains (``--commands`` after the warm-up, on the 0 ms sandbox, ``--repeat`` rounds), rows:

- ``P=0 ×1``: the single command queue, one replica (what the main benchmark drains);
- ``P ×1``: ``--partitions`` partitions, one replica: the intake hop's cost (one more
  consume, confirmed publish and ack per command);
- ``P ×N``: the same with N replicas: what the standbys cost.

The replicas are started and consume every queue (waiting single-active consumers included)
before any command is published; the window opens once the publishing is done and the warm-up
answered, and closes at the last result.  CPU per command is summed over the replicas, and
given for RabbitMQ, the sandbox and Redis.  On a 2-core machine N replicas share two cores: the
figures are about overhead, not speed-up (on RabbitMQ 3.x one replica is active on every
partition anyway, README "Scaling").

Takeover (N ≥ 2): N replicas under paced load (``--takeover-rate`` commands/s, sandbox at
``--takeover-latency-ms``); the active consumer of the busiest partition is SIGKILLed, twice
when N ≥ 3.  Each kill is measured as the seconds until ``rabbitmqctl`` shows another replica
active on that partition (polled, each poll about 0.5 s) and as the longest gap between two
results around it; at the end every command must have its result.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .brokerctl import active_replicas, all_consume, took_over
from .load import CommandPublisher, PacedPublisher, ResultCollector, percentiles, preload
from .plan import sandbox_at
from .procs import BenchError, Child, Snap, console, snap, spawn, status_kb
from .stage import Ctx, SandboxProc, Stage, consumer_command, stage

Grid = tuple[str, list[str], list[list[str]]]
Row = dict[str, Any]
ROLES = ("rabbitmq", "sandbox", "redis")


@dataclass(slots=True)
class Fleet:
    """Named worker replicas (``CW_INSTANCE_NAME``) on one stage's topology."""

    ctx: Ctx
    st: Stage
    sandbox: SandboxProc
    children: dict[str, Child] = field(default_factory=dict)
    started: int = 0

    def spawn(self) -> str:
        self.started += 1
        name = f"{self.st.name}-r{self.started}"
        args = self.ctx.args
        argv, env = consumer_command(
            self.ctx,
            "worker",
            name=name,
            topology=self.st.topology,
            sandbox=self.sandbox,
            prefetch=args.prefetch,
            pool_size=args.pool_size,
        )
        env["CW_INSTANCE_NAME"] = name
        self.children[name] = spawn(name, argv, env, self.ctx.logs)
        return name

    def check(self) -> None:
        for child in self.children.values():
            if not child.alive():
                raise BenchError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")

    async def wait_consuming(self, timeout_s: float = 90.0) -> None:
        """Until every replica consumes the intake and every partition."""
        top = self.st.topology
        queues = list(dict.fromkeys([top.intake_queue, *top.work_queues()]))
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            if await asyncio.to_thread(all_consume, queues, len(self.children)):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.st.name}: the replicas did not all consume in time")
            await asyncio.sleep(0.3)

    async def wait_results(self, collector: ResultCollector, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not await collector.wait_for(count, timeout_s=0.5):
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.st.name}: {collector.count} of {count} results "
                    f"(statuses {dict(collector.statuses)})"
                )

    def roles(self) -> dict[str, list[int]]:
        roles = {name: [child.pid] for name, child in self.children.items()}
        roles.update(
            rabbitmq=self.ctx.beam,
            sandbox=[self.sandbox.child.pid],
            redis=self.ctx.redis_server,
            runner=[os.getpid()],
        )
        return roles

    async def active_on(self) -> Counter[str]:
        """How many partitions each replica is the active consumer of."""
        queues = self.st.topology.work_queues()
        return Counter((await asyncio.to_thread(active_replicas, queues)).values())

    def kill(self, name: str) -> None:
        child = self.children.pop(name)
        child.popen.kill()
        child.stop()

    async def stop(self) -> None:
        for child in list(self.children.values()):
            await child.astop()


# --------------------------------------------------------------------------------------------
# Drains


async def drain_row(ctx: Ctx, sandbox: SandboxProc, partitions: int, n: int, index: int) -> Row:
    """Warm-up + ``--commands`` published to N consuming replicas; the window after the warm-up."""
    args = ctx.args
    total = args.warmup + args.commands
    name = f"replicas-p{partitions}x{n}-{index + 1}"
    console.print(f"[bold]{name}[/]: {n} replica(s), P={partitions}, {total} commands")
    async with stage(ctx, name, sandbox, partitions) as st:
        fleet = Fleet(ctx, st, sandbox)
        try:
            for _ in range(n):
                fleet.spawn()
            await fleet.wait_consuming()
            active = await fleet.active_on()
            snaps: dict[str, Snap] = {}

            def window_end(_: int) -> None:
                snaps["end"] = snap(fleet.roles())

            st.collector.hooks[total] = window_end
            publisher = await CommandPublisher.open(ctx.channel, st.topology.commands_exchange)
            await preload(publisher, st.factory.make_many(0, total))
            await fleet.wait_results(st.collector, args.warmup, 120.0)
            begun, snaps["start"] = st.collector.count, snap(fleet.roles())
            await fleet.wait_results(st.collector, total, 300.0)
            rss = {k: (status_kb(c.pid, "VmHWM") or 0) / 1024 for k, c in fleet.children.items()}
        finally:
            await fleet.stop()
    if total - begun < args.commands // 2:
        raise BenchError(f"{name}: only {total - begun} commands in the window: raise --commands")
    return drain_metrics(snaps["start"], snaps["end"], total - begun, active, rss) | {
        "partitions": partitions,
        "replicas": n,
        "statuses": dict(st.collector.statuses),
    }


def drain_metrics(
    start: Snap,
    end: Snap,
    n: int,
    active: Counter[str],
    rss: dict[str, float],
) -> Row:
    seconds = end.t - start.t
    cpu = {role: end.cpu[role] - start.cpu[role] for role in end.cpu}
    per_replica = {name: cpu[name] for name in rss}
    workers = sum(per_replica.values())
    return {
        "commands": n,
        "window_s": round(seconds, 3),
        "throughput_cmd_s": round(n / seconds, 1),
        "workers_cpu_us_per_cmd": round(workers / n * 1e6, 1),
        "replica_cpu_us_per_cmd": {k: round(v / n * 1e6, 1) for k, v in per_replica.items()},
        "active_partitions": {k: active.get(k, 0) for k in per_replica},
        "cpu_us_per_cmd": {r: round(cpu[r] / n * 1e6, 1) for r in ROLES},
        "system_cpu_us_per_cmd": round((workers + sum(cpu[r] for r in ROLES)) / n * 1e6, 1),
        "others_cpu_pct": round(100.0 * max(0.0, cpu["others"]) / seconds, 1),
        "rss_hwm_mb": {k: round(v, 1) for k, v in rss.items()},
    }


# --------------------------------------------------------------------------------------------
# Takeover


async def takeover(ctx: Ctx, partitions: int, n: int) -> Row:
    """Paced load on N replicas; SIGKILL the busiest active consumer once, or twice (N ≥ 3)."""
    args = ctx.args
    kills = 2 if n >= 3 else 1
    console.print(
        f"[bold]takeover[/]: {n} replicas, P={partitions}, {args.takeover_rate:g} cmd/s, "
        f"sandbox {args.takeover_latency_ms:g} ms, {kills} SIGKILL(s)"
    )
    async with (
        sandbox_at(ctx, args.takeover_latency_ms) as sandbox,
        stage(ctx, "takeover", sandbox, partitions) as st,
    ):
        fleet = Fleet(ctx, st, sandbox)
        try:
            for _ in range(n):
                fleet.spawn()
            await fleet.wait_consuming()
            publisher = await CommandPublisher.open(ctx.channel, st.topology.commands_exchange)
            pacer = PacedPublisher(publisher, st.factory, st.collector, args.takeover_rate)
            load = asyncio.create_task(pacer.run(4.0 + 6.0 * kills))
            events = []
            for k in range(kills):
                await asyncio.sleep(3.0 if k == 0 else 4.0)
                events.append(await kill_active(fleet))
            achieved = await load
            lost = await unanswered(fleet, st.collector, 180.0)
        finally:
            await fleet.stop()
    arrivals = sorted(sent + latency for sent, latency in st.collector.latencies)
    for event in events:
        event["result_gap_s"] = round(result_gap(arrivals, event.pop("t"), 20.0), 3)
    latencies_ms = [latency * 1000 for _, latency in st.collector.latencies]
    return {
        "partitions": partitions,
        "replicas": n,
        "offered_cmd_s": args.takeover_rate,
        "achieved_cmd_s": round(achieved, 1),
        "sandbox_latency_ms": args.takeover_latency_ms,
        "sent": pacer.sent,
        "results": st.collector.count,
        "lost": lost,
        "kills": events,
        "latency_ms": {k: round(v, 1) for k, v in percentiles(latencies_ms, (50, 99, 100)).items()},
        "statuses": dict(st.collector.statuses),
    }


async def kill_active(fleet: Fleet) -> Row:
    """SIGKILL the replica active on the most partitions; time until another is active."""
    queues = fleet.st.topology.work_queues()
    active = await asyncio.to_thread(active_replicas, queues)
    if not active:
        raise BenchError("no partition has an active consumer")
    name, count = Counter(active.values()).most_common(1)[0]
    queue = next(q for q in queues if active.get(q) == name)
    began = time.perf_counter()  # the clock of the results' arrivals (result_gap)
    fleet.kill(name)
    try:
        took, now = await took_over(queue, name, 60.0)
    except TimeoutError:
        raise BenchError(f"no replica took {queue} over within 60 s") from None
    console.print(f"  SIGKILL {name} (active on {count}): {queue} to {now} in {took:.2f} s")
    return {"killed": name, "active_on": count, "partition": queue, "by": now,
            "takeover_s": round(took, 3), "t": began}  # fmt: skip


async def unanswered(fleet: Fleet, collector: ResultCollector, timeout_s: float) -> int:
    """Wait until every published command has a result; how many have none."""
    deadline = time.monotonic() + timeout_s
    while collector.sent_at and time.monotonic() < deadline:
        fleet.check()
        await asyncio.sleep(0.5)
    return len(collector.sent_at)


def result_gap(arrivals: list[float], at: float, span_s: float) -> float:
    """The longest gap between consecutive results from ``at`` - 1 s to ``at`` + ``span_s``
    (counting from ``at`` when the first result after it is the first in the span)."""
    inside = [t for t in arrivals if at - 1.0 <= t <= at + span_s]
    points = sorted([at, *inside])
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


# --------------------------------------------------------------------------------------------
# The run and its tables


def plan(args: Any) -> list[tuple[int, int]]:
    """The (partitions, replicas) rows, in order."""
    rows = [(0, 1), (args.partitions, 1)]
    return rows + ([(args.partitions, args.replicas)] if args.replicas > 1 else [])


async def run_replicas(ctx: Ctx) -> Row:
    args = ctx.args
    runs: list[list[Row]] = []
    async with sandbox_at(ctx, 0.0) as sandbox:
        for index in range(args.repeat):
            rows = plan(args)
            rows = rows[index % len(rows) :] + rows[: index % len(rows)]  # rotated, as the drains
            found = [await drain_row(ctx, sandbox, p, n, index) for p, n in rows]
            runs.append(sorted(found, key=lambda r: (r["partitions"] > 0, r["replicas"])))
    out: Row = {"drains": runs, "summary": summarize(runs)}
    if args.replicas > 1 and args.takeover:
        out["takeover"] = await takeover(ctx, args.partitions, args.replicas)
    return out


def summarize(runs: list[list[Row]]) -> list[Row]:
    """Per row: throughput and CPU per command over the rounds (min, median, max)."""
    rows: list[Row] = []
    for position in range(len(runs[0])):
        same = [run[position] for run in runs]
        row: Row = {"partitions": same[0]["partitions"], "replicas": same[0]["replicas"]}
        for key in ("throughput_cmd_s", "workers_cpu_us_per_cmd", "system_cpu_us_per_cmd"):
            values = [r[key] for r in same]
            row[key] = [min(values), statistics.median(values), max(values)]
        row["rabbitmq_cpu_us_per_cmd"] = statistics.median(
            r["cpu_us_per_cmd"]["rabbitmq"] for r in same
        )
        rows.append(row)
    return rows


def _range(values: list[float]) -> str:
    low, mid, high = values
    return f"{low:,.0f}–{high:,.0f} ({mid:,.0f})"


def grids(out: Row) -> list[Grid]:
    """The drains (ranges over the rounds, median in brackets) and the takeover."""
    columns = ["layout", "replicas", "cmd/s", "workers CPU µs/cmd", "rabbit µs/cmd", "all µs/cmd"]
    rows = [
        [
            f"P={r['partitions']}" if r["partitions"] else "single queue",
            str(r["replicas"]),
            _range(r["throughput_cmd_s"]),
            _range(r["workers_cpu_us_per_cmd"]),
            f"{r['rabbitmq_cpu_us_per_cmd']:,.0f}",
            _range(r["system_cpu_us_per_cmd"]),
        ]
        for r in out["summary"]
    ]
    found: list[Grid] = [("replicas: drains (min–max over rounds, median)", columns, rows)]
    take = out.get("takeover")
    if take:
        cols = ["SIGKILL", "active on", "takeover s", "result gap s", "lost", "latency p99/max ms"]
        lat = take["latency_ms"]
        found.append(
            (
                f"takeover: {take['replicas']} replicas, {take['achieved_cmd_s']:g} cmd/s, "
                f"{take['sent']} commands, {take['results']} results",
                cols,
                [
                    [
                        k["killed"],
                        f"{k['active_on']} partitions",
                        f"{k['takeover_s']:.2f}",
                        f"{k['result_gap_s']:.2f}",
                        str(take["lost"]),
                        f"{lat['p99']:,.0f} / {lat['p100']:,.0f}",
                    ]
                    for k in take["kills"]
                ],
            )
        )
    return found
