"""Looking at a running agent from outside, as an operator would: its SQLite files read-only, and polling.

Shared by the agent tests and the reliability suite (on the pytest ``pythonpath``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of ``sql`` on the agent's outbox or journal, opened read-only (WAL); [] before the tables exist."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def journal_ids(path: Path) -> list[str]:
    """alert_id of every alert in the journal, in seq order."""
    return [row[0] for row in query(path, "SELECT alert_id FROM alerts ORDER BY seq")]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> float:
    """Poll until true; returns the seconds it took. Raises AssertionError naming ``what`` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start
