"""Back-office alert history: the SQLite file ``shelf-alerts --db`` fills and ``shelf-alerts history`` queries.

The primary key is ``alert_id`` (stable across redelivery, DESIGN section 6), so the database is also the
de-duplication memory that survives a subscriber restart: ``record_alert`` answers "was this new?".
Snapshots arrive on their own topic, possibly before their alert, so they live in their own table and are
joined at query time. Messages that failed validation are kept in ``problems`` (never dropped silently).
Times are epoch seconds (UTC) in the database and ISO-8601 UTC strings on output.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id     TEXT PRIMARY KEY,
    seq          INTEGER NOT NULL,
    type         TEXT    NOT NULL,
    store_id     TEXT    NOT NULL,
    camera_id    TEXT    NOT NULL,
    slot_id      TEXT    NOT NULL,
    sku          TEXT,
    raised_at    REAL    NOT NULL,
    event_at     REAL    NOT NULL,
    empty_for_s  REAL    NOT NULL,
    confidence   REAL    NOT NULL,
    received_at  REAL    NOT NULL,
    payload      TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_raised ON alerts (raised_at);
CREATE INDEX IF NOT EXISTS alerts_place ON alerts (store_id, camera_id, raised_at);
CREATE TABLE IF NOT EXISTS snapshots (
    alert_id    TEXT PRIMARY KEY,
    path        TEXT,
    size        INTEGER NOT NULL,
    received_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS problems (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BLOB NOT NULL
);
"""
_PROBLEM_PAYLOAD_BYTES = 4096  # enough to see what was wrong, not a place to store megabytes of garbage

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class HistoryError(ShelfSightError):
    """The history database cannot be opened, written or queried, or a query argument is malformed."""


@dataclass(frozen=True)
class HistoryRow:
    alert_id: str
    seq: int
    type: str
    store_id: str
    camera_id: str
    slot_id: str
    sku: str | None
    raised_at: float
    event_at: float
    empty_for_s: float
    confidence: float
    received_at: float
    snapshot_path: str | None
    payload: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """Row for ``history --json``: the original payload plus what the subscriber added."""
        return {"received_time": iso_utc(self.received_at), "snapshot_path": self.snapshot_path, **self.payload}


@dataclass(frozen=True)
class ProblemRow:
    received_at: float
    topic: str
    kind: str
    detail: str
    payload: bytes


def iso_utc(epoch_s: float) -> str:
    stamp = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """ISO-8601 date or time -> epoch seconds. ``Z``/offsets are honoured; a naive time is UTC like the payloads."""
    try:
        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise HistoryError(f"not an ISO-8601 time: {text!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def parse_since(text: str, now: float) -> float:
    """``30m``, ``1h``, ``1h30m``, ``2d``, ``1w`` (that long before ``now``) or an ISO-8601 time -> epoch seconds."""
    compact = text.strip().lower()
    if compact and _DURATION_PART.sub("", compact).strip() == "":
        seconds = sum(float(value) * _UNIT_S[unit] for value, unit in _DURATION_PART.findall(compact))
        return now - seconds
    try:
        return parse_time(text)
    except HistoryError:
        raise HistoryError(
            f"--since {text!r}: expected a duration like 30m, 1h, 1h30m, 2d or an ISO-8601 time like 2025-03-01T08:00Z"
        ) from None


class AlertHistory:
    """One SQLite file (WAL). Thread-safe behind a lock; one writer process at a time."""

    def __init__(self, path: str | Path, *, must_exist: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        if must_exist and not self.path.is_file():
            raise HistoryError(f"{self.path}: no such history database (shelf-alerts --db {self.path} creates it)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may lose the newest rows, never corrupt the file.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise HistoryError(f"{self.path}: cannot open history database: {exc}") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._lock:
            try:
                return int(self._conn.execute(sql, params).rowcount)
            except sqlite3.Error as exc:
                raise HistoryError(f"{self.path}: cannot write history: {exc}") from None

    def record_alert(self, payload: Mapping[str, Any], received_at: float) -> bool:
        """Store a validated ``shelfsight.alert/1`` payload; False when its ``alert_id`` is already there."""
        row = (
            payload["alert_id"], int(payload["seq"]), payload["type"], payload["store_id"], payload["camera_id"],
            payload["slot_id"], payload.get("sku"), parse_time(payload["raised_time"]),
            parse_time(payload["event_time"]), float(payload["empty_for_s"]), float(payload["confidence"]),
            received_at, json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
        )
        return self._write(f"INSERT OR IGNORE INTO alerts VALUES ({', '.join('?' * len(row))})", row) == 1

    def record_snapshot(self, alert_id: str, path: str | None, size: int, received_at: float) -> None:
        self._write("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", (alert_id, path, size, received_at))

    def record_problem(self, topic: str, kind: str, detail: str, payload: bytes, received_at: float) -> None:
        self._write("INSERT INTO problems (received_at, topic, kind, detail, payload) VALUES (?, ?, ?, ?, ?)",
                    (received_at, topic, kind, detail, bytes(payload[:_PROBLEM_PAYLOAD_BYTES])))

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        store_id: str | None = None,
        camera_id: str | None = None,
        slot_id: str | None = None,
        alert_type: str | None = None,
        limit: int | None = None,
    ) -> list[HistoryRow]:
        """Alerts raised in ``[since, until)`` matching every given filter, oldest first (the last ``limit``)."""
        where, params = [], []
        for column, op, value in (("a.raised_at", ">=", since), ("a.raised_at", "<", until),
                                  ("a.store_id", "=", store_id), ("a.camera_id", "=", camera_id),
                                  ("a.slot_id", "=", slot_id), ("a.type", "=", alert_type)):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        sql = ("SELECT a.alert_id, a.seq, a.type, a.store_id, a.camera_id, a.slot_id, a.sku, a.raised_at, a.event_at, "
               "a.empty_for_s, a.confidence, a.received_at, s.path, a.payload "
               "FROM alerts a LEFT JOIN snapshots s ON s.alert_id = a.alert_id"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY a.raised_at DESC, a.seq DESC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise HistoryError(f"{self.path}: cannot query history: {exc}") from None
        names = [f.name for f in fields(HistoryRow)]
        return [HistoryRow(**dict(zip(names, (*row[:13], json.loads(row[13])), strict=True))) for row in reversed(rows)]

    def problems(self, *, since: float | None = None, limit: int | None = None) -> list[ProblemRow]:
        sql = "SELECT received_at, topic, kind, detail, payload FROM problems"
        params: list[Any] = []
        if since is not None:
            sql += " WHERE received_at >= ?"
            params.append(since)
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit is not None else "")
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise HistoryError(f"{self.path}: cannot query history: {exc}") from None
        return [ProblemRow(row[0], row[1], row[2], row[3], bytes(row[4])) for row in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AlertHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
