"""``shelf-alerts``: the back-office subscriber of the MQTT contract in docs/mqtt.md.

``shelf-alerts [watch]`` connects like the agent (the same ``MqttConfig``: TLS, username/password), subscribes
to one store or the whole chain, validates every message against the shipped JSON Schemas (invalid ones are
reported, never dropped silently), de-duplicates alerts by ``alert_id`` and prints a live view (or ``--json``
lines); ``--db`` keeps a SQLite history that ``shelf-alerts history`` queries, ``--snapshots DIR`` saves JPEGs.

The message logic lives in ``alert_monitor`` (pure); this module is the paho plumbing and the commands.
Exit codes: 0 done, 1 error (one line on stderr), 2 usage, 3 ``--timeout`` before ``--count`` alerts arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import socket
import ssl
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.yamlio import load_yaml_model
from shelfsight.shelf_agent.alert_history import AlertHistory, HistoryRow, iso_utc, parse_since
from shelfsight.shelf_agent.alert_monitor import Monitor, render_json, render_text
from shelfsight.shelf_agent.mqtt_client import MqttConfig, TlsConfig

EXIT_TIMEOUT = 3
PASSWORD_ENV = "SHELF_ALERTS_PASSWORD"


class AlertsConfig(BaseModel):
    """``shelf-alerts --config FILE``: the agent's ``mqtt`` section plus what to watch and keep."""

    model_config = ConfigDict(extra="forbid")
    mqtt: MqttConfig = MqttConfig()
    store: str | None = None
    camera: str | None = None
    db: Path | None = None
    snapshots: Path | None = None


# ------------------------------------------------------------------------------------------------ MQTT


class Connection:
    """A paho client that subscribes, re-subscribes after reconnects and hands messages to the main thread.

    The first connection is made synchronously so that an unreachable broker, a TLS failure or refused
    credentials become one clear error; after that paho reconnects on its own with backoff.
    """

    def __init__(self, config: MqttConfig, topic: str, persistent: bool) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from paho.mqtt.subscribeoptions import SubscribeOptions

        from shelfsight.shelf_agent.mqtt_client import build_client

        self.config, self.topic = config, topic
        self.messages: queue.SimpleQueue[tuple[str, Any, float]] = queue.SimpleQueue()
        self._last_log_error: str | None = None
        self._v5 = config.protocol == "5"
        client_id = config.client_id or f"shelf-alerts-{uuid.uuid4().hex[:12]}"
        self.client = build_client(config, client_id)
        self.client.disable_logger()  # errors reach us through on_log and become our own one-line messages
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.messages.put(("message", m, time.time()))
        self.client.on_log = self._on_log
        self._sub_options = SubscribeOptions(qos=1) if self._v5 else None
        self._properties = None
        if self._v5:
            self._properties = Properties(PacketTypes.CONNECT)
            self._properties.SessionExpiryInterval = config.session_expiry_s if persistent else 0
        self._persistent = persistent

    def _on_log(self, _c: Any, _u: Any, level: int, text: str) -> None:
        if level <= 8:  # MQTT_LOG_ERR / WARNING: e.g. the TLS alert when the broker rejects our certificate
            self._last_log_error = text

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any) -> None:
        if not reason_code.is_failure:
            if self._v5:
                client.subscribe(self.topic, options=self._sub_options)
            else:
                client.subscribe(self.topic, qos=1)
        self.messages.put(("connack", reason_code, time.time()))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reason_codes: Any, _p: Any) -> None:
        self.messages.put(("suback", list(reason_codes), time.time()))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any) -> None:
        self.messages.put(("disconnected", f"{reason_code} ({self._last_log_error or 'no detail'})", time.time()))

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def open(self) -> None:
        """Connect, wait for CONNACK and SUBACK, raise ShelfSightError with one clear line on any failure."""
        try:
            if self._v5:
                self.client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                                    clean_start=not self._persistent, properties=self._properties)
            else:
                self.client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            raise ShelfSightError(f"TLS: cannot verify broker {self.where}: {exc.verify_message} "
                                  "(wrong --ca-certs, or the broker certificate lacks this host name)") from None
        except ssl.SSLError as exc:
            raise ShelfSightError(f"TLS handshake with {self.where} failed: {exc.reason or exc}") from None
        except socket.gaierror as exc:
            raise ShelfSightError(f"cannot resolve broker host {self.config.host!r}: {exc.strerror}") from None
        except OSError as exc:
            raise ShelfSightError(f"cannot reach broker {self.where}: {exc.strerror or exc}") from None
        self.client.loop_start()
        deadline = time.monotonic() + self.config.connect_timeout_s + 5
        while True:
            try:
                kind, value, _ = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise ShelfSightError(f"no answer from broker {self.where} within "
                                      f"{self.config.connect_timeout_s + 5:.0f} s (CONNACK/SUBACK)") from None
            if kind == "connack" and value.is_failure:
                self.close()
                raise ShelfSightError(f"broker {self.where} refused the connection: {value} (0x{value.value:02x}); "
                                      "check username/password and the account's ACL")
            if kind == "disconnected":
                self.close()
                # Under TLS 1.3 the broker rejects a client certificate after the handshake looked fine to us:
                # all we see is a TLS alert or an EOF before CONNACK.
                tls = self.config.tls
                hint = ("" if tls is None else "; the broker may require a client certificate (--certfile/--keyfile)"
                        if tls.certfile is None else "; is the client certificate issued by the broker's CA?")
                raise ShelfSightError(f"broker {self.where} closed the connection before accepting it: {value}{hint}")
            if kind == "suback":
                refused = [code for code in value if code.is_failure]
                if refused:
                    self.close()
                    raise ShelfSightError(f"broker {self.where} refused the subscription to {self.topic}: "
                                          f"{refused[0]} (0x{refused[0].value:02x})")
                return

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------------------------------------ commands


