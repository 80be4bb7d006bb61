"""COCO-style mAP50 / mAP50-95 and per-class AP50, computed by pycocotools from in-memory dicts.

``evaluate_detector`` takes any ``detect(frame_bgr) -> Detections`` callable, so the PyTorch model, the ONNX Runtime
model and later the INT8/TensorRT variants are scored by the same code on the same frames, in frame pixels.
Give the callable a low confidence threshold (``EVAL_CONF_THRESHOLD``) and ``max_det=EVAL_MAX_DET``: mAP integrates
over the whole precision/recall curve and is biased low by any threshold.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shelfsight.export.data import (
    DataSpec,
    LabelledImage,
    image_files,
    label_path_for,
    labelled_images,
    labels_to_xyxy,
    load_data_yaml,
    read_image,
    read_labels,
)
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ShelfSightError

EVAL_CONF_THRESHOLD = 0.001
EVAL_IOU_THRESHOLD = 0.6
EVAL_MAX_DET = 300


@dataclass(frozen=True)
class GroundTruth:
    """One image's boxes in frame pixels."""

    xyxy: np.ndarray
    class_id: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    map50: float
    map50_95: float
    per_class_ap50: dict[str, float]
    num_images: int
    num_instances: int
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fitness(self) -> float:
        """The single number checkpoints are ranked by (YOLO convention)."""
        return 0.1 * self.map50 + 0.9 * self.map50_95

    def as_metrics(self, validation_set: str | None = None) -> dict[str, Any]:
        """Fields of ``shelfsight.runtime.manifest.Metrics``."""
        return {
            "map50": round(self.map50, 5),
            "map50_95": round(self.map50_95, 5),
            "per_class_ap50": {k: round(v, 5) for k, v in self.per_class_ap50.items()},
            "validation_set": validation_set or self.split or None,
        }

    def summary(self) -> str:
        per_class = ", ".join(f"{name} {ap:.3f}" for name, ap in self.per_class_ap50.items())
        return (
            f"mAP50 {self.map50:.4f}  mAP50-95 {self.map50_95:.4f}  ({self.num_images} images, "
            f"{self.num_instances} boxes; AP50 per class: {per_class})"
        )


def _coco_ground_truth(ground_truth: Sequence[GroundTruth], num_classes: int) -> dict[str, Any]:
    annotations: list[dict[str, Any]] = []
    for image_id, gt in enumerate(ground_truth, start=1):
        xywh = np.asarray(gt.xyxy, np.float64).reshape(-1, 4).copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, cls in zip(xywh.tolist(), np.asarray(gt.class_id).tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i} for i in range(1, len(ground_truth) + 1)],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }


def _coco_detections(predictions: Sequence[Detections]) -> np.ndarray:
    """-> (K, 7) rows ``image_id, x, y, w, h, score, category_id`` (pycocotools' array form)."""
    rows = []
    for image_id, det in enumerate(predictions, start=1):
        if len(det) == 0:
            continue
        xywh = det.xyxy.astype(np.float64).copy()
        xywh[:, 2:] -= xywh[:, :2]
        rows.append(
            np.column_stack([np.full(len(det), image_id), xywh, det.confidence, det.class_id.astype(np.float64) + 1])
        )
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def coco_map(
    predictions: Sequence[Detections],
    ground_truth: Sequence[GroundTruth],
    class_names: Sequence[str],
    max_det: int = EVAL_MAX_DET,
    split: str = "",
) -> EvalResult:
    """mAP over images (``predictions[i]`` belongs to ``ground_truth[i]``); classes with no boxes are left out."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} images")
    num_instances = int(sum(len(gt.class_id) for gt in ground_truth))
    if num_instances == 0:
        raise ShelfSightError("cannot compute mAP: the ground truth has no boxes")
    detections = _coco_detections(predictions)
    if len(detections) == 0:
        present = _classes_present(ground_truth, class_names)
        zeros = {str(name): 0.0 for name, has in zip(class_names, present, strict=True) if has}
        return EvalResult(0.0, 0.0, zeros, len(ground_truth), num_instances, split)

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints progress on every call
        coco_gt = COCO()
        coco_gt.dataset = _coco_ground_truth(ground_truth, len(class_names))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision[T, R, K, area, maxDet]; read it directly rather than through summarize(), whose first line is
    # hard-wired to maxDets=100 and reports -1 once maxDets is raised to 300 for dense shelves.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    map50_95, map50 = _mean_valid(precision), _mean_valid(precision[0])
    per_class: dict[str, float] = {}
    for k, name in enumerate(class_names):
        if (precision[0, :, k] > -1).any():
            per_class[str(name)] = _mean_valid(precision[0, :, k])
    return EvalResult(map50, map50_95, per_class, len(ground_truth), num_instances, split)


def _mean_valid(precision: np.ndarray) -> float:
    """Mean over entries that exist (-1 marks a class without ground truth)."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def _classes_present(ground_truth: Sequence[GroundTruth], class_names: Sequence[str]) -> list[bool]:
    present = np.zeros(len(class_names), bool)
    for gt in ground_truth:
        present[np.asarray(gt.class_id, np.int64)] = True
    return present.tolist()


def evaluate_labelled(
    detect: Callable[[np.ndarray], Detections],
    items: Sequence[LabelledImage],
    class_names: list[str],
    progress: bool = False,
    split: str = "val",
    max_det: int = EVAL_MAX_DET,
) -> EvalResult:
    """COCO mAP over images of a mixed split: labels in dataset ids, and on each image the detections of classes
    its source does not label are dropped (an unlabelled product is not a false positive)."""
    predictions: list[Detections] = []
    ground_truth: list[GroundTruth] = []
    for item in tqdm(items, desc=f"eval {split}", unit="img", disable=not progress, leave=False):
        frame = read_image(item.path)
        xyxy, classes = labels_to_xyxy(item.labels, frame.shape[1], frame.shape[0])
        ground_truth.append(GroundTruth(xyxy, classes))
        detections = detect(frame)
        predictions.append(detections[item.class_mask[detections.class_id.astype(np.int64)] > 0])
    return coco_map(predictions, ground_truth, class_names, max_det=max_det, split=split)


def evaluate_detector(
    detect: Callable[[np.ndarray], Detections],
    data_yaml: str | Path | DataSpec,
    split: str = "val",
    limit: int | None = None,
    max_det: int = EVAL_MAX_DET,
    progress: bool = False,
) -> EvalResult:
    """Run ``detect`` on every image of a split (frame pixels in, frame pixels out) and score it with COCO mAP."""
    spec = data_yaml if isinstance(data_yaml, DataSpec) else load_data_yaml(data_yaml)
    if not spec.is_plain(split):  # remapped / partially labelled sources: score only what each source labels
        items = labelled_images(spec, split)
        items = items[:limit] if limit is not None else items
        return evaluate_labelled(detect, items, spec.names, progress, split=split, max_det=max_det)
    images = image_files(spec, split)[:limit] if limit is not None else image_files(spec, split)
    predictions: list[Detections] = []
    ground_truth: list[GroundTruth] = []
    for path in tqdm(images, desc=f"eval {split}", unit="img", disable=not progress, leave=False):
        frame = read_image(path)
        table = read_labels(label_path_for(path), spec.num_classes)
        xyxy, classes = labels_to_xyxy(table, frame.shape[1], frame.shape[0])
        ground_truth.append(GroundTruth(xyxy, classes))
        predictions.append(detect(frame))
    return coco_map(predictions, ground_truth, spec.names, max_det=max_det, split=split)
