"""The shipped store broker configuration, for real: TLS + client certificates + passwords + ACL (mosquitto 2.0).

The agent side is the real Publisher/Outbox; the back-office side is the real ``shelf-alerts`` process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from shelfsight.shelf_agent.events import ModelInfo, SlotStatus, build_alert, build_state, encode_payload, topics
from shelfsight.shelf_agent.mqtt_client import Publisher
from shelfsight.shelf_agent.outbox import Outbox
from shelfsight.shelf_agent.snapshot import encode_capped

MODEL = ModelInfo("shelfsight-test", "ab" * 32, "int8")
STORE, CAMERA = "store-t", "cam-a"  # the camera account of tests/deploy/conftest.py: "store-t/cam-a"
CAMERA_ROOT = f"shelfsight/{STORE}/{CAMERA}"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
USERS_AGENT_PASSWORD = "agent-secret"  # conftest's account for deploy/config/agent.yaml's store/camera
NOT_AUTHORIZED = 0x87


def alert(seq: int, slot: str, kind: str = "stockout", camera: str = CAMERA) -> dict[str, Any]:
    return build_alert(seq=seq, alert_type=kind, store_id=STORE, camera_id=camera, slot_id=slot, sku="4006381333931",
                       event_frame_ts=100.0 + seq, raised_frame_ts=110.0 + seq, confidence=0.9,
                       bbox=[0.1, 0.2, 0.3, 0.4], model=MODEL, time_origin=time.time() - 200)


class TlsClient:
    """A plain paho client over the broker's TLS listener, for what the Publisher cannot do on purpose."""

    def __init__(self, broker: Any, role: str, *, protocol: Any = mqtt.MQTTv5, subscribe: str | None = None) -> None:
        user, password, cert = broker.account(role)
        self._cond = threading.Condition()
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=protocol)
        self.client.username_pw_set(user, password)
        self.client.tls_set(ca_certs=str(broker.certs / "ca.crt"), certfile=str(broker.certs / f"{cert}.crt"),
                            keyfile=str(broker.certs / f"{cert}.key"))
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(subscribe, qos=1) if subscribe
                                                         else self._ready.set())
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._ready.wait(15):
            self.close()
            raise AssertionError(f"{user} could not connect/subscribe:\n{broker.log_tail()}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self.acks[mid] = int(reason_code.value)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1 publish; the PUBACK reason code (always 0 over MQTT 3.1.1, which has none)."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.acks, 15), f"no PUBACK for {topic}"
            return self.acks[mid]

    def wait_for(self, topic: str, timeout: float = 15) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout)

    def topics_seen(self) -> set[str]:
        with self._cond:
            return {t for t, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Any:
    made: list[TlsClient] = []

    def make(*args: Any, **kwargs: Any) -> TlsClient:
        made.append(TlsClient(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_agent_alert_reaches_shelf_alerts_once_with_history_snapshot_and_invalid_report(
    hardened_broker: Any, run_cli: Any, tmp_path: Path
) -> None:
    db, snapshots = tmp_path / "history.sqlite", tmp_path / "snapshots"
    args = hardened_broker.cli("--store", STORE, "--json", "--db", str(db), "--snapshots", str(snapshots),
                               "--count", "2", "--timeout", "40")
    cli = run_cli(args, password=hardened_broker.account("backoffice")[1])
    assert cli.wait_line("stderr", lambda line: "subscribed to shelfsight/store-t/#" in line), cli.err_lines

    first, second = alert(1, "R2S5"), alert(2, "R1S1", kind="restocked")
    jpeg = encode_capped(np.full((120, 160, 3), 90, np.uint8))
    names = topics(STORE, CAMERA)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.put(names.alert, encode_payload(first), "alert")
    outbox.put(names.alert, encode_payload(first), "alert")  # redelivery of the same event
    outbox.put(names.alert, b'{"schema": "shelfsight.alert/1", "seq": 0}', "alert")  # a broken sender
    outbox.put(names.snapshot(first["alert_id"]), jpeg, "snapshot")
    state = build_state(store_id=STORE, camera_id=CAMERA, frame_ts=120.0, slots=[SlotStatus("R2S5", "empty", 101.0)])
    outbox.put(names.state, encode_payload(state), "state")
    outbox.put(names.alert, encode_payload(second), "alert")
    publisher = Publisher(hardened_broker.mqtt_config("camera"), outbox,
                          store_id=STORE, camera_id=CAMERA).start()
    try:
        assert publisher.flush(20), f"{publisher.last_error}\n{hardened_broker.log_tail()}"
    finally:
        publisher.stop()
        outbox.close()

    assert cli.finish() == 0, cli.err_lines
    records = [json.loads(line) for line in cli.out_lines]
    alerts = [r["payload"]["alert_id"] for r in records if r["event"] == "alert"]
    assert alerts == [first["alert_id"], second["alert_id"]]  # the duplicate is printed once
    invalid = [r for r in records if r["event"] == "invalid"]
    assert len(invalid) == 1 and "shelfsight.alert/1 payload invalid" in invalid[0]["error"]
    snapshot = next(r for r in records if r["event"] == "snapshot")
    assert Path(snapshot["snapshot_path"]).read_bytes() == jpeg
    assert any(r["event"] == "state" and r["payload"]["slots"][0]["state"] == "empty" for r in records)
    assert any(r["event"] == "status" and r["payload"]["state"] == "online" for r in records)

    history = run_cli([*hardened_broker.cli()[:3], "history", "--db", str(db), "--since", "1h",
                       "--type", "stockout", "--json"])
    assert history.finish() == 0, history.err_lines
    rows = [json.loads(line) for line in history.out_lines]
    assert [(r["alert_id"], r["slot_id"], r["snapshot_path"]) for r in rows] == [
        (first["alert_id"], "R2S5", snapshot["snapshot_path"])]
    problems = run_cli([*hardened_broker.cli()[:3], "history", "--db", str(db), "--problems", "--json"])
    assert problems.finish() == 0
    assert [json.loads(line)["kind"] for line in problems.out_lines] == ["invalid"]


def test_live_view_shows_retained_shelf_and_offline_camera(
    hardened_broker: Any, run_cli: Any, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    state = build_state(store_id=STORE, camera_id=CAMERA, frame_ts=50.0, slots=[
        SlotStatus("R1S1", "ok", 0.0), SlotStatus("R2S5", "empty", 40.0), SlotStatus("R3S2", "low", 45.0)])
    outbox.put(topics(STORE, CAMERA).state, encode_payload(state), "state")
    publisher = Publisher(hardened_broker.mqtt_config("camera"), outbox,
                          store_id=STORE, camera_id=CAMERA).start()
    assert publisher.flush(20), publisher.last_error
    publisher.stop()  # clean stop: retained status becomes offline/clean_stop
    outbox.close()

    cli = run_cli(hardened_broker.cli("--store", STORE, "--camera", CAMERA),
                  password=hardened_broker.account("backoffice")[1])
    shelf = cli.wait_line("stdout", lambda line: "SHELF" in line)
    offline = [line for line in cli.out_lines if "OFFLINE" in line] or [
        cli.wait_line("stdout", lambda line: "OFFLINE" in line)]
    cli.proc.send_signal(signal.SIGTERM)
    assert cli.finish() == 0, cli.err_lines
    assert shelf is not None and "store-t/cam-a" in shelf and "empty: R2S5" in shelf and "low: R3S2" in shelf
    assert offline[0] is not None and "clean_stop" in offline[0]


@pytest.mark.parametrize(
    ("case", "options", "expected"),
    [
        ("anonymous", {"user": None}, "refused the connection: Not authorized (0x87)"),
        ("wrong password", {"password": "not-the-password"}, "refused the connection: Not authorized (0x87)"),
        ("broker certificate from another CA", {"ca": "rogue"}, "TLS: cannot verify broker"),
        ("client certificate from another CA", {"cert_dir": "rogue"}, "closed the connection before accepting it"),
        ("no client certificate", {"cert": None}, "closed the connection before accepting it"),
    ],
)
def test_refused_clients_get_one_clear_line_and_exit_1(
    hardened_broker: Any, run_cli: Any, case: str, options: dict[str, Any], expected: str
) -> None:
    password = options.pop("password", hardened_broker.account("backoffice")[1])
    if options.get("ca") == "rogue":
        options["ca"] = hardened_broker.rogue / "ca.crt"
    if options.get("cert_dir") == "rogue":
        options["cert_dir"] = hardened_broker.rogue
    cli = run_cli(hardened_broker.cli("--timeout", "20", **options), password=password)
    assert cli.finish() == 1, (case, cli.err_lines)
    assert cli.out_lines == []
    assert len(cli.err_lines) == 1 and cli.err_lines[0].startswith("shelf-alerts: "), cli.err_lines
    assert expected in cli.err_lines[0], cli.err_lines


def test_camera_publishing_outside_its_root_is_refused_reported_and_kept(
    hardened_broker: Any, clients: Any, tmp_path: Path
) -> None:
    backoffice = clients(hardened_broker, "backoffice", subscribe="shelfsight/#")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    # Credentials of store-t/cam-a, topics of store-t/cam-z: every publish is outside the camera's root.
    foreign = topics(STORE, "cam-z")
    outbox.put(foreign.alert, encode_payload(alert(1, "R1S1", camera="cam-z")), "alert")
    publisher = Publisher(hardened_broker.mqtt_config("camera"), outbox,
                          store_id=STORE, camera_id="cam-z").start()
    try:
        deadline = time.monotonic() + 20
        while "outbox row" not in (publisher.stats().last_error or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        error = publisher.stats().last_error or ""
        assert "refused publish of outbox row" in error and "Not authorized (0x87)" in error, error
        assert publisher.stats().failed >= 1
        assert outbox.depth() == 1  # kept for a later retry, not acknowledged away
    finally:
        publisher.stop(timeout=2, drain=False)
        outbox.close()
    # The refusal was decided before this sentinel was sent: if the alert had been routed, it would be here first.
    camera = clients(hardened_broker, "camera")
    sentinel = f"{CAMERA_ROOT}/sentinel"
    assert camera.publish(sentinel, b"-") < 0x80
    assert backoffice.wait_for(sentinel)
    assert not any(topic.startswith(f"shelfsight/{STORE}/cam-z/") for topic in backoffice.topics_seen())


@pytest.mark.parametrize(
    ("role", "topic"),
    [
        ("backoffice", f"{CAMERA_ROOT}/alert"),  # the back-office may only read
        ("wildcard", f"{CAMERA_ROOT}/alert"),  # a username "store-t/#" widens nothing
        ("camera", "shelfsight/other-store/cam-a/alert"),  # another store's root
        ("camera", "elsewhere/alert"),  # outside the shelfsight tree
    ],
)
def test_acl_refuses_with_puback_0x87(hardened_broker: Any, clients: Any, role: str, topic: str) -> None:
    watcher = clients(hardened_broker, "backoffice", subscribe="shelfsight/#")
    publisher = clients(hardened_broker, role)
    assert publisher.publish(topic, b'{"not": "allowed"}') == NOT_AUTHORIZED
    camera = clients(hardened_broker, "camera")
    sentinel = f"{CAMERA_ROOT}/sentinel-{uuid.uuid4().hex[:6]}"
    camera.publish(sentinel, b"-")
    assert watcher.wait_for(sentinel)
    assert topic not in watcher.topics_seen()


def test_mqtt311_cannot_see_a_refused_publish(hardened_broker: Any, clients: Any) -> None:
    """Pins what docs/mqtt.md says: over 3.1.1 mosquitto acknowledges an ACL-denied publish and drops it."""
    watcher = clients(hardened_broker, "backoffice", subscribe="shelfsight/#")
    camera = clients(hardened_broker, "camera", protocol=mqtt.MQTTv311)
    refused_topic = "shelfsight/other-store/cam-a/alert"
    assert camera.publish(refused_topic, b"{}") == 0  # looks like a success
    sentinel = f"{CAMERA_ROOT}/sentinel-311"
    camera.publish(sentinel, b"-")
    assert watcher.wait_for(sentinel)
    assert refused_topic not in watcher.topics_seen()


def _tiny_model(folder: Path) -> Path:
    """A real ONNX detector with fixed outputs (tests/runtime/tiny_onnx.py): products over the whole frame."""
    spec = importlib.util.spec_from_file_location("tiny_onnx", Path(__file__).parents[1] / "runtime" / "tiny_onnx.py")
    assert spec is not None and spec.loader is not None
    tiny_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_onnx)
    boxes = np.array([[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]], np.float32)
    scores = np.tile(np.array([[0.9, 0.0]], np.float32), (4, 1))
    manifest: Path = tiny_onnx.write_model_folder(folder, boxes, scores, classes=["product", "gap"])
    return manifest


def _video(path: Path, frames: int = 20, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (320, 180))
    for index in range(frames):
        writer.write(np.full((180, 320, 3), 80 + index, np.uint8))
    writer.release()
    return path


def test_shelf_agent_with_the_example_config_publishes_to_shelf_alerts(
    hardened_broker: Any, run_cli: Any, tmp_path: Path
) -> None:
    """deploy/config/agent.yaml as shipped, with only files, host and port swapped for this machine."""
    config = yaml.safe_load((DEPLOY / "config" / "agent.yaml").read_text())
    store, camera = config["store_id"], config["camera_id"]
    config["camera"]["source"] = str(_video(tmp_path / "shelf.mp4"))
    config["camera"]["options"].update(width=None, height=None, fps=None)  # a file has its own size and rate
    config["camera"]["capture"]["loop"] = True  # runs until we stop it, like a live camera
    config["model"].update(manifest=str(_tiny_model(tmp_path / "model").parent), backend="onnxruntime")
    config["layout"] = str(DEPLOY / "config" / "layout.yaml")
    config["mqtt"].update(host=hardened_broker.host, port=hardened_broker.port)
    config["mqtt"]["tls"].update({key: str(hardened_broker.certs / name) for key, name in
                                  (("ca_certs", "ca.crt"), ("certfile", "agent.crt"), ("keyfile", "agent.key"))})
    config["outbox"]["path"] = str(tmp_path / "outbox.sqlite")
    config["journal"] = str(tmp_path / "journal.sqlite")
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text(yaml.safe_dump(config))

    alerts_cli = run_cli(hardened_broker.cli("--store", store, "--json"),
                         password=hardened_broker.account("backoffice")[1])
    assert alerts_cli.wait_line("stderr", lambda line: "subscribed" in line, timeout=60), alerts_cli.err_lines
    env = {**os.environ, config["mqtt"]["password_env"]: USERS_AGENT_PASSWORD}
    agent = subprocess.Popen([sys.executable, "-m", "shelfsight.shelf_agent.cli", "--config", str(agent_yaml)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def seen(event: str, **fields: Any) -> bool:
            def match(line: str) -> bool:
                record = json.loads(line)
                payload = record.get("payload") or {}
                return record["event"] == event and all(payload.get(k) == v for k, v in fields.items())
            return any(match(line) for line in alerts_cli.out_lines) or bool(
                alerts_cli.wait_line("stdout", match, timeout=90))

        assert seen("status", state="online", camera_id=camera)
        assert seen("state", camera_id=camera)
        agent.send_signal(signal.SIGTERM)  # the clean stop of systemd's KillSignal
        assert agent.wait(60) == 0, agent.stderr.read()[-3000:] if agent.stderr else ""
        assert seen("status", state="offline", reason="clean_stop")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    alerts_cli.proc.send_signal(signal.SIGTERM)
    assert alerts_cli.finish() == 0
    records = [json.loads(line) for line in alerts_cli.out_lines]
    assert not [r for r in records if r["event"] in ("invalid", "unsupported")]
    state = next(r["payload"] for r in records if r["event"] == "state")
    assert {slot["slot_id"] for slot in state["slots"]} == {"R1S1", "R1S2", "R2S1"}
