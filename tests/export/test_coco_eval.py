from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shelfsight.export.data import label_path_for, labels_to_xyxy, read_labels
from shelfsight.export.evaluate import GroundTruth, coco_map, evaluate_detector
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ShelfSightError

NAMES = ["product", "gap"]


def _ground_truth() -> list[GroundTruth]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(5):
        n = int(rng.integers(3, 9))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(20, 80, (n, 2))
        images.append(GroundTruth(np.hstack([xy, xy + wh]).astype(np.float32), rng.integers(0, 2, n)))
    return images


def _perfect(gt: list[GroundTruth]) -> list[Detections]:
    return [Detections(g.xyxy, np.linspace(0.9, 0.5, len(g.class_id)), g.class_id) for g in gt]


def test_perfect_predictions_score_one() -> None:
    gt = _ground_truth()
    result = coco_map(_perfect(gt), gt, NAMES)
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)
    assert result.per_class_ap50 == {"product": pytest.approx(1.0), "gap": pytest.approx(1.0)}
    assert result.num_images == 5 and result.num_instances == sum(len(g.class_id) for g in gt)


@pytest.mark.parametrize("shift", [0.05, 0.15, 0.3])
def test_shifted_predictions_score_lower_the_further_they_move(shift: float) -> None:
    gt = _ground_truth()
    shifted = []
    for det in _perfect(gt):
        width = det.xyxy[:, 2] - det.xyxy[:, 0]
        moved = det.xyxy.copy()
        moved[:, [0, 2]] += (shift * width)[:, None]
        shifted.append(Detections(moved, det.confidence, det.class_id))
    result = coco_map(shifted, gt, NAMES)
    assert result.map50_95 < 1.0
    # IoU of a box shifted by s of its width is (1 - s) / (1 + s): 0.90, 0.74, 0.54 here, all above 0.5.
    assert result.map50 == pytest.approx(1.0)
    iou = (1 - shift) / (1 + shift)
    passed_thresholds = np.sum(np.linspace(0.5, 0.95, 10) <= iou + 1e-9)
    assert result.map50_95 == pytest.approx(passed_thresholds / 10, abs=0.02)


def test_wrong_class_and_false_positives_lower_the_score() -> None:
    gt = _ground_truth()
    swapped = [Detections(d.xyxy, d.confidence, 1 - d.class_id) for d in _perfect(gt)]
    assert coco_map(swapped, gt, NAMES).map50 == pytest.approx(0.0)
    # Confident false positives ranked above every true one drag precision down.
    noisy = [
        Detections.concatenate([Detections(np.array([[900, 900, 950, 950]] * 3, np.float32), [0.99] * 3, [0, 1, 0]), d])
        for d in _perfect(gt)
    ]
    assert 0.0 < coco_map(noisy, gt, NAMES).map50 < 0.9


def test_no_predictions_score_zero_and_empty_truth_is_refused() -> None:
    gt = _ground_truth()
    result = coco_map([Detections.empty()] * len(gt), gt, NAMES)
    assert result.map50 == 0.0 and result.per_class_ap50 == {"product": 0.0, "gap": 0.0}
    empty = [GroundTruth(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))]
    with pytest.raises(ShelfSightError, match="no boxes"):
        coco_map([Detections.empty()], empty, NAMES)


def test_class_without_ground_truth_is_left_out() -> None:
    gt = [GroundTruth(g.xyxy, np.zeros_like(g.class_id)) for g in _ground_truth()]
    result = coco_map(_perfect(gt), gt, NAMES)
    assert list(result.per_class_ap50) == ["product"] and result.map50 == pytest.approx(1.0)


def test_evaluate_detector_runs_a_callable_over_the_split(tiny_data: Path) -> None:
    """An oracle that reads the label file back gets 1.0; a detector that is off by 40% gets less."""
    frames_seen: list[tuple[int, int]] = []

    def oracle(frame: np.ndarray) -> Detections:
        frames_seen.append(frame.shape[:2])
        index = len(frames_seen) - 1
        label = label_path_for(sorted((tiny_data.parent / "images" / "val").glob("*.jpg"))[index])
        xyxy, cls = labels_to_xyxy(read_labels(label, 2), frame.shape[1], frame.shape[0])
        return Detections(xyxy, np.full(len(cls), 0.9), cls)

    result = evaluate_detector(oracle, tiny_data, "val")
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)
    assert len(frames_seen) == result.num_images == 4

    frames_seen.clear()

    def sloppy(frame: np.ndarray) -> Detections:
        det = oracle(frame)
        return Detections(det.xyxy * 1.4, det.confidence, det.class_id)

    assert evaluate_detector(sloppy, tiny_data, "val", limit=2).map50_95 < 0.5
