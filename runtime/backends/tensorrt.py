"""TensorRT backend (placeholder). ``tensorrt`` is imported when the backend is created, never at module import."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, model_path: str | Path) -> None:
        super().__init__(model_path)
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise BackendError(
                "TensorRT is not installed: install the [gpu] extra on a machine with an NVIDIA GPU, "
                "or use --backend onnxruntime"
            ) from None

    def _activate_impl(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        raise BackendError(f"{self.model_path}: the TensorRT backend is not implemented in this version yet")

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise BackendError("the TensorRT backend is not implemented in this version yet")

    def _deactivate_impl(self) -> None:
        pass
