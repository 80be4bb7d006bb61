"""Static Q/DQ quantization of the project's detector, checked against what ONNX Runtime really executes.

One small detector (width 0.25, 160x160) is exported once per module with the project's ONNX writer; every test
quantizes it with real ORT tooling and inspects the real ORT-optimized graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shelfsight.calibration.cache import calibrate_tensor_ranges
from shelfsight.calibration.images import select_calibration_images
from shelfsight.calibration.reader import ImageCalibrationReader, calibration_digest
from shelfsight.export.model import ModelConfig, build_model, input_spec_for
from shelfsight.export.onnx_export import write_onnx
from shelfsight.export.quantize import (
    QuantizationError,
    QuantizeOptions,
    excluded_nodes,
    expected_float_convs,
    inspect_int8_kernels,
    preprocess_for_quantization,
    quantize_qdq,
    stem_convs,
    tail_nodes,
    verify_int8_kernels,
)

IMGSZ = 160


def _settle_batchnorm(model: torch.nn.Module, imgsz: int) -> None:
    """A few train-mode passes give BatchNorm realistic statistics, so activations have detector-like ranges."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, imgsz, imgsz))
    model.eval()


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    frame = cv2.GaussianBlur(rng.integers(40, 220, (height, width, 3), dtype=np.uint8), (0, 0), 2)
    for _ in range(10):
        x, y = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(frame, (x, y), (x + int(rng.integers(6, 60)), y + int(rng.integers(6, 60))), color, -1)
    return frame


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def fp32_onnx(workdir: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2, width=0.25, depth=0.33, imgsz=IMGSZ))
    _settle_batchnorm(model, IMGSZ)
    return write_onnx(model, IMGSZ, workdir / "fp32.onnx", opset=17)


@pytest.fixture(scope="module")
def preprocessed(fp32_onnx: Path, workdir: Path) -> Path:
    return preprocess_for_quantization(fp32_onnx, workdir / "pre.onnx")


@pytest.fixture(scope="module")
def calibration_cache(preprocessed: Path, workdir: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = workdir / "calib"
    folder.mkdir()
    for i in range(8):
        cv2.imwrite(str(folder / f"{i}.jpg"), _scene(rng, int(rng.integers(120, 300)), int(rng.integers(120, 300))))
    spec = input_spec_for(IMGSZ)
    images = select_calibration_images(folder, count=8)
    ranges = calibrate_tensor_ranges(
        preprocessed, ImageCalibrationReader(images, spec), "minmax", calibration_digest(images, spec), workdir / "c"
    )
    return ranges.cache_path


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    from shelfsight.runtime.preprocess import preprocess_frame

    rng = np.random.default_rng(1)
    return np.stack([preprocess_frame(_scene(rng, 200, 260), input_spec_for(IMGSZ))[0] for _ in range(3)])


def _run(path: Path, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": frame[None]})[0] for frame in batch])


def test_default_quantization_runs_every_conv_as_int8(
    preprocessed: Path, calibration_cache: Path, workdir: Path, frames: np.ndarray
) -> None:
    options = QuantizeOptions()
    int8 = quantize_qdq(preprocessed, workdir / "int8.onnx", calibration_cache, options)
    report = verify_int8_kernels(inspect_int8_kernels(int8, expected_float_convs(preprocessed, options)), int8)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(preprocessed)).graph.node)
    assert report.total_convs == convs > 40
    # Every conv but the stem (3 input channels, faster as float and kept float on purpose) is INT8.
    assert report.int8_convs == convs - 1 and len(report.float_convs) == 1 and report.ok
    assert stem_convs(onnx.load(str(preprocessed))) and options.float_stem
    assert any("QLinearConv" in op for op in report.op_counts)
    graph_ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph_ops
    # It runs, keeps the output contract, and stays close to FP32 (boxes in input pixels, scores in [0, 1]).
    expected, actual = _run(preprocessed, frames), _run(int8, frames)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert np.all((actual[..., 4:] >= 0) & (actual[..., 4:] <= 1))
    assert np.abs(actual[..., :4] - expected[..., :4]).mean() < 0.02 * IMGSZ
    assert int8.stat().st_size < 0.45 * preprocessed.stat().st_size


def test_everything_int8_when_asked(preprocessed: Path, calibration_cache: Path, workdir: Path) -> None:
    options = QuantizeOptions(float_stem=False)
    int8 = quantize_qdq(preprocessed, workdir / "int8-all.onnx", calibration_cache, options)
    report = verify_int8_kernels(inspect_int8_kernels(int8, expected_float_convs(preprocessed, options)), int8)
    assert report.int8_convs == report.total_convs and report.float_convs == []


def test_symmetric_int8_activations_leave_float_convs_and_are_caught(
    preprocessed: Path, calibration_cache: Path, workdir: Path
) -> None:
    """The TensorRT setting (QInt8 symmetric activations): ORT's CPU provider keeps many of these convs in float."""
    options = QuantizeOptions.for_tensorrt()
    int8 = quantize_qdq(preprocessed, workdir / "int8-trt.onnx", calibration_cache, options)
    report = inspect_int8_kernels(int8, expected_float_convs(preprocessed, options))
    assert not report.ok and report.float_convs
    with pytest.raises(QuantizationError, match="float convolutions left in the optimized graph"):
        verify_int8_kernels(report, int8)


