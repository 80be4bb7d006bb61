"""The agent's own MQTT publisher against the SHIPPED hardened broker config (deploy/broker: TLS with client
certificates, password file, ACL), for every way a connection must be refused, and what the agent reports.

Each refusal must be: one clear error line in the agent's log (no traceback), the reason in ``last_error``, nothing
published and nothing acknowledged away from the outbox. Secrets (the password, the private key's contents) must
never appear in the log, not even at DEBUG level with paho's own logger on.

Certificates: the CA, broker and client certificates come from the shipped deploy/certs/make-dev-ca.sh (via the
helpers of tests/deploy/conftest.py, loaded by path); the misnamed and expired ones are issued here by the same CA
with the openssl CLI (``openssl ca -startdate/-enddate`` for a validity period entirely in the past).

Already covered, not repeated: ``shelf-alerts`` refusals (tests/deploy/test_hardened_broker.py::
test_refused_clients_get_one_clear_line_and_exit_1), an ACL-denied publish of the agent's Publisher reported with
0x87 and kept in the outbox (::test_camera_publishing_outside_its_root_is_refused_reported_and_kept), PUBACK 0x87 for
each ACL rule (::test_acl_refuses_with_puback_0x87).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import stop_process

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.config import load_agent_config
from shelfsight.shelf_agent.events import ModelInfo, build_alert, encode_payload, topics
from shelfsight.shelf_agent.mqtt_client import MqttConfig, Publisher
from shelfsight.shelf_agent.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]


def _deploy_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("_shelfsight_deploy_conftest", REPO / "tests/deploy/conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


deploy = _deploy_helpers()
STORE, CAMERA = deploy.STORE, deploy.CAMERA
CAMERA_USER, CAMERA_CERT = deploy.CAMERA_USER, deploy.CAMERA_CERT
PASSWORD = deploy.USERS[CAMERA_USER]
MODEL = ModelInfo("shelfsight-test", "ab" * 32, "int8")


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def issue(certs: Path, name: str, *, san: str | None, usage: str, expired: bool = False) -> None:
    """``name.crt``/``name.key`` signed by ``certs/ca.key``; ``expired``: valid only in January 2020."""
    openssl(certs, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
    openssl(certs, "req", "-new", "-key", f"{name}.key", "-subj", f"/O=ShelfSight test/CN={name}", "-out",
            f"{name}.csr")
    extensions = ["basicConstraints=critical,CA:FALSE", f"extendedKeyUsage={usage}"]
    if san:
        extensions.append(f"subjectAltName={san}")
    db = certs / f"{name}-db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    (certs / f"{name}.cnf").write_text("\n".join([
        "[ca]", "default_ca = test_ca", "[test_ca]", f"database = {db}/index.txt", f"new_certs_dir = {db}",
        f"serial = {db}/serial", "default_md = sha256", "policy = any", "unique_subject = no", "default_days = 30",
        "[any]", "commonName = supplied", "[leaf]", *extensions, ""]))
    dates = ["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"] if expired else []
    openssl(certs, "ca", "-batch", "-config", f"{name}.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
            "-extensions", "leaf", "-in", f"{name}.csr", "-out", f"{name}.crt", *dates)


def start_broker(root: Path, certs: Path, client_certs: Path) -> Any:
    """mosquitto with the shipped mosquitto.conf and acl (paths and port adapted by tests/deploy/conftest.py)."""
    shipped = (deploy.DEPLOY / "broker" / "mosquitto.conf").read_text()
    (root / "data").mkdir(exist_ok=True)
    log_path = root / "mosquitto.log"
    for _attempt in range(3):  # the free port may be taken before mosquitto binds it
        port = deploy.free_port()
        conf_root = root / f"conf-{port}"
        conf_root.mkdir()
        (conf_root / "certs").symlink_to(certs, target_is_directory=True)
        (conf_root / "data").symlink_to(root / "data", target_is_directory=True)
        shutil.copy(root / "passwd", conf_root / "passwd")
        conf = conf_root / "mosquitto.conf"
        conf.write_text(deploy.adapt_shipped_config(shipped, port=port, root=conf_root,
                                                    acl=deploy.DEPLOY / "broker" / "acl"))
        with log_path.open("ab") as log:
            proc = subprocess.Popen([deploy.MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 10
        while not deploy._accepts(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if deploy._accepts(port):
            # ``certs`` of the returned broker: where the clients' certificates are (the broker's own may differ)
            return deploy.HardenedBroker(port=port, root=root, certs=client_certs, rogue=root, proc=proc,
                                         log_path=log_path)
        proc.kill()
        proc.wait(5)
    pytest.fail(f"mosquitto did not start with the shipped config:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``good``: the shipped setup; ``wrong-name``: its certificate names only other.example; ``expired``: its
    certificate expired in 2020. Same CA, password file and ACL for all three."""
    if not os.path.exists(deploy.MOSQUITTO) or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto; the Makefile does it)")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    root = tmp_path_factory.mktemp("secure-broker")
    certs = deploy.make_certs(root / "certs", CAMERA_CERT)
    deploy.make_certs(root / "rogue", CAMERA_CERT)  # another CA, same names
    issue(certs, "expired-client", san=None, usage="clientAuth", expired=True)
    variants = {"wrong-name": ("DNS:other.example", False), "expired": ("DNS:localhost,IP:127.0.0.1", True)}
    for variant, (san, expired) in variants.items():
        folder = root / f"certs-{variant}"
        folder.mkdir()
        for name in ("ca.crt", "ca.key"):
            shutil.copy(certs / name, folder / name)
        issue(folder, "broker", san=san, usage="serverAuth", expired=expired)
    for index, (user, password) in enumerate(deploy.USERS.items()):
        flags = ["-c", "-b"] if index == 0 else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(root / "passwd"), user, password], check=True,
                       capture_output=True, timeout=10)
    started: dict[str, Any] = {}
    try:
        for variant, certs_dir in (("good", certs), *((v, root / f"certs-{v}") for v in variants)):
            variant_root = root / variant
            variant_root.mkdir()
            shutil.copy(root / "passwd", variant_root / "passwd")
            started[variant] = start_broker(variant_root, certs_dir, certs)
        started["root"] = root
        yield started
    finally:
        for broker in started.values():
            if isinstance(broker, deploy.HardenedBroker):
                stop_process(broker.proc)


