"""Embedded deduplication store: one SQLite file, the default for a single worker host.

The URL follows SQLAlchemy: ``sqlite:///relative/path`` or ``sqlite:////absolute/path``; the
parent directory is created.  The file survives restarts and may be shared by processes on one
host: a claim is one ``BEGIN IMMEDIATE`` transaction, so it is atomic across processes, and every
method runs to the end without awaiting, so it is atomic across the tasks of one event loop.

The stdlib :mod:`sqlite3` is called synchronously from the async methods: with WAL and
``synchronous=NORMAL`` a statement takes tens of microseconds, far less than a thread hop.  The one
exception is lock contention with another process, which blocks the loop for at most
``BUSY_TIMEOUT_S``.  Expiry times are wall-clock epoch seconds, so they stay meaningful across
restarts; expired rows are ignored at once and deleted in small batches every ``PURGE_EVERY``
claims.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from worker.dedup import (
    Applied,
    Claimed,
    ClaimOutcome,
    Conflict,
    Done,
    InProgress,
    Reopened,
    Stored,
    stored_status,
)
from worker.errors import StoreUnavailable
from worker.settings import DedupConfig


@contextmanager
def _reach() -> Iterator[None]:
    """Translate "the database cannot be used now" (locked, disk full) into StoreUnavailable."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"sqlite: {exc}") from exc


PURGE_EVERY = 1024  # claims between two purges of expired rows
PURGE_BATCH = 1000  # most rows deleted by one purge, to bound the time the loop is held
BUSY_TIMEOUT_S = 5.0  # how long to wait for another process's write lock
OPEN_RETRY_MAX_PAUSE_S = 0.05  # longest pause between two attempts to prepare the file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dedup (
    command_id  TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    fingerprint TEXT NOT NULL,
    token       TEXT,
    result      BLOB,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dedup_expires_at ON dedup (expires_at);
CREATE TABLE IF NOT EXISTS applied (
    target      TEXT PRIMARY KEY,
    issued_at   REAL NOT NULL,
    expires_at  REAL NOT NULL
);
"""
_RENEW = (
    "UPDATE dedup SET expires_at = ? WHERE command_id = ? AND token = ?"
    " AND state = 'in_progress' AND expires_at > ?"
)
_LAST_APPLIED = "SELECT issued_at FROM applied WHERE target = ? AND expires_at > ?"
_MARK_APPLIED = (
    "INSERT INTO applied (target, issued_at, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (target) DO UPDATE SET issued_at = max(issued_at, excluded.issued_at),"
    " expires_at = excluded.expires_at"
)
_SELECT = "SELECT state, fingerprint, result, expires_at FROM dedup WHERE command_id = ?"
_CLAIM = (
    "INSERT OR REPLACE INTO dedup (command_id, state, fingerprint, token, result, expires_at)"
    " VALUES (?, 'in_progress', ?, ?, NULL, ?)"
)
_COMPLETE = (
    "UPDATE dedup SET state = 'done', token = NULL, result = ?, expires_at = ?"
    " WHERE command_id = ? AND token = ? AND state = 'in_progress' AND expires_at > ?"
)
_RELEASE = (
    "DELETE FROM dedup"
    " WHERE command_id = ? AND token = ? AND state = 'in_progress' AND expires_at > ?"
)
_FORGET = "DELETE FROM dedup WHERE command_id = ?"
_PURGE = (
    "DELETE FROM dedup WHERE command_id IN"
    " (SELECT command_id FROM dedup WHERE expires_at <= ? LIMIT ?)"
)


def sqlite_path(url: str) -> str:
    """The file named by a ``sqlite:///`` URL (``:memory:`` is passed through)."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix) or len(url) == len(prefix):
        raise ValueError("dedup URL must be sqlite:///relative/path or sqlite:////absolute/path")
    return url[len(prefix) :].split("?", 1)[0]