def test_excluded_convs_stay_float_and_are_counted(preprocessed: Path, calibration_cache: Path, workdir: Path) -> None:
    model = onnx.load(str(preprocessed))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    options = QuantizeOptions(per_channel=False, float_stem=False, nodes_to_exclude=tuple(convs[1:4]))
    int8 = quantize_qdq(preprocessed, workdir / "int8-excluded.onnx", calibration_cache, options)
    allowed = expected_float_convs(preprocessed, options)
    assert allowed == 3
    report = inspect_int8_kernels(int8, allowed)
    # ORT's optimizer may still fuse an excluded conv into INT8 when both its neighbours are quantized (it
    # quantizes the float weight itself), so "excluded" is an upper bound on the float convs, not an exact count.
    assert 1 <= len(report.float_convs) <= 3 and report.ok
    assert report.int8_convs + len(report.float_convs) == len(convs)
    strict = inspect_int8_kernels(int8, expected_float_convs=0)
    with pytest.raises(QuantizationError, match=f"{report.int8_convs}/{len(convs)} convolutions run as INT8"):
        verify_int8_kernels(strict, int8)


def test_float_tail_is_the_decode_after_the_last_convs(preprocessed: Path) -> None:
    model = onnx.load(str(preprocessed))
    by_name = {n.name: n for n in model.graph.node}
    tail = tail_nodes(model)
    ops = {by_name[name].op_type for name in tail}
    assert "Sigmoid" in ops and "Concat" in ops and "Conv" not in ops
    final = next(n for n in model.graph.node if "detections" in n.output)
    assert final.name in tail
    # Nothing that feeds a convolution is in the tail.
    conv_inputs = {i for n in model.graph.node if n.op_type == "Conv" for i in n.input}
    assert not any(set(by_name[name].output) & conv_inputs for name in tail)
    stem = stem_convs(model)
    assert len(stem) == 1 and by_name[stem[0]].input[0] == "images"
    assert set(excluded_nodes(preprocessed, QuantizeOptions())) == set(tail) | set(stem)
    assert excluded_nodes(preprocessed, QuantizeOptions(float_tail=False, float_stem=False)) == []


def test_float_tail_keeps_boxes_closer_to_fp32(
    preprocessed: Path, calibration_cache: Path, workdir: Path, frames: np.ndarray
) -> None:
    expected = _run(preprocessed, frames)
    errors = {}
    for float_tail in (True, False):
        path = quantize_qdq(
            preprocessed, workdir / f"tail-{float_tail}.onnx", calibration_cache, QuantizeOptions(float_tail=float_tail)
        )
        errors[float_tail] = float(np.abs(_run(path, frames)[..., :4] - expected[..., :4]).mean())
    assert errors[True] < errors[False]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"symmetric_activations": True}, "needs activation_type 'qint8'"),
        ({"calib_method": "kl"}, "calib_method"),
        ({"per_chanel": True}, "Extra inputs are not permitted"),
    ],
)
def test_incompatible_quantize_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**options)


def test_unknown_excluded_node_is_an_error(preprocessed: Path) -> None:
    with pytest.raises(QuantizationError, match="unknown node 'no_such_conv'"):
        excluded_nodes(preprocessed, QuantizeOptions(nodes_to_exclude=("no_such_conv",)))


def _concat_scale_sets(path: Path) -> list[set[float]]:
    """For each quantized Concat: the set of scales of its dequantized inputs and of its quantized output."""
    model = onnx.load(str(path))
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups = []
    for node in model.graph.node:
        if node.op_type != "Concat":
            continue
        inputs = [producer.get(name) for name in node.input]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in inputs):
            continue  # a float (tail) concat
        scales = {float(consts[p.input[1]]) for p in inputs if p is not None}
        scales |= {
            float(consts[q.input[1]]) for q in consumers.get(node.output[0], []) if q.op_type == "QuantizeLinear"
        }
        groups.append(scales)
    return groups


def test_concat_inputs_share_one_scale(preprocessed: Path, calibration_cache: Path, workdir: Path) -> None:
    shared = quantize_qdq(preprocessed, workdir / "shared.onnx", calibration_cache, QuantizeOptions())
    separate = quantize_qdq(
        preprocessed, workdir / "separate.onnx", calibration_cache, QuantizeOptions(share_concat_ranges=False)
    )
    shared_groups, separate_groups = _concat_scale_sets(shared), _concat_scale_sets(separate)
    assert len(shared_groups) == len(separate_groups) > 5
    assert all(len(scales) == 1 for scales in shared_groups)  # QLinearConcat then copies bytes
    assert any(len(scales) > 1 for scales in separate_groups)


