"""MQTT publishing (DESIGN sections 6 and 7): drain the durable outbox to the broker, in order, and only
treat a message as delivered when the broker says so with a success reason code.

Threads: paho's network thread (``loop_start``) runs the callbacks; they only record facts and put events
on a queue, never raise and never take our locks (paho holds its own message lock while calling
``on_publish``; taking ours there would deadlock against ``publish()``). One worker thread owns
everything else: it reads the outbox, publishes, maps message ids to outbox rows and acks rows.

Delivery: the outbox is the single source of truth. At each (re)connect paho's own in-memory queue is
dropped and every unacknowledged row is re-sent from the outbox in id order, so order per camera holds
across outages and restarts. A window of ``max_inflight`` messages is in flight at a time. A PUBACK with
a reason code >= 0x80 (mosquitto 2.0 answers 0x87 Not authorized for an ACL-denied publish under
MQTT v5) is a failure: counted, logged, exposed in ``last_error``; the row stays in the outbox and its
topic is paused with exponential backoff while other topics keep flowing. Over MQTT 3.1.1 a broker
cannot report a refused publish at all (PUBACK has no reason code): prefer v5. A refused CONNACK is
counted in ``refused``; paho retries with backoff.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.events import build_status, encode_payload, topics
from shelfsight.shelf_agent.outbox import Outbox, OutboxError, OutboxMessage

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.25  # picks up rows put without notify() (another thread, another process)


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ca_certs: Path | None = Field(None, description="CA bundle; None = system trust store")
    certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    keyfile: Path | None = None
    insecure: bool = Field(False, description="skip broker hostname verification (testing only)")

    @model_validator(mode="after")
    def _key_with_cert(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile must be given together")
        return self


class MqttConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = Field(None, description="default shelfsight-{store_id}-{camera_id}: stable per camera")
    keepalive_s: int = Field(30, ge=5, description="a silent broker connection is noticed within about this "
                             "long: the MQTT keep alive sent to the broker is half of it (see ping_interval_s)")
    session_expiry_s: int = Field(86400, ge=0, description="MQTT v5 session expiry interval")
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = Field(None, description="name of an environment variable holding the password")
    tls: TlsConfig | None = None
    topic_prefix: str = "shelfsight"
    max_inflight: int = Field(20, ge=1, le=1000)
    reconnect_min_s: int = Field(1, ge=1)
    reconnect_max_s: int = Field(60, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    refused_retry_min_s: float = Field(5.0, gt=0, description="first pause of a topic after a refused publish")
    refused_retry_max_s: float = Field(300.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password is not None and self.password_env is not None:
            raise ValueError("give either password or password_env, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def ping_interval_s(self) -> int:
        """The MQTT keep alive the client negotiates: half of ``keepalive_s``.

        paho pings once nothing arrived for a keep alive and declares the connection dead when the PINGRESP has
        not come one more keep alive later, so a blackholed link (no FIN, no RST) is noticed after up to twice the
        negotiated value (+1 s of loop granularity). Negotiating ``keepalive_s / 2`` makes that about
        ``keepalive_s``. The broker, for its part, drops a silent agent (and sends the will) after 1.5x the
        negotiated value, 0.75x ``keepalive_s``."""
        return max(1, self.keepalive_s // 2)

    def resolve_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return value
        return None


@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    published: int
    failed: int
    refused: int
    connect_failures: int
    inflight: int
    last_error: str | None

    def as_metrics(self) -> dict[str, Any]:
        """The ``mqtt`` block of the metrics payload."""
        return {"connected": self.connected, "published": self.published, "failed": self.failed,
                "refused": self.refused}


def _agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("shelfsight")
    except Exception:
        return "0+unknown"


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed (paho swallows it before on_connect_fail:
    an untrusted, expired or misnamed broker certificate would otherwise read as an unreachable broker)."""

    last_connect_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            result = super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return result

    def _sock_recv(self, bufsize: int) -> bytes:
        # A broker refusing our client certificate (unknown CA, expired) says so in a TLS alert that arrives after
        # the handshake (TLS 1.3), on the first read; paho logs it and reports a bare disconnect.
        try:
            return super()._sock_recv(bufsize)
        except ssl.SSLError as exc:
            self.last_connect_error = exc
            raise


