"""Make pamqp's decoding of message properties total, so no publisher can kill our connection.

pamqp (under aiormq/aio-pika) decodes every content header frame in the connection's reader. An
exception there is not a bad message but a dead connection: aiormq closes it, the robust
connection reconnects, the broker redelivers the same message, and the loop repeats until the
queue's delivery limit dead-letters it (without a result event), stalling every delivery in
flight each time.  RabbitMQ forwards properties pamqp 4.0 cannot decode:

* a ``timestamp`` (property or header value) past year 9999 (``ValueError`` in ``datetime``);
* short strings (``correlation_id``, ``reply_to``, ... and header names) that are not UTF-8;
* headers nested deeper than Python's recursion limit (``RecursionError``);
* large header tables decode in quadratic time (each value re-slices the rest of the frame).

:func:`install` replaces pamqp's table decoders with linear, depth-limited ones that never raise
for such input (timestamps out of range become ``None``, invalid UTF-8 is replaced, long strings
that are not UTF-8 become ``bytearray`` so they can be re-encoded into a dead letter, tables
deeper than :data:`MAX_DEPTH` become ``None``), and makes :class:`pamqp.header.ContentHeader`
fall back to empty properties (keeping the body size) for anything else it cannot decode.
"""

from __future__ import annotations

import datetime
import logging
import struct
from typing import Any

from pamqp import commands, decode, header

log = logging.getLogger("worker.amqp")

MAX_DEPTH = 32
MAX_PROPERTIES_BYTES = 32 * 1024  # larger property lists are not decoded (~0.1 s of CPU each)
UNREADABLE = "x-cw-unreadable-properties"
_U32 = struct.Struct(">I")
_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"f": 4}
_FIXED.update({b"l": 8, b"L": 8, b"d": 8, b"D": 5, b"T": 8, b"V": 0, b"\x00": 0})


def _timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    try:
        return _ORIGINAL_TIMESTAMP(value)
    except (ValueError, OverflowError, OSError):
        return 8, None


def _short_str(value: bytes) -> tuple[int, str]:
    if not value:
        raise ValueError("Could not unpack short string value")
    length = value[0]
    return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "replace")


def _long_str(value: bytes) -> tuple[int, str | bytearray]:
    (length,) = _U32.unpack_from(value, 0)
    raw = bytes(value[4 : 4 + length])
    try:
        return length + 4, raw.decode("utf-8")
    except UnicodeDecodeError:
        return length + 4, bytearray(raw)


def _value(view: memoryview, offset: int, depth: int) -> tuple[int, Any]:
    """(new offset, value) of the field value starting at ``offset``."""
    kind = bytes(view[offset : offset + 1])
    offset += 1
    if kind in (b"F", b"A"):
        (length,) = _U32.unpack_from(view, offset)
        end = offset + 4 + length
        if end > len(view):
            raise ValueError("field table/array length exceeds the frame")
        if depth >= MAX_DEPTH:
            return end, None
        decoder = _table if kind == b"F" else _array
        return end, decoder(view[offset + 4 : end], depth + 1)
    if kind in (b"S", b"x"):
        (length,) = _U32.unpack_from(view, offset)
        chunk = bytes(view[offset : offset + 4 + length])
        if kind == b"S":
            used, text = _long_str(chunk)
            return offset + used, text
        used, raw = decode.byte_array(chunk)
        return offset + used, raw
    size = _FIXED.get(kind)
    if size is None:
        raise ValueError(f"Unknown type: {kind!r}")
    used, result = decode.TABLE_MAPPING[kind](bytes(view[offset : offset + size]))
    return offset + used, result


def _table(view: memoryview, depth: int) -> dict[str, Any]:
    data: dict[str, Any] = {}
    offset = 0
    while offset < len(view):
        key_length = view[offset]
        key = bytes(view[offset + 1 : offset + 1 + key_length]).decode("utf-8", "replace")
        offset, data[key] = _value(view, offset + 1 + key_length, depth)
    return data


def _array(view: memoryview, depth: int) -> list[Any]:
    data: list[Any] = []
    offset = 0
    while offset < len(view):
        offset, item = _value(view, offset, depth)
        data.append(item)
    return data


def _field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    view = memoryview(value)
    (length,) = _U32.unpack_from(view, 0)
    if 4 + length > len(view):
        raise ValueError("Field table length exceeds available data")
    return 4 + length, _table(view[4 : 4 + length], 1)


def _field_array(value: bytes) -> tuple[int, list[Any]]:
    view = memoryview(value)
    (length,) = _U32.unpack_from(view, 0)
    if 4 + length > len(view):
        raise ValueError("Field array length exceeds available data")
    return 4 + length, _array(view[4 : 4 + length], 1)


def _unmarshal(self: header.ContentHeader, data: bytes) -> None:
    try:
        if len(data) > 12 + MAX_PROPERTIES_BYTES:
            raise ValueError(f"{len(data) - 12} bytes of properties")
        _ORIGINAL_UNMARSHAL(self, data)
    except Exception as exc:  # anything pamqp cannot read must not close the connection
        log.warning("unreadable message properties, delivering without them: %r", exc)
        self.class_id, self.weight, self.body_size = struct.unpack(">HHQ", data[0:12])
        self.properties = commands.Basic.Properties(headers={UNREADABLE: repr(exc)[:200]})


_ORIGINAL_TIMESTAMP = decode.timestamp
_ORIGINAL_UNMARSHAL = header.ContentHeader.unmarshal


def install() -> None:
    """Patch pamqp once (idempotent); the consumer module calls it on import."""
    if header.ContentHeader.unmarshal is _unmarshal:
        return
    decode.METHODS.update(
        timestamp=_timestamp,
        shortstr=_short_str,
        longstr=_long_str,
        table=_field_table,
        array=_field_array,
    )
    decode.TABLE_MAPPING.update(
        {b"T": _timestamp, b"S": _long_str, b"F": _field_table, b"A": _field_array}
    )
    decode.field_table = _field_table
    decode.field_array = _field_array
    header.ContentHeader.unmarshal = _unmarshal  # type: ignore[method-assign]
