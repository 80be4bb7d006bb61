"""Soak test: the real `shelf-agent` process on a looping scenario video, as fast as it can go, against a real
mosquitto, sampled from /proc for memory, file descriptors and threads, plus the outbox depth.

    python tests/reliability/soak.py --minutes 30 --out out/soak          # what `make soak` runs

Writes OUT/soak.json (every sample + a summary) and OUT/soak.png (RSS, fds, threads, outbox depth over time).
Exits 1 when the issue's target is missed: RSS growth after warm-up >= 5 MB, or fds or threads grew after warm-up;
2 when the agent died or did not stop cleanly. The machine may be shared: the niceness and the load average are
recorded with the figures, so read absolute rates (frames, alerts) with that in mind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "helpers"))  # run as a script, outside pytest's pythonpath
from processes import stop_process  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
RSS_GROWTH_LIMIT_MB = 5.0
STORE_ID, CAMERA_ID = "soak-store", "soak-cam"


# ------------------------------------------------------------------------------------------------ scenario
def longest_scenario(folder: Path = REPO / "sim" / "scenarios") -> Path:
    """The shipped scenario with the largest duration_s (the 5-minute one at the time of writing)."""
    def duration(path: Path) -> float:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return float(data.get("duration_s", 0))

    return max(sorted(folder.glob("*.yaml")), key=duration)


# ------------------------------------------------------------------------------------------------ broker
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port (retried: the port can be taken before mosquitto binds it)."""
    if not os.path.exists(MOSQUITTO):
        sys.exit(f"soak: {MOSQUITTO} is not installed (apt-get install mosquitto; `make install` does it)")
    folder.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = free_port()
        lines = [f"listener {port} 127.0.0.1", f"log_dest file {folder / 'mosquitto.log'}", "log_type error",
                 "log_type warning", "allow_anonymous true", "persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf = folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline and not accepts(port):
            time.sleep(0.05)
        if proc.poll() is None and accepts(port):
            return proc, port
        stop_process(proc, 5)
    sys.exit("soak: could not start mosquitto")


# ------------------------------------------------------------------------------------------------ subscriber
class Listener:
    """A paho client on every topic of the soak camera: counts distinct alerts, keeps the latest metrics."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.root = f"shelfsight/{STORE_ID}/{CAMERA_ID}"
        self.lock = threading.Lock()
        self.alert_ids: set[str] = set()
        self.alert_messages = 0
        self.alert_types: Counter[str] = Counter()
        self.metrics: list[dict[str, Any]] = []
        self.camera_states: Counter[str] = Counter()
        self.statuses: list[str] = []
        self.counts: Counter[str] = Counter()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="soak-listener",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{self.root}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            sys.exit("soak: the MQTT listener could not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic[len(self.root) + 1 :].split("/")[0]
        with self.lock:
            self.counts[kind] += 1
            if kind == "snapshot":
                return
            try:
                payload = json.loads(message.payload)
            except ValueError:
                return
            if kind == "alert":
                self.alert_messages += 1
                if payload["alert_id"] not in self.alert_ids:
                    self.alert_ids.add(payload["alert_id"])
                    self.alert_types[payload["type"]] += 1
            elif kind == "metrics":
                self.metrics.append(payload)
                self.camera_states[payload["camera"]["state"]] += 1
            elif kind == "status":
                self.statuses.append(payload["state"])

    def latest_metrics(self) -> dict[str, Any] | None:
        with self.lock:
            return self.metrics[-1] if self.metrics else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------------------------------------ sampling
def proc_sample(pid: int) -> dict[str, Any]:
    """VmRSS/VmHWM (MB), open fds, threads and CPU seconds of one process, from /proc."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": round(int(status["VmRSS"].split()[0]) / 1024.0, 3),
        "hwm_mb": round(int(status["VmHWM"].split()[0]) / 1024.0, 3),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 2),  # utime + stime (fields 14 and 15 of stat)
    }


