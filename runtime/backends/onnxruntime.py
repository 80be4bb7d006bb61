"""ONNX Runtime backend. ``onnxruntime`` is imported on activation only.

ORT quietly falls back to the CPU when an accelerator provider cannot start (missing CUDA libraries, wrong build);
a device that believes it runs on a GPU while it runs on the CPU is worse than one that refuses to start, so the
providers the session actually got are compared with the ones asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


def _flag(value: bool) -> str:
    return "True" if value else "False"


class CudaProviderOptions(BaseModel):
    """ONNX Runtime's CUDA execution provider. Not run on real hardware yet: built and checked on CPU machines only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    provider: ClassVar[str] = CUDA_PROVIDER

    device_id: int = Field(0, ge=0)
    # EXHAUSTIVE benchmarks every cuDNN algorithm once per shape: slow first frame, fastest after; fixed-size inputs
    # make that the right default on a camera device.
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"

    def as_provider(self) -> tuple[str, dict[str, str]]:
        return self.provider, {"device_id": str(self.device_id), "cudnn_conv_algo_search": self.cudnn_conv_algo_search}


class TensorRTProviderOptions(BaseModel):
    """ONNX Runtime's TensorRT execution provider. Not run on real hardware yet: built and checked on CPU machines only.

    Building a TensorRT engine takes minutes on a small GPU, so a device should cache it: ``engine_cache_path`` is
    required when caching is on (ORT's default, the working directory, is often read-only or shared). ORT keys its
    cache by model and GPU, but not by our manifest, so give each model its own folder. ``int8`` is for Q/DQ models
    (explicit quantization) or with a calibration table; ``fp16`` lets TensorRT pick half-precision kernels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    provider: ClassVar[str] = TENSORRT_PROVIDER

    device_id: int = Field(0, ge=0)
    engine_cache_enable: bool = True
    engine_cache_path: Path | None = None
    fp16: bool = False
    int8: bool = False

    @model_validator(mode="after")
    def _cache_has_a_home(self) -> TensorRTProviderOptions:
        if self.engine_cache_enable and self.engine_cache_path is None:
            raise ValueError("engine_cache_enable needs engine_cache_path (a folder for this model's TensorRT engines)")
        return self

    def as_provider(self) -> tuple[str, dict[str, str]]:
        options = {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": _flag(self.engine_cache_enable),
            "trt_fp16_enable": _flag(self.fp16),
            "trt_int8_enable": _flag(self.int8),
        }
        if self.engine_cache_path is not None:
            options["trt_engine_cache_path"] = str(self.engine_cache_path)
        return self.provider, options


ProviderOptions = CudaProviderOptions | TensorRTProviderOptions
ProviderRequest = str | tuple[str, dict[str, Any]] | ProviderOptions


def gpu_providers(
    tensorrt: TensorRTProviderOptions | None = None, cuda: CudaProviderOptions | None = None, cpu: bool = True
) -> list[ProviderRequest]:
    """Providers in ORT's priority order: TensorRT, then CUDA for the nodes TensorRT does not take, then the CPU.

    Every provider in the list must start (``OnnxRuntimeBackend`` refuses a silent fallback), so leave one out
    rather than listing it "just in case".
    """
    chain: list[ProviderRequest] = [options for options in (tensorrt, cuda) if options is not None]
    if cpu:
        chain.append(CPU_PROVIDER)
    return chain


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
    ort_form = _as_ort_provider(request)
    return ort_form if isinstance(ort_form, str) else str(ort_form[0])


def _as_ort_provider(request: ProviderRequest) -> Any:
    """What ``InferenceSession(providers=...)`` takes: a name or a (name, options) pair."""
    if isinstance(request, (CudaProviderOptions, TensorRTProviderOptions)):
        return request.as_provider()
    return request


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
            session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=[_as_ort_provider(p) for p in self.providers]
            )
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
