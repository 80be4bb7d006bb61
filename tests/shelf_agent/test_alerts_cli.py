"""shelf-alerts without a broker: message classification (alert_monitor), de-duplication, views, history
(alert_history), CLI errors (alerts_cli).

The broker-facing behaviour (TLS, auth, ACL, end to end from the agent's Publisher) is in tests/deploy/.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shelfsight.shelf_agent.alert_history import AlertHistory, HistoryError, parse_since, parse_time
from shelfsight.shelf_agent.alert_monitor import Monitor, known_fields, render_json, render_text
from shelfsight.shelf_agent.alerts_cli import _watch_parser, build_config, subscription
from shelfsight.shelf_agent.events import (
    ModelInfo,
    SlotStatus,
    build_alert,
    build_metrics,
    build_state,
    build_status,
    encode_payload,
    load_schema,
    topics,
)

STORE, CAMERA = "s1", "c1"
T = topics(STORE, CAMERA)
MODEL = ModelInfo("m", "0" * 64, "fp32")
NOW = 1_750_000_000.0


def alert(seq: int, slot: str = "R1S1", kind: str = "stockout", camera: str = CAMERA, event_ts: float | None = None,
          origin: float = NOW - 100) -> dict[str, Any]:
    event = 10.0 * seq if event_ts is None else event_ts
    return build_alert(seq=seq, alert_type=kind, store_id=STORE, camera_id=camera, slot_id=slot, sku=None,
                       event_frame_ts=event, raised_frame_ts=event + 10, confidence=0.8, bbox=[0, 0, 0.5, 0.5],
                       model=MODEL, time_origin=origin)


def state(*slots: tuple[str, str]) -> dict[str, Any]:
    return build_state(store_id=STORE, camera_id=CAMERA, frame_ts=5.0,
                       slots=[SlotStatus(slot, value, 1.0) for slot, value in slots])


def status(online: bool, reason: str) -> dict[str, Any]:
    return build_status(store_id=STORE, camera_id=CAMERA, online=online, reason=reason, agent_version="0.1",
                        started_at=NOW - 10, now=NOW)


def metrics(camera_state: str) -> dict[str, Any]:
    return build_metrics(store_id=STORE, camera_id=CAMERA, interval_s=10, fps=2, latency_ms={}, frame_age_ms=None,
                         dropped_frames=0, outbox={"depth": 0, "bytes": 0, "dropped": 0, "dropped_alerts": 0},
                         camera_state=camera_state, now=NOW)


# ------------------------------------------------------------------------------------------------ Monitor


@pytest.mark.parametrize(
    ("topic", "payload", "event", "reason"),
    [
        (T.alert, b"{not json", "invalid", "not UTF-8 JSON"),
        (T.alert, b"\xff\xfe", "invalid", "not UTF-8 JSON"),
        (T.alert, b"[1, 2]", "invalid", "not an object"),
        (T.alert, b'{"seq": 1}', "invalid", "'schema' is missing"),
        (T.alert, json.dumps({**alert(1), "seq": 0}).encode(), "invalid", "payload invalid at 'seq'"),
        (T.alert, json.dumps({**alert(1), "confidence": 1.5}).encode(), "invalid", "payload invalid at 'confidence'"),
        (T.state, encode_payload(alert(1)), "invalid", "does not belong on 'state'"),
        (topics(STORE, "other").alert, encode_payload(alert(1)), "invalid", "arrived on the topic of s1/other"),
        ("shelfsight/s1", b"{}", "invalid", "not a shelfsight/<store>/<camera>/<kind> topic"),
        ("elsewhere/s1/c1/alert", encode_payload(alert(1)), "invalid", "not a shelfsight"),
        (T.alert, b"", "invalid", "empty payload"),
        (T.snapshot("not-an-id"), b"\xff\xd8\xff\xe0", "invalid", "snapshot/<alert_id>"),
        (T.snapshot(alert(1)["alert_id"]), b"GIF89a", "invalid", "not a JPEG"),
        (f"{T.alert}/v2", json.dumps({**alert(1), "schema": "shelfsight.alert/2"}).encode(), "unsupported",
         "shelfsight.alert/2 is not known"),
    ],
)
def test_bad_messages_are_reported_with_a_reason(topic: str, payload: bytes, event: str, reason: str) -> None:
    outcome = Monitor().handle(topic, payload, NOW)
    assert outcome.event == event
    assert reason in (outcome.detail or ""), outcome.detail
    assert render_json(outcome, NOW) is not None  # reported, never dropped silently
    assert any(event.upper() in line for line in render_text(outcome, NOW, None))


def test_unsupported_version_is_reported_once_per_topic() -> None:
    monitor = Monitor()
    payload = json.dumps({**alert(1), "schema": "shelfsight.alert/2"}).encode()
    first, second = (monitor.handle(f"{T.alert}/v2", payload, NOW) for _ in range(2))
    assert first.detail is not None and second.detail is None
    assert render_json(second, NOW) is None and monitor.counts["unsupported"] == 2


def test_duplicates_are_dropped_and_seq_gaps_noted() -> None:
    monitor = Monitor()
    events = [monitor.handle(T.alert, encode_payload(a), NOW) for a in (alert(1), alert(1), alert(2), alert(5))]
    assert [e.event for e in events] == ["alert", "duplicate", "alert", "alert"]
    assert events[2].detail is None
    assert events[3].detail is not None and "2 -> 5" in events[3].detail
    assert render_json(events[1], NOW) is None and render_text(events[1], NOW, None) == []
    late = monitor.handle(T.alert, encode_payload(alert(3)), NOW)
    assert late.event == "alert" and "late delivery" in (late.detail or "")


def test_history_keeps_deduplicating_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    with AlertHistory(db) as history:
        assert Monitor(history=history).handle(T.alert, encode_payload(alert(1)), NOW).event == "alert"
    with AlertHistory(db) as history:  # a restarted subscriber (fresh memory) gets the redelivery
        again = Monitor(history=history).handle(T.alert, encode_payload(alert(1)), NOW)
        assert again.event == "duplicate"
        assert len(history.query()) == 1


def test_state_status_and_metrics_fold_into_the_camera_view() -> None:
    monitor = Monitor()
    first = monitor.handle(T.state, encode_payload(state(("R1S1", "ok"), ("R1S2", "empty"))), NOW)
    assert first.first_view and first.changes == (("R1S1", None, "ok"), ("R1S2", None, "empty"))
    online = monitor.handle(T.status, encode_payload(status(True, "connected")), NOW)
    assert online.detail == "changed"
    (summary,) = render_text(first, NOW, monitor.cameras[(STORE, CAMERA)])
    assert "SHELF" in summary and "1 empty, 1 ok" in summary and "empty: R1S2" in summary
    change = monitor.handle(T.state, encode_payload(state(("R1S1", "ok"), ("R1S2", "ok"))), NOW)
    assert change.changes == (("R1S2", "empty", "ok"),)
    (line,) = render_text(change, NOW, None)
    assert "R1S2 empty -> ok" in line
    assert monitor.handle(T.status, encode_payload(status(True, "connected")), NOW).detail is None  # no news
    offline = monitor.handle(T.status, encode_payload(status(False, "connection_lost")), NOW)
    (line,) = render_text(offline, NOW, None)
    assert "OFFLINE" in line and "connection_lost" in line
    assert monitor.handle(T.metrics, encode_payload(metrics("streaming")), NOW).detail is not None
    assert monitor.handle(T.metrics, encode_payload(metrics("streaming")), NOW).detail is None
    reconnecting = monitor.handle(T.metrics, encode_payload(metrics("reconnecting")), NOW)
    (line,) = render_text(reconnecting, NOW, None)
    assert "CAMERA" in line and "streaming -> reconnecting" in line
    cleared = monitor.handle(T.state, b"", NOW)  # an admin removed the retained document
    assert cleared.event == "cleared" and (STORE, CAMERA) not in monitor.cameras


def test_snapshots_are_saved_atomically_and_joined_in_history(tmp_path: Path) -> None:
    first = alert(1)
    jpeg = b"\xff\xd8\xff\xe0" + bytes(100)
    with AlertHistory(tmp_path / "h.sqlite") as history:
        monitor = Monitor(history=history, snapshots_dir=tmp_path / "snaps")
        saved = monitor.handle(T.snapshot(first["alert_id"]), jpeg, NOW)  # the picture may come first
        monitor.handle(T.alert, encode_payload(first), NOW)
        path = tmp_path / "snaps" / STORE / CAMERA / f"{first['alert_id']}.jpg"
        assert saved.snapshot_path == str(path) and path.read_bytes() == jpeg
        assert not list(path.parent.glob("*.part"))
        assert history.query()[0].snapshot_path == str(path)
        unsafe = monitor.handle(f"shelfsight/../{CAMERA}/snapshot/{first['alert_id']}", jpeg, NOW)
        assert unsafe.event == "invalid" and "folder name" in (unsafe.detail or "")


def test_known_fields_drops_only_unknown_members() -> None:
    schema = load_schema("shelfsight.metrics/1")
    document = {**metrics("streaming"), "new_top": 1}
    document["outbox"] = {**document["outbox"], "new_nested": 2}
    document["latency_ms"] = {"infer": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}
    pruned = known_fields(document, schema)
    assert "new_top" not in pruned and "new_nested" not in pruned["outbox"]
    assert pruned["latency_ms"] == {"infer": {"p50": 1.0, "p95": 2.0}}  # free-form keys kept, their members pruned
    assert Monitor().handle(T.metrics, json.dumps(document).encode(), NOW).event == "metrics"


# ------------------------------------------------------------------------------------------------ history


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - 30), ("15m", NOW - 900), ("1h", NOW - 3600), ("1h30m", NOW - 5400), ("2d", NOW - 172800),
        ("1w", NOW - 604800), ("1.5h", NOW - 5400),
        ("2025-06-03T08:00:00Z", 1748937600.0), ("2025-06-03T10:00:00+02:00", 1748937600.0),
        ("2025-06-03T08:00", 1748937600.0), ("2025-06-03", 1748908800.0),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "1x", "yesterday", "h", "10 parsecs"])
def test_parse_since_rejects_nonsense(text: str) -> None:
    with pytest.raises(HistoryError, match="expected a duration"):
        parse_since(text, NOW)


def test_history_query_filters(tmp_path: Path) -> None:
    origin = time.time() - 7200
    rows = [alert(1, "R1S1", origin=origin), alert(2, "R1S2", kind="restocked", origin=origin),
            alert(3, "R1S1", camera="c2", origin=origin), alert(4, "R2S2", event_ts=7000.0, origin=origin)]
    with AlertHistory(tmp_path / "h.sqlite") as history:
        for row in rows:
            assert history.record_alert(row, NOW)
        assert not history.record_alert(rows[0], NOW)
        ids = lambda **kw: [r.alert_id for r in history.query(**kw)]  # noqa: E731
        assert ids() == [r["alert_id"] for r in rows[:3]] + [rows[3]["alert_id"]]
        assert ids(alert_type="restocked") == [rows[1]["alert_id"]]
        assert ids(camera_id="c2") == [rows[2]["alert_id"]]
        assert ids(slot_id="R1S1") == [rows[0]["alert_id"], rows[2]["alert_id"]]
        assert ids(since=parse_time(rows[3]["raised_time"]) - 1) == [rows[3]["alert_id"]]
        assert ids(until=parse_time(rows[1]["raised_time"])) == [rows[0]["alert_id"]]
        assert ids(limit=2) == [rows[2]["alert_id"], rows[3]["alert_id"]]  # the newest two, oldest first
        assert history.query(alert_type="restocked")[0].payload == rows[1]


# ------------------------------------------------------------------------------------------------ CLI


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shelfsight.shelf_agent.alerts_cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "127.0.0.1", "--port", "{closed}"], "cannot reach broker 127.0.0.1:{closed}"),
        (["--ca-certs", "/nonexistent/ca.crt"], "mqtt.tls.ca_certs: file not found"),
        (["--count", "0", "--port", "{closed}"], "--count must be at least 1"),
        (["--store", "a/b", "--port", "{closed}"], "--store 'a/b' cannot be an MQTT topic level"),
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        (["history", "--db", "/nonexistent/h.sqlite"], "no such history database"),
        (["history", "--db", "{db}", "--since", "soon"], "expected a duration"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    closed = str(_closed_port())
    db = tmp_path / "h.sqlite"
    AlertHistory(db).close()
    args = [a.replace("{closed}", closed).replace("{db}", str(db)) for a in args]
    result = _run(*args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shelf-alerts: "), lines
    assert message.replace("{closed}", closed) in lines[0]


def test_cli_config_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "alerts.yaml"
    config.write_text("mqtt:\n  host: broker\n  username: bo\n  tls:\n    insecure: true\nstore: s9\n")
    monkeypatch.setenv("SHELF_ALERTS_PASSWORD", "pw")
    merged = build_config(_watch_parser().parse_args(["--config", str(config), "--camera", "c3"]))
    assert (merged.mqtt.host, merged.mqtt.port, merged.mqtt.username) == ("broker", 8883, "bo")  # TLS -> 8883
    assert merged.mqtt.resolve_password() == "pw" and merged.mqtt.tls is not None and merged.mqtt.tls.insecure
    assert subscription(merged.mqtt.topic_prefix, merged.store, merged.camera) == "shelfsight/s9/c3/#"
    flags = build_config(_watch_parser().parse_args(["--config", str(config), "--port", "1884", "--host", "h"]))
    assert (flags.mqtt.host, flags.mqtt.port) == ("h", 1884)
    plain = build_config(_watch_parser().parse_args([]))
    assert plain.mqtt.tls is None and plain.mqtt.port == 1883
    assert subscription("shelfsight", None, None) == "shelfsight/#"
    assert subscription("shelfsight", None, "c1") == "shelfsight/+/c1/#"


def test_cli_history_table_and_json(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    with AlertHistory(db) as history:
        history.record_alert(alert(1, "R2S5", origin=time.time() - 60), time.time())
    table = _run("history", "--db", str(db), "--since", "1h")
    assert table.returncode == 0 and "R2S5" in table.stdout and "(1 alerts)" in table.stdout
    assert "stockout" in table.stdout.splitlines()[1]
    as_json = _run("history", "--db", str(db), "--since", "1h", "--json")
    assert [json.loads(line)["slot_id"] for line in as_json.stdout.splitlines()] == ["R2S5"]
    assert _run("history", "--db", str(db), "--type", "restocked").stdout.strip().endswith("(0 alerts)")