def _connect_error_text(exc: OSError | None) -> str:
    """``": TLS: certificate verify failed: ..."`` for a TLS failure; empty otherwise (a plain refusal is clear)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f": TLS: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f": TLS: {exc.reason or exc.strerror or type(exc).__name__}"
    return ""


def build_client(config: MqttConfig, client_id: str) -> mqtt.Client:
    """A configured (not yet connected) paho 2.x client: protocol, session, credentials, TLS, backoff."""
    v5 = config.protocol == "5"
    client = _Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else False,  # 3.1.1 persistent session; v5 uses clean_start below
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        reconnect_on_failure=True,
    )
    client.suppress_exceptions = True
    client.enable_logger(logging.getLogger(f"{__name__}.paho"))
    client.max_inflight_messages_set(config.max_inflight)
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
    client.connect_timeout = config.connect_timeout_s
    if config.username is not None:
        client.username_pw_set(config.username, config.resolve_password())
    if config.tls is not None:
        for name in ("ca_certs", "certfile", "keyfile"):
            path = getattr(config.tls, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"mqtt.tls.{name}: file not found: {path}")
        try:
            client.tls_set(
                ca_certs=str(config.tls.ca_certs) if config.tls.ca_certs else None,
                certfile=str(config.tls.certfile) if config.tls.certfile else None,
                keyfile=str(config.tls.keyfile) if config.tls.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls: cannot load TLS material: {exc}") from None
        client.tls_insecure_set(config.tls.insecure)
    return client


class Publisher:
    """Drains an :class:`Outbox` to one broker for one camera; see the module docstring for the guarantees."""

    def __init__(
        self,
        config: MqttConfig,
        outbox: Outbox,
        *,
        store_id: str,
        camera_id: str,
        agent_version: str | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.store_id = store_id
        self.camera_id = camera_id
        self.topics = topics(store_id, camera_id, config.topic_prefix)
        self.client_id = config.client_id or f"shelfsight-{store_id}-{camera_id}"
        self.agent_version = agent_version or _agent_version()
        self.started_at = time.time() if started_at is None else started_at

        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._connected = False  # written by paho callbacks: transport state
        # Owned by the worker thread (by stop() once the worker has ended):
        self._session_ready = False
        self._inflight: dict[int, OutboxMessage] = {}  # paho mid -> outbox row
        self._inflight_rows: set[int] = set()
        self._status_mids: dict[int, str] = {}
        self._cursor = 0  # highest row id handed to paho (or skipped) since the last rescan
        self._held: dict[str, float] = {}  # topic -> monotonic time its pause ends
        self._hold_delay: dict[str, float] = {}
        # Counters (ints written by one thread, read by any: no lock needed in CPython).
        self.published = 0
        self.failed = 0
        self.refused = 0
        self.connect_failures = 0
        self.last_error: str | None = None

        self.client = build_client(config, self.client_id)
        will = self._status_payload(online=False, reason="connection_lost")
        self.client.will_set(self.topics.status, will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Publisher:
        """Connect in the background (never blocks, never raises for an unreachable broker) and start draining."""
        v5 = self.config.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_s
        self.client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.ping_interval_s,
            clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()
        self._worker = threading.Thread(target=self._run, name=f"outbox-publisher-{self.camera_id}", daemon=True)
        self._worker.start()
        return self

    def notify(self) -> None:
        """Tell the worker new rows are in the outbox (otherwise it finds them within a quarter second)."""
        self._events.put(("wake",))

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight; False on timeout (e.g. a topic is refused)."""
        deadline = time.monotonic() + timeout
        self.notify()
        with self._progress:
            while not (self.outbox.depth() == 0 and not self._inflight and not self._status_mids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(min(remaining, _IDLE_POLL_S))
        return True

    def stop(self, timeout: float = 5.0, drain: bool = True) -> None:
        """Clean stop: optionally drain, publish the retained ``offline`` status, disconnect (no will)."""
        if self._worker is None:
            return
        deadline = time.monotonic() + timeout
        if drain and self._connected:
            self.flush(timeout / 2)
        self._stop.set()
        self._events.put(("wake",))
        self._worker.join(max(0.1, deadline - time.monotonic()))
        self._worker = None
        acks: list[int] = []
        if self._session_ready and self._connected:
            self._publish_status(online=False, reason="clean_stop")
            while self._status_mids and time.monotonic() < deadline:
                self._drain_events(min(0.1, max(0.0, deadline - time.monotonic())), acks)
            if self._status_mids:
                log.warning("mqtt: no PUBACK for the offline status within %.1f s", timeout)
        self._drain_events(0.0, acks)
        self._ack(acks)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected = False

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> PublisherStats:
        return PublisherStats(self._connected, self.published, self.failed, self.refused, self.connect_failures,
                              len(self._inflight), self.last_error)

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if not reason_code.is_failure:
                # Our outbox re-sends everything unacknowledged in order; paho must not re-send its copies
                # first (they would race with the worker's new publishes and could reorder).
                client.drop_out_messages()
                self._connected = True
            self._events.put(("connected", bool(reason_code.is_failure), int(reason_code.value), str(reason_code),
                              bool(flags.session_present)))
        except Exception:
            log.exception("mqtt: error in on_connect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            self._events.put(("connect_failed", _connect_error_text(getattr(client, "last_connect_error", None))))
        except Exception:
            log.exception("mqtt: error in on_connect_fail")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            self._connected = False
            self._events.put(("disconnected", int(reason_code.value), str(reason_code),
                              _connect_error_text(getattr(client, "last_connect_error", None))))
        except Exception:
            log.exception("mqtt: error in on_disconnect")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            self._events.put(("published", mid, int(reason_code.value), str(reason_code)))
        except Exception:
            log.exception("mqtt: error in on_publish")

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        while not self._stop.is_set():
            acks: list[int] = []
            try:
                self._drain_events(_IDLE_POLL_S, acks)
                self._ack(acks)
                if self._session_ready and not self._stop.is_set():
                    self._fill_window()
            except OutboxError as exc:  # disk full / read-only: rows stay where they are, try again shortly
                self._set_error(str(exc), level=logging.ERROR)
                self._stop.wait(1.0)
            except Exception as exc:  # the publisher must outlive any single failure
                self.last_error = f"publisher: {exc}"
                log.exception("mqtt: publisher loop error (retrying)")
                self._stop.wait(1.0)
            with self._progress:
                self._progress.notify_all()

    def _drain_events(self, timeout: float, acks: list[int]) -> None:
        """Handle queued events: block up to ``timeout`` for the first, then take whatever is there."""
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle_event(event, acks)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle_event(self, event: tuple[Any, ...], acks: list[int]) -> None:
        kind = event[0]
        if kind == "published":
            self._handle_puback(event[1], event[2], event[3], acks)
        elif kind == "connected":
            _, failure, code, name, session_present = event
            if failure:
                self.refused += 1
                self._set_error(f"broker {self.config.host}:{self.config.port} refused the connection: "
                                f"{name} (0x{code:02x})", level=logging.ERROR)
                return
            log.info("mqtt: connected to %s:%d as %s (session present: %s)", self.config.host, self.config.port,
                     self.client_id, session_present)
            # paho's queue was dropped in on_connect: every row not yet acked goes again, from the outbox.
            self._inflight.clear()
            self._inflight_rows.clear()
            self._status_mids.clear()
            self._cursor = 0
            self._session_ready = True
            self._publish_status(online=True, reason="connected")
        elif kind == "disconnected":
            if self._session_ready:
                log.warning("mqtt: disconnected from %s:%d: %s", self.config.host, self.config.port, event[2])
            elif event[3]:  # closed during the TLS set-up, before any CONNACK: e.g. our certificate was refused
                self.connect_failures += 1
                self._set_error(f"broker {self.config.host}:{self.config.port} closed the connection before "
                                f"accepting it{event[3]}",
                                level=logging.WARNING if self.connect_failures == 1 else logging.DEBUG)
            self._session_ready = False
        elif kind == "connect_failed":
            self.connect_failures += 1
            self._set_error(f"cannot reach broker {self.config.host}:{self.config.port}{event[1]}",
                            level=logging.WARNING if self.connect_failures == 1 else logging.DEBUG)

    def _handle_puback(self, mid: int, code: int, name: str, acks: list[int]) -> None:
        status = self._status_mids.pop(mid, None)
        if status is not None:
            if code >= 0x80:
                self.failed += 1
                self._set_error(f"broker refused the {status} status on {self.topics.status}: {name} (0x{code:02x})")
            return
        message = self._inflight.pop(mid, None)
        if message is None:
            return  # an ack from before a reconnect: the row was re-sent and will be acked again
        self._inflight_rows.discard(message.id)
        if code < 0x80:  # 0x00 Success and 0x10 No matching subscribers are both delivered
            self.published += 1
            acks.append(message.id)
            self._hold_delay.pop(message.topic, None)
            return
        self.failed += 1
        delay = min(self._hold_delay.get(message.topic, self.config.refused_retry_min_s / 2) * 2,
                    self.config.refused_retry_max_s)
        self._hold_delay[message.topic] = delay
        self._held[message.topic] = time.monotonic() + delay
        self._set_error(f"broker refused publish of outbox row {message.id} to {message.topic}: {name} "
                        f"(0x{code:02x}); kept in the outbox, retrying that topic in {delay:.0f} s")

    def _fill_window(self) -> None:
        now = time.monotonic()
        for topic in [t for t, until in self._held.items() if until <= now]:
            del self._held[topic]
            self._cursor = 0  # rescan from the start so the paused rows go first again
        window = self.config.max_inflight
        while len(self._inflight) < window and self._session_ready:
            batch = self.outbox.peek_batch(window * 2, after_id=self._cursor)
            if not batch:
                return
            sent: list[int] = []
            try:
                for message in batch:
                    if len(self._inflight) >= window:
                        return
                    if message.id in self._inflight_rows:
                        self._cursor = message.id
                        continue
                    if message.topic in self._held:
                        self._cursor = message.id
                        continue
                    if not self._send(message):
                        return
                    self._cursor = message.id
                    sent.append(message.id)
            finally:
                if sent:
                    try:
                        self.outbox.mark_attempts(sent)
                    except OutboxError as exc:
                        log.debug("mqtt: %s", exc)

    def _send(self, message: OutboxMessage) -> bool:
        try:
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        except ValueError as exc:  # invalid topic or payload: it can never be sent
            self.failed += 1
            self._held[message.topic] = time.monotonic() + self.config.refused_retry_max_s
            self._set_error(f"cannot publish outbox row {message.id} to {message.topic!r}: {exc}")
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and message.qos):
            # NO_CONN with QoS 1: paho queued it; the next on_connect drops that copy and we re-send the row.
            self._inflight[info.mid] = message
            self._inflight_rows.add(message.id)
            return True
        log.debug("mqtt: publish of row %d not accepted by the client (%s); retrying later", message.id, info.rc)
        return False

    def _publish_status(self, *, online: bool, reason: Literal["connected", "clean_stop", "connection_lost"]) -> None:
        payload = self._status_payload(online=online, reason=reason)
        try:
            info = self.client.publish(self.topics.status, payload, qos=1, retain=True)
        except ValueError as exc:
            self._set_error(f"cannot publish status: {exc}")
            return
        self._status_mids[info.mid] = "online" if online else "offline"

    def _status_payload(self, *, online: bool, reason: Literal["connected", "clean_stop", "connection_lost"]) -> bytes:
        return encode_payload(build_status(store_id=self.store_id, camera_id=self.camera_id, online=online,
                                           reason=reason, agent_version=self.agent_version,
                                           started_at=self.started_at))

    def _ack(self, acks: list[int]) -> None:
        if not acks:
            return
        try:
            self.outbox.ack_many(acks)
        except OutboxError as exc:  # rows stay and are re-sent later: a duplicate, never a loss
            self._set_error(str(exc))

    def _set_error(self, message: str, level: int = logging.WARNING) -> None:
        self.last_error = message
        log.log(level, "mqtt: %s", message)
