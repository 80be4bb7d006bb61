"""Calibration fixtures: real image files on disk (some deliberately broken) and a tiny real ONNX conv net."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shelfsight.runtime.manifest import InputSpec

INPUT_SHAPE = [1, 3, 32, 32]


def write_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``count`` PNG/JPEG files of different sizes and content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / f"{prefix}{i:03d}{'.png' if i % 2 else '.jpg'}"
        assert cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """``write_images`` as a fixture: with ``--import-mode=importlib`` tests cannot import conftest."""
    return write_images


@pytest.fixture
def input_spec() -> InputSpec:
    return InputSpec(name="images", shape=INPUT_SHAPE)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    write_images(folder, 6)
    return folder


def build_conv_onnx(path: Path, seed: int = 0) -> Path:
    """images [1,3,32,32] -> Conv3x3(8) -> Relu -> Conv1x1(4) -> out: enough for calibrators to see real tensors."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2"], ["out"], name="conv2"),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, INPUT_SHAPE)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 32, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def conv_onnx(tmp_path: Path) -> Path:
    return build_conv_onnx(tmp_path / "tiny.onnx")
