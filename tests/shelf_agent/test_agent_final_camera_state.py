"""The camera's final state reaches `metrics`: a file that ends, or a camera that gives up, stops the agent's loop
right away, and that last state change must still be published (it used to be lost: the loop left before its
metrics check)."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from shelfsight.shelf_agent.agent import Agent
from shelfsight.shelf_agent.config import load_agent_config

pytestmark = pytest.mark.timeout(60)


def outbox_metrics(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT payload FROM messages WHERE kind = 'metrics' ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(row[0]) for row in rows]


def run_agent(tmp_path: Path, camera: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    overrides = {
        "camera": camera,
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
        "journal": str(tmp_path / "journal.sqlite"),
        "publish": {"metrics_interval_s": 600.0},  # no periodic metrics during the run: only state changes
        **extra,
    }
    Agent(load_agent_config(None, overrides, environ={}), publish=False).run()
    return outbox_metrics(tmp_path / "outbox.sqlite")


def test_a_video_that_ends_publishes_ended(tmp_path: Path, small_scenario: Path) -> None:
    metrics = run_agent(tmp_path, {"source": str(small_scenario / "video.mp4"),
                                   "capture": {"replay": "as_fast_as_possible"}},
                        layout=str(small_scenario / "layout.yaml"))
    assert metrics, "no metrics at all"
    assert metrics[-1]["camera"]["state"] == "ended"


def test_a_camera_that_gives_up_publishes_failed(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = run_agent(tmp_path, {"source": f"http://127.0.0.1:{port}/video.mjpg",
                                   "options": {"open_timeout_s": 1.0, "read_timeout_s": 1.0},
                                   "capture": {"max_reconnect_attempts": 1}})
    assert metrics, "no metrics at all"
    assert metrics[-1]["camera"]["state"] == "failed"


def test_a_long_running_agent_keeps_only_the_alert_count(tmp_path: Path, small_scenario: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """RunSummary.alerts used to hold every alert for as long as the agent ran (~3 KB each: +6.8 MB RSS in a 30-minute
    soak with 2293 alerts). `shelf-agent` now keeps only the count; evaluation still gets every alert."""
    import shelfsight.shelf_agent.agent as agent_module
    from shelfsight.shelf_agent.cli import main

    camera = {"source": str(small_scenario / "video.mp4"), "capture": {"replay": "as_fast_as_possible"}}
    overrides = {"camera": camera, "layout": str(small_scenario / "layout.yaml"),
                 "outbox": {"path": str(tmp_path / "kept.sqlite")}, "journal": str(tmp_path / "kept-journal.sqlite")}
    kept = Agent(load_agent_config(None, overrides, environ={}), publish=False).run()
    assert kept.alerts and kept.alerts_raised == len(kept.alerts)

    summaries: list[Any] = []
    real_run = agent_module.Agent.run

    def recording_run(self: Agent) -> Any:
        summaries.append(real_run(self))
        return summaries[-1]

    monkeypatch.setattr(agent_module.Agent, "run", recording_run)
    code = main(["--camera", str(small_scenario / "video.mp4"), "--as-fast-as-possible", "--no-mqtt",
                 "--layout", str(small_scenario / "layout.yaml"), "--outbox", str(tmp_path / "cli.sqlite"),
                 "--journal", str(tmp_path / "cli-journal.sqlite")])
    assert code == 0
    assert summaries[0].alerts == [] and summaries[0].alerts_raised == kept.alerts_raised
