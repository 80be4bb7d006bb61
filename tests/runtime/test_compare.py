"""Comparing two detection sets, as the torch-vs-ONNX parity check does."""

from __future__ import annotations

import numpy as np
import pytest

from shelfsight.runtime.compare import box_iou, compare_detections
from shelfsight.runtime.detections import Detections

BASE = Detections(
    xyxy=np.array([[0, 0, 100, 100], [200, 200, 260, 300], [400, 0, 500, 50]], np.float32),
    confidence=np.array([0.9, 0.8, 0.5]),
    class_id=np.array([0, 1, 0]),
)


def _variant(dx: float = 0.0, dconf: float = 0.0, class_id: list[int] | None = None) -> Detections:
    return Detections(
        BASE.xyxy + np.array([dx, 0, dx, 0], np.float32), BASE.confidence + dconf, class_id or BASE.class_id
    )


def test_box_iou_matrix() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), np.array([[5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 0, 0]]))
    np.testing.assert_allclose(iou, np.array([[1 / 3, 1, 0], [0, 0, 1]]))


@pytest.mark.parametrize(
    ("other", "ok", "matched", "unmatched"),
    [
        (_variant(), True, 3, (0, 0)),
        (_variant(dx=0.2, dconf=5e-4), True, 3, (0, 0)),
        (_variant(dx=3.0), False, 3, (0, 0)),  # IoU about 0.95 < 0.99
        (_variant(dconf=0.01), False, 3, (0, 0)),
        (_variant(class_id=[0, 0, 0]), False, 2, (1, 1)),  # the class-1 box has no same-class partner
        (BASE[np.array([True, False, True])], False, 2, (1, 0)),
        (Detections.concatenate([BASE, BASE[0:1]]), False, 3, (0, 1)),
    ],
    ids=["identical", "within-tolerance", "shifted", "score", "class", "missing", "extra"],
)
def test_compare_detections(other: Detections, ok: bool, matched: int, unmatched: tuple[int, int]) -> None:
    result = compare_detections(BASE, other)
    assert result.ok is ok
    assert result.matched == matched
    assert (result.unmatched_a, result.unmatched_b) == unmatched
    assert ("OK" if ok else "MISMATCH") in str(result)


def test_worst_figures_and_order_independence() -> None:
    shuffled = _variant(dx=3.0, dconf=0.002)[np.array([2, 0, 1])]
    result = compare_detections(BASE, shuffled, iou_min=0.9, score_atol=0.01)
    assert result.ok
    assert result.worst_iou == pytest.approx(float(box_iou(BASE.xyxy[1:2], shuffled.xyxy[2:3])[0, 0]))
    assert result.worst_score_delta == pytest.approx(0.002, abs=1e-6)
    assert sorted(result.pairs.tolist()) == [[0, 1], [1, 2], [2, 0]]
    empty = compare_detections(Detections.empty(), Detections.empty())
    assert empty.ok and empty.matched == 0 and empty.worst_iou == 1.0
