"""``export-model --onnx M --manifest J --int8`` on third-party FP32 ONNX models, without labels.

(a) a tiny hand-built YOLOv8-layout detector (convolutions + sigmoid head, written with onnx.helper): quantized end
to end, gated on agreement with its own FP32 detections, refused (non-zero exit, ``rejected/``) when the
quantization is broken on purpose; (b) the public YOLOX-Nano on real COCO photos (skipped when the shared data
folder is absent): INT8 agreement mAP50 >= 0.9 against FP32. Latency is recorded in the report, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shelfsight.export.cli import main
from shelfsight.export.int8_pipeline import Int8ExportOptions, run_int8_export
from shelfsight.export.int8_steps import REJECTED_DIR
from shelfsight.runtime.describe import describe_onnx
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import load_manifest, sha256_file
from shelfsight.runtime.model import load_model

SIZE = 64
CLASSES = ["box", "can"]


def tiny_yolov8_onnx(path: Path, seed: int = 0) -> Path:
    """[1,3,64,64] -> [1, 4+2, 256]: two stride-2 convs + ReLU and a 1x1 head, random weights; each 4x4 cell predicts
    a box around itself (sigmoid offsets) and class scores that follow the image content (a large score gain)."""
    rng = np.random.default_rng(seed)
    nc = len(CLASSES)
    cells = SIZE // 4
    cy, cx = np.mgrid[0:cells, 0:cells].reshape(2, -1).astype(np.float32) * 4 + 2
    offset = np.stack([cx - 6, cy - 6, np.full_like(cx, 6), np.full_like(cx, 6)])[None]

    inits: list[Any] = [
        numpy_helper.from_array(np.array([1, 4 + nc, -1], np.int64), "shape"),
        numpy_helper.from_array(np.array([12, 12, 20, 20], np.float32).reshape(1, 4, 1), "box_px"),
        numpy_helper.from_array(offset.astype(np.float32), "box_offset"),
        numpy_helper.from_array(np.array([4, nc], np.int64), "split_sizes"),
    ]

    def conv(name: str, cin: int, cout: int, k: int, x: str, y: str, stride: int, gain: float = 1.0) -> Any:
        w = (rng.normal(0, 3, (cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = rng.normal(0, 0.1, cout).astype(np.float32)
        if gain != 1.0:  # the score channels: strong, content-dependent responses, mostly below 0.25
            w[4:] *= gain
            b[4:] = -gain / 2
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[k, k],
                                strides=[stride, stride], pads=[k // 2] * 4)  # fmt: skip

    nodes = [
        conv("c1", 3, 16, 3, "images", "c1", 2),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv("c2", 16, 16, 3, "r1", "c2", 2),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        conv("head", 16, 4 + nc, 1, "r2", "raw", 1, gain=8.0),
        helper.make_node("Reshape", ["raw", "shape"], ["flat"], name="flatten"),
        helper.make_node("Sigmoid", ["flat"], ["prob"], name="sigmoid"),
        helper.make_node("Split", ["prob", "split_sizes"], ["box01", "scores"], name="split", axis=1),
        helper.make_node("Mul", ["box01", "box_px"], ["box_rel"], name="to_pixels"),
        helper.make_node("Add", ["box_rel", "box_offset"], ["boxes"], name="to_cells"),
        helper.make_node("Concat", ["boxes", "scores"], ["output"], name="join", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "foreign_yolov8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4 + nc, (SIZE // 4) ** 2])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """Noisy frames with a few bright rectangles: something for the random detector to react to."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = rng.integers(0, 90, (72, 96, 3), dtype=np.uint8)
        for _ in range(3):
            x, y = int(rng.integers(0, 70)), int(rng.integers(0, 50))
            colour = tuple(int(c) for c in rng.integers(100, 256, 3))
            cv2.rectangle(image, (x, y), (x + int(rng.integers(10, 26)), y + int(rng.integers(10, 22))), colour, -1)
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    return folder


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    model = tiny_yolov8_onnx(root / "vendor" / "detector.onnx")
    describe_onnx(model, "yolov8", CLASSES)
    return {"root": root, "onnx": model, "manifest": model.parent / "manifest.json",
            "photos": write_photos(root / "photos", 14)}  # fmt: skip


