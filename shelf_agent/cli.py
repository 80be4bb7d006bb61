"""``shelf-agent``: the device entry point. ``shelf-agent --camera /dev/video0 --layout layout.yaml`` runs the agent;
subcommands ``detect``, ``eval``, ``calibrate`` and ``alerts`` are the tools around it."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError

log = logging.getLogger("shelfsight.shelf_agent")

SUBCOMMANDS = ("run", "detect", "eval", "calibrate", "alerts")

EXAMPLES = """examples:
  shelf-agent --camera /dev/video0 --layout layout.yaml --broker store-broker.local
  shelf-agent --config /etc/shelfsight/agent.yaml                      # everything from the config file
  shelf-agent --camera csi://0 --backend tensorrt --model /opt/models/shelf-int8
  shelf-agent --camera aisle3.mp4 --as-fast-as-possible --no-mqtt      # replay a recording
  shelf-agent detect --source video.mp4 --out annotated.mp4
  shelf-agent eval sim/scenarios/demo.yaml
  shelf-agent calibrate --camera reference.jpg --out layout.yaml
  shelf-agent alerts --since 1h
environment: SHELFSIGHT__MQTT__HOST=broker SHELFSIGHT__MQTT__PASSWORD_ENV=... override config keys (a__b = a.b)."""


def _parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _broker(text: str) -> dict[str, Any]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        return {"host": text}
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"broker must be HOST or HOST:PORT, got {text!r}")
    return {"host": host, "port": int(port)}


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shelf-agent", description="Watch a shelf camera and publish stock-out alerts "
                                "over MQTT.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="agent.yaml (see deploy/config/agent.yaml)")
    p.add_argument("--camera", help="0, /dev/video0, file.mp4, rtsp://..., http://.../mjpeg, csi://0, gst:PIPELINE")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--camera-fps", type=float, help="frame rate requested from the camera")
    p.add_argument("--fourcc", help="e.g. MJPG for USB cameras")
    replay = p.add_mutually_exclusive_group()
    replay.add_argument("--realtime", action="store_const", dest="replay", const="realtime",
                        help="video files: replay at their own frame rate (default)")
    replay.add_argument("--as-fast-as-possible", action="store_const", dest="replay", const="as_fast_as_possible",
                        help="video files: every frame, no pacing (deterministic replays, evaluation)")
    p.add_argument("--layout", type=Path, help="layout.yaml; without it: planogram-free gap mode")
    p.add_argument("--model", type=Path, help="model folder or manifest.json (default: the bundled demo model)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--providers", help="comma-separated ORT execution providers, e.g. "
                   "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--threads", type=int, help="ORT intra-op threads")
    p.add_argument("--product-classes", help="comma-separated class names of a foreign model that mean product")
    p.add_argument("--gap-classes", help="comma-separated class names of a foreign model that mean an empty facing")
    p.add_argument("--fps", type=float, help="inference rate cap (default 2)")
    p.add_argument("--dwell", type=float, help="seconds a stock-out must persist before the alert (default 10)")
    p.add_argument("--broker", type=_broker, help="HOST[:PORT] of the MQTT broker")
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"])
    p.add_argument("--store-id")
    p.add_argument("--camera-id")
    p.add_argument("--outbox", type=Path, help="SQLite outbox file (durable alert queue)")
    p.add_argument("--journal", type=Path, help="SQLite alert journal (history + persisted slot state)")
    p.add_argument("--no-mqtt", action="store_true", help="do not connect to a broker (alerts stay in the outbox)")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


# argparse dest -> the config field the flag overrides (dotted path); --providers, --dwell and --broker need more than
# a copy and are handled below.
FLAG_FIELDS = {
    "camera": "camera.source",
    "width": "camera.options.width",
    "height": "camera.options.height",
    "camera_fps": "camera.options.fps",
    "fourcc": "camera.options.fourcc",
    "replay": "camera.capture.replay",
    "layout": "layout",
    "model": "model.manifest",
    "backend": "model.backend",
    "threads": "model.threads",
    "fps": "fps",
    "mqtt_protocol": "mqtt.protocol",
    "store_id": "store_id",
    "camera_id": "camera_id",
    "outbox": "outbox.path",
    "journal": "journal",
    "log_format": "log_format",
    "log_level": "log_level",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only flags the user gave: unset flags must not overwrite the config file."""
    o: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = o
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    for dest, path in FLAG_FIELDS.items():
        put(path, getattr(args, dest))
    for flag in ("providers", "product_classes", "gap_classes"):
        value = getattr(args, flag)
        put(f"model.{flag}", [v.strip() for v in value.split(",") if v.strip()] if value else None)
    if args.dwell is not None:
        put("slots.dwell_s", args.dwell)
        put("gaps.dwell_s", args.dwell)
    for key, value in (args.broker or {}).items():
        put(f"mqtt.{key}", value)
    return o


