"""Benchmark results: machine facts, and the tables of a run, on the console or as Markdown.

The verdicts themselves (side by side, ratios, acceptance) are :mod:`ops.bench.verdict`'s.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Iterator
from typing import Any

from aio_pika.abc import AbstractConnection
from rich.table import Table

from .procs import KINDS, ROOT

# --------------------------------------------------------------------------------------------
# Machine facts


def machine_facts(ctx_connection: AbstractConnection, redis_version: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    rabbit = "?"
    with contextlib.suppress(Exception):
        transport = ctx_connection.transport
        assert transport is not None
        props = transport.connection.server_properties
        version = props.get("version", b"?")
        rabbit = version.decode() if isinstance(version, bytes) else str(version)
    packages = {}
    for name in (
        "aio-pika",
        "aiormq",
        "aiohttp",
        "redis",
        "orjson",
        "pydantic",
        "opentelemetry-sdk",
        "faststream",
        "fast-depends",
        "httpx",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "redis": redis_version,
        "packages": packages,
        "loadavg_at_start": os.getloadavg(),
        "git": git_facts(),
    }


def git_facts() -> dict[str, Any]:
    """HEAD and the changed files: the worker measured is the working tree, not HEAD."""

    def run(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in run("status", "--porcelain").splitlines() if len(line) > 3]
    return {"head": run("rev-parse", "--short", "HEAD").strip(), "dirty_files": dirty}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


_MAIN_COLUMNS = (
    "scenario",
    "process",
    "cmds",
    "cmd/s",
    "CPU µs/cmd",
    "CPU %",
    "RSS MB",
    "in flight mean/max",
    "sandbox µs",
    "rabbit µs",
    "redis µs",
    "runner µs",
    "others CPU %",
)


def _row(tag: str, r: dict[str, Any]) -> list[str]:
    cpu = r["cpu_us_per_cmd"]
    paced = "achieved_cmd_s" in r
    return [
        tag,
        r["kind"],
        _fmt(r["commands"]),
        f"{_fmt(r['achieved_cmd_s'])} paced" if paced else _fmt(r["throughput_cmd_s"]),
        _fmt(r["consumer_cpu_us_per_cmd"]),
        _fmt(r["consumer_cpu_util_pct"]),
        _fmt(max(r["rss_hwm_mb"], r.get("rss_peak_mb", 0.0)), 1),
        "" if paced else f"{_fmt(r['inflight_mean'])}/{_fmt(r['inflight_max'])}",
        _fmt(cpu["sandbox"]),
        _fmt(cpu["rabbitmq"]),
        _fmt(cpu["redis"]),
        _fmt(cpu["runner"]),
        _fmt(r["cpu_util_pct"]["others"]),
    ]


_SCENARIO_KEYS = (
    "p99",
    "p99_floor",
    "p99_peer",
    "latency100",
    "latency100_peer",
    "rss",
    "rss_peer",
)
Grid = tuple[str, list[str], list[list[str]]]  # title, columns, rows: a table, in either form


def _main_rows(scen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    runs = scen.get("drain", {}).get("runs", [])
    for i, run in enumerate(runs):
        tag = "drain" + (f"#{i + 1}" if len(runs) > 1 else "")
        rows += [(tag, run[kind]) for kind in KINDS if kind in run]
    for key in _SCENARIO_KEYS:
        if key in scen:
            rows.append((key.split("_", 1)[0], scen[key]))
    return rows


def main_grid(results: dict[str, Any]) -> Grid:
    rows = [_row(tag, r) for tag, r in _main_rows(results["scenarios"])]
    return f"conference-worker bench {results['run_id']}", list(_MAIN_COLUMNS), rows


def latency_grid(scen: dict[str, Any]) -> Grid:
    columns = ["process", "offered cmd/s", "p50", "p95", "p99", "p99.9", "max", "broker p99"]
    rows = []
    for key in ("p99", "p99_floor", "p99_peer"):
        if key in scen:
            r = scen[key]
            lat = r["latency_ms"]
            rows.append(
                [r["kind"], _fmt(r["offered_cmd_s"])]
                + [_fmt(lat[k], 2) for k in ("p50", "p95", "p99", "p99.9", "max")]
                + [_broker_p99(r)]
            )
    title = "publish → result latency (ms) at half the measured rate (the peer: half its own)"
    return title, columns, rows


def _broker_p99(r: dict[str, Any]) -> str:
    confirm = r.get("broker_confirm_ms") or {}
    return _fmt(confirm["p99"], 2) if "p99" in confirm else "—"


def _over(a: float | None, b: float | None) -> str:
    return _fmt(a / b, 2) if a is not None and b else "–"


def side_grid(summary: dict[str, Any]) -> Grid:
    """Worker, floor and peer side by side (drain medians), and the worker's ratios."""
    side = summary["side_by_side"]
    kinds = [k for k in ("worker", "floor", "stack", "peer") if k in side]
    others = [k for k in ("floor", "stack", "peer") if k in side and "worker" in side]
    runs = summary["ratios"].get("runs", max((v["runs"] for v in side.values()), default=0))
    columns = [f"median of {runs} drain run(s)", *kinds, *(f"worker ÷ {k}" for k in others)]
    rows = []
    for label, key, digits in (
        ("throughput cmd/s", "throughput_cmd_s", 0),
        ("consumer CPU µs/cmd", "consumer_cpu_us_per_cmd", 0),
        ("consumer RSS MB", "rss_mb", 1),
    ):
        worker = side.get("worker", {}).get(key)
        rows.append(
            [label]
            + [_fmt(side[k][key], digits) for k in kinds]
            + [_over(worker, side[k][key]) for k in others]
        )
    return "worker / floor / peer", columns, rows