@pytest.fixture(scope="module")
def exported(foreign: dict[str, Path]) -> Path:
    """One CLI run as the issue spells it: 8 photos calibrate, the other 6 measure agreement."""
    out = foreign["root"] / "out"
    status = main([
        "--onnx", str(foreign["onnx"]), "--manifest", str(foreign["manifest"]), "--int8",
        "--calib-data", str(foreign["photos"]), "--calib-images", "8", "--out", str(out),
        "--calib-cache", str(foreign["root"] / "cache"), "--latency-runs", "5", "--no-tensorrt-variant",
    ])  # fmt: skip
    assert status == 0
    return out


def test_foreign_model_is_quantized_and_gated_on_agreement(exported: Path, foreign: dict[str, Path]) -> None:
    report = json.loads((exported / "report.json").read_text())
    assert report["accuracy"]["mode"] == "agreement"
    assert report["accuracy"]["label"] == "agreement with FP32 (no labels)"
    assert report["accuracy"]["images"] == 6 and report["accuracy"]["held_out_from_calibration"]
    assert report["accuracy"]["pseudo_truth_boxes"] > 0
    assert report["verdict"].startswith("agreement with FP32 (no labels) within --min-agreement 0.9")
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["fp32", "int8"]
    assert variants["fp32"]["map50"] >= 0.9  # FP32 against its own detections: the ceiling
    assert variants["int8"]["map50"] >= 0.9 and variants["int8"]["passed"] is True
    assert "2/3 convolutions run as INT8 kernels, 1 float (1 expected)" in variants["int8"]["int8_kernels"]  # stem
    assert variants["int8"]["latency"]["median_ms"] > 0 and variants["fp32"]["latency"]["median_ms"] > 0
    md = (exported / "report.md").read_text()
    assert "agreement with FP32 (no labels)" in md and "| agreement mAP50 |" in md

    fp32, int8 = load_manifest(exported / "fp32"), load_manifest(exported / "int8")
    assert fp32.precision == "fp32" and int8.precision == "int8"
    assert fp32.artifact().sha256 == sha256_file(foreign["onnx"])  # the vendor file, copied unchanged
    assert int8.artifact().sha256 == sha256_file(exported / "int8" / "model.onnx")
    assert int8.output.format == "yolov8" and int8.classes == CLASSES and int8.input == fp32.input
    assert int8.metrics.validation_set.startswith("agreement with FP32 (no labels): 6 image(s)")
    assert int8.metrics.map50 == pytest.approx(variants["int8"]["map50"], abs=1e-5)
    assert int8.provenance.calibration_image_count == 8
    frame = cv2.imread(str(next(foreign["photos"].glob("*.png"))))
    with load_model(exported / "int8") as detector:  # verifies the sha256 on the way
        assert detector.detect(frame).xyxy.shape[1] == 4


