"""``make demo``: the agent on its bundled demo shelf, end to end, with nothing to set up.

Renders the bundled ``demo`` scenario, uses a local mosquitto on 1883 when one answers (otherwise starts a private one
on a free port), subscribes like a back-office would, runs the agent on the video with the bundled model and prints
every alert as the subscriber receives it, then scores the alerts against the scenario's truth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


class LocalBroker:
    """A throwaway mosquitto on a free loopback port (anonymous, no persistence): demo use only."""

    def __init__(self) -> None:
        binary = next((shutil.which(c) or c for c in MOSQUITTO_CANDIDATES if shutil.which(c) or Path(c).is_file()),
                      None)
        if binary is None:
            raise ShelfSightError("no MQTT broker on localhost:1883 and mosquitto is not installed "
                                  "(Debian/Ubuntu: sudo apt-get install mosquitto)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._dir = tempfile.TemporaryDirectory(prefix="shelfsight-demo-broker-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _accepts("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise ShelfSightError(f"{binary} did not start on port {self.port}")
            time.sleep(0.05)

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._dir.cleanup()


class AlertPrinter:
    """A back-office style subscriber: prints alerts as they arrive and keeps the latest retained state."""

    def __init__(self, host: str, port: int, store_id: str, snapshots: Path) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.alerts: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.snapshots = snapshots
        self.state: dict[str, Any] | None = None
        self.status: str | None = None
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"shelfsight-demo-viewer-{int(time.time())}")
        self._topic = f"shelfsight/{store_id}/#"
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise ShelfSightError(f"cannot subscribe on the broker at {host}:{port}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe(self._topic, qos=1)
        self._ready.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic.split("/")[3] if message.topic.count("/") >= 3 else ""
        if kind == "snapshot":
            self.snapshots.mkdir(parents=True, exist_ok=True)
            (self.snapshots / f"{message.topic.rsplit('/', 1)[-1]}.jpg").write_bytes(message.payload)
            return
        try:
            payload = json.loads(message.payload)
        except ValueError:
            print(f"  [viewer] non-JSON message on {message.topic}")
            return
        if kind == "alert" and payload["alert_id"] not in self.seen:
            self.seen.add(payload["alert_id"])
            self.alerts.append(payload)
            print(f"  ALERT #{payload['seq']:<3} {payload['type']:<10} slot {payload['slot_id']:<5} "
                  f"sku={payload.get('sku') or '-':<18} empty/changed at t={payload['event_frame_ts']:6.1f}s, "
                  f"raised at t={payload['raised_frame_ts']:6.1f}s", flush=True)
        elif kind == "state":
            self.state = payload
        elif kind == "status":
            self.status = payload.get("state")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shelfsight-demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--scenario", default="demo", help="bundled scenario name or a scenario YAML")
    p.add_argument("--realtime", action="store_true", help="replay at the video's own speed (default: as fast "
                   "as possible; results are identical, frame timestamps drive everything)")
    p.add_argument("--model", type=Path)
    args = p.parse_args(argv)
    try:
        return run_demo(args)
    except ShelfSightError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    from shelfsight.shelf_agent.agent import Agent
    from shelfsight.shelf_agent.config import load_agent_config
    from shelfsight.shelf_agent.evaluate import rendered_scenario
    from shelfsight.shelf_agent.logs import setup_logging
    from shelfsight.shelf_agent.scoring import ScoredAlert, score_alerts
    from shelfsight.sim import bundled_scenario

    setup_logging("text", "WARNING")
    scenario = Path(args.scenario) if args.scenario.endswith((".yaml", ".yml")) else bundled_scenario(args.scenario)
    print(f"1/4 rendering scenario {scenario.name} (cached in {args.out}) ...", flush=True)
    scene = rendered_scenario(scenario, args.out)
    broker: LocalBroker | None = None
    host, port = "127.0.0.1", 1883
    if not _accepts(host, port):
        broker = LocalBroker()
        port = broker.port
    print(f"2/4 MQTT broker {host}:{port} ({'started for this demo' if broker else 'already running'})", flush=True)
    viewer = None
    try:
        viewer = AlertPrinter(host, port, "demo-store", args.out / "snapshots")
        state_dir = args.out / "agent-state"
        shutil.rmtree(state_dir, ignore_errors=True)  # a fresh shelf: the demo replays from the start
        overrides: dict[str, Any] = {
            "camera": {"source": str(scene / "video.mp4"),
                       "capture": {"replay": "realtime" if args.realtime else "as_fast_as_possible"}},
            "layout": str(scene / "layout.yaml"),
            "mqtt": {"host": host, "port": port},
            "outbox": {"path": str(state_dir / "outbox.sqlite")},
            "journal": str(state_dir / "journal.sqlite"),
        }
        if args.model:
            overrides["model"] = {"manifest": str(args.model)}
        config = load_agent_config(None, overrides, environ={})
        agent = Agent(config)
        print(f"3/4 agent: model {agent.detector.manifest.name} ({agent.detector.manifest.precision}), "
              f"{len(agent.layout.slots) if agent.layout else 0} slots, dwell {config.slots.dwell_s:g} s, "
              f"{config.fps:g} inferences/s of video time; alerts as the subscriber receives them:", flush=True)
        summary = agent.run()
        deadline = time.monotonic() + 5
        while len(viewer.alerts) < len(summary.alerts) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if viewer is not None:
            viewer.close()
        if broker is not None:
            broker.close()
    truth = json.loads((scene / "truth.json").read_text())
    raised = [ScoredAlert(a["type"], a["slot_id"], a["raised_frame_ts"]) for a in viewer.alerts
              if a["type"] in ("stockout", "restocked")]
    expected = [ScoredAlert(e["type"], e["slot"], e["t"]) for e in truth["expected_alerts"]]
    score = score_alerts(raised, expected, config.slots.dwell_s)
    print(f"4/4 {summary.frames_processed} frames analysed in {summary.wall_s:.1f} s "
          f"({summary.source_s / max(summary.wall_s, 1e-9):.1f}x real time); "
          f"{len(viewer.alerts)} alerts received by the subscriber, {len(summary.alerts)} raised")
    print(f"    against the scenario truth: {score.summary()}")
    journal = state_dir / "journal.sqlite"
    print(f"    snapshots: {args.out / 'snapshots'}; history: shelf-agent alerts --journal {journal}")
    return 0 if len(viewer.alerts) == len(summary.alerts) else 1


if __name__ == "__main__":
    sys.exit(main())
