"""Benchmark processes: their CPU and memory from /proc, and children that die with the runner."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("drain", "latency100", "p99", "rss")
Kind = Literal["floor", "stack", "worker", "peer"]
# The consumers: the bare floor, the floor on the worker's stack (ops/bench/stack.py), the worker,
# the naive FastStream peer (ops/bench/peer.py).  The stack floor runs when asked for.
KINDS: tuple[Kind, ...] = ("floor", "stack", "worker", "peer")
DEFAULT_KINDS: tuple[Kind, ...] = ("floor", "worker", "peer")
console = Console() if Console().is_terminal else Console(width=150)


# --------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` line of ``/proc/<pid>/status`` (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pids_named(*names: str) -> list[int]:
    """Processes whose ``comm`` is one of ``names``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8") as f:
                    if f.read().strip() in names:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def pids_listening(port: int) -> list[int]:
    """Processes holding a socket that listens on ``port`` (e.g. the beam.smp of 5672).

    Other engineers may run more RabbitMQ nodes or Redis servers on this machine: only the ones
    the benchmark talks to are counted.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    found.append(int(entry))
                    break
    return found


def server_pids(url: str, default_port: int, *names: str) -> list[int]:
    port = urlsplit(url).port or default_port
    return pids_listening(port) or pids_named(*names)


@dataclass(frozen=True, slots=True)
class Snap:
    """CPU seconds of each role's processes at one instant (perf_counter ``t``)."""

    t: float
    cpu: dict[str, float]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def snap(roles: dict[str, list[int]]) -> Snap:
    """CPU seconds per role, plus ``others``: what the rest of the machine used meanwhile."""
    cpu: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            total += cpu_seconds(pid) or 0.0
        cpu[role] = total
    cpu["others"] = machine_busy_seconds() - sum(cpu.values())
    return Snap(time.perf_counter(), cpu)


# --------------------------------------------------------------------------------------------
# Child processes: always terminated (SIGTERM, then SIGKILL), even on failure or Ctrl-C.


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(ValueError):
            CHILDREN.remove(self)

    async def astop(self, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """As :meth:`stop`, without blocking the event loop."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            deadline = time.monotonic() + timeout_s
            while self.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        self.stop(timeout_s=5.0)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


CHILDREN: list[Child] = []
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_runner() -> None:
    """In the child before exec: SIGTERM when the runner dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def stop_all() -> None:
    for child in list(reversed(CHILDREN)):
        child.stop(timeout_s=5.0)


atexit.register(stop_all)


def spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops everyone
            preexec_fn=_die_with_runner,  # noqa: PLW1509 (no threads fork here)
        )
    child = Child(name, popen, log)
    CHILDREN.append(child)
    return child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchError(Exception):
    """The benchmark could not measure (a process died, results missing, ...)."""
