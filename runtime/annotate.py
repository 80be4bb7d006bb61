"""Draw detections on a frame (snapshots, debug video, the calibration preview)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from shelfsight.runtime.detections import Detections


def class_colors(count: int) -> np.ndarray:
    """``count`` well separated BGR colours (uint8, (count, 3)); class ``i`` always gets row ``i``."""
    hues = (np.arange(count) * 0.618033988749895 * 180.0) % 180.0  # golden-ratio steps spread hues evenly
    hsv = np.stack([hues, np.full(count, 200.0), np.full(count, 230.0)], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]


def _text_color(bgr: np.ndarray) -> tuple[int, int, int]:
    luma = 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_detections(
    frame: np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
    *,
    thickness: int = 2,
    font_scale: float = 0.5,
    show_labels: bool = True,
    copy: bool = False,
) -> np.ndarray:
    """Draw boxes in class colours with ``name 0.87`` labels; draws in place unless ``copy``; returns the image."""
    canvas = frame.copy() if copy else frame
    if len(detections) == 0:
        return canvas
    colors = class_colors(max(len(class_names), int(detections.class_id.max()) + 1))
    corners = np.rint(detections.xyxy).astype(np.int32)
    # Each box as a closed 4-point polygon, so one polylines call draws every box of a class.
    polygons = corners[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    for class_id in np.unique(detections.class_id):
        members = detections.class_id == class_id
        color = tuple(int(c) for c in colors[class_id])
        cv2.polylines(canvas, list(polygons[members]), True, color, thickness, cv2.LINE_AA)
    if not show_labels:
        return canvas
    font = cv2.FONT_HERSHEY_SIMPLEX
    # OpenCV has no batched text call; labels are drawn one by one, which is why annotation is off the hot path.
    for (x1, y1, _, _), class_id, confidence in zip(corners, detections.class_id, detections.confidence, strict=True):
        name = class_names[class_id] if 0 <= class_id < len(class_names) else f"class {class_id}"
        label = f"{name} {confidence:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, 1)
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        color = colors[class_id]
        cv2.rectangle(
            canvas, (x1, top), (x1 + text_w + 2, top + text_h + baseline + 2), tuple(int(c) for c in color), -1
        )
        cv2.putText(canvas, label, (x1 + 1, top + text_h + 1), font, font_scale, _text_color(color), 1, cv2.LINE_AA)
    return canvas