def _watch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shelf-alerts", description=(
        "Watch ShelfSight shelves over MQTT: live shelf state, stock-out alerts, cameras offline. "
        "'shelf-alerts history --help' queries a --db history."))
    conn = parser.add_argument_group("connection (defaults from --config's mqtt section, like the agent)")
    conn.add_argument("--config", type=Path, help="YAML: {mqtt: <agent mqtt section>, store, camera, db, snapshots}")
    conn.add_argument("--host")
    conn.add_argument("--port", type=int, help="default 1883, or 8883 with TLS")
    conn.add_argument("--protocol", choices=["5", "3.1.1"])
    conn.add_argument("--username")
    conn.add_argument("--password-env", metavar="VAR",
                      help=f"environment variable holding the password (default {PASSWORD_ENV} when it is set)")
    conn.add_argument("--tls", action="store_true", help="TLS with the system trust store")
    conn.add_argument("--ca-certs", type=Path, help="CA bundle for the broker certificate (implies --tls)")
    conn.add_argument("--certfile", type=Path, help="client certificate (mutual TLS)")
    conn.add_argument("--keyfile", type=Path, help="client key")
    conn.add_argument("--tls-insecure", action="store_true", help="skip broker host name check (testing only)")
    conn.add_argument("--client-id", help="fixed id = persistent session: the broker keeps alerts while we are away")
    what = parser.add_argument_group("what to watch")
    what.add_argument("--prefix", help="topic prefix (default shelfsight)")
    what.add_argument("--store", help="one store (default: the whole chain)")
    what.add_argument("--camera", help="one camera (of --store, or of every store)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per line instead of the live view")
    out.add_argument("--db", type=Path, help="keep a SQLite history of alerts (and of invalid messages)")
    out.add_argument("--snapshots", type=Path, metavar="DIR", help="save snapshot JPEGs as DIR/store/camera/id.jpg")
    out.add_argument("--count", type=int, metavar="N", help="exit after N new alerts")
    out.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (exit 3 if --count not reached)")
    return parser


def _history_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shelf-alerts history", description="Query the alert history of --db.")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--since", help="30m, 1h, 2d or an ISO-8601 time (UTC when no offset); raised time")
    parser.add_argument("--until", help="same forms as --since")
    parser.add_argument("--store")
    parser.add_argument("--camera")
    parser.add_argument("--slot")
    parser.add_argument("--type", choices=["stockout", "low_stock", "restocked"])
    parser.add_argument("--limit", type=int, default=1000, help="the newest N (default 1000)")
    parser.add_argument("--problems", action="store_true", help="list invalid/unsupported messages instead")
    parser.add_argument("--json", action="store_true")
    return parser


def build_config(args: argparse.Namespace) -> AlertsConfig:
    """--config file, then command-line flags on top; validated by the same models as the agent's."""
    base = load_yaml_model(args.config, AlertsConfig) if args.config else AlertsConfig()
    mqtt = base.mqtt.model_dump()
    explicit = dict(host=args.host, port=args.port, protocol=args.protocol, username=args.username,
                    password_env=args.password_env, client_id=args.client_id, topic_prefix=args.prefix)
    mqtt.update({key: value for key, value in explicit.items() if value is not None})
    if args.password_env:
        mqtt["password"] = None
    elif mqtt["username"] and mqtt["password"] is None and mqtt["password_env"] is None and PASSWORD_ENV in os.environ:
        mqtt["password_env"] = PASSWORD_ENV
    tls = mqtt["tls"] or ({} if (args.tls or args.ca_certs or args.certfile or args.tls_insecure) else None)
    if tls is not None:
        for key in ("ca_certs", "certfile", "keyfile"):
            if getattr(args, key) is not None:
                tls[key] = getattr(args, key)
        tls["insecure"] = tls.get("insecure", False) or args.tls_insecure
        if args.port is None and "port" not in base.mqtt.model_fields_set:
            mqtt["port"] = 8883
    try:
        mqtt["tls"] = None if tls is None else TlsConfig.model_validate(tls)
        config = MqttConfig.model_validate(mqtt)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "mqtt"
        raise ShelfSightError(f"mqtt {where}: {first['msg']}") from None
    return base.model_copy(update={
        "mqtt": config,
        "store": args.store or base.store, "camera": args.camera or base.camera,
        "db": args.db or base.db, "snapshots": args.snapshots or base.snapshots,
    })