def agent_config(broker: Any, **changes: Any) -> MqttConfig:
    """The camera account's MqttConfig (as deploy/config/agent.yaml would give it), with ``changes``."""
    certs = broker.certs
    document: dict[str, Any] = {
        "host": broker.host, "port": broker.port, "username": CAMERA_USER, "password": PASSWORD,
        "reconnect_min_s": 1, "reconnect_max_s": 2, "refused_retry_min_s": 30,
        "tls": {"ca_certs": certs / "ca.crt", "certfile": certs / f"{CAMERA_CERT}.crt",
                "keyfile": certs / f"{CAMERA_CERT}.key"},
    }
    tls = changes.pop("tls", {})
    document["tls"].update(tls)
    document.update(changes)
    return MqttConfig.model_validate(document)


def put_alert(outbox: Outbox, camera: str = CAMERA, slot: str = "R1S1") -> None:
    seq = outbox.next_seq(camera)
    payload = build_alert(seq=seq, alert_type="stockout", store_id=STORE, camera_id=camera, slot_id=slot,
                          sku=None, event_frame_ts=float(seq), raised_frame_ts=seq + 10.0, confidence=0.9,
                          bbox=[0.1, 0.1, 0.2, 0.2], model=MODEL)
    outbox.put(topics(STORE, camera).alert, encode_payload(payload), "alert", key=payload["alert_id"])


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything the agent's loggers (paho's included, it logs through ours) say, down to DEBUG."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="shelfsight")
    return caplog


def secrets(config: MqttConfig) -> list[str]:
    """The password and every base64 line of the client's private key."""
    found = [PASSWORD]
    if config.tls is not None and config.tls.keyfile is not None:
        found += [line for line in Path(config.tls.keyfile).read_text().splitlines()
                  if line and not line.startswith("-----")]
    return found


def assert_no_secrets(caplog: pytest.LogCaptureFixture, config: MqttConfig, *extra_text: str) -> None:
    text = "\n".join([caplog.text, *(record.getMessage() for record in caplog.records), *extra_text])
    assert caplog.records, "nothing was logged: the check would prove nothing"
    assert any(record.levelno == logging.DEBUG for record in caplog.records), "DEBUG was not captured"
    for secret in secrets(config):
        assert secret not in text, "a secret appeared in the agent's log"


AGENT_LOGGER = "shelfsight.shelf_agent.mqtt_client"


def agent_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The agent's own warnings/errors (paho's, under AGENT_LOGGER.paho, are checked for secrets only)."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == AGENT_LOGGER]


