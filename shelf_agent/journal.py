"""The local alert journal (``shelf-agent alerts``) and the persisted slot state that stops re-raising after a restart.

Separate from the outbox: the outbox forgets a message once the broker has it; the journal keeps history.

The journal is also the write-ahead record of every alert: an alert and the slot state that reported it are
committed in ONE transaction (``record_alerts``) as *pending*, then put into the outbox and marked queued. Two
SQLite files cannot share a transaction, so this order is what makes a crash (or a full disk) between the two
writes harmless: on restart the state says "reported" (no second stock-out) and the pending alert is put into the
outbox then (``pending_alerts``), instead of being lost or raised twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    slot_id TEXT NOT NULL,
    event_time TEXT NOT NULL,
    raised_time TEXT NOT NULL,
    recorded REAL NOT NULL,
    payload TEXT NOT NULL,
    queued INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS alerts_recorded ON alerts (recorded);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_PENDING_INDEX = "CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (seq) WHERE queued = 0"


class JournalError(ShelfSightError):
    """The journal database cannot be opened or written."""


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(alerts)")}
            if "queued" not in columns:  # a journal written before the write-ahead column existed
                self._conn.execute("ALTER TABLE alerts ADD COLUMN queued INTEGER NOT NULL DEFAULT 1")
            self._conn.execute(_PENDING_INDEX)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"{self.path}: cannot open alert journal: {exc}") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conn.execute(sql, params)
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: journal write failed: {exc}") from None

    def record_alert(self, payload: dict[str, Any]) -> None:
        """History only: an alert that is already in the outbox."""
        self.record_alerts([payload], pending=False)

    def record_alerts(
        self,
        payloads: list[dict[str, Any]],
        *,
        state: tuple[str, dict[str, Any]] | None = None,
        pending: bool = True,
    ) -> None:
        """Alerts (pending: not yet in the outbox) and optionally ``state`` = (key, value), all or nothing."""
        recorded = time.time()
        rows = [
            (p["alert_id"], p["seq"], p["type"], p["slot_id"], p["event_time"], p["raised_time"], recorded,
             json.dumps(p), 0 if pending else 1)
            for p in payloads
        ]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany("INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    if state is not None:
                        self._conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (state[0], json.dumps(state[1])))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: journal write failed: {exc}") from None

    def pending_alerts(self) -> list[dict[str, Any]]:
        """Alerts recorded but not yet confirmed in the outbox, in seq order."""
        with self._lock:
            rows = self._conn.execute("SELECT payload FROM alerts WHERE queued = 0 ORDER BY seq").fetchall()
        return [json.loads(row[0]) for row in rows]

    def mark_queued(self, alert_id: str) -> None:
        self._write("UPDATE alerts SET queued = 1 WHERE alert_id = ?", (alert_id,))

    def alerts(self, since_s: float | None = None, alert_type: str | None = None) -> list[dict[str, Any]]:
        """Alerts recorded in the last ``since_s`` seconds (all when None), oldest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if since_s is not None:
            clauses.append("recorded >= ?")
            params.append(time.time() - since_s)
        if alert_type is not None:
            clauses.append("type = ?")
            params.append(alert_type)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._conn.execute(f"SELECT payload FROM alerts {where} ORDER BY seq", params).fetchall()
        return [json.loads(row[0]) for row in rows]

    def save_state(self, key: str, value: dict[str, Any]) -> None:
        self._write("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def load_state(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
