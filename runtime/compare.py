"""Compare two sets of detections of the same frame (torch vs ONNX Runtime, FP32 vs INT8, backend vs backend)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shelfsight.runtime.detections import Detections


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N,4) and (M,4) xyxy boxes -> (N,M) float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    # Two identical zero-area boxes count as a perfect match rather than 0/0.
    same = np.all(a[:, None, :] == b[None, :, :], axis=2)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), same.astype(np.float64))


@dataclass(frozen=True)
class ComparisonResult:
    """Pairs are matched one-to-one by mutual best IoU within the same class."""

    pairs: np.ndarray  # (K, 2) int64 indices into (a, b)
    ious: np.ndarray  # (K,) IoU of each pair
    score_deltas: np.ndarray  # (K,) |confidence_a - confidence_b|
    unmatched_a: int
    unmatched_b: int
    iou_min: float
    score_atol: float

    @property
    def matched(self) -> int:
        return len(self.pairs)

    @property
    def worst_iou(self) -> float:
        """Lowest IoU among matched pairs (1.0 when there are none)."""
        return float(self.ious.min()) if len(self.ious) else 1.0

    @property
    def worst_score_delta(self) -> float:
        return float(self.score_deltas.max()) if len(self.score_deltas) else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.unmatched_a == 0
            and self.unmatched_b == 0
            and self.worst_iou >= self.iou_min
            and self.worst_score_delta <= self.score_atol
        )

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"{verdict}: {self.matched} matched, {self.unmatched_a}/{self.unmatched_b} unmatched (a/b), "
            f"worst IoU {self.worst_iou:.4f} (min {self.iou_min}), "
            f"worst score delta {self.worst_score_delta:.2e} (atol {self.score_atol:.0e})"
        )

    def __str__(self) -> str:
        return self.summary()


def compare_detections(
    a: Detections, b: Detections, iou_min: float = 0.99, score_atol: float = 1e-3
) -> ComparisonResult:
    """Match ``a`` to ``b`` and report the worst disagreement; ``.ok`` says whether it is within tolerance."""
    iou = box_iou(a.xyxy, b.xyxy)
    iou[a.class_id[:, None] != b.class_id[None, :]] = 0.0
    if iou.size:
        best_b = iou.argmax(axis=1)
        best_a = iou.argmax(axis=0)
        rows = np.arange(len(a))
        # Mutual best and overlapping: after NMS, same-class boxes barely overlap, so this is unambiguous.
        mutual = (best_a[best_b] == rows) & (iou[rows, best_b] > 0)
        pairs = np.stack([rows[mutual], best_b[mutual]], axis=1).astype(np.int64)
    else:
        pairs = np.zeros((0, 2), np.int64)
    ious = iou[pairs[:, 0], pairs[:, 1]]
    deltas = np.abs(a.confidence[pairs[:, 0]].astype(np.float64) - b.confidence[pairs[:, 1]])
    return ComparisonResult(
        pairs=pairs,
        ious=ious,
        score_deltas=deltas,
        unmatched_a=len(a) - len(pairs),
        unmatched_b=len(b) - len(pairs),
        iou_min=iou_min,
        score_atol=score_atol,
    )