SHARED = Path(os.environ.get("SHELFSIGHT_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
YOLOX = SHARED / "third-party-models" / "yolox_nano" / "yolox_nano.onnx"
COCO_PHOTOS = SHARED / "third-party-models" / "coco_val2017_subset"


@pytest.mark.skipif(
    not (YOLOX.is_file() and COCO_PHOTOS.is_dir()),
    reason=f"YOLOX-Nano test material not found under {SHARED} (set SHELFSIGHT_SHARED_DATA)",
)
def test_third_party_opset11_model_quantizes_to_int8_kernels(workdir: Path) -> None:
    """The public YOLOX-Nano export is opset 11, too old for per-channel Q/DQ: it is upgraded to 13 first."""
    from shelfsight.runtime.manifest import InputSpec

    assert next(o.version for o in onnx.load(str(YOLOX)).opset_import if o.domain in ("", "ai.onnx")) == 11
    pre = preprocess_for_quantization(YOLOX, workdir / "yolox-pre.onnx")
    assert next(o.version for o in onnx.load(str(pre)).opset_import if o.domain in ("", "ai.onnx")) >= 13
    spec = InputSpec(
        name="images", shape=[1, 3, 416, 416], channel_order="BGR", pixel_scale=1.0, letterbox_align="top-left"
    )
    images = select_calibration_images(COCO_PHOTOS, count=6)
    ranges = calibrate_tensor_ranges(
        pre, ImageCalibrationReader(images, spec), "minmax", calibration_digest(images, spec), workdir / "yc"
    )
    options = QuantizeOptions()
    int8 = quantize_qdq(pre, workdir / "yolox-int8.onnx", ranges.cache_path, options)
    report = verify_int8_kernels(inspect_int8_kernels(int8, expected_float_convs(pre, options)), int8)
    assert report.total_convs > 100 and report.int8_convs == report.total_convs
    # Its 104 SiLUs run as float QuickGelu between the INT8 convolutions, not as table lookups (faster here).
    assert report.op_counts.get("com.microsoft:QuickGelu", 0) >= 100
    assert "com.microsoft:QLinearSigmoid" not in report.op_counts
    frame = cv2.imread(str(next(COCO_PHOTOS.glob("*.jpg"))))
    from shelfsight.runtime.preprocess import preprocess_frame

    output = _run(int8, preprocess_frame(frame, spec)[0][None])
    assert output.shape == (1, 3549, 85) and np.isfinite(output).all()


def _conv_silu_onnx(path: Path, size: int = 32) -> Path:
    """[1,3,S,S] -> two 3x3 convs, each followed by SiLU written as Mul(x, Sigmoid(x)), as YOLO exports do."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits, nodes, x = [], [], "images"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8)]):
        inits += [numpy_helper.from_array(rng.normal(0, 0.4, (cout, cin, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"], name=f"sigmoid{i}"),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"], name=f"silu{i}")]
        x = f"a{i}"
    graph = helper.make_graph(
        nodes, "conv_silu", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, size, size])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_silu_becomes_one_quickgelu_with_the_same_output(workdir: Path) -> None:
    from shelfsight.export.quantize import fuse_silu

    source = _conv_silu_onnx(workdir / "silu.onnx")
    model = onnx.load(str(source))
    assert fuse_silu(model) == 2
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["Conv", "QuickGelu", "Conv", "QuickGelu"]
    assert [node.name for node in model.graph.node if node.op_type == "QuickGelu"] == ["silu0", "silu1"]
    onnx.save(model, str(workdir / "silu-fused.onnx"))
    batch = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(workdir / "silu-fused.onnx", batch), _run(source, batch), rtol=1e-5, atol=1e-5)
    assert fuse_silu(model) == 0  # nothing left to fuse


@pytest.mark.parametrize(
    ("options", "fused", "silu_kernel"),
    [
        # The default: one float SiLU kernel between INT8 convolutions.
        (QuantizeOptions(float_stem=False), True, "com.microsoft:QuickGelu"),
        (QuantizeOptions(float_stem=False, fuse_silu=False), False, "com.microsoft:QLinearSigmoid"),
        (QuantizeOptions.for_tensorrt(float_stem=False), False, None),  # TensorRT knows no contrib ops
    ],
)
def test_silu_kernels_after_quantization(
    options: QuantizeOptions, fused: bool, silu_kernel: str | None, tmp_path: Path
) -> None:
    pre = preprocess_for_quantization(_conv_silu_onnx(tmp_path / "silu.onnx"), tmp_path / "pre.onnx")
    rng = np.random.default_rng(2)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), _scene(rng, 32, 32))
    spec = input_spec_for(32)
    images = select_calibration_images(folder, count=4)
    ranges = calibrate_tensor_ranges(
        pre, ImageCalibrationReader(images, spec), "minmax", calibration_digest(images, spec), tmp_path / "c"
    )
    int8 = quantize_qdq(pre, tmp_path / "int8.onnx", ranges.cache_path, options)
    assert any(node.op_type == "QuickGelu" for node in onnx.load(str(int8)).graph.node) is fused
    if silu_kernel is not None:  # what ORT's CPU provider runs
        report = inspect_int8_kernels(int8)
        assert report.int8_convs == report.total_convs == 2
        assert report.op_counts.get(silu_kernel, 0) >= 1, report.op_counts
        if fused:
            assert "com.microsoft:QLinearSigmoid" not in report.op_counts
