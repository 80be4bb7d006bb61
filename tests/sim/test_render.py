"""Rendering a short scenario: a real decodable video, truth that matches the events, a layout that matches truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from video_frames import video_frames

from shelfsight.shelf_agent.layout import load_layout
from shelfsight.sim.cli import main
from shelfsight.sim.scenario import load_scenario
from shelfsight.sim.video import render_scenario

SHORT = """\
name: short-test
seed: {seed}
duration_s: 3
fps: 10
camera: {{width: 320, height: 180, noise: 0.02, jitter_px: 1.0}}
shelf: {{rows: 2, slots_per_row: 3, facings_per_slot: 3}}
events:
  - {{t: 0.2, type: deplete, slot: R1S2, duration_s: 1.5}}
  - {{t: 0.5, type: take, slot: R2S1, count: 1}}
  - {{t: 0.5, type: lighting, factor: 0.6, duration_s: 1}}
  - {{t: 1.0, type: occlude, slots: [R2S3], duration_s: 1}}
  - {{t: 2.0, type: restock, slot: R1S2, duration_s: 0.6}}
"""


def _write(tmp: Path, seed: int = 5) -> Path:
    path = tmp / f"short-{seed}.yaml"
    path.write_text(SHORT.format(seed=seed))
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("render")
    out = tmp / "out"
    assert main(["render", str(_write(tmp)), "--out", str(out), "--quiet"]) == 0
    return out


def _decode(video: Path) -> list[np.ndarray]:
    return [frame for _, frame in video_frames(video)]


def test_video_decodes_to_every_frame_at_the_right_size(rendered: Path):
    frames = _decode(rendered / "video.mp4")
    assert len(frames) == 30  # fps * duration
    assert {frame.shape for frame in frames} == {(180, 320, 3)}
    # The lighting dip (0.5..1.5 s) is visible: mid-dip frames are darker than the first frame.
    assert frames[10].mean() < 0.8 * frames[0].mean()


def test_truth_alerts_and_slot_states_match_the_events(rendered: Path):
    truth = json.loads((rendered / "truth.json").read_text())
    assert truth["schema"] == "shelfsight.truth/1"
    assert truth["frame_size"] == {"width": 320, "height": 180}
    assert truth["classes"] == ["product", "gap"]
    assert [frame["i"] for frame in truth["frames"]] == list(range(30))
    # stockout at the deplete end (0.2 + 1.5), restocked at the restock end (2.0 + 0.6); the take raises nothing
    assert truth["expected_alerts"] == [
        {"type": "stockout", "slot": "R1S2", "t": 1.7},
        {"type": "restocked", "slot": "R1S2", "t": 2.6},
    ]
    assert truth["slots"]["R2S1"] == [{"t": 0.0, "facings": 3, "state": "ok"}, {"t": 0.5, "facings": 2, "state": "low"}]
    assert [entry["state"] for entry in truth["slots"]["R1S2"]] == ["ok", "low", "low", "empty", "low", "low", "ok"]
    assert truth["occlusions"] == [{"slots": ["R2S3"], "t_start": 1.0, "t_end": 2.0}]


def _facings_at(history: list[dict], t: float) -> int:
    return [entry["facings"] for entry in history if entry["t"] <= t + 1e-6][-1]


def test_every_frame_shows_the_stock_of_every_visible_slot(rendered: Path):
    truth = json.loads((rendered / "truth.json").read_text())
    layout = load_layout(rendered / "layout.yaml")
    polygons = {slot.id: np.array(slot.polygon, np.float32) for slot in layout.slots}
    for frame in truth["frames"]:
        t = frame["t"]
        boxes = np.array(frame["boxes"], np.float64).reshape(-1, 5)
        centres = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 2] + boxes[:, 4]) / 2], 1)
        occluded = {s for occ in truth["occlusions"] if occ["t_start"] <= t < occ["t_end"] for s in occ["slots"]}
        for slot_id, polygon in polygons.items():
            inside = np.array([cv2.pointPolygonTest(polygon, (float(x), float(y)), False) > 0 for x, y in centres])
            classes = boxes[inside, 0] if len(boxes) else np.array([])
            if slot_id in occluded:
                assert not inside.any(), f"{slot_id} is behind a shopper at t={t} but has boxes"
                continue
            facings = _facings_at(truth["slots"][slot_id], t)
            products, gaps = int((classes == 0).sum()), int((classes == 1).sum())
            if occluded:
                # The shopper's head and arms may hide a few objects of neighbouring slots too.
                assert products <= facings and gaps <= (1 if facings < 3 else 0), (slot_id, t)
            else:
                assert products == facings, (slot_id, t)
                assert gaps == (1 if facings < 3 else 0), (slot_id, t)


def test_missing_facings_leave_from_the_right(rendered: Path):
    truth = json.loads((rendered / "truth.json").read_text())
    layout = load_layout(rendered / "layout.yaml")
    polygon = np.array(layout.slot("R2S1").polygon, np.float32)
    boxes = np.array(truth["frames"][8]["boxes"], np.float64)  # t=0.8: one facing taken from R2S1
    mine = boxes[[cv2.pointPolygonTest(polygon, ((b[1] + b[3]) / 2, (b[2] + b[4]) / 2), False) > 0 for b in boxes]]
    products, gaps = mine[mine[:, 0] == 0], mine[mine[:, 0] == 1]
    assert len(products) == 2 and len(gaps) == 1
    assert gaps[0, 1] >= products[:, 3].max() - 2.0  # the gap is right of every remaining facing


def test_layout_polygons_contain_their_slots_truth_boxes(rendered: Path):
    layout = load_layout(rendered / "layout.yaml")
    truth = json.loads((rendered / "truth.json").read_text())
    assert (layout.store_id, layout.camera_id) == ("demo-store", "cam-1")
    assert (layout.frame_size.width, layout.frame_size.height) == (320, 180)
    assert [slot.id for slot in layout.slots] == ["R1S1", "R1S2", "R1S3", "R2S1", "R2S2", "R2S3"]
    assert all(slot.min_facings == 3 and slot.sku for slot in layout.slots)
    polygons = [np.array(slot.polygon, np.float32) for slot in layout.slots]
    for frame in truth["frames"]:
        for _, x1, y1, x2, y2 in frame["boxes"]:
            centre = ((x1 + x2) / 2, (y1 + y2) / 2)
            owners = [p for p in polygons if cv2.pointPolygonTest(p, centre, False) > 0]
            assert len(owners) == 1, (frame["i"], centre)
            # Corners may poke out by the perspective slant plus camera shake, never more.
            tolerance = 1.5 + 0.05 * max(x2 - x1, y2 - y1)
            for corner in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
                assert cv2.pointPolygonTest(owners[0], corner, True) >= -tolerance, (frame["i"], corner)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_scenario_and_seed_render_identically(tmp_path: Path):
    path = _write(tmp_path)
    assert main(["render", str(path), "--out", str(tmp_path / "a"), "--png-frames", "--quiet"]) == 0
    first = tmp_path / "a"
    assert not (first / "video.mp4").exists()
    assert len(list((first / "frames").glob("*.png"))) == 30
    second = render_scenario(load_scenario(path), tmp_path / "b", png_frames=True)
    assert second.frames_dir is not None and second.video is None
    assert (first / "truth.json").read_bytes() == second.truth.read_bytes()
    assert _digest(first / "frames") == _digest(second.frames_dir)
    other = render_scenario(load_scenario(_write(tmp_path, seed=6)), tmp_path / "c", png_frames=True)
    assert other.frames_dir is not None
    assert _digest(other.frames_dir) != _digest(first / "frames")


def test_cli_reports_a_bad_scenario_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SHORT.format(seed=1).replace("slot: R2S1, count", "slot: R9S1, count"))
    assert main(["render", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{bad}:9: field 'events[1].slot'" in err
    assert not (tmp_path / "out" / "video.mp4").exists()


def test_cli_lists_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "aisle-3-morning", "busy-afternoon", "hard-occlusion"):
        assert name in out
