"""Logging set-up: readable lines on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with ``extra=``."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(extras(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """``12:00:00 INFO    worker.commands: command.succeeded command_id=c-1 ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = extras(record)
        if not fields:
            return text
        pairs = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        head, newline, tail = text.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{newline}{tail}"


def configure(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """Configure the root logger once, at the edge (the CLI).

    One JSON object per line unless stderr is a terminal (``json_lines`` forces either).  The
    command outcome lines (logger ``worker.commands``, events ``command.*``) are INFO.
    """
    # Thread and process names are in no line we write; not looking them up saves ~1 µs a line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Nor is the caller's file and line: skip the stack walk of every record (see the logging
    # HOWTO, "Optimization").
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    use_json = not sys.stderr.isatty() if json_lines is None else json_lines
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: POST …"): a line per provider call that
    # says less than our outcome line, and ~3 % of the worker's CPU (ops/bench/RESULTS.md).
    for noisy in ("aio_pika", "aiormq", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
