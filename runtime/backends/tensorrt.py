"""Native TensorRT engine runner (TensorRT 10 name-based tensor API). Not run on real hardware yet.

Written against the TensorRT 10 Python API and NVIDIA's cuda-python runtime bindings, and tested only against a
fake of both (tests/runtime/test_tensorrt_backend.py): the build machines have no GPU and TensorRT's wheels are
not installable there. Treat the first run on a Jetson or a dGPU as the first real test.

Device memory and the stream come from **cuda-python** (``cuda.bindings.runtime``, or ``cuda.cudart`` before
cuda-python 12.6) rather than torch or pycuda: it is NVIDIA's own thin binding, small enough for a device image,
and needs no CUDA context juggling. Both ``tensorrt`` and ``cuda`` are imported when the backend is created, never
when this module is imported.

One inference: set the input shapes (dynamic engines only) -> copy inputs host to device -> bind every tensor
address (only when a buffer moved) -> ``execute_async_v3`` on the backend's stream -> copy outputs device to host
-> synchronize. Device buffers grow when a larger shape arrives and are reused otherwise; output arrays are fresh
per call, because the caller may keep them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta

MIN_TENSORRT_MAJOR = 10


def import_tensorrt() -> Any:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise BackendError(
            "TensorRT is not installed: install the [gpu] extra on a machine with an NVIDIA GPU, "
            "or use --backend onnxruntime"
        ) from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        raise BackendError(
            f"TensorRT {trt.__version__} found; this backend needs TensorRT {MIN_TENSORRT_MAJOR} or newer "
            "(name-based tensor I/O, execute_async_v3)"
        )
    return trt


def import_cuda_runtime() -> Any:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise BackendError(
        "cuda-python is not installed (pip install cuda-python): the TensorRT backend uses it for device memory"
    )


@dataclass
class _DeviceBuffer:
    pointer: int = 0
    nbytes: int = 0


def _capture_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps the last error, so a failed load can say why in one line."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.last_error = str(msg).strip().splitlines()[0] if str(msg).strip() else ""

    return CapturingLogger()


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine (``.engine``/``.plan``) built for this GPU and TensorRT version."""

    name = "tensorrt"

    def __init__(self, model_path: str | Path, device_id: int = 0) -> None:
        super().__init__(model_path)
        if device_id < 0:
            raise BackendError(f"device_id must be >= 0, got {device_id}")
        self.device_id = device_id
        self._trt = import_tensorrt()
        self._cudart = import_cuda_runtime()
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._bound: dict[str, int] = {}
        self._set_shapes: dict[str, tuple[int, ...]] = {}
        self._dynamic_inputs: set[str] = set()

    # --- CUDA runtime calls: every one returns (error, *results) -----------------------------------------------------
    def _cuda(self, call: str, *args: Any) -> Any:
        cudart = self._cudart
        result = getattr(cudart, call)(*args)
        error, values = result[0], result[1:]
        if error != cudart.cudaError_t.cudaSuccess:
            name = cudart.cudaGetErrorName(error)[1]
            text = name.decode() if isinstance(name, bytes) else str(name)
            raise BackendError(f"{self.model_path.name}: CUDA {call} failed: {text}")
        return values[0] if len(values) == 1 else (values or None)

    # --- Backend implementation -----------------------------------------------------------------------------------
    def _activate_impl(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        if not self.model_path.is_file():
            raise BackendError(f"{self.model_path}: engine file not found")
        trt = self._trt
        try:
            self._cuda("cudaSetDevice", self.device_id)
            self._logger = _capture_logger(trt)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.model_path.read_bytes())
            if self._engine is None:
                reason = self._logger.last_error or "see the TensorRT log"
                raise BackendError(
                    f"{self.model_path}: TensorRT cannot deserialize the engine ({reason}); engines only load on the "
                    "GPU model and TensorRT version that built them: rebuild it with export-model build-engine"
                )
            inputs, outputs = self._discover_io()
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"{self.model_path}: TensorRT could not create an execution context (GPU memory?)")
            self._stream = self._cuda("cudaStreamCreate")
        except BaseException:
            self._release()
            raise
        return inputs, outputs

    def _discover_io(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        trt, engine = self._trt, self._engine
        inputs: dict[str, TensorMeta] = {}
        outputs: dict[str, TensorMeta] = {}
        for index in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(index)
            if engine.get_tensor_location(tensor) != trt.TensorLocation.DEVICE:
                raise BackendError(
                    f"{self.model_path.name}: tensor '{tensor}' lives on the host (shape tensor); not supported"
                )
            trt_dtype = engine.get_tensor_dtype(tensor)
            try:
                dtype = np.dtype(trt.nptype(trt_dtype))
            except TypeError:
                raise BackendError(
                    f"{self.model_path.name}: tensor '{tensor}' has type {trt_dtype}, which numpy cannot hold"
                ) from None
            shape = tuple(int(d) for d in engine.get_tensor_shape(tensor))
            meta = TensorMeta(tensor, tuple(d if d >= 0 else None for d in shape), dtype)
            if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                inputs[tensor] = meta
                if any(d < 0 for d in shape):
                    self._dynamic_inputs.add(tensor)
            else:
                outputs[tensor] = meta
        if not inputs or not outputs:
            raise BackendError(f"{self.model_path.name}: engine has {len(inputs)} inputs and {len(outputs)} outputs")
        return inputs, outputs

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, copy_kind = self._context, self._cudart.cudaMemcpyKind
        hosts = {name: np.ascontiguousarray(feed[name]) for name in self._input_meta}
        for name, array in hosts.items():
            if name in self._dynamic_inputs:
                self._set_input_shape(name, array.shape)
            buffer = self._device_buffer(name, array.nbytes)
            self._cuda(
                "cudaMemcpyAsync",
                buffer.pointer,
                array.ctypes.data,
                array.nbytes,
                copy_kind.cudaMemcpyHostToDevice,
                self._stream,
            )
        results: dict[str, np.ndarray] = {}
        for name, meta in self._output_meta.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.model_path.name}: output '{name}' has a data-dependent shape {shape}")
            results[name] = np.empty(shape, meta.dtype)
            self._device_buffer(name, results[name].nbytes)
        for name, buffer in self._buffers.items():
            if self._bound.get(name) != buffer.pointer:
                if not context.set_tensor_address(name, buffer.pointer):
                    raise BackendError(f"{self.model_path.name}: TensorRT refused the address of tensor '{name}'")
                self._bound[name] = buffer.pointer
        if not context.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self.model_path.name}: TensorRT execute_async_v3 failed")
        for name, array in results.items():
            self._cuda(
                "cudaMemcpyAsync",
                array.ctypes.data,
                self._buffers[name].pointer,
                array.nbytes,
                copy_kind.cudaMemcpyDeviceToHost,
                self._stream,
            )
        # Until this returns, the device may still read the input arrays and write the outputs.
        self._cuda("cudaStreamSynchronize", self._stream)
        return results

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._set_shapes.get(name) == shape:
            return
        low, _, high = (tuple(int(d) for d in dims) for dims in self._engine.get_tensor_profile_shape(name, 0))
        if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
            raise BackendError(
                f"{self.model_path.name}: input '{name}' shape {shape} is outside the engine's optimization profile "
                f"(min {low}, max {high}); rebuild the engine for this size"
            )
        if not self._context.set_input_shape(name, shape):
            raise BackendError(f"{self.model_path.name}: TensorRT refused shape {shape} for input '{name}'")
        self._set_shapes[name] = shape

    def _device_buffer(self, name: str, nbytes: int) -> _DeviceBuffer:
        """The tensor's device buffer, grown (never shrunk) to hold ``nbytes``."""
        buffer = self._buffers.setdefault(name, _DeviceBuffer())
        if buffer.nbytes < nbytes:
            if buffer.pointer:
                self._cuda("cudaFree", buffer.pointer)
                buffer.pointer, buffer.nbytes = 0, 0
            buffer.pointer = int(self._cuda("cudaMalloc", max(nbytes, 1)))
            buffer.nbytes = nbytes
        return buffer

    def _deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free device memory and the stream, then drop TensorRT objects context-first; the first error wins."""
        errors: list[BackendError] = []
        for buffer in self._buffers.values():
            if buffer.pointer:
                try:
                    self._cuda("cudaFree", buffer.pointer)
                except BackendError as exc:
                    errors.append(exc)
        self._buffers.clear()
        self._bound.clear()
        self._set_shapes.clear()
        self._dynamic_inputs.clear()
        if self._stream is not None:
            try:
                self._cuda("cudaStreamDestroy", self._stream)
            except BackendError as exc:
                errors.append(exc)
            self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None
        if errors:
            raise errors[0]