def cmd_run(argv: list[str]) -> int:
    from shelfsight.shelf_agent.agent import Agent
    from shelfsight.shelf_agent.config import load_agent_config
    from shelfsight.shelf_agent.logs import setup_logging

    args = _run_parser().parse_args(argv)
    config = load_agent_config(args.config, overrides_from_args(args))
    setup_logging(config.log_format, config.log_level)
    agent = Agent(config, publish=not args.no_mqtt, keep_alerts=False)  # runs for months: only the count
    agent.install_signal_handlers()
    summary = agent.run()
    log.info("stopped: %d frames seen, %d processed (%.1f fps), %d bad, %d alerts", summary.frames_seen,
             summary.frames_processed, summary.fps, summary.bad_frames, summary.alerts_raised)
    return 0


def cmd_detect(argv: list[str]) -> int:
    from shelfsight.runtime.model import load_model
    from shelfsight.shelf_agent.agent import bundled_model_dir
    from shelfsight.shelf_agent.detect_video import annotate_video

    p = argparse.ArgumentParser(prog="shelf-agent detect", description="Draw detections on a video; print fps.")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--out", type=Path, help="annotated mp4 to write")
    p.add_argument("--model", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--conf", type=float, default=0.35)
    args = p.parse_args(argv)
    with load_model(args.model or bundled_model_dir(), threads=args.threads, conf_threshold=args.conf) as detector:
        stats = annotate_video(detector, args.source, args.out, args.max_frames)
    print(f"{stats.frames} frames in {stats.wall_s:.1f} s: {stats.fps:.1f} fps end to end "
          f"(detect median {stats.detect_ms_median:.1f} ms, {stats.detections_per_frame:.0f} detections/frame)"
          + (f"; annotated video: {args.out}" if args.out else ""))
    return 0


def cmd_eval(argv: list[str]) -> int:
    from shelfsight.shelf_agent.evaluate import evaluate_scenarios

    p = argparse.ArgumentParser(prog="shelf-agent eval", description="Run the agent on scenarios as fast as "
                                "possible and score its alerts (DESIGN section 4).")
    p.add_argument("scenarios", nargs="+", type=Path, help="scenario YAML files or rendered scenario folders")
    p.add_argument("--config", type=Path, help="agent.yaml whose slot/model settings to use")
    p.add_argument("--model", type=Path)
    p.add_argument("--fps", type=float)
    p.add_argument("--dwell", type=float)
    p.add_argument("--work-dir", type=Path, default=Path("out/eval"), help="where scenarios are rendered")
    p.add_argument("--json", type=Path, help="write the scores as JSON here")
    args = p.parse_args(argv)
    report = evaluate_scenarios(args.scenarios, config_path=args.config, model=args.model, fps=args.fps,
                                dwell=args.dwell, work_dir=args.work_dir)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0


def cmd_calibrate(argv: list[str]) -> int:
    from shelfsight.shelf_agent.calibrate import calibrate_main

    return calibrate_main(argv)


def cmd_alerts(argv: list[str]) -> int:
    from shelfsight.shelf_agent.journal import Journal

    p = argparse.ArgumentParser(prog="shelf-agent alerts", description="List the local alert journal.")
    p.add_argument("--journal", type=Path, default=Path("shelfsight-journal.sqlite"))
    p.add_argument("--since", type=_parse_duration, help="e.g. 15m, 1h, 2d")
    p.add_argument("--type", choices=["stockout", "low_stock", "restocked"])
    p.add_argument("--json", action="store_true", help="JSON lines")
    args = p.parse_args(argv)
    if not args.journal.is_file():
        raise ShelfSightError(f"{args.journal}: no alert journal here (the agent's --journal path)")
    journal = Journal(args.journal)
    try:
        for alert in journal.alerts(args.since, args.type):
            if args.json:
                print(json.dumps(alert))
            else:
                print(f"{alert['raised_time']}  #{alert['seq']:<5} {alert['type']:<10} {alert['slot_id']:<8} "
                      f"sku={alert.get('sku') or '-'}  empty since {alert['event_time']}")
    finally:
        journal.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "run"
    if argv and argv[0] == command:
        argv = argv[1:]
    handler = {"run": cmd_run, "detect": cmd_detect, "eval": cmd_eval, "calibrate": cmd_calibrate,
               "alerts": cmd_alerts}[command]
    try:
        return handler(argv)
    except ShelfSightError as exc:
        print(f"shelf-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