class SqliteDedupStore:
    """A :class:`worker.dedup.DedupStore` in one SQLite table; ``clock`` is injectable."""

    def __init__(self, config: DedupConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._lease_s = config.lease_s
        self._retention_s = config.retention_s
        self._clock = clock
        self._claims = 0
        self._conn = _connect(sqlite_path(config.url))
        self._purge(clock())

    async def claim(
        self, command_id: str, fingerprint: str, *, target: str | None = None
    ) -> ClaimOutcome:
        """Claim ``command_id``, or report what is known of it (see :mod:`worker.dedup`)."""
        now = self._clock()
        self._claims += 1
        if self._claims % PURGE_EVERY == 0:
            self._purge(now)
        with _reach():
            return self._claim(command_id, fingerprint, target, now)

    def _claim(
        self, command_id: str, fingerprint: str, target: str | None, now: float
    ) -> ClaimOutcome:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(_SELECT, (command_id,)).fetchone()
            if row is None or row[3] <= now:
                token = secrets.token_hex(8)
                conn.execute(_CLAIM, (command_id, fingerprint, token, now + self._lease_s))
                applied = None
                if target is not None:
                    known = conn.execute(_LAST_APPLIED, (target, now)).fetchone()
                    applied = None if known is None else float(known[0])
                outcome: ClaimOutcome = Claimed(token, applied)
            else:
                outcome = _known(row[0], row[1], row[2], fingerprint)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return outcome

    async def complete(
        self, command_id: str, token: str, result: bytes, *, applied: Applied | None = None
    ) -> None:
        """Record ``result`` if ``token`` still holds a live claim; mark ``applied`` anyway."""
        if applied is not None:
            await self.mark_applied(applied.target, applied.issued_at)
        now = self._clock()
        with _reach():
            self._conn.execute(_COMPLETE, (result, now + self._retention_s, command_id, token, now))

    async def release(self, command_id: str, token: str) -> None:
        """Forget ``command_id`` if ``token`` still holds a live claim; otherwise do nothing."""
        with _reach():
            self._conn.execute(_RELEASE, (command_id, token, self._clock()))

    async def renew(self, command_id: str, token: str) -> bool:
        """Extend ``token``'s live claim by a lease."""
        now = self._clock()
        with _reach():
            cursor = self._conn.execute(_RENEW, (now + self._lease_s, command_id, token, now))
        return cursor.rowcount == 1

    async def last_applied(self, target: str) -> float | None:
        """The newest applied ``issued_at`` of ``target`` within the retention window."""
        with _reach():
            row = self._conn.execute(_LAST_APPLIED, (target, self._clock())).fetchone()
        return None if row is None else float(row[0])

    async def mark_applied(self, target: str, issued_at: float) -> None:
        """Keep the newest ``issued_at`` of ``target`` for the retention window."""
        with _reach():
            self._conn.execute(
                _MARK_APPLIED, (target, issued_at, self._clock() + self._retention_s)
            )

    async def lookup(self, command_id: str) -> Stored | None:
        """What is stored for ``command_id``."""
        with _reach():
            row = self._conn.execute(_SELECT, (command_id,)).fetchone()
        if row is None or row[3] <= self._clock():
            return None
        return Stored(row[1], None if row[0] != "done" else bytes(row[2] or b""))

    async def reopen(self, command_id: str, fingerprint: str) -> Reopened:
        """Forget a stored non-success of the same payload, in one ``BEGIN IMMEDIATE``."""
        conn = self._conn
        with _reach():
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(_SELECT, (command_id,)).fetchone()
                found = _reopened(row, fingerprint, self._clock())
                if found is Reopened.CLEARED:
                    conn.execute(_FORGET, (command_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return found

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the database cannot be read."""
        with _reach():
            self._conn.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        """Close the database file; safe to call twice."""
        self._conn.close()

    def _purge(self, now: float) -> None:
        self._conn.execute(_PURGE, (now, PURGE_BATCH))


def _known(state: str, stored: str, result: bytes | None, fingerprint: str) -> ClaimOutcome:
    if stored != fingerprint:
        return Conflict()
    if state == "done" and result is not None:
        return Done(bytes(result))
    return InProgress()


def _reopened(
    row: tuple[str, str, bytes | None, float] | None, fingerprint: str, now: float
) -> Reopened:
    if row is None or row[3] <= now:
        return Reopened.ABSENT
    if row[1] != fingerprint:
        return Reopened.CONFLICT
    if row[0] != "done":
        return Reopened.IN_PROGRESS
    if stored_status(bytes(row[2] or b"")) == "succeeded":
        return Reopened.SUCCEEDED
    return Reopened.CLEARED


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        _prepare(conn, deadline=time.monotonic() + BUSY_TIMEOUT_S)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, *, deadline: float) -> None:
    """Switch ``conn``'s file to WAL and create the schema, retrying while another process does.

    The busy timeout does not cover the switch to WAL: while another connection writes the file
    in rollback-journal mode (as a process that opened the new file a moment earlier does while
    it switches it to WAL), ``PRAGMA journal_mode=WAL`` takes a shared lock and then needs a
    write lock, and SQLite answers SQLITE_BUSY at once rather than wait (the busy handler is
    skipped where waiting could deadlock).  Every step is idempotent, so on SQLITE_BUSY the
    whole sequence is retried, with a growing pause, until ``deadline``.
    """
    pause_s = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            left_s = deadline - time.monotonic()
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or left_s <= 0:
                raise
            time.sleep(min(pause_s, left_s))
            pause_s = min(pause_s * 2, OPEN_RETRY_MAX_PAUSE_S)
        else:
            return
