"""The calibration stream ONNX Runtime's calibrators consume, built on the runtime's own preprocessing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from shelfsight.calibration.images import CalibrationDataError, CalibrationImageSet, read_image
from shelfsight.runtime.manifest import InputSpec
from shelfsight.runtime.preprocess import preprocess_frame


def preprocessing_spec(input_spec: InputSpec) -> dict[str, object]:
    """The part of the input spec that changes the tensors; the input name does not."""
    return input_spec.model_dump(mode="json", exclude={"name"})


def calibration_digest(image_set: CalibrationImageSet, input_spec: InputSpec) -> str:
    """sha256 over the sorted image hashes and the preprocessing spec: same images + same spec = same tensors."""
    digest = hashlib.sha256()
    for sha in sorted(image.sha256 for image in image_set.images):
        digest.update(sha.encode("ascii"))
        digest.update(b"\n")
    digest.update(json.dumps(preprocessing_spec(input_spec), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


class ImageCalibrationReader(CalibrationDataReader):
    """Rewindable ``{input_name: (1,3,H,W) float32}`` stream over an image set.

    Images are decoded and preprocessed on demand (300 images at 640x640 would be 1.5 GB of float tensors), with
    ``shelfsight.runtime.preprocess.preprocess_frame`` so calibration sees exactly what the device will feed.
    """

    def __init__(self, image_set: CalibrationImageSet, input_spec: InputSpec, input_name: str | None = None) -> None:
        if input_spec.shape[0] != 1:
            raise CalibrationDataError(f"calibration feeds batch 1, but the model input shape is {input_spec.shape}")
        self.image_set = image_set
        self.input_spec = input_spec
        self.input_name = input_name or input_spec.name
        self._position = 0

    def __len__(self) -> int:
        return len(self.image_set)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self.image_set):
            return None
        path = self.image_set.images[self._position].path
        self._position += 1
        frame = read_image(path)
        if frame is None:
            # It decoded when the set was chosen; a file changed underneath us would silently skew the ranges.
            raise CalibrationDataError(f"{path}: calibration image became unreadable after it was selected")
        tensor, _ = preprocess_frame(frame, self.input_spec)
        return {self.input_name: tensor[np.newaxis]}

    def rewind(self) -> None:
        self._position = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        raise NotImplementedError("strided calibration is not used: the reader streams one image at a time")