def outbox_depth(path: Path) -> int | None:
    """Rows waiting in the agent's outbox, read through a read-only connection (None if not readable yet)."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


# ------------------------------------------------------------------------------------------------ summary
def _window(values: list[float], fraction: float, last: bool) -> list[float]:
    n = max(1, round(len(values) * fraction))
    return values[-n:] if last else values[:n]


def summarize(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """RSS growth = median of the last 10 % of post-warm-up samples minus the median of the first 10 % (robust to a
    single GC or allocator blip); fds/threads 'grew' when the largest value in the last quarter exceeds the largest
    value in the first quarter after warm-up."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    summary: dict[str, Any] = {"samples": len(samples), "samples_after_warmup": len(after)}
    if len(after) < 2:
        summary["verdict"] = "too few samples after warm-up"
        return summary
    rss = [s["rss_mb"] for s in after]
    t = [s["t_s"] for s in after]
    fds = [s["fds"] for s in after]
    threads = [s["threads"] for s in after]
    growth = statistics.median(_window(rss, 0.1, True)) - statistics.median(_window(rss, 0.1, False))
    span_h = (t[-1] - t[0]) / 3600.0
    slope = statistics.linear_regression(t, rss).slope * 3600.0 if len(set(t)) > 1 else 0.0
    fd_growth = max(_window(fds, 0.25, True)) - max(_window(fds, 0.25, False))
    thread_growth = max(_window(threads, 0.25, True)) - max(_window(threads, 0.25, False))
    depths = [s["outbox_depth"] for s in samples if s.get("outbox_depth") is not None]
    summary.update({
        "rss_mb_at_warmup_end": round(rss[0], 2),
        "rss_mb_last": round(rss[-1], 2),
        "rss_mb_min_after_warmup": round(min(rss), 2),
        "rss_mb_max_after_warmup": round(max(rss), 2),
        "rss_growth_mb": round(growth, 3),
        "rss_growth_mb_raw_last_minus_first": round(rss[-1] - rss[0], 3),
        "rss_slope_mb_per_h": round(slope, 3),
        "post_warmup_hours": round(span_h, 4),
        "peak_rss_mb": round(max(s["hwm_mb"] for s in samples), 2),
        "fds_min": min(s["fds"] for s in samples),
        "fds_max": max(s["fds"] for s in samples),
        "fds_min_after_warmup": min(fds),
        "fds_max_after_warmup": max(fds),
        "fd_growth": fd_growth,
        "threads_min": min(s["threads"] for s in samples),
        "threads_max": max(s["threads"] for s in samples),
        "threads_min_after_warmup": min(threads),
        "threads_max_after_warmup": max(threads),
        "thread_growth": thread_growth,
        "outbox_depth_max": max(depths) if depths else None,
        "cpu_s": round(samples[-1]["cpu_s"], 1),
    })
    failures = []
    if growth >= RSS_GROWTH_LIMIT_MB:
        failures.append(f"RSS grew {growth:.2f} MB after warm-up (limit {RSS_GROWTH_LIMIT_MB:g} MB)")
    if fd_growth > 0:
        failures.append(f"open fds grew by {fd_growth} after warm-up")
    if thread_growth > 0:
        failures.append(f"threads grew by {thread_growth} after warm-up")
    summary["failures"] = failures
    summary["verdict"] = "pass" if not failures else "fail"
    return summary


