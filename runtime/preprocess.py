"""Camera frame -> network input tensor, and the geometry to map boxes back to the frame.

``preprocess_frame`` is the single source of truth: training validation, calibration, the evaluator and the device
all turn frames into tensors through the code in this module, so a model never sees two kinds of input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from shelfsight.runtime.manifest import InputSpec


@dataclass(frozen=True)
class LetterboxTransform:
    """``input_px = frame_px * scale + pad``, per axis; ``frame_w``/``frame_h`` bound the way back."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    frame_w: int
    frame_h: int

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], np.float64)
        pad = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float64)
        return scale, pad

    def to_frame(self, xyxy_input_px: np.ndarray) -> np.ndarray:
        """Boxes in network-input pixels -> (N,4) float32 boxes in frame pixels, clipped to the frame."""
        scale, pad = self._affine()
        boxes = (np.asarray(xyxy_input_px, np.float64).reshape(-1, 4) - pad) / scale
        np.clip(boxes[:, 0::2], 0.0, self.frame_w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0.0, self.frame_h, out=boxes[:, 1::2])
        return boxes.astype(np.float32)

    def to_input(self, xyxy_frame_px: np.ndarray) -> np.ndarray:
        """Boxes in frame pixels -> (N,4) float32 boxes in network-input pixels (e.g. ground truth for training)."""
        scale, pad = self._affine()
        return (np.asarray(xyxy_frame_px, np.float64).reshape(-1, 4) * scale + pad).astype(np.float32)


def letterbox_geometry(frame_w: int, frame_h: int, input_spec: InputSpec) -> tuple[LetterboxTransform, int, int]:
    """The transform for a frame size plus the size (w, h) the frame is resized to before padding."""
    in_w, in_h = input_spec.width, input_spec.height
    if input_spec.resize == "resize":
        return LetterboxTransform(in_w / frame_w, in_h / frame_h, 0.0, 0.0, frame_w, frame_h), in_w, in_h
    ratio = min(in_w / frame_w, in_h / frame_h)
    new_w = min(in_w, max(1, round(frame_w * ratio)))
    new_h = min(in_h, max(1, round(frame_h * ratio)))
    if input_spec.letterbox_align == "center":
        pad_x, pad_y = (in_w - new_w) // 2, (in_h - new_h) // 2
    else:
        pad_x, pad_y = 0, 0
    # The exact per-axis ratio after rounding, so boxes map back without a sub-pixel drift.
    transform = LetterboxTransform(new_w / frame_w, new_h / frame_h, float(pad_x), float(pad_y), frame_w, frame_h)
    return transform, new_w, new_h


def _check_frame(frame: object) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {frame.dtype}")
    if frame.size == 0:
        raise ValueError(f"frame is empty (shape {frame.shape})")
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3))):
        raise ValueError(f"frame must be BGR HxWx3 or grayscale HxW, got shape {frame.shape}")
    return frame


class Preprocessor:
    """Reusable preprocessing for one input spec; every intermediate buffer is allocated once and reused.

    Not thread-safe: give each thread its own instance.
    """

    def __init__(self, input_spec: InputSpec) -> None:
        self.input_spec = input_spec
        height, width = input_spec.height, input_spec.width
        # Folded normalization: value = pixel * gain - offset, with gain = scale/std and offset = mean/std.
        std = np.asarray(input_spec.std, np.float64)
        self._gain = (input_spec.pixel_scale / std).astype(np.float32)
        self._offset = (np.asarray(input_spec.mean, np.float64) / std).astype(np.float32)
        self._subtract = bool(np.any(self._offset != 0))
        # Input channel c reads BGR plane _source[c].
        self._source = (2, 1, 0) if input_spec.channel_order == "RGB" else (0, 1, 2)
        self._canvas = np.empty((height, width, 3), np.uint8)
        self._planes = [np.empty((height, width), np.uint8) for _ in range(3)]
        self._gray_bgr = np.empty((0, 0, 3), np.uint8)
        self._geometry_for: tuple[int, int] | None = None
        self._geometry: tuple[LetterboxTransform, int, int] | None = None
        self._single = np.empty((1, 3, height, width), np.float32)
        self._batch = np.empty((0, 3, height, width), np.float32)

    def __call__(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, LetterboxTransform]:
        """One frame -> ((1,3,H,W) float32 reused buffer, transform). Copy the tensor if you keep it."""
        transform = self.fill(frame_bgr, self._single[0])
        return self._single, transform

    def batch(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxTransform]]:
        """Frames -> ((N,3,H,W) float32 reused buffer, transforms)."""
        if len(frames) != len(self._batch):
            self._batch = np.empty((len(frames), 3, self.input_spec.height, self.input_spec.width), np.float32)
        return self._batch, self.fill_batch(frames, self._batch)

    def fill_batch(self, frames: Sequence[np.ndarray], out: np.ndarray) -> list[LetterboxTransform]:
        """Write frames into the first ``len(frames)`` rows of a caller-owned (N,3,H,W) float32 array."""
        if len(frames) > len(out):
            raise ValueError(f"{len(frames)} frames do not fit a batch buffer of {len(out)}")
        return [self.fill(frame, out[i]) for i, frame in enumerate(frames)]

    def fill(self, frame_bgr: np.ndarray, out_chw: np.ndarray) -> LetterboxTransform:
        """Write one frame into a caller-owned (3,H,W) float32 array and return its transform."""
        frame = self._as_bgr(_check_frame(frame_bgr))
        transform, new_w, new_h = self._geometry_of(frame.shape[1], frame.shape[0])
        pad_x, pad_y = int(transform.pad_x), int(transform.pad_y)
        # The pad border was painted when the geometry last changed; only the picture area is rewritten.
        cv2.resize(
            frame,
            (new_w, new_h),
            dst=self._canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w],
            interpolation=cv2.INTER_LINEAR,
        )
        cv2.split(self._canvas, self._planes)
        for channel, source in enumerate(self._source):
            plane = out_chw[channel]
            np.multiply(self._planes[source], self._gain[channel], out=plane)
            if self._subtract:
                np.subtract(plane, self._offset[channel], out=plane)
        return transform

    def _geometry_of(self, frame_w: int, frame_h: int) -> tuple[LetterboxTransform, int, int]:
        if self._geometry_for != (frame_w, frame_h) or self._geometry is None:
            self._geometry = letterbox_geometry(frame_w, frame_h, self.input_spec)
            self._geometry_for = (frame_w, frame_h)
            self._canvas.fill(self.input_spec.pad_value)
        return self._geometry

    def _as_bgr(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim == 3 and frame.shape[2] == 3:
            # cv2 cannot read negative strides (e.g. a flipped view); contiguous frames pass through untouched.
            return frame if frame.strides[-1] > 0 and frame.strides[1] > 0 else np.ascontiguousarray(frame)
        gray = np.ascontiguousarray(frame.reshape(frame.shape[0], frame.shape[1]))
        if self._gray_bgr.shape[:2] != gray.shape:
            self._gray_bgr = np.empty((*gray.shape, 3), np.uint8)
        cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR, dst=self._gray_bgr)
        return self._gray_bgr


def preprocess_frame(frame_bgr: np.ndarray, input_spec: InputSpec) -> tuple[np.ndarray, LetterboxTransform]:
    """One frame -> (fresh (3,H,W) float32 array, transform). The reference path for every non-device user."""
    out = np.empty((3, input_spec.height, input_spec.width), np.float32)
    transform = Preprocessor(input_spec).fill(frame_bgr, out)
    return out, transform
