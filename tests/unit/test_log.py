"""Log formatting: JSON lines for machines, key=value lines for a terminal."""

from __future__ import annotations

import io
import logging
import sys

import orjson
import pytest

from worker.observability import log

FIELDS: dict[str, object] = {
    "command_id": "c-1",
    "type": "conference.update",
    "status": "rejected",
    "attempts": 2,
    "error_code": "provider_not_found",
    "duration_ms": 12.5,
    "trace_id": None,
}


def record(extra: dict[str, object], message: str = "command.rejected") -> logging.LogRecord:
    logger = logging.getLogger("worker.commands")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None, extra=extra)


def test_json_line_carries_the_event_and_every_field() -> None:
    """A JSON line is one object: ts, level, logger, event, then each extra field as given."""
    line = orjson.loads(log.JsonFormatter().format(record(FIELDS)))
    assert (line["level"], line["logger"], line["event"]) == (
        "info",
        "worker.commands",
        "command.rejected",
    )
    assert {key: line[key] for key in FIELDS} == FIELDS
    assert line["ts"].endswith("+00:00")
    assert "\n" not in log.JsonFormatter().format(record(FIELDS))


def test_json_line_keeps_a_traceback_inside_the_object() -> None:
    """An exception goes into the "exception" field, so the line stays one JSON object."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.getLogger("x").makeRecord("x", 40, __file__, 1, "crash", (), sys.exc_info())
    text = log.JsonFormatter().format(rec)
    assert text.count("\n") == 0
    assert "RuntimeError: boom" in orjson.loads(text)["exception"]


def test_json_line_survives_values_json_cannot_hold() -> None:
    """Values orjson cannot encode are written as their str()."""
    line = orjson.loads(log.JsonFormatter().format(record({"odd": set})))
    assert line["odd"] == "<class 'set'>"


def test_text_line_is_readable_with_fields() -> None:
    """On a terminal: time, level, logger, event, then key=value (None fields left out)."""
    text = log.TextFormatter().format(record(FIELDS))
    assert "INFO" in text
    assert "worker.commands: command.rejected" in text
    assert "command_id=c-1" in text
    assert "error_code=provider_not_found" in text
    assert "trace_id" not in text


@pytest.mark.parametrize(
    ("json_lines", "kind"), [(True, log.JsonFormatter), (False, log.TextFormatter)]
)
def test_configure_picks_the_format(json_lines: bool, kind: type[logging.Formatter]) -> None:
    """configure() installs one stderr handler with the JSON or the text formatter."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        log.configure("INFO", json_lines=json_lines)
        (handler,) = root.handlers
        assert isinstance(handler.formatter, kind)
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_outcome_line_written_through_configure_is_json() -> None:
    """Through a configured handler, an outcome is exactly one valid JSON line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.JsonFormatter())
    logger = logging.getLogger("worker.commands.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("command.succeeded", extra=FIELDS)
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    assert orjson.loads(line)["event"] == "command.succeeded"
