"""ONNX Runtime's TensorRT/CUDA provider options are built from typed options; this CPU-only ORT refuses them loudly.

The provider option strings are what ORT's GPU build parses; they have not been run on a GPU yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from shelfsight.runtime.backends.base import BackendError, create_backend
from shelfsight.runtime.backends.onnxruntime import (
    CPU_PROVIDER,
    CudaProviderOptions,
    OnnxRuntimeBackend,
    TensorRTProviderOptions,
    gpu_providers,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("doubled", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Add", ["images", "images"], ["doubled"])], "double", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("gpu_options") / "double.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            TensorRTProviderOptions(engine_cache_path=Path("/var/cache/shelfsight/trt"), fp16=True),
            {
                "device_id": "0",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": "/var/cache/shelfsight/trt",
                "trt_fp16_enable": "True",
                "trt_int8_enable": "False",
            },
        ),
        (
            TensorRTProviderOptions(device_id=1, engine_cache_enable=False, int8=True),
            {
                "device_id": "1",
                "trt_engine_cache_enable": "False",
                "trt_fp16_enable": "False",
                "trt_int8_enable": "True",
            },
        ),
        (CudaProviderOptions(), {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}),
        (
            CudaProviderOptions(device_id=2, cudnn_conv_algo_search="HEURISTIC"),
            {"device_id": "2", "cudnn_conv_algo_search": "HEURISTIC"},
        ),
    ],
    ids=["trt-cache-fp16", "trt-int8-no-cache", "cuda-default", "cuda-heuristic"],
)
def test_provider_options_are_ort_strings(
    options: TensorRTProviderOptions | CudaProviderOptions, expected: dict
) -> None:
    name, built = options.as_provider()
    assert name == options.provider
    assert built == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TensorRTProviderOptions(), "engine_cache_enable needs engine_cache_path"),
        (lambda: TensorRTProviderOptions(engine_cache_enable=False, fp32=True), "Extra inputs are not permitted"),
        (lambda: TensorRTProviderOptions(engine_cache_enable=False, device_id=-1), "greater than or equal to 0"),
        (lambda: CudaProviderOptions(cudnn_conv_algo_search="FAST"), "EXHAUSTIVE"),
    ],
    ids=["cache-without-path", "unknown-option", "negative-device", "bad-algo-search"],
)
def test_bad_provider_options_are_refused(make: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make()  # type: ignore[operator]


def test_gpu_providers_are_in_priority_order() -> None:
    trt_options = TensorRTProviderOptions(engine_cache_path=Path("cache"))
    cuda_options = CudaProviderOptions()
    assert gpu_providers(trt_options, cuda_options) == [trt_options, cuda_options, CPU_PROVIDER]
    assert gpu_providers(cuda=cuda_options, cpu=False) == [cuda_options]
    assert gpu_providers() == [CPU_PROVIDER]


@pytest.mark.parametrize(
    "providers",
    [
        gpu_providers(TensorRTProviderOptions(engine_cache_path=Path("cache")), CudaProviderOptions()),
        gpu_providers(cuda=CudaProviderOptions(device_id=1)),
        [("TensorrtExecutionProvider", {"trt_fp16_enable": "True"}), CPU_PROVIDER],
    ],
    ids=["trt+cuda+cpu", "cuda+cpu", "raw-tuple"],
)
def test_gpu_providers_on_this_cpu_only_onnxruntime_are_a_clear_error(model_path: Path, providers: list) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers(), "this test expects the CPU-only ORT build"
    requested = [p if isinstance(p, str) else p[0] if isinstance(p, tuple) else p.provider for p in providers]
    backend = create_backend("onnxruntime", model_path, providers=providers)
    with pytest.raises(BackendError, match="requested but this onnxruntime build only offers") as caught:
        backend.activate()
    missing = [p for p in requested if p != CPU_PROVIDER]
    assert all(name in str(caught.value) for name in missing)
    assert "\n" not in str(caught.value) and not backend.is_active


def test_typed_cpu_only_request_still_runs(model_path: Path) -> None:
    with OnnxRuntimeBackend(model_path, providers=gpu_providers()) as backend:
        assert backend.active_providers == [CPU_PROVIDER]
        feed = np.ones((1, 3, 8, 8), np.float32)
        np.testing.assert_array_equal(backend.infer({"images": feed})["doubled"], feed * 2)
