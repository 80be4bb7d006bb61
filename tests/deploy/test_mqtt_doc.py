"""docs/mqtt.md is the back-office contract: its examples, tables and rules must match what the agent ships."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from shelfsight.shelf_agent.events import DELIVERY, SCHEMA_FILES, alert_id_for, load_schema, topics, validate_payload

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"
TEXT = DOC.read_text(encoding="utf-8")
EXAMPLES = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", TEXT, flags=re.DOTALL)]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _table_after(heading: str) -> list[list[str]]:
    """Rows (cells stripped) of the first markdown table after ``heading``, header and rule excluded."""
    lines = TEXT[TEXT.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_doc_has_examples() -> None:
    assert len(EXAMPLES) >= len(SCHEMA_FILES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_every_json_example_validates_against_the_shipped_schema(index: int) -> None:
    validate_payload(EXAMPLES[index])  # strict, as the agent validates what it sends


@pytest.mark.parametrize("schema_name", sorted(SCHEMA_FILES))
def test_examples_show_every_field_of_every_schema(schema_name: str) -> None:
    """A field added to a schema must be documented with an example (the doc cannot silently fall behind)."""
    examples = [e for e in EXAMPLES if e["schema"] == schema_name]
    assert examples, f"no example of {schema_name} in {DOC.name}"
    schema = load_schema(schema_name)
    assert set().union(*(e.keys() for e in examples)) == set(schema["properties"])
    if schema_name.startswith("shelfsight.state/"):
        slot_keys = set().union(*(slot.keys() for e in examples for slot in e["slots"]))
        assert slot_keys == set(schema["properties"]["slots"]["items"]["properties"])


def test_alert_examples_follow_the_documented_rules() -> None:
    alerts = [e for e in EXAMPLES if e["schema"] == "shelfsight.alert/1"]
    assert {a["type"] for a in alerts} >= {"stockout", "restocked"}
    for a in alerts:
        # de-duplication rule: the id is derived from the event, so a redelivery carries the same id
        assert a["alert_id"] == alert_id_for(a["store_id"], a["camera_id"], a["slot_id"], a["type"],
                                             a["event_frame_ts"])
        # both times come from the same frame clock
        assert _epoch(a["raised_time"]) - _epoch(a["event_time"]) == pytest.approx(
            a["raised_frame_ts"] - a["event_frame_ts"], abs=1e-3)
        if a["snapshot_topic"] is not None:
            assert a["snapshot_topic"] == topics(a["store_id"], a["camera_id"]).snapshot(a["alert_id"])
    by_camera: dict[tuple[str, str], list[int]] = {}
    for a in alerts:
        by_camera.setdefault((a["store_id"], a["camera_id"]), []).append(a["seq"])
    assert all(seqs == sorted(set(seqs)) for seqs in by_camera.values())  # seq strictly increasing per camera


def test_status_examples_cover_online_and_the_will() -> None:
    statuses = {(e["state"], e["reason"]) for e in EXAMPLES if e["schema"] == "shelfsight.status/1"}
    assert {("online", "connected"), ("offline", "connection_lost")} <= statuses


def test_topic_table_matches_the_agents_qos_and_retain_flags() -> None:
    documented: dict[str, tuple[int, bool]] = {}
    for row in _table_after("## 1. Topics"):
        kind = row[0].strip("`").split("/")[0]
        documented[kind] = (int(row[1]), {"yes": True, "no": False}[row[2]])
    assert documented == DELIVERY


def test_alert_field_table_names_every_schema_field() -> None:
    names: set[str] = set()
    for row in _table_after("### 3.1 `alert`"):
        names.update(re.findall(r"`([a-z_0-9]+)`", row[0]))
    assert names == set(load_schema("shelfsight.alert/1")["properties"])


def test_compatibility_policy_is_stated() -> None:
    policy = TEXT[TEXT.index("## 5. Compatibility policy"):]
    for phrase in ("Consumers must ignore fields they do not know", "new major version", "alongside",
                   "deprecation period"):
        assert phrase in policy


def test_additive_field_rule_holds_for_shelf_alerts() -> None:
    """The policy says consumers ignore unknown fields: shelf-alerts must accept a v1 alert with an extra field."""
    from shelfsight.shelf_agent.alert_monitor import Monitor

    example: dict[str, Any] = dict(next(e for e in EXAMPLES if e["schema"] == "shelfsight.alert/1"))
    example["shelf_zone"] = "chilled"  # a field a newer agent might add
    outcome = Monitor().handle(f"shelfsight/{example['store_id']}/{example['camera_id']}/alert",
                               json.dumps(example).encode())
    assert outcome.event == "alert"