# case -> (broker, config changes, what the error line must say)
REFUSALS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "anonymous": ("good", {"username": None, "password": None}, ["refused the connection", "Not authorized (0x87)"]),
    "wrong password": ("good", {"password": "not-the-password"}, ["refused the connection", "(0x87)"]),
    "broker certificate from another CA": ("good", {"tls": {"ca_certs": "ROGUE"}},
                                           ["cannot reach broker", "TLS: certificate verify failed",
                                            "self-signed certificate in certificate chain"]),
    "broker certificate for another name": ("wrong-name", {},
                                            ["TLS: certificate verify failed", "mismatch", "127.0.0.1"]),
    "expired broker certificate": ("expired", {}, ["TLS: certificate verify failed", "certificate has expired"]),
    "expired client certificate": ("good", {"tls": {"certfile": "EXPIRED", "keyfile": "EXPIRED"}},
                                   ["closed the connection before accepting it", "TLS:", "CERTIFICATE_EXPIRED"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_connections_give_one_clear_error_and_ack_nothing(
    brokers: dict[str, Any], debug_log: pytest.LogCaptureFixture, tmp_path: Path, case: str
) -> None:
    variant, changes, expected = REFUSALS[case]
    broker = brokers[variant]
    tls = dict(changes.get("tls", {}))
    if tls.get("ca_certs") == "ROGUE":
        tls["ca_certs"] = brokers["root"] / "rogue" / "ca.crt"
    if tls.get("certfile") == "EXPIRED":
        tls = {"certfile": broker.certs / "expired-client.crt", "keyfile": broker.certs / "expired-client.key"}
    config = agent_config(broker, **{**changes, "tls": tls})
    outbox = Outbox(tmp_path / "outbox.sqlite")
    put_alert(outbox)
    put_alert(outbox, slot="R1S2")
    publisher = Publisher(config, outbox, store_id=STORE, camera_id=CAMERA, agent_version="test").start()
    try:
        assert wait_until(lambda: publisher.stats().refused + publisher.stats().connect_failures >= 1), (
            f"{case}: no refusal seen; last_error={publisher.last_error!r}\n{broker.log_tail()}")
        stats = publisher.stats()
    finally:
        publisher.stop(timeout=2, drain=False)
    assert not stats.connected and stats.published == 0
    assert outbox.depth() == 2, "a refused connection acknowledged rows away from the outbox"
    error = stats.last_error or ""
    for needle in expected:
        assert needle in error, f"{case}: {error!r} does not say {needle!r}"
    errors = agent_errors(debug_log)
    assert errors, "the refusal was not logged"
    # One clear line: the same sentence each time it is logged (a refused CONNACK is logged per retry; a TLS failure
    # once, later retries at DEBUG), no traceback, no second explanation.
    assert {r.getMessage() for r in errors} == {f"mqtt: {error}"}, [r.getMessage() for r in errors]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in errors), "a multi-line error or traceback"
    assert_no_secrets(debug_log, config, error)
    outbox.close()


def test_a_good_connection_delivers_and_logs_no_secrets(
    brokers: dict[str, Any], debug_log: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The success path with paho's DEBUG log on (CONNECT with credentials, PUBLISH, PUBACK)."""
    config = agent_config(brokers["good"])
    outbox = Outbox(tmp_path / "outbox.sqlite")
    put_alert(outbox)
    publisher = Publisher(config, outbox, store_id=STORE, camera_id=CAMERA, agent_version="test").start()
    try:
        assert publisher.flush(20), f"{publisher.last_error}\n{brokers['good'].log_tail()}"
        stats = publisher.stats()
    finally:
        publisher.stop(timeout=2)
    assert stats.published == 1 and outbox.depth() == 0 and stats.last_error is None
    assert any("Sending CONNECT" in r.getMessage() for r in debug_log.records), "paho's DEBUG log was not captured"
    assert_no_secrets(debug_log, config, repr(config), str(config.model_dump()))
    outbox.close()


def test_an_acl_refusal_holds_only_its_topic(brokers: dict[str, Any], tmp_path: Path) -> None:
    """A foreign-root alert refused with 0x87 stays in the outbox while the camera's own alert behind it is
    delivered and acked (the refusal pauses that topic only; see the module docstring for the single-topic case)."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    put_alert(outbox, camera="cam-z")  # the camera account may not write under cam-z
    put_alert(outbox)
    publisher = Publisher(agent_config(brokers["good"]), outbox, store_id=STORE, camera_id=CAMERA,
                          agent_version="test").start()
    try:
        assert wait_until(lambda: publisher.stats().published >= 1 and publisher.stats().failed >= 1)
        stats = publisher.stats()
    finally:
        publisher.stop(timeout=2, drain=False)
    assert "Not authorized (0x87)" in (stats.last_error or "") and "cam-z" in (stats.last_error or "")
    remaining = outbox.peek_batch(10)
    assert [m.topic for m in remaining] == [topics(STORE, "cam-z").alert]
    outbox.close()


def test_config_errors_never_echo_the_password(tmp_path: Path) -> None:
    secret = "hunter2-do-not-print"
    for mqtt in (f"{{password: {secret}, password_env: X}}", f"{{passwrd: {secret}}}",
                 f"{{password: [{secret}]}}", f"{{password: {secret}, port: nope}}"):
        path = tmp_path / "agent.yaml"
        path.write_text(f"mqtt: {mqtt}\n")
        with pytest.raises(ShelfSightError) as caught:
            load_agent_config(path, environ={})
        assert secret not in str(caught.value), str(caught.value)
    config = load_agent_config(None, environ={"SHELFSIGHT__MQTT__PASSWORD": secret})
    assert secret not in repr(config) and secret not in str(config)
