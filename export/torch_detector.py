"""The PyTorch eager reference detector: the runtime's own preprocessing and postprocessing around the torch model.

Only the inference step differs from ``shelfsight.runtime.model.Detector``, so comparing the two isolates the
exported graph (and later INT8 quantization) from everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shelfsight.export.model import Detector, input_spec_for, load_checkpoint, output_spec_for
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.postprocess import postprocess
from shelfsight.runtime.preprocess import LetterboxTransform, preprocess_frame


class TorchDetector:
    """``detect(frame_bgr) -> Detections`` in frame pixels, with a PyTorch model in eval mode on the CPU."""

    def __init__(
        self,
        model: Detector,
        class_names: Sequence[str],
        imgsz: int,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        max_det: int = 300,
    ) -> None:
        self.model = model.eval()
        self.class_names = list(class_names)
        self.input_spec = input_spec_for(imgsz)
        self.output_spec = output_spec_for()
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_det = max_det

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        imgsz: int | None = None,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        max_det: int = 300,
    ) -> TorchDetector:
        model, meta = load_checkpoint(path)
        return cls(model, meta.class_names, imgsz or meta.imgsz, conf_threshold, iou_threshold, max_det)

    def preprocess(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxTransform]]:
        """Frames -> ((N,3,H,W) float32 network input, letterbox transforms), via the runtime's preprocessing."""
        tensors, transforms = zip(*(preprocess_frame(frame, self.input_spec) for frame in frames), strict=True)
        return np.stack(tensors), list(transforms)

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N,3,H,W) float32 -> the model's [N, A, 4+nc] output."""
        output = self.model(torch.from_numpy(batch))
        assert isinstance(output, torch.Tensor), "model must be in eval mode"
        return output.numpy()

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        if not frames:
            return []
        batch, transforms = self.preprocess(frames)
        output = self.infer(batch)
        return postprocess(
            [output], self.output_spec, transforms, self.conf_threshold, self.iou_threshold, self.max_det
        )

    def detect(self, frame: np.ndarray) -> Detections:
        return self.detect_batch([frame])[0]

    __call__ = detect
