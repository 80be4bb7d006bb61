"""A model nobody here trained: the public YOLOX-Nano ONNX on 20 real COCO photos, through describe + load_model,
against a straightforward reference decode of the same ONNX written out below (hand letterbox, plain loops,
cv2.dnn.NMSBoxes per class). Skipped when the shared data folder is absent (e.g. on a user's machine)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from shelfsight.runtime.compare import box_iou
from shelfsight.runtime.describe import describe_onnx
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.manifest import Manifest
from shelfsight.runtime.model import load_model
from shelfsight.runtime.preprocess import preprocess_frame

SHARED = Path(os.environ.get("SHELFSIGHT_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
MODELS = SHARED / "third-party-models"
ONNX = MODELS / "yolox_nano" / "yolox_nano.onnx"
COCO_NAMES = MODELS / "coco.names"
PHOTOS = MODELS / "coco_val2017_subset"
PUBLISHED_SHA256 = "e8af074932d4ed7e232278e3055cefcdea3edf178874a3694ae292649fb464dd"

CONF, IOU = 0.25, 0.5
SIZE = 416

pytestmark = pytest.mark.skipif(
    not (ONNX.is_file() and COCO_NAMES.is_file() and PHOTOS.is_dir()),
    reason=f"YOLOX-Nano test material not found under {MODELS} (set SHELFSIGHT_SHARED_DATA to the shared data folder)",
)


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    folder = tmp_path_factory.mktemp("yolox_nano")
    # Artifacts must live in the manifest's folder, and the loader follows symlinks, so the model is copied.
    shutil.copyfile(ONNX, folder / ONNX.name)
    manifest = describe_onnx(
        folder / ONNX.name, "yolox", COCO_NAMES, channel_order="BGR", pixel_scale=1.0,
        letterbox_align="top-left", pad_value=114,
    )  # fmt: skip
    return folder / "manifest.json", manifest


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    images = {path.name: cv2.imread(str(path)) for path in sorted(PHOTOS.glob("*.jpg"))}
    assert len(images) == 20 and all(image is not None for image in images.values())
    return {name: np.asarray(image) for name, image in images.items()}


def reference_letterbox(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """YOLOX's preproc, BGR kept, 0-255, pasted top-left on 114 gray; returns the tensor and the (x, y) scales.

    The picture size is rounded, as the manifest's letterbox contract says (YOLOX's demo truncates with int(), one
    pixel less on half of these photos), and boxes go back by the scale each axis really got (new size / old size)
    rather than by the single ratio, which would shift a box at the bottom of a 436-row photo by 0.6 px."""
    height, width = image.shape[:2]
    ratio = min(SIZE / height, SIZE / width)
    new_w, new_h = round(width * ratio), round(height * ratio)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return canvas.transpose(2, 0, 1)[None].astype(np.float32), (new_w / width, new_h / height)


def reference_detections(raw: np.ndarray, scale_xy: tuple[float, float], frame_hw: tuple[int, int]) -> Detections:
    """Decode one [3549, 85] YOLOX output anchor by anchor, then NMS class by class."""
    boxes: list[list[float]] = []
    scores: list[float] = []
    classes: list[int] = []
    row = 0
    for stride in (8, 16, 32):
        for cell_y in range(SIZE // stride):
            for cell_x in range(SIZE // stride):
                tx, ty, tw, th, objectness = raw[row, :5]
                best = int(np.argmax(raw[row, 5:]))
                score = float(objectness * raw[row, 5 + best])
                row += 1
                if score < CONF:
                    continue
                cx, cy = (tx + cell_x) * stride, (ty + cell_y) * stride
                w, h = np.exp(tw) * stride, np.exp(th) * stride
                boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                scores.append(score)
                classes.append(best)
    assert row == len(raw)
    kept: list[int] = []
    for class_id in sorted(set(classes)):
        members = [i for i, c in enumerate(classes) if c == class_id]
        xywh = [[boxes[i][0], boxes[i][1], boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]] for i in members]
        for k in np.asarray(cv2.dnn.NMSBoxes(xywh, [scores[i] for i in members], CONF, IOU)).reshape(-1):
            kept.append(members[int(k)])
    height, width = frame_hw
    xyxy = np.array([boxes[i] for i in kept], np.float64).reshape(-1, 4) / np.tile(scale_xy, 2)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    return Detections(xyxy.astype(np.float32), np.array([scores[i] for i in kept], np.float32), np.array(classes)[kept])


def test_describe_fills_in_the_published_model(described: tuple[Path, Manifest]) -> None:
    _, manifest = described
    assert manifest.artifacts[0].sha256 == PUBLISHED_SHA256
    assert manifest.input.name == "images" and manifest.input.shape == [1, 3, SIZE, SIZE]
    assert manifest.output.names == ["output"] and len(manifest.classes) == 80 and manifest.classes[0] == "person"


def test_runtime_matches_the_reference_decode_on_real_photos(
    described: tuple[Path, Manifest], photos: dict[str, np.ndarray]
) -> None:
    manifest_path, manifest = described
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    worst_iou, worst_score, total = 1.0, 0.0, 0
    found: set[str] = set()
    with load_model(manifest_path, threads=2, conf_threshold=CONF, iou_threshold=IOU) as detector:
        for name, image in photos.items():
            tensor, scale_xy = reference_letterbox(image)
            # The runtime's preprocessing is the same tensor, bit for bit.
            np.testing.assert_array_equal(preprocess_frame(image, manifest.input)[0], tensor[0], err_msg=name)
            expected = reference_detections(session.run(None, {"images": tensor})[0][0], scale_xy, image.shape[:2])
            got = detector.detect(image)
            assert len(got) == len(expected), f"{name}: runtime {len(got)} detections, reference {len(expected)}"
            ious = box_iou(got.xyxy, expected.xyxy)
            ious[got.class_id[:, None] != expected.class_id[None, :]] = 0.0
            for i in range(len(got)):  # greedy one-to-one, best score first
                j = int(np.argmax(ious[i]))
                assert ious[i, j] > 0.99, f"{name}: detection {i} ({got.class_id[i]}) has no twin, IoU {ious[i, j]}"
                assert abs(float(got.confidence[i]) - float(expected.confidence[j])) < 1e-3, name
                worst_iou = min(worst_iou, float(ious[i, j]))
                worst_score = max(worst_score, abs(float(got.confidence[i]) - float(expected.confidence[j])))
                ious[:, j] = 0.0
            total += len(got)
            found |= {manifest.classes[c] for c in got.class_id}
    print(f"\nYOLOX-Nano parity: {total} detections on {len(photos)} photos, min IoU {worst_iou:.6f}, "
          f"max |score diff| {worst_score:.2e}; classes found: {sorted(found)}")  # fmt: skip
    # Plausibility on real COCO photos: people and everyday objects, and plenty of them.
    assert total >= 40
    assert "person" in found
    assert len(found) >= 8
