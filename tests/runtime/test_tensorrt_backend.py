"""The TensorRT backend's logic against FakeTensorRT and FakeCudaRuntime (no GPU here); one real-GPU test, skipped.

The fakes implement just the TensorRT 10 / cuda-python surface the backend uses. Device memory is real host memory
(numpy buffers addressed by their pointer), so a value only reaches the output if the backend copied the input to
the right buffer, bound the right address and copied the result back: the data flow is tested, not only the calls.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from shelfsight.runtime.backends.base import BackendError, create_backend
from shelfsight.runtime.backends.tensorrt import TensorRTBackend
from shelfsight.runtime.manifest import InputSpec, Manifest, OutputSpec, artifact_for, write_manifest
from shelfsight.runtime.model import load_model


# --- FakeCudaRuntime: cuda.bindings.runtime ----------------------------------------------------------------------
class cudaError_t(Enum):
    cudaSuccess = 0
    cudaErrorInvalidDevice = 101
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


@dataclass
class FakeStream:
    handle: int

    def __int__(self) -> int:
        return self.handle


@dataclass
class FakeCudaRuntime:
    calls: list[tuple]
    memory: dict[int, np.ndarray] = field(default_factory=dict)
    streams: set[int] = field(default_factory=set)
    device_count: int = 1
    fail_malloc: bool = False

    def module(self) -> types.ModuleType:
        module = types.ModuleType("cuda.bindings.runtime")
        module.cudaError_t = cudaError_t  # type: ignore[attr-defined]
        module.cudaMemcpyKind = cudaMemcpyKind  # type: ignore[attr-defined]
        for name in ("cudaSetDevice", "cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaStreamCreate",
                     "cudaStreamSynchronize", "cudaStreamDestroy", "cudaGetErrorName"):  # fmt: skip
            setattr(module, name, getattr(self, name))
        return module

    def cudaSetDevice(self, device: int) -> tuple:
        self.calls.append(("cudaSetDevice", device))
        return (cudaError_t.cudaSuccess if device < self.device_count else cudaError_t.cudaErrorInvalidDevice,)

    def cudaMalloc(self, nbytes: int) -> tuple:
        self.calls.append(("cudaMalloc", nbytes))
        if self.fail_malloc:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        block = np.zeros(nbytes, np.uint8)
        self.memory[block.ctypes.data] = block
        return cudaError_t.cudaSuccess, block.ctypes.data

    def cudaFree(self, pointer: int) -> tuple:
        self.calls.append(("cudaFree", pointer))
        del self.memory[pointer]
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: FakeStream) -> tuple:
        self.calls.append(("cudaMemcpyAsync", kind.name))
        device = dst if kind is cudaMemcpyKind.cudaMemcpyHostToDevice else src
        assert device in self.memory and self.memory[device].nbytes >= nbytes, "copy outside a device buffer"
        assert int(stream) in self.streams
        ctypes.memmove(dst, src, nbytes)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple:
        self.calls.append(("cudaStreamCreate",))
        stream = FakeStream(1000 + len(self.streams))
        self.streams.add(stream.handle)
        return cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(self, stream: FakeStream) -> tuple:
        self.calls.append(("cudaStreamSynchronize",))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: FakeStream) -> tuple:
        self.calls.append(("cudaStreamDestroy",))
        self.streams.remove(int(stream))
        return (cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, error: cudaError_t) -> tuple:
        return cudaError_t.cudaSuccess, error.name.encode()

    def device_array(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.memory[pointer][: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


# --- FakeTensorRT: tensorrt ----------------------------------------------------------------------------------------
class TensorIOMode(Enum):
    INPUT = 1
    OUTPUT = 2


class TensorLocation(Enum):
    DEVICE = 0
    HOST = 1


class DataType(Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7


class Severity(Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        raise NotImplementedError


def nptype(dtype: DataType) -> type:
    table = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}
    if dtype not in table:
        raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype: {dtype}")
    return table[dtype]


@dataclass
class FakeTensor:
    name: str
    mode: TensorIOMode
    shape: tuple[int, ...]
    dtype: DataType = DataType.FLOAT
    location: TensorLocation = TensorLocation.DEVICE
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


@dataclass
class FakeEngine:
    """``compute(inputs) -> outputs`` stands for the network; ``output_shapes(input shapes)`` for shape inference."""

    tensors: list[FakeTensor]
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    output_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]
    cuda: FakeCudaRuntime
    execute_ok: bool = True

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def _tensor(self, name: str) -> FakeTensor:
        return next(t for t in self.tensors if t.name == name)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index].name

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensor(name).mode

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensor(name).dtype

    def get_tensor_location(self, name: str) -> TensorLocation:
        return self._tensor(name).location

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        assert profile == 0
        shapes = self._tensor(name).profile
        assert shapes is not None, f"{name} has no optimization profile"
        return shapes

    def create_execution_context(self) -> FakeContext:
        self.cuda.calls.append(("create_execution_context",))
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.calls = engine.cuda.calls
        self.shapes = {t.name: t.shape for t in engine.tensors if t.mode is TensorIOMode.INPUT}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append(("set_input_shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        return self.engine.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.calls.append(("set_tensor_address", name))
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute_async_v3", stream))
        assert isinstance(stream, int) and stream in self.engine.cuda.streams
        if not self.engine.execute_ok:
            return False
        cuda, dtypes = self.engine.cuda, {t.name: np.dtype(nptype(t.dtype)) for t in self.engine.tensors}
        inputs = {
            name: cuda.device_array(self.addresses[name], shape, dtypes[name]).copy()
            for name, shape in self.shapes.items()
        }
        for name, value in self.engine.compute(inputs).items():
            cuda.device_array(self.addresses[name], value.shape, dtypes[name])[...] = value
        return True


class FakeRuntime:
    engines: ClassVar[dict[bytes, FakeEngine]] = {}

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        engine = self.engines.get(bytes(data))
        if engine is None:
            self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag)")
            return None
        engine.cuda.calls.append(("deserialize_cuda_engine",))
        return engine


def fake_tensorrt_module(version: str = "10.3.0") -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    for name, value in {
        "ILogger": ILogger, "Runtime": FakeRuntime, "TensorIOMode": TensorIOMode, "TensorLocation": TensorLocation,
        "DataType": DataType, "nptype": nptype,
    }.items():  # fmt: skip
        setattr(module, name, value)
    return module


@dataclass
class Fakes:
    cuda: FakeCudaRuntime
    tmp_path: Path

    def engine_file(self, key: str, tensors: list[FakeTensor], compute: Callable, output_shapes: Callable) -> Path:
        FakeRuntime.engines[key.encode()] = FakeEngine(tensors, compute, output_shapes, self.cuda)
        path = self.tmp_path / f"{key}.engine"
        path.write_bytes(key.encode())
        return path

    def engine(self, key: str) -> FakeEngine:
        return FakeRuntime.engines[key.encode()]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Fakes]:
    cuda = FakeCudaRuntime(calls=[])
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module())
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda.module())
    FakeRuntime.engines = {}
    yield Fakes(cuda, tmp_path)
    FakeRuntime.engines = {}


def _mean_max(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    images = inputs["images"].astype(np.float32)
    flat = images.reshape(len(images), -1)
    return {"stats": np.stack([flat.mean(axis=1), flat.max(axis=1)], axis=1)}


def _stats_shape(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {"stats": (shapes["images"][0], 2)}


def _stats_engine(fakes: Fakes, key: str = "static", batch: int = 1, **input_options: Any) -> Path:
    tensors = [
        FakeTensor("images", TensorIOMode.INPUT, (batch, 3, 4, 4), **input_options),
        FakeTensor("stats", TensorIOMode.OUTPUT, (batch, 2)),
    ]
    return fakes.engine_file(key, tensors, _mean_max, _stats_shape)


def _names(calls: list[tuple]) -> list[str]:
    return [call[0] if call[0] != "cudaMemcpyAsync" else call[1] for call in calls]


def test_static_engine_discovers_io_runs_in_order_and_reuses_buffers(fakes: Fakes) -> None:
    backend = TensorRTBackend(_stats_engine(fakes))
    with backend:
        assert backend.input_meta["images"].shape == (1, 3, 4, 4)
        assert backend.input_meta["images"].dtype == np.float32
        assert backend.output_meta["stats"].shape == (1, 2)
        assert _names(fakes.cuda.calls) == [
            "cudaSetDevice", "deserialize_cuda_engine", "create_execution_context", "cudaStreamCreate",
        ]  # fmt: skip
        fakes.cuda.calls.clear()
        feed = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
        np.testing.assert_allclose(backend.infer({"images": feed})["stats"], [[23.5, 47.0]])
        assert _names(fakes.cuda.calls) == [
            "cudaMalloc", "cudaMemcpyHostToDevice", "cudaMalloc", "set_tensor_address", "set_tensor_address",
            "execute_async_v3", "cudaMemcpyDeviceToHost", "cudaStreamSynchronize",
        ]  # fmt: skip
        fakes.cuda.calls.clear()
        first = backend.infer({"images": feed})["stats"]
        second = backend.infer({"images": feed * 2})["stats"]
        # Same shapes: no new memory, no rebinding; each call hands out its own output array.
        assert "cudaMalloc" not in _names(fakes.cuda.calls) and "set_tensor_address" not in _names(fakes.cuda.calls)
        np.testing.assert_allclose(first, [[23.5, 47.0]])
        np.testing.assert_allclose(second, [[47.0, 94.0]])
        assert len(fakes.cuda.memory) == 2
    assert fakes.cuda.memory == {} and fakes.cuda.streams == set()
    assert _names(fakes.cuda.calls)[-3:] == ["cudaFree", "cudaFree", "cudaStreamDestroy"]


def test_dynamic_batch_sets_shapes_grows_buffers_and_refuses_sizes_outside_the_profile(fakes: Fakes) -> None:
    profile = ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))
    path = _stats_engine(fakes, "dynamic", batch=-1, profile=profile)
    with TensorRTBackend(path) as backend:
        assert backend.input_meta["images"].shape == (None, 3, 4, 4)
        assert backend.output_meta["stats"].shape == (None, 2)
        for batch in (2, 2, 4, 1):
            feed = np.random.default_rng(batch).random((batch, 3, 4, 4), dtype=np.float32)
            stats = backend.infer({"images": feed})["stats"]
            np.testing.assert_allclose(stats[:, 0], feed.reshape(batch, -1).mean(axis=1), rtol=1e-6)
        shapes = [call[2][0] for call in fakes.cuda.calls if call[0] == "set_input_shape"]
        assert shapes == [2, 4, 1]  # set only when the batch changes
        mallocs = [call[1] for call in fakes.cuda.calls if call[0] == "cudaMalloc"]
        assert mallocs == [2 * 192, 2 * 8, 4 * 192, 4 * 8]  # grown for 4, reused for 1
        calls_before = len(fakes.cuda.calls)
        with pytest.raises(BackendError, match=r"\(5, 3, 4, 4\) is outside the engine's optimization profile"):
            backend.infer({"images": np.zeros((5, 3, 4, 4), np.float32)})
        assert fakes.cuda.calls[calls_before:] == []  # refused before any device work
        with pytest.raises(BackendError, match="dtype float64"):
            backend.infer({"images": np.zeros((1, 3, 4, 4), np.float64)})


def test_half_precision_input_is_declared_as_float16(fakes: Fakes) -> None:
    with TensorRTBackend(_stats_engine(fakes, "half", dtype=DataType.HALF)) as backend:
        assert backend.input_meta["images"].dtype == np.float16
        stats = backend.infer({"images": np.full((1, 3, 4, 4), 0.5, np.float16)})["stats"]
        np.testing.assert_allclose(stats, [[0.5, 0.5]])


@pytest.mark.parametrize(
    ("tensor_options", "message"),
    [
        ({"location": TensorLocation.HOST}, "lives on the host"),
        ({"dtype": DataType.BF16}, "BF16, which numpy cannot hold"),
    ],
    ids=["host-tensor", "bf16"],
)
def test_unsupported_engine_tensors_are_refused_and_nothing_leaks(
    fakes: Fakes, tensor_options: dict, message: str
) -> None:
    backend = TensorRTBackend(_stats_engine(fakes, "odd", **tensor_options))
    with pytest.raises(BackendError, match=message):
        backend.activate()
    assert not backend.is_active and fakes.cuda.streams == set() and fakes.cuda.memory == {}


def test_an_engine_from_another_tensorrt_or_gpu_is_one_clear_line(fakes: Fakes) -> None:
    path = fakes.tmp_path / "foreign.engine"
    path.write_bytes(b"built elsewhere")
    with pytest.raises(BackendError, match=r"cannot deserialize the engine \(.*magic tag\).*rebuild") as caught:
        TensorRTBackend(path).activate()
    assert "\n" not in str(caught.value)
    with pytest.raises(BackendError, match="engine file not found"):
        TensorRTBackend(fakes.tmp_path / "missing.engine").activate()


def test_cuda_and_execution_failures_are_backend_errors(fakes: Fakes) -> None:
    path = _stats_engine(fakes)
    with pytest.raises(BackendError, match="cudaSetDevice failed: cudaErrorInvalidDevice"):
        TensorRTBackend(path, device_id=3).activate()
    fakes.cuda.fail_malloc = True
    with TensorRTBackend(path) as backend, pytest.raises(BackendError, match="cudaMalloc failed: cudaErrorMemoryAll"):
        backend.infer({"images": np.zeros((1, 3, 4, 4), np.float32)})
    fakes.cuda.fail_malloc = False
    fakes.engine("static").execute_ok = False
    with TensorRTBackend(path) as backend, pytest.raises(BackendError, match="execute_async_v3 failed"):
        backend.infer({"images": np.zeros((1, 3, 4, 4), np.float32)})
    assert fakes.cuda.memory == {}


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ({"tensorrt": None}, "TensorRT is not installed"),
        ({"tensorrt": fake_tensorrt_module("8.6.1")}, r"TensorRT 8\.6\.1 found; .* needs TensorRT 10"),
        ({"cuda.bindings.runtime": None, "cuda.cudart": None}, "cuda-python is not installed"),
    ],
    ids=["no-tensorrt", "tensorrt-8", "no-cuda-python"],
)
def test_missing_or_old_libraries_fail_when_the_backend_is_created(
    fakes: Fakes, monkeypatch: pytest.MonkeyPatch, modules: dict, message: str
) -> None:
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(BackendError, match=message):
        create_backend("tensorrt", fakes.tmp_path / "any.engine")


def test_registry_options_are_checked(fakes: Fakes) -> None:
    assert isinstance(create_backend("tensorrt", fakes.tmp_path / "x.engine", device_id=1), TensorRTBackend)
    with pytest.raises(BackendError, match="threads"):
        create_backend("tensorrt", fakes.tmp_path / "x.engine", threads=2)


def test_load_model_runs_a_detector_through_the_tensorrt_backend(fakes: Fakes) -> None:
    boxes = np.array([[8, 16, 24, 48], [40, 40, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.1], [0.2, 0.7]], np.float32)

    def head(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Scores follow the input's mean so the test sees the frame reach the "network".
        brightness = inputs["images"].mean()
        return {"output": np.concatenate([boxes, scores * brightness], axis=1)[None]}

    tensors = [
        FakeTensor("images", TensorIOMode.INPUT, (1, 3, 64, 64)),
        FakeTensor("output", TensorIOMode.OUTPUT, (1, 2, 6)),
    ]
    engine = fakes.engine_file("detector", tensors, head, lambda shapes: {"output": (1, 2, 6)})
    manifest = Manifest(
        name="fake-trt",
        classes=["product", "gap"],
        input=InputSpec(name="images", shape=[1, 3, 64, 64], pixel_scale=1.0 / 255.0),
        output=OutputSpec(format="shelfsight", names=["output"]),
        artifacts=[artifact_for(fakes.tmp_path, engine.name)],
    )
    with load_model(write_manifest(manifest, fakes.tmp_path), backend="tensorrt") as detector:
        dets = detector.detect(np.full((64, 64, 3), 255, np.uint8))
    assert dets.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(dets.confidence, [0.9, 0.7], rtol=1e-6)
    np.testing.assert_allclose(dets.xyxy, boxes)
    assert fakes.cuda.memory == {}


# --- real hardware --------------------------------------------------------------------------------------------------
def _real_tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        return False
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    error, count = cudart.cudaGetDeviceCount()
    return error == cudart.cudaError_t.cudaSuccess and count > 0


@pytest.mark.gpu
@pytest.mark.skipif(
    not _real_tensorrt_and_gpu(),
    reason="needs an NVIDIA GPU with TensorRT 10 and cuda-python; the TensorRT backend has not run on hardware yet",
)
def test_real_engine_matches_onnxruntime(tmp_path: Path) -> None:  # pragma: no cover - no GPU in CI
    import tensorrt as trt

    from shelfsight.runtime.backends.onnxruntime import OnnxRuntimeBackend

    spec = importlib.util.spec_from_file_location("tiny_onnx", Path(__file__).parent / "tiny_onnx.py")
    assert spec is not None and spec.loader is not None
    tiny_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_onnx)
    boxes = np.array([[8, 8, 24, 24], [30, 30, 60, 50]], np.float32)
    scores = np.array([[0.9, 0.1], [0.2, 0.7]], np.float32)
    onnx_path = tiny_onnx.build_detector_onnx(tmp_path / "tiny.onnx", boxes, scores, scores_follow_brightness=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes())
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    engine_path = tmp_path / "tiny.engine"
    engine_path.write_bytes(bytes(serialized))
    feed = {"images": np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)}
    with TensorRTBackend(engine_path) as trt_backend, OnnxRuntimeBackend(onnx_path) as ort_backend:
        np.testing.assert_allclose(trt_backend.infer(feed)["output"], ort_backend.infer(feed)["output"], atol=1e-4)
