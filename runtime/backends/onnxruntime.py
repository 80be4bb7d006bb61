"""ONNX Runtime backend. ``onnxruntime`` is imported on activation only.

ORT quietly falls back to the CPU when an accelerator provider cannot start (missing CUDA libraries, wrong build);
a device that believes it runs on a GPU while it runs on the CPU is worse than one that refuses to start, so the
providers the session actually got are compared with the ones asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta

ProviderRequest = str | tuple[str, dict[str, Any]]

CPU_PROVIDER = "CPUExecutionProvider"

_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}

_OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _provider_name(request: ProviderRequest) -> str:
    return request if isinstance(request, str) else request[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _meta(node: Any) -> TensorMeta:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise BackendError(f"tensor '{node.name}' has type {node.type}, which this runtime does not feed")
    return TensorMeta(node.name, shape, dtype)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[ProviderRequest] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = 1,
        graph_optimization: str = "all",
    ) -> None:
        super().__init__(model_path)
        if graph_optimization not in _OPTIMIZATION_LEVELS:
            raise BackendError(
                f"graph_optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}, got '{graph_optimization}'"
            )
        for threads in (intra_op_threads, inter_op_threads):
            if threads is not None and threads < 0:
                raise BackendError(f"thread counts must be >= 0 (0 = onnxruntime default), got {threads}")
        self.providers: list[ProviderRequest] = list(providers) if providers else [CPU_PROVIDER]
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        self.active_providers: list[str] = []
        self._session: Any = None
        self._output_names: list[str] = []

    def _activate_impl(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f"onnxruntime is not installed: {exc}") from None

        requested = [_provider_name(p) for p in self.providers]
        available = ort.get_available_providers()
        unavailable = [p for p in requested if p not in available]
        if unavailable:
            raise BackendError(
                f"{self.model_path.name}: execution provider(s) {', '.join(unavailable)} requested but this "
                f"onnxruntime build only offers {', '.join(available)}"
            )
        if not self.model_path.is_file():
            raise BackendError(f"{self.model_path}: model file not found")

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[self.graph_optimization]
        )
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own pybind exception types for protobuf/graph/provider errors
            raise BackendError(f"{self.model_path}: onnxruntime cannot load the model: {_first_line(exc)}") from None

        self.active_providers = list(session.get_providers())
        fallen_back = [p for p in requested if p not in self.active_providers]
        if fallen_back:
            raise BackendError(
                f"{self.model_path.name}: requested execution provider(s) {', '.join(fallen_back)} did not start; "
                f"the session would run on {', '.join(self.active_providers)}"
            )
        self._session = session
        inputs = {node.name: _meta(node) for node in session.get_inputs()}
        outputs = {node.name: _meta(node) for node in session.get_outputs()}
        self._output_names = list(outputs)
        return inputs, outputs

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, results, strict=True))

    def _deactivate_impl(self) -> None:
        self._session = None
