"""load_model end to end: manifest -> sha256 -> ONNX Runtime -> Detections in frame pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto
from tiny_onnx import write_model_folder

from shelfsight.runtime.backends.base import BackendError
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.model import STAGES, load_model

# Network input 64x64; boxes in input pixels.
BOXES = np.array(
    [
        [8, 16, 24, 48],  # class 0, 0.9
        [9, 16, 24, 48],  # class 0, 0.8: duplicate of the first -> NMS removes it
        [9, 16, 24, 48],  # class 1, 0.6: same place, other class -> kept
        [40, 40, 60, 60],  # class 1, 0.7: reaches below the picture -> clipped to the frame
        [0, 0, 64, 64],  # class 0, 0.1: under the confidence threshold
    ],
    np.float32,
)
SCORES = np.array([[0.9, 0.0], [0.8, 0.1], [0.2, 0.6], [0.1, 0.7], [0.1, 0.05]], np.float32)


def test_detect_gives_detections_in_frame_pixels(tmp_path: Path) -> None:
    detector = load_model(write_model_folder(tmp_path, BOXES, SCORES, classes=["product", "gap"]), threads=1)
    with detector:
        # 640x480 -> 64x48 picture, centred: pad_y = 8, scale 0.1.
        dets = detector.detect(np.zeros((480, 640, 3), np.uint8))
        np.testing.assert_allclose(dets.confidence, [0.9, 0.7, 0.6])
        assert dets.class_id.tolist() == [0, 1, 1]
        np.testing.assert_allclose(dets.xyxy, [[80, 80, 240, 400], [400, 320, 600, 480], [90, 80, 240, 400]])
        assert set(detector.stage_ns) == set(STAGES) and all(v > 0 for v in detector.stage_ns.values())
        assert detector.manifest.classes == ["product", "gap"]
        assert detector.model_sha256 == detector.manifest.artifacts[0].sha256
        # A grayscale frame of another size works too, and the same boxes map onto it.
        gray = detector.detect(np.zeros((64, 128), np.uint8))
        np.testing.assert_allclose(gray.xyxy[0], [16, 0, 48, 64])  # scale 0.5, pad_y 16
        with pytest.raises(ValueError, match="uint8"):
            detector.detect(np.zeros((480, 640, 3), np.float32))
    assert not detector.backend.is_active


def test_a_model_folder_works_as_the_manifest_path_and_nothing_found_is_empty(tmp_path: Path) -> None:
    write_model_folder(tmp_path, BOXES, SCORES)
    with load_model(tmp_path, conf_threshold=0.95) as detector:
        dets = detector.detect(np.zeros((480, 640, 3), np.uint8))
    assert len(dets) == 0 and dets.xyxy.shape == (0, 4)


@pytest.mark.parametrize(
    ("onnx_batch", "dynamic", "frames"),
    [(2, False, 5), (2, False, 2), (1, False, 3), (1, True, 4), (4, False, 1)],
    ids=["fixed2-x5", "fixed2-x2", "fixed1-x3", "dynamic-x4", "fixed4-x1"],
)
def test_detect_batch_keeps_frame_order(tmp_path: Path, onnx_batch: int, dynamic: bool, frames: int) -> None:
    manifest_path = write_model_folder(
        tmp_path,
        BOXES[:1],
        np.array([[1.0]], np.float32),
        input_shape=(onnx_batch, 3, 64, 64),
        dynamic_batch=dynamic,
        scores_follow_brightness=True,
    )
    # Square frames fill the input without padding, so each image's score is its brightness in [0, 1].
    levels = np.linspace(60, 250, frames).round().astype(np.uint8)
    images = [np.full((128, 128, 3), level, np.uint8) for level in levels]
    with load_model(manifest_path, conf_threshold=0.0) as detector:
        results = detector.detect_batch(images)
        assert detector.max_batch == (None if dynamic else onnx_batch)
    assert [len(r) for r in results] == [1] * frames
    np.testing.assert_allclose([r.confidence[0] for r in results], levels / 255.0, atol=1e-4)
    np.testing.assert_allclose(results[-1].xyxy, [[16, 32, 48, 96]])


def test_float16_input_models_are_fed_float16(tmp_path: Path) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES, input_dtype=TensorProto.FLOAT16)
    with load_model(manifest_path) as detector:
        assert detector.backend.input_meta["images"].dtype == np.float16
        assert len(detector.detect(np.zeros((64, 64, 3), np.uint8))) == 3


def _edit_manifest(path: Path, change: dict) -> None:
    document = json.loads(path.read_text())
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = document
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input.name": "pixels"}, r"manifest input 'pixels' but the model's inputs are \['images'\]"),
        ({"input.shape": [1, 3, 32, 32]}, r"shape \[1, 3, 32, 32\] does not match the model's \[1, 3, 64, 64\]"),
        ({"output.names": ["boxes"]}, r"manifest outputs \['boxes'\] but the model's outputs are \['output'\]"),
        ({"classes": ["a", "b", "c"]}, r"\[1, 5, 6\] does not match the manifest's \[1, \?, 7\]"),
        ({"output.format": "yolov8"}, "does not fit format 'yolov8'"),
    ],
    ids=["input-name", "input-shape", "output-name", "class-count", "format"],
)
def test_manifest_model_disagreements_name_both_sides(tmp_path: Path, change: dict, message: str) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES)
    _edit_manifest(manifest_path, change)
    with pytest.raises(ManifestError, match=message) as caught:
        load_model(manifest_path)
    assert "\n" not in str(caught.value)


def test_options_are_checked(tmp_path: Path) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES)
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        load_model(manifest_path, providers=["CUDAExecutionProvider"])
    with pytest.raises(BackendError, match="onnxruntime backend only"):
        load_model(manifest_path, backend="tensorrt", threads=2)
    with pytest.raises(ValueError, match="iou_threshold"):
        load_model(manifest_path, iou_threshold=0.0)


def test_tensorrt_backend_needs_an_engine_not_the_onnx_file(tmp_path: Path) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES)
    with pytest.raises(ManifestError, match=r"no TensorRT engine listed.*build-engine"):
        load_model(manifest_path, backend="tensorrt")
