"""Profiling (optional): py-spy attached to a consumer for its measured window, and a summary
of its raw (collapsed) stacks: self and inclusive shares by function and by library."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from .procs import Child, console, spawn
from .stage import Ctx, base_env, python


def start_profiler(ctx: Ctx, child: Child, name: str) -> Child | None:
    spy = shutil.which("py-spy", path=str(Path(python()).parent)) or shutil.which("py-spy")
    if spy is None:
        console.print("[yellow]--profile: py-spy is not installed (pip install py-spy); skipped")
        return None
    fmt = ctx.args.profile_format
    suffix = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[fmt]
    out = ctx.logs / f"{name}.pyspy.{suffix}"
    argv = [spy, "record", "--pid", str(child.pid), "--rate", str(ctx.args.profile_rate)]
    argv += ["--format", fmt, "--output", str(out)]
    if ctx.args.profile_nonblocking:
        argv.append("--nonblocking")  # cheaper, but many stacks come back truncated
    ctx.profiles[name] = str(out)
    return spawn(f"{name}.pyspy", argv, base_env(), ctx.logs)


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive time by function, and by library, from py-spy's raw (collapsed) output."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        areas[_area(stack.split(";")[-1])] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
        "leaf_by_library_pct": share(areas),
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({_short(file)})"


def _short(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    for marker in ("/worker/", "/ops/"):
        if marker in file:
            return marker.strip("/") + "/" + file.split(marker, 1)[1]
    return file.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1] if "/lib/python3" in file else file


def _area(frame: str) -> str:
    file = _short(frame.partition(" (")[2].rsplit(":", 1)[0])
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in file or file.endswith(".py") else file