def plot(samples: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60.0 for s in samples]
    panels = [("rss_mb", "RSS (MB)"), ("fds", "open fds"), ("threads", "threads"), ("outbox_depth", "outbox depth"),
              ("cpu_pct", "agent CPU %")]
    # The agent's CPU share (from its utime + stime) shows how hard the shared machine let it work.
    cpu_pct = [float("nan")] + [
        100.0 * (b["cpu_s"] - a["cpu_s"]) / (b["t_s"] - a["t_s"]) if b["t_s"] > a["t_s"] else float("nan")
        for a, b in itertools.pairwise(samples)
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        if key == "cpu_pct":
            values = cpu_pct
        else:
            values = [s.get(key) if s.get(key) is not None else float("nan") for s in samples]
        ax.plot(minutes, values, lw=1.2 if key != "cpu_pct" else 0.8,
                drawstyle="steps-post" if key in ("fds", "threads", "outbox_depth") else "default")
        if key == "cpu_pct":
            load = ax.twinx()
            load.plot(minutes, [s.get("load_1m", float("nan")) for s in samples], color="tab:orange", lw=0.8)
            load.set_ylabel("machine load (1 min)", color="tab:orange", fontsize=8)
        ax.set_ylabel(label)
        after = [v for s, v in zip(samples, values, strict=True) if s["t_s"] >= meta["warmup_minutes"] * 60 and v == v]
        if key == "rss_mb" and after:  # zoomed on the post-warm-up range, where growth would show
            ax.set_ylim(min(after) - 3, max(after) + 3)
            ax.set_ylabel("RSS (MB)\nafter warm-up")
        ax.axvline(meta["warmup_minutes"], color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].annotate("warm-up", (meta["warmup_minutes"], 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                     color="grey", ha="right", rotation=90)
    axes[-1].set_xlabel("minutes since the agent started")
    growth = summary.get("rss_growth_mb")
    fig.suptitle(
        f"shelf-agent soak: {meta['scenario_name']} looped as fast as possible, {meta['minutes']:g} min "
        f"(nice {meta['nice']}, {meta['cpus']} shared CPUs)\n"
        f"RSS growth after warm-up {growth if growth is not None else '-'} MB, fds "
        f"{summary.get('fds_min_after_warmup', '-')}..{summary.get('fds_max_after_warmup', '-')}, threads "
        f"{summary.get('threads_min_after_warmup', '-')}..{summary.get('threads_max_after_warmup', '-')}, "
        f"{meta.get('alerts_delivered', 0)} alerts delivered: {summary.get('verdict')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ run
def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "shelf-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shelfsight.shelf_agent.cli"]


def write_agent_config(folder: Path, scenario_dir: Path, port: int, metrics_s: float) -> Path:
    config = {
        "store_id": STORE_ID,
        "camera_id": CAMERA_ID,
        "camera": {"source": str(scenario_dir / "video.mp4"),
                   "capture": {"replay": "as_fast_as_possible", "loop": True}},
        "layout": str(scenario_dir / "layout.yaml"),
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(folder / "outbox.sqlite")},
        "journal": str(folder / "journal.sqlite"),
        "publish": {"metrics_interval_s": metrics_s},
        "log_level": "INFO",
    }
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the agent runs (default 30)")
    p.add_argument("--out", type=Path, default=Path("out/soak"), help="folder for soak.json, soak.png, agent.log")
    p.add_argument("--scenario", type=Path, default=None,
                   help="scenario YAML or rendered folder (default: the longest in sim/scenarios/)")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="ignored by the growth checks (default 2)")
    p.add_argument("--sample-s", type=float, default=None,
                   help="seconds between samples (default: 5, or less for runs under 10 minutes)")
    p.add_argument("--work-dir", type=Path, default=REPO / "out" / "scenarios", help="where scenarios are rendered")
    p.add_argument("--metrics-s", type=float, default=5.0, help="the agent's metrics interval (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--replot", type=Path, metavar="SOAK_JSON", help="only redraw soak.png next to this soak.json")
    args = p.parse_args(argv)
    if args.replot:
        return args
    if args.minutes <= 0 or args.warmup_minutes < 0 or args.warmup_minutes >= args.minutes:
        p.error("need --minutes > --warmup-minutes >= 0")
    if args.sample_s is None:
        args.sample_s = 5.0 if args.minutes >= 10 else max(0.5, min(5.0, args.minutes * 60 / 60))
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from shelfsight.shelf_agent.evaluate import rendered_scenario

    args = parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report["samples"], report["summary"], report["meta"], args.replot.with_suffix(".png"))
        print(f"soak: wrote {args.replot.with_suffix('.png')}")
        return 0
    scenario = args.scenario or longest_scenario()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"soak: rendering {scenario} (cached in {args.work_dir})", flush=True)
    scenario_dir = rendered_scenario(scenario, args.work_dir)
    scenario_name = json.loads((scenario_dir / "truth.json").read_text()).get("name", scenario_dir.name) \
        if (scenario_dir / "truth.json").is_file() else scenario_dir.name

    work = out / "work"  # outbox, journal, broker config and agent.yaml of the last run
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    broker, port = start_broker(work / "broker")
    listener = Listener(port)
    config_path = write_agent_config(work, scenario_dir, port, args.metrics_s)
    command = [*agent_command(), "--config", str(config_path)]
    log_path = out / "agent.log"
    duration_s, warmup_s = args.minutes * 60.0, args.warmup_minutes * 60.0
    samples: list[dict[str, Any]] = []
    agent_exit: int | None = None
    died_early = False
    stop_s: float | None = None
    started_wall = time.time()
    agent: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("wb") as log_file:
            agent = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            started = time.monotonic()
            bar = tqdm(total=round(duration_s), unit="s", desc="soak", disable=args.no_progress,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}] {postfix}")
            next_sample = started
            try:
                while True:
                    now = time.monotonic()
                    elapsed = now - started
                    if agent.poll() is not None:
                        died_early = True
                        break
                    if now >= next_sample:
                        try:
                            sample = {"t_s": round(elapsed, 2), "pid": agent.pid, **proc_sample(agent.pid)}
                        except (FileNotFoundError, ProcessLookupError):
                            died_early = True
                            break
                        sample["outbox_depth"] = outbox_depth(work / "outbox.sqlite")
                        metrics = listener.latest_metrics()
                        sample["camera_state"] = metrics["camera"]["state"] if metrics else None
                        sample["load_1m"] = round(os.getloadavg()[0], 2)
                        samples.append(sample)
                        bar.set_postfix_str(f"rss {sample['rss_mb']:.1f} MB, fds {sample['fds']}, "
                                            f"threads {sample['threads']}, alerts {len(listener.alert_ids)}")
                        next_sample += args.sample_s
                    bar.n = min(round(elapsed), bar.total)
                    bar.refresh()
                    if elapsed >= duration_s:
                        break
                    time.sleep(max(0.0, min(0.5, next_sample - time.monotonic(), duration_s - elapsed)))
            finally:
                bar.close()
            stop_started = time.monotonic()
            agent_exit = agent.returncode if died_early else stop_process(agent, 60)
            stop_s = time.monotonic() - stop_started
        time.sleep(0.5)  # the offline status and the last messages
    finally:
        if agent is not None and agent.poll() is None:  # interrupted: never leave the agent behind
            stop_process(agent, 30)
        listener.close()
        stop_process(broker, 10)

    log_text = log_path.read_text(errors="replace")
    frames = _stopped_line(log_text)
    with listener.lock:
        metrics = list(listener.metrics)
        delivered = {
            "alerts_delivered": len(listener.alert_ids),
            "alert_messages": listener.alert_messages,
            "alert_types": dict(listener.alert_types),
            "messages_by_kind": dict(listener.counts),
            "camera_states_in_metrics": dict(listener.camera_states),
            "statuses": listener.statuses,
        }
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"soak.py {' '.join(argv)}",
        "agent_command": command,
        "agent_pid": samples[0]["pid"] if samples else None,
        "scenario": str(scenario),
        "scenario_name": scenario_name,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "sample_s": args.sample_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "nice": os.nice(0),
        "shared_machine_note": "2 cores shared with other jobs; load_1m is recorded per sample",
        "agent_exit_code": agent_exit,
        "agent_died_early": died_early,
        "agent_stop_s": None if stop_s is None else round(stop_s, 2),
        **delivered,
        "frames_seen": frames[0] if frames else None,
        "frames_processed": frames[1] if frames else None,
        "camera_reconnects": metrics[-1]["camera"]["reconnects"] if metrics else None,
        "dropped_frames": metrics[-1]["dropped_frames"] if metrics else None,
        "outbox_dropped": metrics[-1]["outbox"]["dropped"] if metrics else None,
        "load_1m_mean": round(statistics.fmean(s["load_1m"] for s in samples), 2) if samples else None,
    }
    summary = summarize(samples, warmup_s)
    if died_early or agent_exit not in (0,):
        summary.setdefault("failures", []).append(f"agent exit code {agent_exit} (died early: {died_early})")
        summary["verdict"] = "fail"
    report = {"schema": "shelfsight.soak/1", "meta": meta, "summary": summary, "samples": samples}
    (out / "soak.json").write_text(report_json(report))
    plot(samples, summary, meta, out / "soak.png")
    print(json.dumps({"meta": {k: meta[k] for k in ("agent_pid", "alerts_delivered", "frames_processed",
                                                       "agent_exit_code", "agent_stop_s")},
                      "summary": summary}, indent=1))
    print(f"soak: wrote {out / 'soak.json'} and {out / 'soak.png'}")
    if died_early or agent_exit != 0:
        print(f"soak: FAIL: the agent exited with {agent_exit} (see {log_path})", file=sys.stderr)
        return 2
    if summary.get("verdict") != "pass":
        print(f"soak: FAIL: {'; '.join(summary.get('failures', [])) or summary.get('verdict')}", file=sys.stderr)
        return 1
    return 0


def report_json(report: dict[str, Any]) -> str:
    """Indented meta and summary, one line per sample (a 30-minute run has hundreds)."""
    head = json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1)
    lines = ",\n".join("  " + json.dumps(sample) for sample in report["samples"])
    return head[: head.rindex("}")].rstrip() + ',\n "samples": [\n' + lines + "\n ]\n}\n"


def _stopped_line(log_text: str) -> tuple[int, int] | None:
    """(frames seen, frames processed) from the agent's last log line: 'stopped: N frames seen, M processed'."""
    import re

    found = re.findall(r"stopped: (\d+) frames seen, (\d+) processed", log_text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # `make soak` stopped: stop the agent and the broker too
    sys.exit(main())
