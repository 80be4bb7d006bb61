"""Shared fixtures: real mosquitto brokers on free loopback ports, a real paho subscriber, rendered scenario videos
(hash-keyed, once per session) and the `shelf-agent` command line.

Test modules cannot import this file (pytest runs with --import-mode=importlib), so everything is a fixture."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from processes import stop_process

from shelfsight.shelf_agent.agent import Agent, RunSummary
from shelfsight.shelf_agent.config import AgentConfig
from shelfsight.shelf_agent.evaluate import rendered_scenario

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """One mosquitto process; ``stop()``/``kill()`` then ``start()`` restarts it on the same port."""

    conf: Path
    log_path: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Broker:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _accepts(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Graceful (SIGTERM): mosquitto saves its persistence file, if configured."""
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no mosquitto log)"


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Factory ``mosquitto_broker(config_lines=None, persistence=False) -> Broker`` (started).

    ``config_lines`` are added to a config that already holds the listener, the log file and (unless the
    lines set it) ``allow_anonymous true``. Every broker is terminated at teardown.
    """
    if not os.path.exists(MOSQUITTO):
        pytest.skip(f"{MOSQUITTO} is not installed (apt-get install mosquitto; the Makefile does it)")
    brokers: list[Broker] = []

    def make(config_lines: list[str] | None = None, persistence: bool = False) -> Broker:
        index = len(brokers)
        folder = tmp_path / f"broker{index}"
        folder.mkdir()
        lines = list(config_lines or [])
        last_error: Exception | None = None
        for _attempt in range(3):  # the free port may be taken by someone else before mosquitto binds it
            port = free_port()
            conf = folder / "mosquitto.conf"
            log_path = folder / "mosquitto.log"
            text = [f"listener {port} 127.0.0.1", f"log_dest file {log_path}", "log_type all"]
            if os.geteuid() == 0:
                text.append("user root")  # otherwise it drops to user 'mosquitto', who cannot read tmp_path
            if not any(line.strip().startswith("allow_anonymous") for line in lines):
                text.append("allow_anonymous true")
            if persistence:
                text += ["persistence true", f"persistence_location {folder}/", "autosave_interval 1"]
            else:
                text.append("persistence false")
            conf.write_text("\n".join(text + lines) + "\n")
            broker = Broker(conf=conf, log_path=log_path, port=port)
            try:
                broker.start()
            except RuntimeError as exc:
                last_error = exc
                continue
            brokers.append(broker)
            return broker
        raise RuntimeError(f"could not start mosquitto: {last_error}")

    yield make
    for broker in brokers:
        broker.kill()


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file made by the real ``mosquitto_passwd``."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.unlink(missing_ok=True)
    for index, (user, password) in enumerate(users.items()):
        flags = ["-b", "-c"] if index == 0 else ["-b"]
        subprocess.run([tool, *flags, str(path), user, password], check=True, capture_output=True, timeout=10)
    return path


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A real paho client that subscribes (again on every reconnect) and collects messages."""

    host: str
    port: int
    topic: str = "#"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    persistent: bool = False
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=self.client_id or f"test-sub-{id(self)}", protocol=mqtt.MQTTv5)
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        properties = None
        if self.persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect_async(self.host, self.port, clean_start=not self.persistent, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"test subscriber could not subscribe to {self.topic} on port {self.port}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain), message.qos))
            self._lock.notify_all()

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_subscriber() -> Iterator[Callable[..., Subscriber]]:
    """Factory ``mqtt_subscriber(host, port, topic="#", **options) -> Subscriber`` (subscribed); closed at teardown."""
    subscribers: list[Subscriber] = []

    def make(host: str, port: int, topic: str = "#", **options: Any) -> Subscriber:
        subscriber = Subscriber(host, port, topic, **options)
        subscribers.append(subscriber)
        return subscriber

    yield make
    for subscriber in subscribers:
        subscriber.close()


@pytest.fixture
def mqtt_password_file(tmp_path: Path) -> Callable[[dict[str, str]], Path]:
    """``mqtt_password_file({"user": "password", ...}) -> Path`` of a real mosquitto password file."""
    return lambda users: write_password_file(tmp_path / "mosquitto.passwd", users)


# A 2x4 shelf, fully stocked for the first second: R1S2 empties at ~2 s and is restocked at ~14 s; R2S3 empties
# at ~7 s and stays empty to the end.
SMALL_SCENARIO = """\
name: agent-small
seed: 5
duration_s: 20
fps: 10
camera: {width: 640, height: 360, noise: 0.01, jitter_px: 0.5}
shelf: {rows: 2, slots_per_row: 4, facings_per_slot: 2}
events:
  - {t: 1, type: deplete, slot: R1S2, duration_s: 1}
  - {t: 6, type: deplete, slot: R2S3, duration_s: 1}
  - {t: 13, type: restock, slot: R1S2, duration_s: 1}
"""


@pytest.fixture(scope="session")
def scenario_source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Writes a scenario text to a YAML file named by its hash (the same text -> the same file)."""
    folder = tmp_path_factory.getbasetemp() / "scenario-sources"

    def write(text: str) -> Path:
        source = folder / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
        folder.mkdir(exist_ok=True)
        source.write_text(text, encoding="utf-8")
        return source

    return write


@pytest.fixture(scope="session")
def scenario_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where rendered scenarios live for the session (one folder per scenario name)."""
    return tmp_path_factory.getbasetemp() / "scenarios"


@pytest.fixture(scope="session")
def render_scenario(scenario_source: Callable[[str], Path], scenario_work_dir: Path) -> Callable[[str], Path]:
    """`render_scenario(text) -> folder` with video.mp4/truth.json/layout.yaml, rendered once per session and text
    (rendered_scenario keeps the folder while its stamped source text is unchanged)."""

    def render(text: str) -> Path:
        return rendered_scenario(scenario_source(text), scenario_work_dir)

    return render


@pytest.fixture(scope="session")
def small_scenario_text() -> str:
    return SMALL_SCENARIO


@pytest.fixture(scope="session")
def small_scenario(render_scenario: Callable[[str], Path], small_scenario_text: str) -> Path:
    return render_scenario(small_scenario_text)


@pytest.fixture(scope="session")
def shelf_agent_command() -> list[str]:
    """The installed `shelf-agent` console script, or the module when the venv has no script."""
    script = Path(sys.executable).parent / "shelf-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shelfsight.shelf_agent.cli"]


