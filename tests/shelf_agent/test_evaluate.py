"""`shelf-agent eval`: the real agent pipeline (no MQTT) on rendered scenarios, scored by the DESIGN section 4 rule."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.cli import main
from shelfsight.shelf_agent.evaluate import (
    EvalReport,
    ScenarioScore,
    _occlusion_alerts,
    evaluate_scenarios,
    rendered_scenario,
)
from shelfsight.shelf_agent.scoring import ScoredAlert, score_alerts

pytestmark = pytest.mark.timeout(120)

# A shopper hides four slots for three times the dwell; a slot next to them empties meanwhile.
SHOPPER = """\
name: agent-small-shopper
seed: 11
duration_s: 16
fps: 10
camera: {width: 640, height: 360, noise: 0.01, jitter_px: 0.5}
shelf: {rows: 2, slots_per_row: 4, facings_per_slot: 2}
events:
  - {t: 2, type: occlude, slots: [R1S1, R1S2, R2S1, R2S2], duration_s: 6}
  - {t: 7, type: deplete, slot: R2S4, duration_s: 1}
"""


def test_eval_scores_the_agent_on_a_scenario(small_scenario: Path, scenario_work_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = small_scenario
    report = evaluate_scenarios([folder], fps=5, dwell=2, work_dir=scenario_work_dir)
    assert report.dwell_s == 2
    (result,) = report.scenarios
    score = result.score
    with capsys.disabled():
        print(f"\neval {result.name}: precision {score.precision:.3f} recall {score.recall:.3f} "
              f"median {score.median_delay} s p95 {score.p95_delay} s, {result.alerts_raised} raised, "
              f"{result.frames_processed} frames at {result.replay_speed:.1f}x real time")
    expected = json.loads((folder / "truth.json").read_text())["expected_alerts"]
    assert len(score.matches) + len(score.misses) == len(expected) == 3
    assert len(score.matches) + len(score.false_alerts) == result.alerts_raised
    assert score.precision == pytest.approx(len(score.matches) / max(result.alerts_raised, 1))
    assert score.recall == pytest.approx(len(score.matches) / 3)
    # The slot that stays empty for 13 s is what any working model must find, within the scoring window.
    assert ("stockout", "R2S3") in {(m.expected.type, m.expected.slot) for m in score.matches}
    assert all(0 <= m.delay_s <= 2 + 2 for m in score.matches)
    assert result.frames_processed == 100 and result.occlusion_alerts == 0
    assert result.name in report.table()


def test_eval_cli_prints_precision_recall_and_writes_json(small_scenario: Path,
                                                          scenario_source: Callable[[str], Path],
                                                          shelf_agent_command: list[str], tmp_path: Path) -> None:
    shopper = scenario_source(SHOPPER)  # a YAML: rendered by eval itself into --work-dir
    out = tmp_path / "scores.json"
    result = subprocess.run([*shelf_agent_command, "eval", str(small_scenario), str(shopper), "--dwell", "2",
                             "--fps", "5", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dwell 2 s")
    assert "precision" in lines[1] and "recall" in lines[1] and "p95" in lines[1]
    assert lines[2].split()[0] == "agent-small" and lines[3].split()[0] == "agent-small-shopper"
    assert (tmp_path / "work" / "agent-small-shopper" / "video.mp4").is_file()

    scores = json.loads(out.read_text())
    assert scores["dwell_s"] == 2
    by_name = {s["name"]: s for s in scores["scenarios"]}
    for s in by_name.values():
        assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
        assert f"{s['precision']:.3f}" in result.stdout and f"{s['recall']:.3f}" in result.stdout
    shopper_score = by_name["agent-small-shopper"]
    assert shopper_score["occlusion_alerts"] == 0  # a shopper must never cause an alert
    assert shopper_score["frames_processed"] == 80


def test_rendered_scenario_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    text = SHOPPER.replace("agent-small-shopper", "cache-check").replace("duration_s: 16", "duration_s: 1")
    text = text.split("events:")[0] + "events: []\n"
    source = tmp_path / "s.yaml"
    source.write_text(text)
    folder = rendered_scenario(source, tmp_path / "work")
    stamp = (folder / "video.mp4").stat().st_mtime_ns
    assert rendered_scenario(source, tmp_path / "work") == folder
    assert (folder / "video.mp4").stat().st_mtime_ns == stamp  # not rendered again
    source.write_text(text.replace("seed: 11", "seed: 12"))
    rendered_scenario(source, tmp_path / "work")
    assert (folder / "video.mp4").stat().st_mtime_ns != stamp
    assert rendered_scenario(folder, tmp_path / "elsewhere") == folder  # a rendered folder is used as it is


def test_missing_scenario_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ShelfSightError, match="no such scenario"):
        evaluate_scenarios([tmp_path / "nope.yaml"], work_dir=tmp_path)
    assert main(["eval", str(tmp_path / "nope.yaml"), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shelf-agent: error:") and "nope.yaml" in err and "\n" not in err


TRUTH = {
    "occlusions": [{"slots": ["R1S1", "R1S2"], "t_start": 10.0, "t_end": 16.0}],
    "expected_alerts": [{"type": "stockout", "slot": "R1S2", "t": 14.0}],
}


@pytest.mark.parametrize(
    ("alert", "counted"),
    [
        ({"type": "stockout", "slot_id": "R1S1", "raised_frame_ts": 12.0}, True),  # during the occlusion
        ({"type": "stockout", "slot_id": "R1S1", "raised_frame_ts": 19.5}, True),  # just after it (dwell + 2 s)
        ({"type": "stockout", "slot_id": "R1S1", "raised_frame_ts": 21.0}, False),  # long after: a plain false alert
        ({"type": "stockout", "slot_id": "R1S2", "raised_frame_ts": 15.0}, False),  # really emptied behind it
        ({"type": "stockout", "slot_id": "R2S1", "raised_frame_ts": 12.0}, False),  # not an occluded slot
        ({"type": "restocked", "slot_id": "R1S1", "raised_frame_ts": 12.0}, False),
    ],
)
def test_occlusion_alerts_are_stockouts_caused_by_a_shopper(alert: dict[str, object], counted: bool) -> None:
    assert _occlusion_alerts([alert], TRUTH, dwell_s=1.5) == int(counted)


def test_eval_json_lists_which_alerts_were_false_and_which_were_missed() -> None:
    expected = [ScoredAlert("stockout", "R1S1", 5.0), ScoredAlert("stockout", "R1S2", 9.0)]
    raised = [ScoredAlert("stockout", "R1S1", 15.5), ScoredAlert("stockout", "R2S3", 30.25)]
    score = score_alerts(raised, expected, dwell_s=10.0)
    report = EvalReport(10.0, [ScenarioScore("busy", score, len(raised), 0, 100, 20.0)])
    (entry,) = report.as_dict()["scenarios"]
    assert entry["false_alerts"] == 1 and entry["misses"] == 1
    assert entry["false_alert_list"] == [{"type": "stockout", "slot": "R2S3", "t": 30.25}]
    assert entry["missed_list"] == [{"type": "stockout", "slot": "R1S2", "t": 9.0}]
    json.dumps(report.as_dict())  # the CLI writes it as JSON
