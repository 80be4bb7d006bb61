"""``shelf-agent eval``: run the real agent pipeline on rendered scenarios as fast as possible and score its alerts
with the DESIGN section 4 rule (precision, recall, median and p95 delay)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.agent import Agent
from shelfsight.shelf_agent.config import load_agent_config
from shelfsight.shelf_agent.scoring import AlertScore, ScoredAlert, score_alerts


@dataclass
class ScenarioScore:
    name: str
    score: AlertScore
    alerts_raised: int
    occlusion_alerts: int
    frames_processed: int
    replay_speed: float  # source seconds per wall second


@dataclass
class EvalReport:
    dwell_s: float
    scenarios: list[ScenarioScore]

    def table(self) -> str:
        lines = [
            f"dwell {self.dwell_s:g} s; an alert matches when raised in [t, t + dwell + 2 s]",
            f"{'scenario':<22}{'expected':>9}{'raised':>8}{'precision':>10}{'recall':>8}{'median':>8}{'p95':>7}"
            f"{'occl.':>7}{'speed':>8}",
        ]
        for s in self.scenarios:
            sc = s.score
            lines.append(
                f"{s.name:<22}{len(sc.matches) + len(sc.misses):>9}{s.alerts_raised:>8}{sc.precision:>10.3f}"
                f"{sc.recall:>8.3f}{_fmt(sc.median_delay):>8}{_fmt(sc.p95_delay):>7}{s.occlusion_alerts:>7}"
                f"{s.replay_speed:>7.1f}x"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dwell_s": self.dwell_s,
            "scenarios": [
                {
                    "name": s.name,
                    "precision": s.score.precision,
                    "recall": s.score.recall,
                    "median_delay_s": s.score.median_delay,
                    "p95_delay_s": s.score.p95_delay,
                    "false_alerts": len(s.score.false_alerts),
                    "misses": len(s.score.misses),
                    # Which alerts, so a miss can be looked up in the video without re-running the scenario.
                    "false_alert_list": [_alert_dict(a) for a in s.score.false_alerts],
                    "missed_list": [_alert_dict(a) for a in s.score.misses],
                    "alerts_raised": s.alerts_raised,
                    "occlusion_alerts": s.occlusion_alerts,
                    "frames_processed": s.frames_processed,
                    "replay_speed": s.replay_speed,
                }
                for s in self.scenarios
            ],
        }


def _alert_dict(alert: ScoredAlert) -> dict[str, Any]:
    return {"type": alert.type, "slot": alert.slot, "t": round(alert.t, 3)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def rendered_scenario(path: Path, work_dir: Path) -> Path:
    """A folder with video.mp4/truth.json/layout.yaml: given directly, or rendered from a scenario YAML (cached)."""
    if path.is_dir():
        return path
    from shelfsight.sim.scenario import load_scenario
    from shelfsight.sim.video import render_scenario

    scenario = load_scenario(path)
    out = work_dir / scenario.name
    stamp = out / "scenario.source.yaml"
    source_text = path.read_text(encoding="utf-8")
    if not (stamp.is_file() and stamp.read_text(encoding="utf-8") == source_text and (out / "truth.json").is_file()):
        render_scenario(scenario, out)
        stamp.write_text(source_text, encoding="utf-8")
    return out


def _occlusion_alerts(alerts: list[dict[str, Any]], truth: dict[str, Any], dwell_s: float) -> int:
    """Stock-outs raised for a slot that was occluded (and not empty in truth) shortly before the alert."""
    count = 0
    for alert in alerts:
        if alert["type"] != "stockout":
            continue
        t = alert["raised_frame_ts"]
        for occ in truth.get("occlusions", []):
            if alert["slot_id"] in occ["slots"] and occ["t_start"] <= t <= occ["t_end"] + dwell_s + 2.0:
                expected = [e for e in truth["expected_alerts"] if e["slot"] == alert["slot_id"]
                            and e["type"] == "stockout" and e["t"] <= t <= e["t"] + dwell_s + 2.0]
                if not expected:
                    count += 1
                break
    return count


def evaluate_folder(folder: Path, overrides: dict[str, Any], config_path: Path | None) -> ScenarioScore:
    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="shelf-eval-") as tmp:
        run_overrides = {
            **overrides,
            "camera": {"source": str(folder / "video.mp4"), "capture": {"replay": "as_fast_as_possible"}},
            "layout": str(folder / "layout.yaml"),
            "outbox": {"path": str(Path(tmp) / "outbox.sqlite")},
            "journal": str(Path(tmp) / "journal.sqlite"),
        }
        config = load_agent_config(config_path, run_overrides, environ={})
        summary = Agent(config, publish=False).run()
    dwell = config.slots.dwell_s
    raised = [ScoredAlert(a["type"], a["slot_id"], a["raised_frame_ts"]) for a in summary.alerts
              if a["type"] in ("stockout", "restocked")]
    expected = [ScoredAlert(e["type"], e["slot"], e["t"]) for e in truth["expected_alerts"]]
    score = score_alerts(raised, expected, dwell)
    speed = summary.source_s / summary.wall_s if summary.wall_s > 0 else 0.0
    return ScenarioScore(truth.get("name", folder.name), score, len(raised),
                         _occlusion_alerts(summary.alerts, truth, dwell), summary.frames_processed, speed)


def evaluate_scenarios(
    paths: list[Path],
    *,
    config_path: Path | None = None,
    model: Path | None = None,
    fps: float | None = None,
    dwell: float | None = None,
    work_dir: Path = Path("out/eval"),
) -> EvalReport:
    overrides: dict[str, Any] = {}
    if model is not None:
        overrides["model"] = {"manifest": str(model)}
    if fps is not None:
        overrides["fps"] = fps
    if dwell is not None:
        overrides["slots"] = {"dwell_s": dwell}
    results = []
    for path in paths:
        if not path.exists():
            raise ShelfSightError(f"{path}: no such scenario file or folder")
        results.append(evaluate_folder(rendered_scenario(path, work_dir), overrides, config_path))
    dwell_s = load_agent_config(config_path, overrides, environ={}).slots.dwell_s
    return EvalReport(dwell_s, results)