def subscription(prefix: str, store: str | None, camera: str | None) -> str:
    for what, value in (("--store", store), ("--camera", camera)):
        if value is not None and not re.fullmatch(r"[^/#+\x00]+", value):
            raise ShelfSightError(f"{what} {value!r} cannot be an MQTT topic level")
    return f"{prefix}/{store or '+'}/{camera}/#" if camera else f"{prefix}/{store}/#" if store else f"{prefix}/#"


def watch(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    config = build_config(args)
    if args.count is not None and args.count < 1:
        raise ShelfSightError("--count must be at least 1")
    topic = subscription(config.mqtt.topic_prefix, config.store, config.camera)
    history = AlertHistory(config.db) if config.db else None
    monitor = Monitor(config.mqtt.topic_prefix, history, config.snapshots)
    connection = Connection(config.mqtt, topic, persistent=config.mqtt.client_id is not None)
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    connected = False
    try:
        connection.open()
        connected = True
        print(f"shelf-alerts: subscribed to {topic} on {connection.where}", file=err, flush=True)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        alerts = 0
        while stop["signal"] is None:
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                if args.count is not None:
                    print(f"shelf-alerts: timeout after {args.timeout:g} s with {alerts} of {args.count} alerts",
                          file=err, flush=True)
                    return EXIT_TIMEOUT
                return 0
            try:
                kind, value, received_at = connection.messages.get(timeout=wait)
            except queue.Empty:
                continue
            if kind == "disconnected":
                print(f"shelf-alerts: connection lost: {value}; reconnecting", file=err, flush=True)
                continue
            if kind == "connack":
                if value.is_failure:
                    print(f"shelf-alerts: reconnect refused: {value}", file=err, flush=True)
                continue
            if kind != "message":
                continue
            outcome = monitor.handle(value.topic, value.payload, received_at)
            if args.json:
                line = render_json(outcome, received_at)
                lines = [line] if line is not None else []
            else:
                view = monitor.cameras.get(outcome.camera) if outcome.camera else None
                lines = render_text(outcome, received_at, view)
            for line in lines:
                print(line, file=out, flush=True)
            if outcome.event == "alert":
                alerts += 1
                if args.count is not None and alerts >= args.count:
                    return 0
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        connection.close()
        if history is not None:
            history.close()
        if connected:  # a failed start is one line, nothing more
            summary = ", ".join(f"{n} {event}" for event, n in sorted(monitor.counts.items()))
            print(f"shelf-alerts: {summary or 'no messages'}", file=err, flush=True)


def history_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    now = time.time()
    since = parse_since(args.since, now) if args.since else None
    until = parse_since(args.until, now) if args.until else None
    with AlertHistory(args.db, must_exist=True) as history:
        if args.problems:
            for problem in history.problems(since=since, limit=args.limit):
                record = {"received_time": iso_utc(problem.received_at), "topic": problem.topic,
                          "kind": problem.kind, "detail": problem.detail}
                print(json.dumps(record) if args.json else
                      f"{record['received_time']}  {problem.kind:<11} {problem.topic}: {problem.detail}", file=out)
            return 0
        rows = history.query(since=since, until=until, store_id=args.store, camera_id=args.camera,
                             slot_id=args.slot, alert_type=args.type, limit=args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json(), ensure_ascii=False), file=out)
    else:
        print(_history_table(rows), file=out)
    return 0


def _history_table(rows: list[HistoryRow]) -> str:
    header = ("raised (UTC)", "type", "store/camera", "slot", "sku", "empty_s", "conf", "seq", "snapshot")
    table = [header] + [(iso_utc(r.raised_at)[:19], r.type, f"{r.store_id}/{r.camera_id}", r.slot_id, r.sku or "-",
                         f"{r.empty_for_s:.1f}", f"{r.confidence:.2f}", str(r.seq), r.snapshot_path or "-")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join([*lines, f"({len(rows)} alerts)"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["history"]:
            return history_command(_history_parser().parse_args(argv[1:]))
        if argv[:1] == ["watch"]:
            argv = argv[1:]
        return watch(_watch_parser().parse_args(argv))
    except ShelfSightError as exc:
        message = str(exc)
        print(message if message.startswith("shelf-alerts:") else f"shelf-alerts: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
