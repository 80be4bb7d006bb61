"""The local alert journal: history for `shelf-agent alerts` and the slot state that survives a restart."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from shelfsight.shelf_agent.journal import Journal, JournalError


def alert(seq: int, alert_type: str = "stockout", slot: str = "R1S1") -> dict[str, Any]:
    return {
        "alert_id": f"id-{seq}-{alert_type}-{slot}",
        "seq": seq,
        "type": alert_type,
        "slot_id": slot,
        "event_time": "2026-01-01T00:00:00.000Z",
        "raised_time": "2026-01-01T00:00:10.000Z",
        "sku": None,
    }


def test_alerts_come_back_in_seq_order_and_filter_by_type(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    for payload in (alert(3, "restocked"), alert(1), alert(2, slot="R2S4")):
        journal.record_alert(payload)
    assert [a["seq"] for a in journal.alerts()] == [1, 2, 3]
    assert [a["seq"] for a in journal.alerts(alert_type="stockout")] == [1, 2]
    assert journal.alerts()[1] == alert(2, slot="R2S4")  # the whole payload, as sent
    journal.close()


def test_same_alert_recorded_twice_is_kept_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.record_alert(alert(1))
    journal.record_alert(alert(1))
    assert len(journal.alerts()) == 1
    journal.close()


def test_since_filters_on_recording_time(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal.record_alert(alert(1))
    journal.record_alert(alert(2))
    journal.close()
    with sqlite3.connect(path) as conn:  # age the first alert by two hours
        conn.execute("UPDATE alerts SET recorded = ? WHERE seq = 1", (time.time() - 7200,))
    journal = Journal(path)
    assert [a["seq"] for a in journal.alerts(since_s=3600)] == [2]
    assert [a["seq"] for a in journal.alerts(since_s=3 * 3600)] == [1, 2]
    journal.close()


def test_state_and_alerts_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "j.sqlite"  # the parent folder is created
    journal = Journal(path)
    assert journal.load_state("slot_state") is None
    journal.save_state("slot_state", {"version": 1, "reported": {"R1S2": {"reported_empty": True}}})
    journal.save_state("slot_state", {"version": 1, "reported": {"R2S3": {"reported_empty": True}}})
    journal.record_alert(alert(1))
    journal.close()
    journal = Journal(path)
    assert journal.load_state("slot_state") == {"version": 1, "reported": {"R2S3": {"reported_empty": True}}}
    assert [a["alert_id"] for a in journal.alerts()] == ["id-1-stockout-R1S1"]
    journal.close()


def test_unopenable_journal_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(JournalError) as info:
        Journal(blocker / "j.sqlite")
    assert "cannot open alert journal" in str(info.value) and "\n" not in str(info.value)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="cannot open alert journal"):
        Journal(path)


# ------------------------------------------------------------------------------------------------ write-ahead

def test_alerts_and_state_are_written_ahead_together_and_marked_queued(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    state = {"version": 1, "reported": {"R1S1": {"reported_empty": True}}}
    journal.record_alerts([alert(1), alert(2, slot="R1S2")], state=("slot_state", state))
    assert [a["seq"] for a in journal.pending_alerts()] == [1, 2]
    assert journal.load_state("slot_state") == state
    journal.mark_queued("id-1-stockout-R1S1")
    assert [a["seq"] for a in journal.pending_alerts()] == [2]
    assert [a["seq"] for a in journal.alerts()] == [1, 2]  # history shows pending ones too: they were raised
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")  # pending survives a restart
    assert [a["seq"] for a in reopened.pending_alerts()] == [2]
    reopened.close()


def test_write_ahead_is_all_or_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.save_state("slot_state", {"version": 1, "reported": {}})
    with pytest.raises(TypeError):  # the state cannot be stored: neither can the alert
        journal.record_alerts([alert(1)], state=("slot_state", {"bad": object()}))
    assert journal.alerts() == [] and journal.pending_alerts() == []
    assert journal.load_state("slot_state") == {"version": 1, "reported": {}}
    journal.record_alerts([alert(2)])  # and the journal is usable afterwards (no transaction left open)
    assert [a["seq"] for a in journal.pending_alerts()] == [2]
    journal.close()


def test_history_only_records_are_not_pending(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.record_alert(alert(1))
    journal.record_alerts([alert(2)], pending=False)
    assert journal.pending_alerts() == [] and len(journal.alerts()) == 2
    journal.close()


def test_journal_from_before_the_write_ahead_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL, "
            "slot_id TEXT NOT NULL, event_time TEXT NOT NULL, raised_time TEXT NOT NULL, recorded REAL NOT NULL, "
            "payload TEXT NOT NULL);"
            "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        )
        conn.execute("INSERT INTO alerts VALUES ('old', 1, 'stockout', 'R1S1', 'e', 'r', ?, ?)",
                     (time.time(), '{"alert_id": "old", "seq": 1}'))
    journal = Journal(path)
    assert journal.pending_alerts() == []  # what an old agent recorded had gone to its outbox
    assert [a["alert_id"] for a in journal.alerts()] == ["old"]
    journal.record_alerts([alert(2)])
    assert [a["seq"] for a in journal.pending_alerts()] == [2]
    journal.close()