def points_grid(title: str, points: dict[str, Any], *, judged: bool = True) -> Grid:
    """Acceptance points (pass / FAIL, and the goal when there is one) or information figures
    (whether the earlier bound held: held / not held)."""
    rows = []
    for key, a in points.items():
        threshold = a["threshold"] + (f" (goal {a['goal']:g})" if "goal" in a else "")
        if not judged:
            result = "held" if a["pass"] else "not held"
        else:
            result = "pass" if a["pass"] else "FAIL"
        if "meets_goal" in a:
            result += ", goal met" if a["meets_goal"] else ", goal not met"
        rows.append([key, shown(a), threshold, result])
    if not rows:
        rows.append(["–", "not measured (the worker did not run these scenarios)", "", ""])
    return (
        title,
        ["criterion", "measured", "threshold", "result" if judged else "earlier bound"],
        rows,
    )


def grids(results: dict[str, Any]) -> Iterator[Grid]:
    """Every table of a run: the runs, the latencies, side by side, acceptance, information."""
    summary = results["summary"]
    yield main_grid(results)
    if any(k in results["scenarios"] for k in ("p99", "p99_floor", "p99_peer")):
        yield latency_grid(results["scenarios"])
    if summary.get("side_by_side"):
        yield side_grid(summary)
    yield points_grid("acceptance", summary["acceptance"])
    if summary.get("information"):
        yield points_grid("information (not judged)", summary["information"], judged=False)


def _colored(cell: str) -> str:
    if cell.startswith("FAIL"):
        return f"[red]{cell}"
    return f"[green]{cell}" if cell.startswith("pass") else cell


def to_table(grid: Grid) -> Table:
    title, columns, rows = grid
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 or col == "process" else "right")
    for row in rows:
        table.add_row(*(_colored(cell) for cell in row))
    return table


def to_markdown(grid: Grid) -> list[str]:
    title, columns, rows = grid
    lines = ["", f"**{title}**", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def shown(a: dict[str, Any]) -> str:
    """An acceptance entry's measured value as printed: two decimals, more when two would show
    the bound itself (0.8998 against >= 0.9 reads 0.8998, not a failing 0.90)."""
    measured = a["measured"]
    text = str(measured)
    if isinstance(measured, float) and math.isnan(measured):
        text = _fmt(measured)  # no samples: a dash, as in the other tables
    elif isinstance(measured, float):
        for digits in (2, 3, 4):
            text = f"{measured:,.{digits}f}"
            if float(text.replace(",", "")) != a.get("bound"):
                break
    if "inflight_max" in a:
        text = f"{text} ({a['inflight_max']} in flight)"
    return text


def markdown(results: dict[str, Any]) -> str:
    """The run as Markdown (machine facts, command, tables): RESULTS.md is made of these."""
    m = results["machine"]
    dirty = m["git"]["dirty_files"]
    lines = [
        f"### Run `{results['run_id']}` ({results['started_at'][:19]}Z, {results['duration_s']} s)",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {m['nproc']} cores, {m['cpu_model']}, kernel {m['kernel']}; "
        f"RabbitMQ {m['rabbitmq']}, Redis {m['redis']}, Python {m['python']}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- load average at start/end: {m['loadavg_at_start'][0]:.2f} / "
        f"{m.get('loadavg_at_end', [0.0])[0]:.2f}; git {m['git']['head']}"
        + (f" with {len(dirty)} changed file(s)" if dirty else ""),
    ]
    for grid in grids(results):
        lines += to_markdown(grid)
    lines += [""] + [f"> {w}" for w in results.get("noise_warnings", [])]
    return "\n".join(lines) + "\n"


def tables(results: dict[str, Any]) -> Iterator[Table]:
    for grid in grids(results):
        yield to_table(grid)
