"""`shelf-agent` as a real process: SIGKILL during a broker outage and restart, the will, SIGTERM, bad input,
credentials kept out of the logs. Real mosquitto, real subscriber, the bundled model, rendered scenario videos."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from agent_state import query, wait_until

from shelfsight.shelf_agent.agent import bundled_model_dir
from shelfsight.shelf_agent.events import ModelInfo, build_alert, validate_payload
from shelfsight.shelf_agent.journal import Journal
from shelfsight.shelf_agent.layout import load_layout
from shelfsight.shelf_agent.outbox import Outbox

pytestmark = pytest.mark.timeout(150)

# The same shelf (same seed) as the conftest's small scenario looks after it ran: both depleted slots empty from
# the start.
AFTERWARDS = """\
name: agent-small-afterwards
seed: 5
duration_s: 10
fps: 10
camera: {width: 640, height: 360, noise: 0.01, jitter_px: 0.5}
shelf: {rows: 2, slots_per_row: 4, facings_per_slot: 2}
events:
  - {t: 0, type: deplete, slot: R1S2, duration_s: 0.1}
  - {t: 0, type: deplete, slot: R2S3, duration_s: 0.1}
"""
ROOT = "shelfsight/demo-store/cam-1"
SECRET = "Pw-9f8e7d6c5b4a"


def run_args(scenario: Path, tmp_path: Path, broker: Any, *extra: str, realtime: bool = False) -> list[str]:
    return ["--camera", str(scenario / "video.mp4"), "--layout", str(scenario / "layout.yaml"),
            "--realtime" if realtime else "--as-fast-as-possible", "--fps", "5", "--dwell", "2",
            "--broker", f"{broker.host}:{broker.port}",
            "--outbox", str(tmp_path / "outbox.sqlite"), "--journal", str(tmp_path / "journal.sqlite"), *extra]


def first_seen(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for alert in alerts:
        seen.setdefault(alert["alert_id"], alert)
    return list(seen.values())


def status_is(state: str, reason: str) -> Callable[[list[Any]], bool]:
    return lambda ms: any(m.topic == f"{ROOT}/status" and (m.json()["state"], m.json()["reason"]) == (state, reason)
                          for m in ms)


# ------------------------------------------------------------------------------------------------ 3. kill -9

def test_sigkill_during_outage_then_restart_delivers_everything_and_raises_nothing_twice(
        small_scenario: Path, render_scenario: Callable[[str], Path], shelf_agent_command: list[str], tmp_path: Path,
        mosquitto_broker: Any, mqtt_subscriber: Any, agent_process: Any) -> None:
    afterwards = render_scenario(AFTERWARDS)
    assert load_layout(afterwards / "layout.yaml").slots == load_layout(small_scenario / "layout.yaml").slots
    broker = mosquitto_broker()
    broker.stop()
    outbox, journal = tmp_path / "outbox.sqlite", tmp_path / "journal.sqlite"

    first = agent_process(tmp_path, run_args(small_scenario, tmp_path, broker), name="first")
    stored_alert = "SELECT 1 FROM messages WHERE kind = 'alert'"
    wait_until(lambda: bool(query(outbox, stored_alert)) or first.proc.poll() is not None, 90, "an alert in the outbox")
    assert first.proc.poll() is None, f"agent ended before the kill:\n{first.log()[-2000:]}"
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    stored = [json.loads(row[0]) for row in query(outbox, "SELECT payload FROM messages WHERE kind = 'alert'")]
    journaled = [json.loads(row[0]) for row in query(journal, "SELECT payload FROM alerts ORDER BY seq")]
    assert stored and {a["alert_id"] for a in stored} <= {a["alert_id"] for a in journaled}
    reported = {a["slot_id"] for a in journaled if a["type"] == "stockout"}

    broker.start()
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#")
    second = agent_process(tmp_path, run_args(afterwards, tmp_path, broker), name="second")
    assert second.wait(90) == 0, second.log()[-3000:]
    assert sub.wait_for(status_is("offline", "clean_stop"), 15), second.log()[-3000:]

    delivered = [m.json() for m in sub.on(f"{ROOT}/alert")]
    delivered_ids = [a["alert_id"] for a in delivered]
    missing = {a["alert_id"] for a in journaled} - set(delivered_ids)
    assert not missing, f"stored before the kill but never delivered: {missing}"
    assert delivered_ids[: len(journaled)] == [a["alert_id"] for a in journaled]  # replayed first, in order
    seqs = [a["seq"] for a in delivered]
    assert all(b > a for a, b in pairwise(seqs)), [(a["seq"], a["type"], a["slot_id"]) for a in delivered]

    # The restart saw those slots empty and published that, but raised no second stock-out for them.
    new = delivered[len(journaled):]
    assert not [a for a in new if a["type"] == "stockout" and a["slot_id"] in reported], new
    final_state = {s["slot_id"]: s["state"] for s in sub.on(f"{ROOT}/state")[-1].json()["slots"]}
    assert all(final_state[slot] == "empty" for slot in reported), (reported, final_state)
    assert "restored slot state" in second.log()
    with Outbox(outbox) as box:
        assert box.depth() == 0

    # The operator's view of the same history: `shelf-agent alerts` lists every alert of both runs.
    listing = subprocess.run([*shelf_agent_command, "alerts", "--since", "1h", "--journal", str(journal)],
                             capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == len(set(delivered_ids))
    for line, alert in zip(lines, first_seen(delivered), strict=True):
        assert f"#{alert['seq']}" in line and alert["type"] in line and alert["slot_id"] in line


# ------------------------------------------------------------------------------------------------ 4./5. will, SIGTERM

LOOP = {"SHELFSIGHT__CAMERA__CAPTURE__LOOP": "true"}  # a live-like source that never ends


def test_sigkill_leaves_the_will_offline_connection_lost(small_scenario: Path, tmp_path: Path, mosquitto_broker: Any,
                                                         mqtt_subscriber: Any, agent_process: Any) -> None:
    broker = mosquitto_broker()
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/status")
    agent = agent_process(tmp_path, run_args(small_scenario, tmp_path, broker, realtime=True), env=LOOP)
    assert sub.wait_for(status_is("online", "connected"), 60), agent.log()[-3000:]
    agent.proc.send_signal(signal.SIGKILL)
    assert agent.wait(10) == -signal.SIGKILL
    assert sub.wait_for(status_is("offline", "connection_lost"), 15), "no will message"
    will = [m for m in sub.messages if m.json()["state"] == "offline"][-1]
    validate_payload(will.json())
    late = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/status")
    assert late.wait_for(lambda ms: bool(ms), 10)
    assert late.messages[0].retain and late.messages[0].json()["reason"] == "connection_lost"


def test_sigterm_stops_cleanly(small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any,
                               agent_process: Any) -> None:
    broker = mosquitto_broker()
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#")
    agent = agent_process(tmp_path, run_args(small_scenario, tmp_path, broker, realtime=True), env=LOOP)
    assert sub.wait_for(lambda ms: status_is("online", "connected")(ms) and any(m.topic == f"{ROOT}/state"
                                                                                 for m in ms), 60), agent.log()[-3000:]
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0, agent.log()[-3000:]
    assert sub.wait_for(status_is("offline", "clean_stop"), 10)
    assert not status_is("offline", "connection_lost")(sub.messages)  # a clean stop sends no will
    late = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/status")
    assert late.wait_for(lambda ms: bool(ms), 10)
    assert late.messages[0].retain and late.messages[0].json()["reason"] == "clean_stop"
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        assert outbox.depth() == 0  # drained, including the final state
    assert "stopped:" in agent.log() and "Traceback" not in agent.log()


# ------------------------------------------------------------------------------------------------ 6. bad input

def corrupt_model(folder: Path) -> Path:
    target = folder / "model"
    target.mkdir()
    source = bundled_model_dir()
    for item in source.iterdir():
        data = bytearray(item.read_bytes())
        if item.suffix == ".onnx":
            data[len(data) // 2] ^= 0x01  # one flipped bit
        (target / item.name).write_bytes(bytes(data))
    return target


def bad_input_args(case: str, scenario: Path, tmp_path: Path) -> tuple[list[str], str]:
    video, layout = str(scenario / "video.mp4"), str(scenario / "layout.yaml")
    common = ["--no-mqtt", "--outbox", str(tmp_path / "o.sqlite"), "--journal", str(tmp_path / "j.sqlite")]
    if case == "unknown-config-key":
        config = tmp_path / "agent.yaml"
        config.write_text(f"camera:\n  source: {video}\nmqtt:\n  host: localhost\n  hots: typo\n")
        return ["--config", str(config), *common], f"{config}:5: field 'mqtt.hots'"
    if case == "missing-layout":
        return ["--camera", video, "--layout", str(tmp_path / "nope.yaml"), *common], "nope.yaml"
    if case == "missing-camera-file":
        return ["--camera", str(tmp_path / "gone.mp4"), "--layout", layout, *common], "gone.mp4"
    if case == "unreadable-camera-file":
        junk = tmp_path / "junk.mp4"
        junk.write_bytes(os.urandom(20_000))
        return ["--camera", str(junk), "--layout", layout, *common], "junk.mp4"
    if case == "corrupt-model":
        return ["--camera", video, "--layout", layout, "--model", str(corrupt_model(tmp_path)), *common], "sha256"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown-config-key", "missing-layout", "missing-camera-file",
                                  "unreadable-camera-file", "corrupt-model"])
def test_bad_input_is_one_line_and_exit_2(case: str, small_scenario: Path, tmp_path: Path,
                                          shelf_agent_command: list[str]) -> None:
    args, expected = bad_input_args(case, small_scenario, tmp_path)
    result = subprocess.run([*shelf_agent_command, *args], capture_output=True, text=True, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("shelf-agent")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith("shelf-agent: error: ") and expected in errors[0], result.stderr
    if case != "unreadable-camera-file":  # only found out when the capture opens it, after startup
        assert not (tmp_path / "o.sqlite").exists()  # refused before it touched any state


# ------------------------------------------------------------------------------------------------ 9. credentials

def test_password_from_environment_is_used_and_never_logged(small_scenario: Path, tmp_path: Path,
                                                            mosquitto_broker: Any, mqtt_password_file: Any,
                                                            mqtt_subscriber: Any, agent_process: Any) -> None:
    passwords = mqtt_password_file({"agent": SECRET, "viewer": "viewer-pw"})
    broker = mosquitto_broker([f"password_file {passwords}", "allow_anonymous false"])
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#", username="viewer", password="viewer-pw")
    env = {"SHELFSIGHT__MQTT__USERNAME": "agent"}
    args = run_args(small_scenario, tmp_path, broker, "--log-level", "DEBUG", "--log-format", "json")

    wrong = agent_process(tmp_path, args, env={**env, "SHELFSIGHT__MQTT__PASSWORD": SECRET[::-1]}, name="wrong")
    assert wrong.wait(90) == 0
    assert "refused the connection" in wrong.log()
    assert not sub.on(f"{ROOT}/alert")

    right = agent_process(tmp_path, args, env={**env, "SHELFSIGHT__MQTT__PASSWORD": SECRET}, name="right")
    assert right.wait(90) == 0, right.log()[-3000:]
    assert sub.wait_for(status_is("offline", "clean_stop"), 15)
    assert sub.on(f"{ROOT}/alert"), "authenticated agent delivered nothing"  # the alerts kept from the refused run
    for process in (wrong, right):
        text = process.log()
        assert SECRET not in text and SECRET[::-1] not in text
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)


# ------------------------------------------------------------------------------------------------ alerts

MODEL = ModelInfo(name="m", sha256="0" * 64, precision="int8")


def journal_with_history(path: Path) -> list[dict[str, Any]]:
    """Three alerts, the first one recorded two hours ago."""
    alerts = [
        build_alert(seq=i + 1, alert_type=kind, store_id="demo-store", camera_id="cam-1", slot_id=slot, sku=sku,
                    event_frame_ts=10.0 * i, raised_frame_ts=10.0 * i + 2, confidence=0.9, bbox=[0.1, 0.1, 0.2, 0.2],
                    model=MODEL, time_origin=1_700_000_000.0)
        for i, (kind, slot, sku) in enumerate([("stockout", "R1S2", "Tea"), ("stockout", "R2S3", None),
                                                ("restocked", "R1S2", "Tea")])
    ]
    journal = Journal(path)
    journal.record_alerts(alerts, pending=False)
    journal.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alerts SET recorded = recorded - 7200 WHERE seq = 1")
    return alerts


def test_alerts_lists_the_journal(tmp_path: Path, shelf_agent_command: list[str]) -> None:
    path = tmp_path / "journal.sqlite"
    alerts = journal_with_history(path)
    result = subprocess.run([*shelf_agent_command, "alerts", "--since", "1h", "--journal", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # the two-hour-old one is outside --since 1h
    assert "#2" in lines[0] and "stockout" in lines[0] and "R2S3" in lines[0] and "sku=-" in lines[0]
    assert "#3" in lines[1] and "restocked" in lines[1] and "sku=Tea" in lines[1]
    assert alerts[1]["raised_time"] in lines[0] and alerts[1]["event_time"] in lines[0]

    everything = subprocess.run([*shelf_agent_command, "alerts", "--journal", str(path), "--json", "--type",
                                 "stockout"], capture_output=True, text=True, timeout=30)
    assert [json.loads(line) for line in everything.stdout.splitlines()] == alerts[:2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--journal", "{tmp}/absent.sqlite"], "no alert journal here"),
        (["--since", "yesterday"], "not a duration"),
    ],
)
def test_alerts_bad_arguments(tmp_path: Path, args: list[str], message: str, shelf_agent_command: list[str]) -> None:
    result = subprocess.run([*shelf_agent_command, "alerts", *[a.format(tmp=tmp_path) for a in args]],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