# ------------------------------------------------------------------------------------------------ running agents

class AgentThread:
    """``Agent.run()`` on a background thread (the agent's own threads stay as in production)."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="agent-run", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.agent.run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self, timeout: float = 30.0) -> RunSummary:
        self.agent.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


@pytest.fixture
def agent_thread() -> Iterator[Callable[[AgentConfig], AgentThread]]:
    """``agent_thread(config) -> AgentThread`` (running); any still running at teardown is stopped."""
    started: list[AgentThread] = []

    def start(config: AgentConfig) -> AgentThread:
        running = AgentThread(config)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.agent.stop()
            running.thread.join(30)


class AgentProcess:
    """One `shelf-agent` process; stderr goes to a file so a failing test can show it."""

    def __init__(self, command: list[str], folder: Path, args: list[str], env: dict[str, str] | None, name: str):
        self.log_path = folder / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"shelf-agent did not exit within {timeout} s:\n{self.log()[-3000:]}") from None
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def agent_process(shelf_agent_command: list[str]) -> Iterator[Callable[..., AgentProcess]]:
    """``agent_process(folder, args, env=None, name="agent") -> AgentProcess``; killed at teardown if running."""
    started: list[AgentProcess] = []

    def start(folder: Path, args: list[str], env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        process = AgentProcess(shelf_agent_command, folder, args, env, name)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
