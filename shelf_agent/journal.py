"""The local alert journal (``shelf-agent alerts``) and the persisted slot state that stops re-raising after a restart.

Separate from the outbox: the outbox forgets a message once the broker has it; the journal keeps history.
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
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_recorded ON alerts (recorded);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"{self.path}: cannot open alert journal: {exc}") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conn.execute(sql, params)
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: journal write failed: {exc}") from None

    def record_alert(self, payload: dict[str, Any]) -> None:
        self._write(
            "INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                payload["alert_id"],
                payload["seq"],
                payload["type"],
                payload["slot_id"],
                payload["event_time"],
                payload["raised_time"],
                time.time(),
                json.dumps(payload),
            ),
        )

    def alerts(self, since_s: float | None = None, alert_type: str | None = None) -> list[dict[str, Any]]:
        """Alerts recorded in the last ``since_s`` seconds (all when None), oldest first."""
        clauses, params = [], []
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
