"""Detections: the shared result type indexes like supervision's, keeping the arrays parallel."""

from __future__ import annotations

import numpy as np
import pytest

from shelfsight.runtime.detections import Detections


def _three() -> Detections:
    return Detections(
        xyxy=np.array([[0, 0, 10, 10], [5, 5, 20, 25], [30, 30, 40, 50]], np.float64),
        confidence=np.array([0.9, 0.4, 0.7]),
        class_id=np.array([0, 1, 0]),
    )


def test_boolean_mask_keeps_rows_together() -> None:
    dets = _three()
    kept = dets[dets.confidence > 0.5]
    assert len(kept) == 2
    np.testing.assert_array_equal(kept.class_id, [0, 0])
    np.testing.assert_array_equal(kept.xyxy, [[0, 0, 10, 10], [30, 30, 40, 50]])
    np.testing.assert_allclose(kept.confidence, [0.9, 0.7])


@pytest.mark.parametrize(
    ("index", "expected_confidence"),
    [
        (np.array([False, False, False]), []),
        (np.array([2, 0]), [0.7, 0.9]),
        (slice(1, None), [0.4, 0.7]),
        (1, [0.4]),
        (np.int64(2), [0.7]),
    ],
)
def test_indexing_forms(index: object, expected_confidence: list[float]) -> None:
    picked = _three()[index]
    np.testing.assert_allclose(picked.confidence, expected_confidence)
    assert picked.xyxy.shape == (len(expected_confidence), 4)
    assert picked.xyxy.dtype == np.float32 and picked.class_id.dtype == np.int32


def test_area_center_and_concatenate() -> None:
    dets = _three()
    np.testing.assert_allclose(dets.area, [100, 300, 200])
    np.testing.assert_allclose(dets.center[1], [12.5, 15])
    both = Detections.concatenate([dets, Detections.empty(), dets[0]])
    assert len(both) == 4 and both.class_id.tolist() == [0, 1, 0, 0]
    assert len(Detections.concatenate([])) == 0


def test_unequal_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Detections(np.zeros((2, 4)), np.zeros(3), np.zeros(2))
