"""Alert snapshots (topic ``snapshot/{alert_id}``): the frame as JPEG with the slot outlined, size-capped.

The cap matters on a metered store uplink and in the outbox byte budget: quality is lowered first
(cheap, keeps resolution), then the image is downscaled until the JPEG fits ``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from shelfsight.runtime.errors import ShelfSightError

DEFAULT_MAX_BYTES = 150_000
_MIN_SIDE_PX = 32


class SnapshotError(ShelfSightError):
    """The frame cannot be encoded within the size cap (or is not a BGR image)."""


def draw_slot(
    frame_bgr: np.ndarray,
    polygon: Sequence[Sequence[float]] | np.ndarray,
    *,
    label: str | None = None,
    color: tuple[int, int, int] = (0, 0, 255),
) -> np.ndarray:
    """A copy of ``frame_bgr`` with the slot polygon (frame pixels) outlined and optionally labelled."""
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise SnapshotError(f"snapshot needs a BGR uint8 HxWx3 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
    canvas = frame_bgr.copy()
    points = np.round(np.asarray(polygon, dtype=np.float64).reshape(-1, 2)).astype(np.int32)
    thickness = max(2, round(max(canvas.shape[:2]) / 400))
    cv2.polylines(canvas, [points], isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)
    if label:
        x, y = int(points[:, 0].min()), int(points[:, 1].min())
        scale = max(0.5, max(canvas.shape[:2]) / 1600)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        y = max(y, th + base + 2)
        cv2.rectangle(canvas, (x, y - th - base - 2), (x + tw + 4, y), color, cv2.FILLED)
        cv2.putText(canvas, label, (x + 2, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                    cv2.LINE_AA)
    return canvas


def encode_capped(
    image_bgr: np.ndarray,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    quality: int = 85,
    min_quality: int = 40,
    quality_step: int = 15,
    downscale: float = 0.75,
) -> bytes:
    """JPEG bytes no larger than ``max_bytes``: lower the quality down to ``min_quality``, then downscale."""
    qualities = [*range(quality, min_quality, -quality_step), min(quality, min_quality)]
    image = image_bgr
    while True:
        for q in qualities:
            ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                raise SnapshotError(f"JPEG encoding failed for a {image.shape} image")
            if buffer.size <= max_bytes:
                return buffer.tobytes()
        h, w = image.shape[:2]
        new_w, new_h = round(w * downscale), round(h * downscale)
        if min(new_w, new_h) < _MIN_SIDE_PX:
            raise SnapshotError(
                f"snapshot cannot fit in {max_bytes} bytes "
                f"(still {buffer.size} bytes at {w}x{h}, quality {min_quality})"
            )
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def render_snapshot(
    frame_bgr: np.ndarray,
    polygon: Sequence[Sequence[float]] | np.ndarray,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    label: str | None = None,
    quality: int = 85,
) -> bytes:
    """The snapshot payload of an alert: frame + slot outline, JPEG, at most ``max_bytes``."""
    return encode_capped(draw_slot(frame_bgr, polygon, label=label), max_bytes, quality=quality)
