"""A real mosquitto started with the SHIPPED hardened config (deploy/broker/mosquitto.conf + acl).

Only container paths and the listener port are rewritten (plus ``user root`` when the tests run as root, since
mosquitto would otherwise drop to the 'mosquitto' user, who cannot read pytest's private tmp folders).
Certificates come from the shipped deploy/certs/make-dev-ca.sh, the password file from the real mosquitto_passwd.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import stop_process

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MOSQUITTO = "/usr/sbin/mosquitto"
MAKE_CA = DEPLOY / "certs" / "make-dev-ca.sh"

STORE = "store-t"
CAMERA = "cam-a"
CAMERA_USER = f"{STORE}/{CAMERA}"  # the ACL derives the camera's topic root from this name
CAMERA_CERT = f"{STORE}.{CAMERA}"
USERS = {
    "backoffice": "bo-secret",
    CAMERA_USER: "cam-secret",
    "store-t/#": "wild-secret",  # a username trying to widen its pattern ACL
    "store-0042/aisle3-cam1": "agent-secret",  # the identity of deploy/config/agent.yaml, used as shipped
}
# role -> (username, client certificate name)
ACCOUNTS = {
    "backoffice": ("backoffice", "shelf-alerts"),
    "camera": (CAMERA_USER, CAMERA_CERT),
    "wildcard": ("store-t/#", CAMERA_CERT),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certs(out: Path, *clients: str) -> Path:
    args = ["bash", str(MAKE_CA), "-o", str(out), "-H", "broker.test"]
    for client in clients:
        args += ["-c", client]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


def adapt_shipped_config(text: str, *, port: int, root: Path, acl: Path) -> str:
    """The shipped mosquitto.conf with container paths and the port replaced, nothing else."""
    replacements = {
        "/mosquitto/config/passwd": str(root / "passwd"),
        "/mosquitto/config/acl": str(acl),
        "/mosquitto/certs/": f"{root / 'certs'}/",
        "/mosquitto/data/": f"{root / 'data'}/",
    }
    lines = []
    for line in text.splitlines():
        if line.strip() == "listener 8883":
            line = f"listener {port} 127.0.0.1"
        for old, new in replacements.items():
            line = line.replace(old, new)
        lines.append(line)
    adapted = "\n".join(lines) + "\n"
    settings = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if any("/mosquitto/" in line for line in settings) or f"listener {port} 127.0.0.1" not in settings:
        raise AssertionError("the shipped mosquitto.conf changed shape: update adapt_shipped_config")
    if os.geteuid() == 0:
        adapted += "user root\n"
    return adapted


@dataclass
class HardenedBroker:
    port: int
    root: Path
    certs: Path
    rogue: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    host: str = "127.0.0.1"
    store: str = STORE
    camera: str = CAMERA
    camera_user: str = CAMERA_USER

    def account(self, role: str) -> tuple[str, str, str]:
        """(username, password, certificate name) of ``backoffice``, ``camera`` or ``wildcard``."""
        user, cert = ACCOUNTS[role]
        return user, USERS[user], cert

    def cli(self, *extra: str, user: str | None = "backoffice", password: str | None = None,
            ca: Path | None = None, cert: str | None = "shelf-alerts", cert_dir: Path | None = None) -> list[str]:
        """``shelf-alerts`` arguments for this broker; ``password`` goes through the environment (see run_cli)."""
        cert_dir = cert_dir or self.certs
        args = [sys.executable, "-m", "shelfsight.shelf_agent.alerts_cli", "--host", self.host,
                "--port", str(self.port), "--ca-certs", str(ca or self.certs / "ca.crt")]
        if user is not None:
            args += ["--username", user]
        if cert is not None:
            args += ["--certfile", str(cert_dir / f"{cert}.crt"), "--keyfile", str(cert_dir / f"{cert}.key")]
        return args + list(extra)

    def mqtt_config(self, role: str = "camera", protocol: str = "5") -> Any:
        """The agent's MqttConfig for an account, over this broker's TLS listener."""
        from shelfsight.shelf_agent.mqtt_client import MqttConfig

        user, password, cert = self.account(role)
        return MqttConfig.model_validate({
            "host": self.host, "port": self.port, "protocol": protocol, "username": user, "password": password,
            "reconnect_min_s": 1, "reconnect_max_s": 2, "refused_retry_min_s": 30,
            "tls": {"ca_certs": self.certs / "ca.crt", "certfile": self.certs / f"{cert}.crt",
                    "keyfile": self.certs / f"{cert}.key"},
        })

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def hardened_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedBroker]:
    if not os.path.exists(MOSQUITTO) or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto; the Makefile does it)")
    root = tmp_path_factory.mktemp("hardened-broker")
    certs = make_certs(root / "certs", "shelf-alerts", CAMERA_CERT, "agent")
    rogue = make_certs(root / "rogue", "shelf-alerts", CAMERA_CERT)  # same names, another CA
    (root / "data").mkdir()
    for index, (user, password) in enumerate(USERS.items()):
        flags = ["-c", "-b"] if index == 0 else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(root / "passwd"), user, password], check=True,
                       capture_output=True, timeout=10)
    shipped = (DEPLOY / "broker" / "mosquitto.conf").read_text()
    log_path = root / "mosquitto.log"
    for _attempt in range(3):  # the free port may be taken before mosquitto binds it
        port = free_port()
        conf = root / "mosquitto.conf"
        conf.write_text(adapt_shipped_config(shipped, port=port, root=root, acl=DEPLOY / "broker" / "acl"))
        with log_path.open("ab") as log:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 10
        while not _accepts(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if _accepts(port):
            break
        proc.kill()
        proc.wait(5)
    else:
        pytest.fail(f"mosquitto did not start with the shipped config:\n{log_path.read_text(errors='replace')}")
    broker = HardenedBroker(port=port, root=root, certs=certs, rogue=rogue, proc=proc, log_path=log_path)
    yield broker
    stop_process(proc)


class CliProcess:
    """A running ``shelf-alerts`` whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: queue.Queue[str] = queue.Queue()
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self._pumps = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                       for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream: object, sink: queue.Queue[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.put(line.rstrip("\n"))

    def wait_line(self, which: str, predicate: object, timeout: float = 20.0) -> str | None:
        """Wait for a line of stdout/stderr matching ``predicate`` (all lines seen are kept)."""
        source = self.stdout if which == "stdout" else self.stderr
        seen = self.out_lines if which == "stdout" else self.err_lines
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = source.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if predicate(line):  # type: ignore[operator]
                return line
        return None

    def finish(self, timeout: float = 40.0) -> int:
        """Wait for the exit code; afterwards ``out_lines``/``err_lines`` hold everything the process printed."""
        code = self.proc.wait(timeout)
        for pump in self._pumps:
            pump.join(5)
        for source, seen in ((self.stdout, self.out_lines), (self.stderr, self.err_lines)):
            while not source.empty():
                seen.append(source.get_nowait())
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def run_cli() -> Iterator[object]:
    """Factory ``run_cli(args, password=None) -> CliProcess``; processes still running at teardown are killed."""
    started: list[CliProcess] = []

    def start(args: list[str], password: str | None = None) -> CliProcess:
        env = {k: v for k, v in os.environ.items() if k != "SHELF_ALERTS_PASSWORD"}
        if password is not None:
            env["SHELF_ALERTS_PASSWORD"] = password
        process = CliProcess(args, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
