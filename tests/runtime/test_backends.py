"""Backends run real ONNX Runtime on hand-built models; the base class checks every feed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import build_detector_onnx

from shelfsight.runtime.backends.base import BACKENDS, Backend, BackendError, create_backend
from shelfsight.runtime.backends.onnxruntime import OnnxRuntimeBackend

BOXES = np.array([[8, 8, 24, 24], [30, 30, 60, 50]], np.float32)
SCORES = np.array([[0.9, 0.1], [0.2, 0.7]], np.float32)
FEED = np.full((1, 3, 64, 64), 0.5, np.float32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_detector_onnx(tmp_path_factory.mktemp("ort") / "tiny.onnx", BOXES, SCORES)


def test_infer_returns_named_outputs_and_times_them(model_path: Path) -> None:
    with OnnxRuntimeBackend(model_path, intra_op_threads=1) as backend:
        assert list(backend.input_meta) == ["images"]
        assert backend.input_meta["images"].shape == (1, 3, 64, 64)
        assert backend.output_meta["output"].static_shape == (1, 2, 6)
        assert backend.active_providers == ["CPUExecutionProvider"]
        outputs = backend.infer({"images": FEED})
        assert list(outputs) == ["output"]
        np.testing.assert_allclose(outputs["output"][0], np.concatenate([BOXES, SCORES], axis=1))
        assert backend.last_infer_ns > 0
    assert not backend.is_active


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"images": np.zeros((1, 3, 32, 64), np.float32)}, r"'images' has shape \(1, 3, 32, 64\).*\(1, 3, 64, 64\)"),
        ({"images": np.zeros((2, 3, 64, 64), np.float32)}, r"'images' has shape \(2, 3, 64, 64\)"),
        ({"images": np.zeros((3, 64, 64), np.float32)}, r"'images' has shape \(3, 64, 64\)"),
        ({"images": np.zeros((1, 3, 64, 64), np.float64)}, "dtype float64, the model expects float32"),
        ({"input": FEED}, r"missing \['images'\], unexpected \['input'\]"),
        ({"images": FEED, "extra": FEED}, r"unexpected \['extra'\]"),
        ({"images": [[0.0]]}, "numpy array"),
    ],
    ids=["height", "batch", "rank", "dtype", "renamed", "extra", "list"],
)
def test_bad_feeds_are_refused_before_running(model_path: Path, feed: dict, message: str) -> None:
    with OnnxRuntimeBackend(model_path) as backend, pytest.raises(BackendError, match=message):
        backend.infer(feed)


def test_dynamic_batch_accepts_any_batch(tmp_path: Path) -> None:
    path = build_detector_onnx(tmp_path / "dyn.onnx", BOXES, SCORES, dynamic_batch=True)
    with OnnxRuntimeBackend(path) as backend:
        assert backend.input_meta["images"].shape[0] is None or isinstance(backend.input_meta["images"].shape[0], str)
        assert backend.infer({"images": np.zeros((3, 3, 64, 64), np.float32)})["output"].shape == (3, 2, 6)
        with pytest.raises(BackendError, match="shape"):
            backend.infer({"images": np.zeros((3, 3, 64, 65), np.float32)})


def test_requested_cuda_provider_is_refused_on_a_cpu_machine(model_path: Path) -> None:
    backend = OnnxRuntimeBackend(model_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        backend.activate()
    assert not backend.is_active


@pytest.mark.parametrize(
    "content", [b"", b"this is not a protobuf", b"\x08\x07\x12\x04junk" * 3], ids=["empty", "text", "junk"]
)
def test_a_corrupt_model_file_is_one_line_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(BackendError, match=r"broken\.onnx: onnxruntime cannot load the model") as caught:
        OnnxRuntimeBackend(path).activate()
    assert "\n" not in str(caught.value)


def test_a_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"nope\.onnx: model file not found"):
        OnnxRuntimeBackend(tmp_path / "nope.onnx").activate()


def test_lifecycle_is_checked(model_path: Path) -> None:
    backend = OnnxRuntimeBackend(model_path)
    with pytest.raises(BackendError, match="not active"):
        backend.infer({"images": FEED})
    backend.activate()
    with pytest.raises(BackendError, match="already active"):
        backend.activate()
    backend.deactivate()
    backend.deactivate()  # a second deactivate is harmless
    with pytest.raises(BackendError, match="not active"):
        _ = backend.input_meta


def test_create_backend_registry(model_path: Path) -> None:
    backend = create_backend("onnxruntime", model_path, intra_op_threads=1, graph_optimization="basic")
    assert isinstance(backend, OnnxRuntimeBackend) and isinstance(backend, Backend)
    assert set(BACKENDS) >= {"onnxruntime", "tensorrt"}
    with pytest.raises(BackendError, match=r"unknown backend 'openvino'.*onnxruntime, tensorrt"):
        create_backend("openvino", model_path)
    with pytest.raises(BackendError, match=r"backend 'onnxruntime'.*num_threads"):
        create_backend("onnxruntime", model_path, num_threads=2)
    with pytest.raises(BackendError, match="graph_optimization must be one of"):
        create_backend("onnxruntime", model_path, graph_optimization="max")


def test_tensorrt_says_it_is_not_installed(model_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            create_backend("tensorrt", model_path)
    else:
        pytest.skip("TensorRT is installed here; the stub's not-installed path cannot run")
