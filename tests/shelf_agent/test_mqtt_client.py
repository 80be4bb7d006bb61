"""The outbox publisher against a real mosquitto: order, outages, ACL refusals, will and clean stop."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.events import ModelInfo, build_alert, build_metrics, encode_payload, topics
from shelfsight.shelf_agent.mqtt_client import MqttConfig, Publisher, build_client
from shelfsight.shelf_agent.outbox import Outbox

STORE, CAMERA = "store-1", "cam-1"
TOPICS = topics(STORE, CAMERA)
MODEL = ModelInfo("shelf-det", "0" * 64, "fp32")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def put_alerts(outbox: Outbox, count: int) -> list[int]:
    """Real alert payloads, each with the next persisted seq; returns the seqs."""
    seqs = []
    for _ in range(count):
        seq = outbox.next_seq(CAMERA)
        payload = build_alert(seq=seq, alert_type="stockout", store_id=STORE, camera_id=CAMERA, slot_id="R1S1",
                              sku=None, event_frame_ts=float(seq), raised_frame_ts=seq + 3.0, confidence=0.9,
                              bbox=[0.1, 0.1, 0.2, 0.2], model=MODEL)
        outbox.put(TOPICS.alert, encode_payload(payload), "alert")
        seqs.append(seq)
    return seqs


def put_metrics(outbox: Outbox) -> None:
    payload = build_metrics(store_id=STORE, camera_id=CAMERA, interval_s=10, fps=10, latency_ms={}, frame_age_ms=5,
                            dropped_frames=0, outbox=outbox.stats(), camera_state="streaming")
    outbox.put(TOPICS.metrics, encode_payload(payload), "metrics")


def received_seqs(subscriber: Any) -> list[int]:
    """Alert seqs in arrival order, duplicates (allowed by QoS 1) removed keeping the first arrival."""
    seen: list[int] = []
    for message in subscriber.on(TOPICS.alert):
        seq = message.json()["seq"]
        if seq not in seen:
            seen.append(seq)
    return seen


def statuses(subscriber: Any) -> list[dict[str, Any]]:
    return [m.json() for m in subscriber.on(TOPICS.status)]


@pytest.fixture
def publishers() -> Iterator[Callable[..., Publisher]]:
    started: list[Publisher] = []

    def make(outbox: Outbox, **config: Any) -> Publisher:
        config.setdefault("reconnect_max_s", 1)
        publisher = Publisher(MqttConfig(**config), outbox, store_id=STORE, camera_id=CAMERA, agent_version="test")
        started.append(publisher.start())
        return publisher

    yield make
    for publisher in started:
        publisher.stop(timeout=2.0, drain=False)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_delivers_everything_in_order_and_acks_the_outbox(
    protocol: str, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, publishers: Any
) -> None:
    broker = mosquitto_broker()
    subscriber = mqtt_subscriber(broker.host, broker.port, f"shelfsight/{STORE}/{CAMERA}/#")
    outbox = Outbox(tmp_path / "outbox.db")
    seqs = put_alerts(outbox, 60)
    put_metrics(outbox)
    publisher = publishers(outbox, host=broker.host, port=broker.port, protocol=protocol, max_inflight=5)
    assert publisher.flush(20), publisher.stats()
    assert subscriber.wait_for(lambda msgs: len(received_seqs(subscriber)) == 60 and subscriber.on(TOPICS.metrics))
    assert received_seqs(subscriber) == seqs
    assert outbox.depth() == 0
    stats = publisher.stats()
    assert (stats.connected, stats.published, stats.failed, stats.refused) == (True, 61, 0, 0)
    assert subscriber.wait_for(lambda msgs: any(s["state"] == "online" for s in statuses(subscriber)))
    # New rows are picked up while running.
    seqs += put_alerts(outbox, 3)
    publisher.notify()
    assert publisher.flush(10)
    assert subscriber.wait_for(lambda msgs: received_seqs(subscriber) == seqs)


def test_broker_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, publishers: Any
) -> None:
    broker = mosquitto_broker(persistence=True)  # the subscriber's session survives the restart
    subscriber = mqtt_subscriber(broker.host, broker.port, TOPICS.alert, client_id="outage-sub", persistent=True)
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = publishers(outbox, host=broker.host, port=broker.port)
    assert wait_until(lambda: publisher.connected)
    seqs = put_alerts(outbox, 30)
    publisher.notify()
    broker.stop()  # some of the 30 are likely in flight right now
    assert wait_until(lambda: not publisher.connected)
    seqs += put_alerts(outbox, 10)
    publisher.notify()
    assert not publisher.flush(0.5)
    assert outbox.depth() >= 10  # written during the outage: all still on disk
    broker.start()
    assert publisher.flush(30), publisher.stats()
    assert subscriber.wait_for(lambda msgs: len(received_seqs(subscriber)) == 40, timeout=20), received_seqs(subscriber)
    assert received_seqs(subscriber) == seqs
    assert outbox.depth() == 0 and publisher.stats().failed == 0


def acl_broker(mosquitto_broker: Any, mqtt_password_file: Any, tmp_path: Path) -> Any:
    passwords = mqtt_password_file({"agent": "agent-pw", "reader": "reader-pw"})
    acl = tmp_path / "acl"
    root = f"shelfsight/{STORE}/{CAMERA}"
    acl.write_text(
        f"user agent\ntopic write {root}/status\ntopic write {root}/state\ntopic write {root}/metrics\n"
        "user reader\ntopic read #\n"
    )
    return mosquitto_broker(["allow_anonymous false", f"password_file {passwords}", f"acl_file {acl}"])


def test_publish_refused_by_acl_stays_in_outbox_and_counts_as_failed(
    tmp_path: Path, mosquitto_broker: Any, mqtt_password_file: Any, mqtt_subscriber: Any, publishers: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = acl_broker(mosquitto_broker, mqtt_password_file, tmp_path)
    subscriber = mqtt_subscriber(broker.host, broker.port, "#", username="reader", password="reader-pw")
    outbox = Outbox(tmp_path / "outbox.db")
    put_alerts(outbox, 1)
    alert_row = outbox.peek_batch(1)[0]
    put_metrics(outbox)
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "agent-pw")
    publisher = publishers(outbox, host=broker.host, port=broker.port, username="agent",
                           password_env="TEST_MQTT_PASSWORD", refused_retry_min_s=30)
    assert wait_until(lambda: publisher.stats().failed >= 1 and publisher.stats().published >= 1)
    stats = publisher.stats()
    assert stats.connected and stats.refused == 0
    assert "0x87" in (stats.last_error or "") and TOPICS.alert in (stats.last_error or "")
    assert [m.id for m in outbox.peek_batch(10)] == [alert_row.id]  # metrics acked, refused alert kept
    assert subscriber.wait_for(lambda msgs: bool(subscriber.on(TOPICS.metrics)))
    # The paused alert topic does not block the others.
    outbox.put(TOPICS.state, b'{"schema":"shelfsight.state/1"}', "state")
    publisher.notify()
    assert subscriber.wait_for(lambda msgs: bool(subscriber.on(TOPICS.state)))
    assert wait_until(lambda: outbox.depth() == 1)
    assert not publisher.flush(0.3)
    assert subscriber.on(TOPICS.alert) == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_refused_connection_is_counted_and_nothing_is_acked(
    protocol: str, tmp_path: Path, mosquitto_broker: Any, mqtt_password_file: Any, publishers: Any
) -> None:
    broker = acl_broker(mosquitto_broker, mqtt_password_file, tmp_path)
    outbox = Outbox(tmp_path / "outbox.db")
    put_metrics(outbox)
    publisher = publishers(outbox, host=broker.host, port=broker.port, username="agent", password="wrong",
                           protocol=protocol)
    assert wait_until(lambda: publisher.stats().refused >= 1)
    stats = publisher.stats()
    assert not stats.connected and stats.published == 0
    assert "refused the connection" in (stats.last_error or "") and "0x87" in (stats.last_error or "")
    assert outbox.depth() == 1


def test_unreachable_broker_keeps_messages_and_reports_it(tmp_path: Path, publishers: Any) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outbox = Outbox(tmp_path / "outbox.db")
    put_alerts(outbox, 2)
    publisher = publishers(outbox, host="127.0.0.1", port=port)
    assert wait_until(lambda: publisher.stats().connect_failures >= 1)
    assert publisher.last_error == f"cannot reach broker 127.0.0.1:{port}"
    assert not publisher.connected and outbox.depth() == 2


def make_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra)
    return {name: folder / name for name in ("ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem",
                                             "client.key")}


def test_mutual_tls_connects_with_the_right_ca_and_refuses_a_wrong_one(
    tmp_path: Path, mosquitto_broker: Any, publishers: Any
) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = mosquitto_broker([f"cafile {pki['ca.pem']}", f"certfile {pki['server.pem']}",
                               f"keyfile {pki['server.key']}", "require_certificate true"])
    good_outbox, bad_outbox = Outbox(tmp_path / "good.db"), Outbox(tmp_path / "bad.db")
    put_alerts(good_outbox, 2)
    put_alerts(bad_outbox, 2)
    client_tls = {"certfile": pki["client.pem"], "keyfile": pki["client.key"]}
    good = publishers(good_outbox, host=broker.host, port=broker.port, client_id="good",
                      tls={"ca_certs": pki["ca.pem"], **client_tls})
    bad = publishers(bad_outbox, host=broker.host, port=broker.port, client_id="bad",
                     tls={"ca_certs": pki["other-ca.pem"], **client_tls})
    assert good.flush(15), good.stats()
    assert good.stats().published == 2 and good_outbox.depth() == 0
    assert wait_until(lambda: bad.stats().connect_failures >= 1)
    assert not bad.connected and bad_outbox.depth() == 2 and bad.stats().published == 0


WILL_PROCESS = textwrap.dedent(
    """
    import sys, time
    from shelfsight.shelf_agent.mqtt_client import MqttConfig, Publisher
    from shelfsight.shelf_agent.outbox import Outbox
    config = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]))
    Publisher(config, Outbox(sys.argv[2]), store_id=sys.argv[3], camera_id=sys.argv[4]).start()
    print("started", flush=True)
    time.sleep(60)
    """
)


def test_will_publishes_offline_when_the_agent_is_killed(
    tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any
) -> None:
    broker = mosquitto_broker()
    subscriber = mqtt_subscriber(broker.host, broker.port, TOPICS.status)
    agent = subprocess.Popen(
        [sys.executable, "-c", WILL_PROCESS, str(broker.port), str(tmp_path / "outbox.db"), STORE, CAMERA],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert subscriber.wait_for(lambda msgs: any(s["state"] == "online" for s in statuses(subscriber)), 20)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    assert subscriber.wait_for(lambda msgs: statuses(subscriber)[-1]["state"] == "offline")
    will = statuses(subscriber)[-1]
    assert will["reason"] == "connection_lost" and will["schema"] == "shelfsight.status/1"
    late = mqtt_subscriber(broker.host, broker.port, TOPICS.status)  # retained for whoever comes later
    assert late.wait_for(lambda msgs: bool(msgs))
    assert late.messages[0].retain and late.messages[0].json()["reason"] == "connection_lost"


def test_clean_stop_publishes_offline_retained_and_no_will(
    tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any
) -> None:
    broker = mosquitto_broker()
    subscriber = mqtt_subscriber(broker.host, broker.port, TOPICS.status)
    publisher = Publisher(MqttConfig(host=broker.host, port=broker.port), Outbox(tmp_path / "outbox.db"),
                          store_id=STORE, camera_id=CAMERA, agent_version="9.9").start()
    assert subscriber.wait_for(lambda msgs: any(s["state"] == "online" for s in statuses(subscriber)))
    publisher.stop(timeout=5)
    assert subscriber.wait_for(lambda msgs: statuses(subscriber)[-1]["state"] == "offline")
    time.sleep(0.3)  # a will would arrive right after the disconnect; give it the chance to show up
    assert [(s["state"], s["reason"]) for s in statuses(subscriber)] == [("online", "connected"),
                                                                       ("offline", "clean_stop")]
    late = mqtt_subscriber(broker.host, broker.port, TOPICS.status)
    assert late.wait_for(lambda msgs: bool(msgs))
    retained = late.messages[0]
    assert retained.retain and json.loads(retained.payload)["reason"] == "clean_stop"
    assert json.loads(retained.payload)["agent_version"] == "9.9"


def test_config_is_strict_and_resolves_the_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        MqttConfig(hostname="x")
    with pytest.raises(ValidationError, match="either password or password_env"):
        MqttConfig(password="a", password_env="B")
    with pytest.raises(ValidationError, match="together"):
        MqttConfig(tls={"certfile": "c.pem"})
    assert MqttConfig(protocol=5).protocol == "5"
    monkeypatch.delenv("SHELFSIGHT_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="SHELFSIGHT_TEST_PW is not set"):
        MqttConfig(username="u", password_env="SHELFSIGHT_TEST_PW").resolve_password()
    monkeypatch.setenv("SHELFSIGHT_TEST_PW", "s3cret")
    assert MqttConfig(username="u", password_env="SHELFSIGHT_TEST_PW").resolve_password() == "s3cret"
    assert "s3cret" not in repr(MqttConfig(password="s3cret"))
    with pytest.raises(ConfigError, match="ca_certs: file not found"):
        build_client(MqttConfig(tls={"ca_certs": tmp_path / "missing.pem"}), "id")


# ------------------------------------------------------------------------------------------------ silent broker

def _silent_broker(listener: socket.socket, seen: dict[str, Any]) -> None:
    """Byte level: accept one client, answer its CONNECT with a success CONNACK, then never send another byte
    (a blackholed link: the TCP connection stays up, no FIN, no RST). Records the keep alive from the CONNECT."""
    conn, _ = listener.accept()
    seen["conn"] = conn
    header = conn.recv(2)
    length, shift, byte = 0, 0, header[1]
    while True:  # remaining length, variable byte integer
        length += (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        byte = conn.recv(1)[0]
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    assert header[0] == 0x10 and body[:6] == b"\x00\x04MQTT", (header, body[:8])
    seen["keepalive"] = int.from_bytes(body[8:10], "big")  # after protocol name, level, connect flags
    conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK v5: no session, Success, no properties
    while conn.recv(4096):  # swallow PUBLISH/PINGREQ until the client gives up
        pass


def test_a_silent_connection_is_given_up_after_about_the_configured_keepalive(tmp_path: Path,
                                                                              publishers: Any) -> None:
    """keepalive_s is how long a dead link may go unnoticed: paho pings after one negotiated keep alive and waits one
    more for the PINGRESP, so the agent negotiates half of keepalive_s (a blackhole was noticed after 2.1x before)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: dict[str, Any] = {}
    thread = threading.Thread(target=_silent_broker, args=(listener, seen), daemon=True)
    thread.start()
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = publishers(outbox, host="127.0.0.1", port=listener.getsockname()[1], keepalive_s=6)
    assert wait_until(lambda: publisher.connected, 10)
    assert seen["keepalive"] == 3 == publisher.config.ping_interval_s
    put_alerts(outbox, 1)
    publisher.notify()
    assert wait_until(lambda: not publisher.connected, 30), "the silent connection was never given up"
    assert outbox.depth() == 1  # never acknowledged, so still there for the next connection
    publisher.stop(timeout=1.0, drain=False)
    thread.join(5)
    seen["conn"].close()
    listener.close()
    assert MqttConfig(keepalive_s=30).ping_interval_s == 15 and MqttConfig(keepalive_s=5).ping_interval_s == 2
