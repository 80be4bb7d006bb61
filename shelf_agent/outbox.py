"""Durable outbox (DESIGN section 7): every message is on disk before anyone tries to send it.

One SQLite file in WAL mode. ``put()`` commits before it returns, with ``synchronous=FULL`` for everything
except metrics (metrics lost in a power cut are harmless; alerts are not). A row leaves only through
``ack()``, which the publisher calls after a success PUBACK, so a crash, ``kill -9``, power cut or broker
outage loses nothing that was written; replay is in ``id`` order, which preserves order per camera.

Cap policy (``max_messages`` rows and ``max_bytes`` of payload): after each ``put()`` the outbox drops,
oldest first, messages that are NOT alerts (metrics, state, status, snapshots) until it is under both
limits. Only when nothing but alerts is left are the oldest alerts dropped too (counted apart in
``dropped_alerts``, logged as an error). The newest message may itself be the one dropped (a metrics
message put into an outbox full of alerts). Every drop is counted in ``dropped`` (persisted) and logged.
Retained ``state`` messages supersede each other: putting one deletes older pending ones on the same
topic (not counted as drops: nothing the subscriber needs is lost).

Per-camera ``seq`` numbers are allocated from a persisted counter, so they increase strictly across
restarts and ``kill -9``; a crash between ``next_seq()`` and ``put()`` leaves a gap, never a repeat.

``put(..., key=alert_id)`` is idempotent: the key is remembered in the same transaction as the row (for
``KEY_MEMORY_S``, long after the row was acknowledged), and a second put with it stores nothing. The journal
moves an alert into the outbox and then marks it queued, in two files; a ``kill -9`` between the two makes the
next start put it again, and without the key that would be a second copy on the wire with the same seq.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.events import DELIVERY

log = logging.getLogger(__name__)

KINDS = tuple(DELIVERY)
DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
KEY_MEMORY_S = 90 * 24 * 3600.0  # far longer than any restart; a few dozen bytes per alert

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    size     INTEGER NOT NULL,
    qos      INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain   INTEGER NOT NULL CHECK (retain IN (0, 1)),
    kind     TEXT    NOT NULL CHECK (kind IN ('alert', 'state', 'status', 'metrics', 'snapshot')),
    created  REAL    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS taken_keys (
    key     TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS taken_keys_created ON taken_keys (created);
"""


