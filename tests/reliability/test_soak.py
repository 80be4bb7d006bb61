"""tests/reliability/soak.py in miniature (about 25 s on the small scenario): the script runs end to end and writes a
sane soak.json and a readable soak.png. No threshold on the figures here: `make soak` is the real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

SOAK = Path(__file__).resolve().parent / "soak.py"

pytestmark = pytest.mark.timeout(180)


def test_soak_script_writes_samples_summary_and_figure(tmp_path: Path, small_scenario: Path) -> None:
    out = tmp_path / "soak"
    command = [sys.executable, str(SOAK), "--minutes", "0.4", "--warmup-minutes", "0.1", "--sample-s", "1",
               "--scenario", str(small_scenario), "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    # 0 = pass, 1 = a growth target missed (not judged on a 25 s run); 2 = the agent died, anything else = a crash
    assert result.returncode in (0, 1), f"soak.py exited {result.returncode}:\n{result.stdout}\n{result.stderr}"

    report = json.loads((out / "soak.json").read_text())
    meta, summary, samples = report["meta"], report["summary"], report["samples"]
    assert len(samples) >= 10
    assert meta["agent_pid"] and {s["pid"] for s in samples} == {meta["agent_pid"]}
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 and s["threads"] > 0 for s in samples)
    assert any(s["outbox_depth"] is not None for s in samples)
    assert meta["agent_exit_code"] == 0 and not meta["agent_died_early"]
    assert meta["frames_processed"] and meta["frames_processed"] > 0
    assert meta["scenario_name"] == "agent-small"
    for key in ("rss_growth_mb", "fds_min", "fds_max", "threads_min", "threads_max", "outbox_depth_max", "verdict"):
        assert key in summary, key
    assert summary["samples_after_warmup"] < summary["samples"]

    image = cv2.imread(str(out / "soak.png"))
    assert image is not None and image.shape[0] > 400 and image.shape[1] > 400
    print(f"\nsoak (25 s): {summary['verdict']}, RSS growth {summary['rss_growth_mb']} MB, fds "
          f"{summary['fds_min']}..{summary['fds_max']}, threads {summary['threads_min']}..{summary['threads_max']}, "
          f"{meta['alerts_delivered']} alerts, {meta['frames_processed']} frames processed")