def test_a_tampered_source_is_refused(foreign: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "vendor"
    shutil.copytree(foreign["onnx"].parent, folder)
    with open(folder / "detector.onnx", "ab") as handle:
        handle.write(b"\0")
    options = Int8ExportOptions(calib_data=foreign["photos"], calib_images=8, tensorrt_variant=False)
    with pytest.raises(ShelfSightError, match="sha256"):
        run_int8_export(folder / "manifest.json", tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_broken_quantization_is_rejected_with_exit_status(
    foreign: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrating on flat grey frames leaves activation ranges far too narrow: agreement collapses."""
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        cv2.imwrite(str(grey / f"{i}.png"), np.full((72, 96, 3), 20 + i, np.uint8))
    out = tmp_path / "out"
    status = main([
        "--onnx", str(foreign["onnx"]), "--manifest", str(foreign["manifest"]), "--int8",
        "--calib-data", str(grey), "--agreement-data", str(foreign["photos"]), "--min-agreement", "0.95",
        "--out", str(out), "--calib-cache", str(tmp_path / "cache"), "--latency-runs", "2", "--no-tensorrt-variant",
    ])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert "REJECTED int8: agreement with FP32 (no labels) below --min-agreement 0.95" in err
    assert (out / REJECTED_DIR / "int8" / "model.onnx").is_file() and not (out / "int8").exists()
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert variants["int8"]["passed"] is False and variants["int8"]["map50"] < 0.95
    assert "agreement with FP32 (no labels)" in (out / REJECTED_DIR / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-map-drop", "0.02"], "without --val-data the gate is agreement with FP32: use --min-agreement"),
        (["--val-data", "data.yaml", "--min-agreement", "0.9"], "--min-agreement set the agreement gate"),
        (["--val-data", "data.yaml", "--agreement-data", "x"], "--agreement-data set the agreement gate"),
        (["--calib-images", "14"], "no held-out image to measure agreement with FP32 on: all 14"),
    ],
)
def test_flags_that_do_not_fit_the_gate_are_errors(
    foreign: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["--manifest", str(foreign["manifest"]), "--int8", "--calib-data", str(foreign["photos"]),
            "--out", str(tmp_path / "out"), "--calib-cache", str(tmp_path / "cache"), *extra]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_source_flags_are_checked(foreign: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.onnx"
    shutil.copyfile(foreign["onnx"], other)
    common = ["--int8", "--calib-data", str(foreign["photos"]), "--out", str(tmp_path / "out")]
    cases = [
        (["--onnx", str(other), "--manifest", str(foreign["manifest"])], "not the --onnx file"),
        (["--onnx", str(other)], "no manifest.json beside it"),
        ([str(foreign["onnx"].parent), "--manifest", str(foreign["manifest"])], "give the source once"),
        (["--manifest", str(foreign["manifest"]), "--out", "x"], "add --int8"),
    ]
    for argv, message in cases:
        full = argv if "--out" in argv else argv + common
        assert main(full) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_checkpoint_source_still_needs_labels(trained_run: Any, tmp_path: Path) -> None:
    options = Int8ExportOptions(calib_data=tmp_path, tensorrt_variant=False)
    with pytest.raises(ShelfSightError, match="checkpoint export is scored on labels: add --val-data"):
        run_int8_export(trained_run.best, tmp_path / "out", options)


# --- the real YOLOX-Nano -------------------------------------------------------------------------------------------

SHARED = Path(os.environ.get("SHELFSIGHT_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
MODELS = SHARED / "third-party-models"
YOLOX = MODELS / "yolox_nano" / "yolox_nano.onnx"
COCO_NAMES = MODELS / "coco.names"
PHOTOS = MODELS / "coco_val2017_subset"


@pytest.mark.skipif(
    not (YOLOX.is_file() and COCO_NAMES.is_file() and PHOTOS.is_dir()),
    reason=f"YOLOX-Nano test material not found under {MODELS} (set SHELFSIGHT_SHARED_DATA to the shared data folder)",
)
def test_yolox_nano_int8_agrees_with_fp32_on_real_photos(tmp_path: Path) -> None:
    folder = tmp_path / "yolox_nano"
    folder.mkdir()
    shutil.copyfile(YOLOX, folder / YOLOX.name)  # artifacts live in the manifest's folder
    describe_onnx(folder / YOLOX.name, "yolox", COCO_NAMES, channel_order="BGR", pixel_scale=1.0,
                  letterbox_align="top-left", pad_value=114)  # fmt: skip
    options = Int8ExportOptions(
        calib_data=PHOTOS, calib_images=12, float_leading_convs=2, calib_cache=tmp_path / "cache",
        tensorrt_variant=False, latency_runs=20,
    )  # fmt: skip
    report = json.loads(run_int8_export(folder / "manifest.json", tmp_path / "out", options).read_text())
    variants = {v["name"]: v for v in report["variants"]}
    fp32, int8 = variants["fp32"], variants["int8"]
    ratio = int8["latency"]["median_ms"] / fp32["latency"]["median_ms"]
    print(f"\nYOLOX-Nano INT8: agreement mAP50 {int8['map50']:.4f} (mAP50-95 {int8['map50_95']:.4f}) on "
          f"{report['accuracy']['images']} held-out photos, {report['accuracy']['pseudo_truth_boxes']} FP32 boxes; "
          f"{int8['int8_kernels']}; latency 1 thread {fp32['latency']['median_ms']:.2f} ms FP32, "
          f"{int8['latency']['median_ms']:.2f} ms INT8 = {ratio:.3f}x (recorded, not asserted)")  # fmt: skip
    assert report["accuracy"]["mode"] == "agreement" and report["accuracy"]["images"] == 8
    assert int8["map50"] >= 0.9 and int8["passed"] is True
    assert "111/113 convolutions run as INT8 kernels, 2 float (2 expected)" in int8["int8_kernels"]
    assert int8["latency"]["median_ms"] > 0 and fp32["latency"]["median_ms"] > 0
