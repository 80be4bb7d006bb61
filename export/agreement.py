"""Accuracy without labels: how well a quantized model agrees with its FP32 parent.

When a model comes without a labelled validation set (typically a third-party ONNX file), the INT8 gate scores
every variant against the FP32 model's own detections instead: the FP32 detections at a deployment-like
confidence (``PSEUDO_TRUTH_CONF``) on held-out images become the ground truth, and each variant's detections
(low threshold, as for any mAP) are scored against them with the same COCO mAP code as labelled data.
FP32 scored against itself is the ceiling: 1.0, or a little less when its own detections below the pseudo-truth
confidence (e.g. a second class on the same box) outrank pseudo-truth boxes; the report shows it. The figure measures
*agreement*, not accuracy: an FP32 mistake copied faithfully counts as agreement.

Held-out images: ``--agreement-data DIR`` when given; otherwise the images of the calibration source that were not
picked for calibration (calibrating and scoring on the same images would flatter the INT8 model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shelfsight.calibration.images import CalibrationImageSet, list_candidates, read_image
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import load_manifest

if TYPE_CHECKING:  # the evaluator pulls in the training-side data module: imported when scoring only
    from shelfsight.export.evaluate import EvalResult, GroundTruth

AGREEMENT_LABEL = "agreement with FP32 (no labels)"
PSEUDO_TRUTH_CONF = 0.25
FEW_IMAGES = 10  # below this the report warns that the agreement figure is coarse


@dataclass(frozen=True)
class AgreementSet:
    """The held-out images the agreement is measured on, and where they came from."""

    paths: tuple[Path, ...]
    source: Path
    held_out_from_calibration: bool
    overlap_with_calibration: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def notes(self) -> list[str]:
        notes = []
        if self.overlap_with_calibration:
            notes.append(
                f"{self.overlap_with_calibration} of the {len(self)} agreement images were also calibration images"
            )
        if len(self) < FEW_IMAGES:
            notes.append(f"only {len(self)} agreement image(s): the agreement figure is coarse")
        return notes


def agreement_images(
    calibration: CalibrationImageSet,
    agreement_data: Path | None,
    calib_split: str = "train",
    limit: int | None = None,
) -> AgreementSet:
    """The images to measure agreement on (sorted, so a run is reproducible); refuses when there are none."""
    used = {path.resolve() for path in calibration.paths}
    if agreement_data is not None:
        candidates = list_candidates(agreement_data, "val")
        paths = [p for p in candidates if read_image(p) is not None]
        if not paths:
            raise ShelfSightError(f"{agreement_data}: --agreement-data holds no readable image")
        chosen = paths[:limit] if limit else paths
        return AgreementSet(tuple(chosen), agreement_data, False, sum(p.resolve() in used for p in chosen))
    candidates = list_candidates(calibration.source, calib_split)
    held_out = [p for p in candidates if p.resolve() not in used and read_image(p) is not None]
    if not held_out:
        raise ShelfSightError(
            f"{calibration.source}: no labels (--val-data) and no held-out image to measure agreement with FP32 on: "
            f"all {len(calibration)} readable image(s) were used for calibration; lower --calib-images "
            "or give --agreement-data DIR"
        )
    return AgreementSet(tuple(held_out[:limit] if limit else held_out), calibration.source, True)


def pseudo_truth(
    fp32_manifest: Path, images: AgreementSet, conf: float = PSEUDO_TRUTH_CONF, threads: int = 2
) -> list[GroundTruth]:
    """The FP32 model's detections at ``conf`` on every agreement image, as ground truth."""
    from shelfsight.export.evaluate import EVAL_IOU_THRESHOLD, EVAL_MAX_DET, GroundTruth
    from shelfsight.runtime.model import load_model

    truth = []
    with load_model(
        fp32_manifest, threads=threads, conf_threshold=conf, iou_threshold=EVAL_IOU_THRESHOLD, max_det=EVAL_MAX_DET
    ) as detector:
        for path in images.paths:
            detections = detector.detect(_frame(path))
            truth.append(GroundTruth(detections.xyxy, detections.class_id))
    if not sum(len(t.class_id) for t in truth):
        raise ShelfSightError(
            f"{fp32_manifest}: the FP32 model detects nothing at confidence >= {conf} on the {len(images)} "
            f"agreement image(s) from {images.source}, so agreement cannot be measured; use images it detects "
            "objects in (--agreement-data DIR)"
        )
    return truth


def agreement_step(
    manifest_path: Path, images: AgreementSet, truth: list[GroundTruth], threads: int = 2
) -> EvalResult:
    """COCO mAP of one variant against the FP32 pseudo-truth (same images, same order)."""
    from shelfsight.export.evaluate import EVAL_CONF_THRESHOLD, EVAL_IOU_THRESHOLD, EVAL_MAX_DET, coco_map
    from shelfsight.runtime.model import load_model

    manifest = load_manifest(manifest_path)
    with load_model(
        manifest_path,
        threads=threads,
        conf_threshold=EVAL_CONF_THRESHOLD,
        iou_threshold=EVAL_IOU_THRESHOLD,
        max_det=EVAL_MAX_DET,
    ) as detector:
        predictions = [detector.detect(_frame(path)) for path in images.paths]
    return coco_map(predictions, truth, manifest.classes, split="agreement")


def _frame(path: Path) -> np.ndarray:
    frame = read_image(path)
    if frame is None:
        raise ShelfSightError(f"{path}: agreement image became unreadable")
    return frame


def describe(images: AgreementSet, truth: list[GroundTruth], conf: float) -> dict[str, object]:
    """What the report and the manifests say about the agreement measurement."""
    return {
        "mode": "agreement",
        "label": AGREEMENT_LABEL,
        "images": len(images),
        "source": str(images.source),
        "held_out_from_calibration": images.held_out_from_calibration,
        "overlap_with_calibration": images.overlap_with_calibration,
        "pseudo_truth_conf": conf,
        "pseudo_truth_boxes": int(sum(len(t.class_id) for t in truth)),
        "metric": "COCO mAP50 of each variant against the FP32 model's own detections (conf >= "
        f"{conf}) as ground truth; FP32 scored against itself is the ceiling (1.0 or a little less)",
    }
