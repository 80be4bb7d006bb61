"""Third-party heads (yolov8, yolov5, yolox): decoding by hand-computed numbers, layout checks, and end to end
through describe_onnx + load_model on hand-built constant-output ONNX models (real ONNX Runtime)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from shelfsight.runtime.decoders import (
    check_output_layout,
    decode_yolov5,
    decode_yolov8,
    decode_yolox,
    grid_cells,
    yolox_grid,
)
from shelfsight.runtime.describe import describe_onnx
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import InputSpec
from shelfsight.runtime.model import load_model
from shelfsight.runtime.postprocess import DECODERS
from shelfsight.runtime.preprocess import Preprocessor

LN2 = math.log(2.0)


def constant_output_onnx(path: Path, output: np.ndarray, input_shape: tuple[int, ...] = (1, 3, 64, 64)) -> Path:
    """A model whose single output is ``output`` whatever the input (the input still flows into the graph)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output.shape))
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["table", "nothing"], ["output"]),
    ]
    initializers = [
        numpy_helper.from_array(np.asarray(output, np.float32), "table"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "constant_head", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_every_format_is_registered_by_importing_postprocess() -> None:
    assert {"shelfsight", "yolov8", "yolov5", "yolox"} <= set(DECODERS)


def test_yolov8_is_channels_first_cxcywh_with_scores_as_given() -> None:
    raw = np.zeros((1, 6, 3), np.float32)
    raw[0, :, 0] = [50, 40, 20, 10, 0.9, 0.1]  # -> [40, 35, 60, 45]
    raw[0, :, 2] = [10, 10, 4, 8, 0.2, 0.6]  # -> [8, 6, 12, 14]
    [(xyxy, scores)] = decode_yolov8([raw])
    np.testing.assert_allclose(xyxy[[0, 2]], [[40, 35, 60, 45], [8, 6, 12, 14]])
    np.testing.assert_allclose(scores[[0, 2]], [[0.9, 0.1], [0.2, 0.6]])
    assert xyxy.shape == (3, 4) and scores.shape == (3, 2) and xyxy.dtype == np.float32


def test_yolov5_multiplies_objectness_into_class_scores() -> None:
    raw = np.array([[[50, 40, 20, 10, 0.5, 0.9, 0.2], [10, 10, 4, 8, 1.0, 0.3, 0.6]]], np.float32)
    [(xyxy, scores)] = decode_yolov5([raw])
    np.testing.assert_allclose(xyxy, [[40, 35, 60, 45], [8, 6, 12, 14]])
    np.testing.assert_allclose(scores, [[0.45, 0.1], [0.3, 0.6]])


def test_yolox_decodes_grid_cells_at_each_stride_row_major() -> None:
    # 32x64 input (H x W): 4x8 cells at stride 8, 2x4 at 16, 1x2 at 32 -> 32 + 8 + 2 = 42 anchors.
    assert grid_cells((32, 64)) == 42
    raw = np.zeros((2, 42, 7), np.float32)
    raw[0, 1 * 8 + 3] = [0.5, 0.25, 0.0, LN2, 0.8, 0.5, 0.25]  # stride 8, row 1, col 3
    raw[0, 32 + 1 * 4 + 2] = [0.0, 0.0, LN2, 0.0, 1.0, 0.0, 0.9]  # stride 16, row 1, col 2
    raw[1, 40 + 1] = [0.5, 0.5, 0.0, 0.0, 0.5, 1.0, 0.0]  # stride 32, row 0, col 1 (second image)
    first, second = decode_yolox([raw], (32, 64))
    # centre = (t + cell) * stride, size = exp(t) * stride
    np.testing.assert_allclose(first[0][11], [24, 2, 32, 18], atol=1e-5)  # c=(28, 10), wh=(8, 16)
    np.testing.assert_allclose(first[0][38], [16, 8, 48, 24], atol=1e-5)  # c=(32, 16), wh=(32, 16)
    np.testing.assert_allclose(second[0][41], [32, 0, 64, 32], atol=1e-5)  # c=(48, 16), wh=(32, 32)
    np.testing.assert_allclose(first[1][[11, 38]], [[0.4, 0.2], [0.0, 0.9]])
    np.testing.assert_allclose(second[1][41], [0.5, 0.0])
    assert first[1][0].tolist() == [0.0, 0.0]


def test_yolox_grid_is_cached_and_read_only() -> None:
    grid, strides = yolox_grid((64, 64))
    assert yolox_grid((64, 64))[0] is grid
    assert grid.shape == (84, 2) and strides.shape == (84, 1)
    assert not grid.flags.writeable and not strides.flags.writeable
    assert grid[64 + 4 + 3].tolist() == [3, 1] and strides[64, 0] == 16


def test_a_huge_raw_size_does_not_become_infinite() -> None:
    raw = np.zeros((1, 84, 6), np.float32)
    raw[0, 0, 2:4] = 500.0
    xyxy, _ = decode_yolox([raw], (64, 64))[0]
    assert np.isfinite(xyxy).all()


@pytest.mark.parametrize(
    ("decoder", "outputs", "input_hw", "message"),
    [
        (decode_yolov8, [np.zeros((1, 84))], None, "3-D tensor"),
        (decode_yolov8, [np.zeros((1, 4, 10))], None, r"\[N, 4\+nc, A\] with nc >= 1"),
        (decode_yolov5, [np.zeros((1, 10, 5))], None, r"\[N, A, 5\+nc\] with nc >= 1"),
        (decode_yolov5, [np.zeros((1, 10, 7))] * 2, None, "expects 1 output tensor, got 2"),
        (decode_yolox, [np.zeros((1, 84, 7))], None, "needs the network input size"),
        (decode_yolox, [np.zeros((1, 85, 7))], (64, 64), "85 anchors but a 64x64 input .* gives 84"),
    ],
    ids=["v8-rank", "v8-no-classes", "v5-no-classes", "v5-two-outputs", "yolox-no-size", "yolox-anchors"],
)
def test_malformed_outputs_are_refused(
    decoder: Callable, outputs: list[np.ndarray], input_hw: tuple[int, int] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decoder(outputs, input_hw)


@pytest.mark.parametrize(
    ("fmt", "shape", "message"),
    [
        ("yolov8", [1, 84, 8400], None),
        ("yolov8", [1, 84, "anchors"], None),
        ("yolov8", ["batch", 84, None], None),
        ("yolov5", [1, 25200, 85], None),
        ("yolox", [1, 8400, 85], None),
        ("shelfsight", [1, 8400, 84], None),
        ("yolov8", [1, 8400, 84], r"fit format 'yolov8' \[N, 4\+nc, A\] with nc=80; .* 'shelfsight'"),
        ("yolov8", [1, 85, 8400], "no format fits 80 classes: check the class list"),
        ("yolox", [1, 25200, 85], r"'yolox' \[N, A=8400 grid cells at 640x640, 5\+nc\] .* fits format 'yolov5'"),
        ("yolov5", [1, 84, 8400], "fits format 'yolov8'"),
        ("yolov5", [1, 8400, 85, 1], r"output shape \[1, 8400, 85, 1\] does not fit"),
        ("yolov9", [1, 84, 8400], "unknown output format 'yolov9'"),
    ],
    ids=[
        "v8", "v8-dynamic-anchors", "v8-dynamic-batch", "v5", "yolox", "shelfsight", "v8-transposed", "v8-wrong-nc",
        "yolox-given-anchor-head", "v5-given-v8", "rank-4", "unknown-format",
    ],
)  # fmt: skip
def test_check_output_layout(fmt: str, shape: list, message: str | None) -> None:
    if message is None:
        check_output_layout(fmt, [shape], (640, 640), 80)
        return
    with pytest.raises(ManifestError, match=message) as caught:
        check_output_layout(fmt, [shape], (640, 640), 80, where="model.onnx")
    assert str(caught.value).startswith("model.onnx: ") and "\n" not in str(caught.value)


def test_check_output_layout_wants_exactly_one_output() -> None:
    with pytest.raises(ManifestError, match="exactly 1 output tensor, the model has 2"):
        check_output_layout("yolov8", [[1, 84, 8400], [1, 32, 160, 160]], (640, 640), 80)


def test_yolox_preprocessing_is_the_reference_recipe() -> None:
    """BGR, 0-255, no normalization, top-left letterbox padded with 114: YOLOX's own ``preproc``."""
    spec = InputSpec(
        name="images", shape=[1, 3, 64, 64], channel_order="BGR", pixel_scale=1.0, letterbox_align="top-left"
    )
    frame = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    ratio = min(64 / 60, 64 / 100)
    new_w, new_h = int(100 * ratio), int(60 * ratio)  # 64 x 38: rounding and YOLOX's truncation agree here
    padded = np.full((64, 64, 3), 114, np.uint8)
    padded[:new_h, :new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    expected = padded.transpose(2, 0, 1).astype(np.float32)
    tensor, transform = Preprocessor(spec)(frame)
    np.testing.assert_array_equal(tensor[0], expected)
    assert (transform.pad_x, transform.pad_y) == (0.0, 0.0)


# --- end to end: describe -> load_model -> detect -------------------------------------------------------------------
# One box, cxcywh (32, 32, 32, 16) in 64x64 input pixels, class 1 at 0.8, plus the same box at 0.5 from another
# anchor (NMS must drop it). Anchor 74 is stride 16, cell (2, 2); anchor 36 is stride 8, cell (4, 4).
BOX_ANCHOR, DUPLICATE_ANCHOR, ANCHORS = 74, 36, 84


def _head(fmt: str) -> np.ndarray:
    if fmt == "yolov8":
        raw = np.zeros((1, 6, ANCHORS), np.float32)
        raw[0, :, BOX_ANCHOR] = [32, 32, 32, 16, 0.08, 0.8]
        raw[0, :, DUPLICATE_ANCHOR] = [32, 32, 32, 16, 0.0, 0.5]
        return raw
    raw = np.zeros((1, ANCHORS, 7), np.float32)
    if fmt == "yolov5":
        raw[0, BOX_ANCHOR] = [32, 32, 32, 16, 0.8, 0.1, 1.0]
        raw[0, DUPLICATE_ANCHOR] = [32, 32, 32, 16, 1.0, 0.0, 0.5]
    else:  # yolox: raw offsets, t_xy = centre / stride - cell, t_wh = log(size / stride)
        raw[0, BOX_ANCHOR] = [0.0, 0.0, LN2, 0.0, 0.8, 0.1, 1.0]
        raw[0, DUPLICATE_ANCHOR] = [0.0, 0.0, 2 * LN2, LN2, 1.0, 0.0, 0.5]
    return raw


@pytest.mark.parametrize(
    ("fmt", "align", "expected_xyxy"),
    [
        # frame 128x96 -> 64x48 picture, scale 0.5; centred pad_y = 8, top-left pad_y = 0
        ("yolov8", "center", [32, 32, 96, 64]),
        ("yolov5", "center", [32, 32, 96, 64]),
        ("yolox", "center", [32, 32, 96, 64]),
        ("yolox", "top-left", [32, 48, 96, 80]),
    ],
)
def test_describe_then_detect_gives_the_box_in_frame_pixels(
    tmp_path: Path, fmt: str, align: str, expected_xyxy: list[float]
) -> None:
    onnx_path = constant_output_onnx(tmp_path / f"{fmt}.onnx", _head(fmt))
    manifest = describe_onnx(onnx_path, fmt, ["shelf", "gap"], letterbox_align=align, name=f"tiny-{fmt}")
    assert manifest.output.format == fmt and manifest.input.letterbox_align == align
    with load_model(tmp_path / "manifest.json", threads=1) as detector:
        dets = detector.detect(np.zeros((96, 128, 3), np.uint8))
    assert dets.class_id.tolist() == [1]
    np.testing.assert_allclose(dets.confidence, [0.8], rtol=1e-6)
    np.testing.assert_allclose(dets.xyxy, [expected_xyxy], atol=1e-4)