class OutboxError(ShelfSightError):
    """The outbox file cannot be opened or written (disk full, read-only, corrupt); the agent retries."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float
    attempts: int


class Outbox:
    """Thread-safe (one connection behind a lock). Use one instance per file at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_file_bytes: int | None = None,
    ) -> None:
        """``max_file_bytes``: optional hard ceiling on the database file, a safety net for a small root
        filesystem; a write beyond it fails like a full disk (OutboxError) instead of filling the disk."""
        if max_messages < 1 or max_bytes < 1:
            raise OutboxError(
                f"{path}: outbox caps must be positive (max_messages={max_messages}, max_bytes={max_bytes})"
            )
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so PRAGMAs run outside transactions.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            if max_file_bytes is not None:
                page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
                self._conn.execute(f"PRAGMA max_page_count={max(1, max_file_bytes // page_size)}")
            self._depth, self._bytes = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages"
            ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from None

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, action: str, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; any SQLite/OS failure becomes a one-line OutboxError."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                self._reload_totals()
                raise OutboxError(f"{self.path}: outbox {action} failed: {exc}") from None

    def _reload_totals(self) -> None:
        try:
            self._depth, self._bytes = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages"
            ).fetchone()
        except sqlite3.Error:
            pass

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int = 1) -> int:
        # No RETURNING/UPSERT: devices on Ubuntu 20.04 ship SQLite 3.31.
        conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (name,))
        conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))
        return int(conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    # ------------------------------------------------------------------ writing

    def put(
        self,
        topic: str,
        payload: bytes,
        kind: str,
        *,
        qos: int | None = None,
        retain: bool | None = None,
        key: str | None = None,
    ) -> int | None:
        """Store one message durably and return its id; QoS/retain default to the DESIGN table for ``kind``.

        With ``key``, a message already put under that key is not stored again: the return is then None."""
        if kind not in DELIVERY:
            raise OutboxError(f"{self.path}: unknown message kind {kind!r} (expected one of {', '.join(KINDS)})")
        default_qos, default_retain = DELIVERY[kind]
        qos = default_qos if qos is None else qos
        retain = default_retain if retain is None else retain
        payload = bytes(payload)
        with self._transaction(f"put ({kind})", durable=kind != "metrics") as conn:
            if key is not None and not self._take_key(conn, key):
                log.info("outbox: %s %s was put before; not stored again", kind, key)
                return None
            superseded = 0
            if kind == "state":
                superseded_size = conn.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE kind = 'state' AND topic = ?", (topic,)
                ).fetchone()
                conn.execute("DELETE FROM messages WHERE kind = 'state' AND topic = ?", (topic,))
                superseded = int(superseded_size[0])
                self._depth -= superseded
                self._bytes -= int(superseded_size[1])
            cursor = conn.execute(
                "INSERT INTO messages (topic, payload, size, qos, retain, kind, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, payload, len(payload), qos, int(retain), kind, time.time()),
            )
            message_id = int(cursor.lastrowid or 0)
            self._depth += 1
            self._bytes += len(payload)
            self._enforce_cap(conn)
        if superseded:
            log.debug("outbox: new %s message superseded %d pending one(s)", topic, superseded)
        return message_id

    @staticmethod
    def _take_key(conn: sqlite3.Connection, key: str) -> bool:
        now = time.time()
        conn.execute("DELETE FROM taken_keys WHERE created < ?", (now - KEY_MEMORY_S,))
        return conn.execute("INSERT OR IGNORE INTO taken_keys (key, created) VALUES (?, ?)", (key, now)).rowcount == 1

    def _enforce_cap(self, conn: sqlite3.Connection) -> None:
        if self._depth <= self.max_messages and self._bytes <= self.max_bytes:
            return
        dropped: dict[str, int] = {}
        for only_non_alerts in (True, False):
            where = "WHERE kind != 'alert'" if only_non_alerts else ""
            while self._depth > self.max_messages or self._bytes > self.max_bytes:
                rows = conn.execute(f"SELECT id, size, kind FROM messages {where} ORDER BY id LIMIT 64").fetchall()
                if not rows:
                    break
                for row_id, size, kind in rows:
                    if self._depth <= self.max_messages and self._bytes <= self.max_bytes:
                        break
                    conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    self._depth -= 1
                    self._bytes -= size
                    dropped[kind] = dropped.get(kind, 0) + 1
        total = sum(dropped.values())
        self._bump(conn, "dropped", total)
        if dropped.get("alert"):
            self._bump(conn, "dropped_alerts", dropped["alert"])
            log.error("outbox full (%d messages, %d bytes max): dropped %d ALERT(s), nothing else was left to drop",
                      self.max_messages, self.max_bytes, dropped["alert"])
        log.warning("outbox full: dropped %d oldest message(s) %s", total, dropped)

    def next_seq(self, camera_id: str) -> int:
        """Allocate the next alert sequence number of ``camera_id`` (1, 2, ...), durably."""
        with self._transaction("seq allocation") as conn:
            return self._bump(conn, f"seq:{camera_id}")

    def ack(self, message_id: int) -> None:
        self.ack_many((message_id,))

    def ack_many(self, message_ids: Iterable[int]) -> None:
        """Delete delivered messages. Not fsynced: losing an ack in a power cut means a duplicate, not a loss."""
        ids = [(int(i),) for i in message_ids]
        if not ids:
            return
        with self._transaction("ack", durable=False) as conn:
            for (message_id,) in ids:
                row = conn.execute("SELECT size FROM messages WHERE id = ?", (message_id,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                    self._depth -= 1
                    self._bytes -= int(row[0])

    def mark_attempts(self, message_ids: Iterable[int]) -> None:
        """Count a send attempt (diagnostics only, hence not fsynced)."""
        ids = [(int(i),) for i in message_ids]
        if ids:
            with self._transaction("attempt update", durable=False) as conn:
                conn.executemany("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", ids)

    # ------------------------------------------------------------------ reading

    def peek_batch(self, n: int, after_id: int = 0) -> list[OutboxMessage]:
        """Up to ``n`` oldest messages with ``id > after_id``, in id order (the replay order)."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT id, topic, payload, qos, retain, kind, created, attempts FROM messages "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, n),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: outbox read failed: {exc}") from None
        return [
            OutboxMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]), r[5], float(r[6]), int(r[7]))
            for r in rows
        ]

    def depth(self) -> int:
        return int(self._depth)

    def counter(self, name: str) -> int:
        with self._lock:
            try:
                row = self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: outbox read failed: {exc}") from None
        return int(row[0]) if row else 0

    @property
    def dropped_count(self) -> int:
        return self.counter("dropped")

    @property
    def dropped_alerts(self) -> int:
        return self.counter("dropped_alerts")

    def stats(self) -> dict[str, int]:
        """The ``outbox`` block of the metrics payload."""
        return {"depth": self.depth(), "bytes": int(self._bytes), "dropped": self.dropped_count,
                "dropped_alerts": self.dropped_alerts}

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
