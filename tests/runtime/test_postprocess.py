"""Decoding the 'shelfsight' head, class-aware NMS and the way back to frame pixels."""

from __future__ import annotations

import numpy as np
import pytest

from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import OutputSpec
from shelfsight.runtime.postprocess import DECODERS, get_decoder, nms, postprocess
from shelfsight.runtime.preprocess import LetterboxTransform

IDENTITY = LetterboxTransform(1.0, 1.0, 0.0, 0.0, frame_w=1000, frame_h=1000)
SPEC = OutputSpec(format="shelfsight", names=["output"])


def test_nms_is_class_aware() -> None:
    xyxy = np.array(
        [
            [0, 0, 100, 100],  # 0: class 0, best of its cluster
            [5, 5, 105, 105],  # 1: class 0, overlaps 0 heavily -> suppressed
            [5, 5, 105, 105],  # 2: class 1, same place but another class -> kept
            [300, 300, 400, 400],  # 3: class 0, far away -> kept
            [0, 0, 100, 100],  # 4: class 1, overlaps 2 heavily, higher score -> kept, suppresses 2
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.6, 0.5, 0.7], np.float32)
    class_ids = np.array([0, 0, 1, 0, 1])
    assert nms(xyxy, scores, class_ids, iou_threshold=0.5, max_det=100).tolist() == [0, 4, 3]


@pytest.mark.parametrize(
    ("shift", "iou_threshold", "both_kept"),
    [(50, 0.3, False), (50, 0.34, True), (0, 0.99, False), (100, 0.01, True)],
)
def test_nms_threshold_is_iou(shift: int, iou_threshold: float, both_kept: bool) -> None:
    # Two 100x100 boxes shifted by 50 px overlap with IoU = 50*100 / (2*10000 - 5000) = 1/3.
    xyxy = np.array([[0, 0, 100, 100], [shift, 0, 100 + shift, 100]], np.float32)
    kept = nms(xyxy, np.array([0.9, 0.8]), np.zeros(2), iou_threshold, max_det=10)
    assert len(kept) == (2 if both_kept else 1)


def test_nms_max_det_keeps_the_best_and_empty_input_is_fine() -> None:
    xyxy = np.arange(40, dtype=np.float32).reshape(10, 4) * [100, 0, 100, 0] + [0, 0, 50, 50]
    scores = np.linspace(0.1, 1.0, 10)
    assert nms(xyxy, scores, np.zeros(10), 0.5, max_det=3).tolist() == [9, 8, 7]
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5, 10).shape == (0,)


def _head(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, np.float32)[None]


def test_postprocess_maps_to_frame_pixels_and_thresholds() -> None:
    # 1280x720 letterboxed into 320x320: scale 0.25, pad_y (320-180)/2 = 70.
    transform = LetterboxTransform(0.25, 0.25, 0.0, 70.0, frame_w=1280, frame_h=720)
    output = _head(
        [
            [10, 80, 50, 120, 0.9, 0.1],  # class 0 at 0.9
            [100, 100, 140, 200, 0.2, 0.6],  # class 1 at 0.6
            [200, 100, 220, 120, 0.1, 0.2],  # below threshold
            [300, 240, 330, 260, 0.05, 0.4],  # leaves the bottom-right of the frame: clipped
        ]
    )
    (dets,) = postprocess([output], SPEC, [transform], conf_threshold=0.3, iou_threshold=0.5)
    np.testing.assert_allclose(dets.confidence, [0.9, 0.6, 0.4])
    assert dets.class_id.tolist() == [0, 1, 1]
    np.testing.assert_allclose(dets.xyxy[0], [40, 40, 200, 200])
    np.testing.assert_allclose(dets.xyxy[1], [400, 120, 560, 520])
    np.testing.assert_allclose(dets.xyxy[2], [1200, 680, 1280, 720])


def test_postprocess_batches_and_ignores_padding_rows() -> None:
    rows = [[0, 0, 10, 10, 0.9], [0, 0, 10, 10, 0.8]]
    output = np.stack([_head(rows)[0], _head(rows)[0] * [1, 1, 1, 1, 0.5], np.full((2, 5), np.nan, np.float32)])
    results = postprocess([output], SPEC, [IDENTITY, IDENTITY])
    assert [len(d) for d in results] == [1, 1]
    np.testing.assert_allclose([results[0].confidence[0], results[1].confidence[0]], [0.9, 0.45])


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([np.zeros((1, 5, 4), np.float32)], r"4\+nc"),
        ([np.zeros((5, 6), np.float32)], r"4\+nc"),
        ([np.zeros((1, 5, 6)), np.zeros((1, 5, 6))], "1 output tensor"),
    ],
)
def test_malformed_shelfsight_outputs_are_refused(outputs: list[np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        postprocess(outputs, SPEC, [IDENTITY])


def test_formats_without_a_decoder_fail_with_the_available_list() -> None:
    assert "shelfsight" in DECODERS
    with pytest.raises(ManifestError, match=r"'ssd' has no decoder.*available: .*shelfsight"):
        get_decoder("ssd")


def test_a_registered_decoder_is_used_and_gets_the_input_size(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int] | None] = []

    def decode_transposed(outputs: list[np.ndarray], input_hw: tuple[int, int] | None) -> list:
        seen.append(input_hw)
        return [(image[:4].T, image[4:].T) for image in outputs[0]]  # [N, 4+nc, A], like yolov8's layout

    monkeypatch.setitem(DECODERS, "yolov8", decode_transposed)
    output = np.array([[[10, 200], [10, 200], [20, 220], [20, 220], [0.9, 0.1]]], np.float32)
    (dets,) = postprocess([output], OutputSpec(format="yolov8", names=["o"]), [IDENTITY], input_hw=(320, 320))
    assert seen == [(320, 320)]
    np.testing.assert_allclose(dets.xyxy, [[10, 10, 20, 20]])
