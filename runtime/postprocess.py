"""Raw network outputs -> Detections in frame pixels: decode per output format, class-aware NMS, map back.

A decoder turns the model's output tensors into per-image candidates ``(xyxy in network-input pixels, per-class
scores in [0, 1])``; everything after that (threshold, NMS, max_det, letterbox inverse) is shared by all formats.
Adding a format (yolov8, yolov5, yolox) means writing one function and decorating it with ``@register_decoder``;
a decoder also gets the network input size (H, W), which grid heads such as YOLOX need to rebuild their anchors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import OutputSpec
from shelfsight.runtime.preprocess import LetterboxTransform

# (xyxy (A,4) float32 input pixels, class scores (A,nc) float32 in [0, 1]) for one image.
Candidates = tuple[np.ndarray, np.ndarray]
# decoder(outputs in manifest order, network input (H, W) or None when the caller does not know it)
Decoder = Callable[[Sequence[np.ndarray], tuple[int, int] | None], list[Candidates]]

DECODERS: dict[str, Decoder] = {}


def register_decoder(output_format: str) -> Callable[[Decoder], Decoder]:
    def register(decoder: Decoder) -> Decoder:
        DECODERS[output_format] = decoder
        return decoder

    return register


def get_decoder(output_format: str) -> Decoder:
    try:
        return DECODERS[output_format]
    except KeyError:
        raise ManifestError(
            f"output format '{output_format}' has no decoder in this runtime (available: {', '.join(sorted(DECODERS))})"
        ) from None


@register_decoder("shelfsight")
def decode_shelfsight(outputs: Sequence[np.ndarray], input_hw: tuple[int, int] | None = None) -> list[Candidates]:
    """ONE tensor [N, A, 4+nc]: x1,y1,x2,y2 in input pixels, then per-class scores (sigmoid already applied)."""
    if len(outputs) != 1:
        raise ValueError(f"'shelfsight' output format expects 1 output tensor, got {len(outputs)}")
    raw = np.asarray(outputs[0])
    if raw.ndim != 3 or raw.shape[2] < 5:
        raise ValueError(f"'shelfsight' output must be [N, A, 4+nc] with nc >= 1, got shape {raw.shape}")
    raw = raw.astype(np.float32, copy=False)
    return [(image[:, :4], image[:, 4:]) for image in raw]


def nms(xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float, max_det: int) -> np.ndarray:
    """Class-aware NMS; returns kept indices (int64), highest score first, at most ``max_det``."""
    if len(scores) == 0 or max_det <= 0:
        return np.zeros(0, np.int64)
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    xywh = np.empty_like(boxes)
    xywh[:, :2] = boxes[:, :2]
    # A degenerate box (x2 < x1) gets zero size rather than a negative area that would confuse the overlap test.
    np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None, out=xywh[:, 2:])
    # cv2's stubs say Sequence, but the binding reads numpy arrays directly, with no Python object per box.
    nms_batched: Any = cv2.dnn.NMSBoxesBatched
    kept = nms_batched(
        xywh,
        np.asarray(scores, np.float32).reshape(-1),
        np.asarray(class_ids, np.int32).reshape(-1),
        -np.inf,  # scores were thresholded by the caller; keep every candidate it passed in
        float(iou_threshold),
        1.0,
        int(max_det),
    )
    return np.asarray(kept, np.int64).reshape(-1)


def select(
    candidates: Candidates, transform: LetterboxTransform, conf_threshold: float, iou_threshold: float, max_det: int
) -> Detections:
    """Best class per candidate, confidence threshold, NMS, then back to frame pixels."""
    xyxy, class_scores = candidates
    class_id = np.argmax(class_scores, axis=1)
    confidence = np.take_along_axis(class_scores, class_id[:, None], axis=1)[:, 0]
    keep = confidence >= conf_threshold
    xyxy, confidence, class_id = xyxy[keep], confidence[keep], class_id[keep]
    order = nms(xyxy, confidence, class_id, iou_threshold, max_det)
    return Detections(transform.to_frame(xyxy[order]), confidence[order], class_id[order])


def postprocess(
    outputs: list[np.ndarray],
    output_spec: OutputSpec,
    transforms: list[LetterboxTransform],
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    max_det: int = 300,
    input_hw: tuple[int, int] | None = None,
) -> list[Detections]:
    """One Detections per transform, in frame pixels.

    ``outputs`` are in ``output_spec.names`` order. Batch rows past ``len(transforms)`` are ignored, which is how a
    fixed-batch model runs a partial chunk. ``input_hw`` is the network input (H, W), needed by grid-head formats.
    """
    per_image = get_decoder(output_spec.format)(outputs, input_hw)
    if len(per_image) < len(transforms):
        raise ValueError(f"model returned {len(per_image)} batch items for {len(transforms)} frames")
    return [
        select(candidates, transform, conf_threshold, iou_threshold, max_det)
        for candidates, transform in zip(per_image[: len(transforms)], transforms, strict=True)
    ]


# Last, because the third-party decoders register themselves through this module's register_decoder.
import shelfsight.runtime.decoders  # noqa: E402, F401
