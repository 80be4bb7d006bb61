"""describe_onnx: a manifest for a foreign ONNX file from its real graph (ONNX Runtime), or a one-line refusal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from shelfsight.runtime.describe import describe_onnx, read_classes
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import MANIFEST_FILENAME, load_manifest, sha256_file
from shelfsight.runtime.model import load_model

Dims = Sequence[int | str | None]


def make_onnx(
    path: Path,
    nodes: list,
    inputs: list[tuple[str, int, Dims]],
    outputs: list[tuple[str, Dims]],
    metadata: dict[str, str] | None = None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "described",
        [helper.make_tensor_value_info(name, dtype, list(shape)) for name, dtype, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in outputs],
        [helper.make_tensor("keep_batch", TensorProto.INT64, [3], [0, 6, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def pooled_head(
    path: Path,
    anchors_last: bool = True,
    input_shape: Dims = (1, 3, 64, 64),
    input_type: int = TensorProto.FLOAT,
    metadata: dict[str, str] | None = None,
) -> Path:
    """6 channels per 8x8 cell: [N, 6, A] (yolov8 layout with nc=2) or [N, A, 6] (yolov5/yolox with nc=1)."""
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Concat", ["pooled", "pooled"], ["six"], axis=1),
        helper.make_node("Reshape", ["six", "keep_batch"], ["cells" if not anchors_last else "output"]),
    ]
    batch = input_shape[0]
    height, width = input_shape[2], input_shape[3]
    cells: int | str = height * width // 64 if isinstance(height, int) and isinstance(width, int) else "anchors"
    if anchors_last:
        out_shape: Dims = [batch, 6, cells]
    else:
        nodes.append(helper.make_node("Transpose", ["cells"], ["output"], perm=[0, 2, 1]))
        out_shape = [batch, cells, 6]
    return make_onnx(path, nodes, [("images", input_type, input_shape)], [("output", out_shape)], metadata)


def test_manifest_is_written_beside_the_model_from_its_real_graph(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "det.onnx")
    names = tmp_path / "names.txt"
    names.write_text("shelf\ngap\n\n", encoding="utf-8")  # trailing blank lines are fine
    manifest = describe_onnx(
        onnx_path, "yolov8", names, channel_order="BGR", pixel_scale=1.0, mean=(0.5, 0.5, 0.5), std=(2, 2, 2),
        letterbox_align="top-left", pad_value=0,
    )  # fmt: skip
    assert load_manifest(tmp_path / MANIFEST_FILENAME) == manifest
    assert manifest.name == "det" and manifest.classes == ["shelf", "gap"] and manifest.precision == "fp32"
    assert manifest.input.name == "images" and manifest.input.shape == [1, 3, 64, 64]
    assert (manifest.input.channel_order, manifest.input.pixel_scale, manifest.input.letterbox_align) == (
        "BGR", 1.0, "top-left",
    )  # fmt: skip
    assert manifest.input.mean == [0.5] * 3 and manifest.input.std == [2.0] * 3 and manifest.input.pad_value == 0
    assert manifest.output.format == "yolov8" and manifest.output.names == ["output"]
    [artifact] = manifest.artifacts
    assert (artifact.path, artifact.role, artifact.sha256) == ("det.onnx", "model", sha256_file(onnx_path))
    assert manifest.provenance.tool_versions["onnxruntime"]
    assert not list(tmp_path.glob("*.partial"))


def test_manifest_in_a_parent_folder_names_the_model_by_relative_path(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "models" / "v1" / "det.onnx", anchors_last=False)
    manifest = describe_onnx(onnx_path, "yolov5", ["gap"], tmp_path / "deploy.json")
    assert manifest.artifacts[0].path == "models/v1/det.onnx"
    assert json.loads((tmp_path / "deploy.json").read_text())["output"]["format"] == "yolov5"
    with load_model(tmp_path / "deploy.json", threads=1) as detector:
        assert detector.detect(np.zeros((48, 64, 3), np.uint8)).xyxy.shape[1] == 4


def test_dynamic_sizes_need_input_hw_and_the_real_output_shape_is_checked(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "dyn.onnx", input_shape=("batch", 3, "height", "width"))
    with pytest.raises(ManifestError, match=r"dynamic size .*give the network input size \(input_hw\)"):
        describe_onnx(onnx_path, "yolov8", ["a", "b"])
    # The declared output is [batch, 6, anchors]; only a run shows 6 = 4 + nc, so nc = 3 must fail.
    with pytest.raises(ManifestError, match=r"output shape \[1, 6, 64\] does not fit format 'yolov8'.*nc=3"):
        describe_onnx(onnx_path, "yolov8", ["a", "b", "c"], input_hw=(64, 64))
    manifest = describe_onnx(onnx_path, "yolov8", ["a", "b"], input_hw=(64, 96))
    assert manifest.input.shape == [1, 3, 64, 96]  # dynamic batch is written as 1; the backend still takes any
    with load_model(tmp_path, threads=1) as detector:
        assert len(detector.detect_batch([np.zeros((64, 96, 3), np.uint8)] * 3)) == 3


def test_yolox_anchor_count_comes_from_the_grid(tmp_path: Path) -> None:
    # A 64x64 input has 64 + 16 + 4 = 84 YOLOX grid cells; this head has 64 (one stride only).
    onnx_path = pooled_head(tmp_path / "m.onnx", anchors_last=False)
    with pytest.raises(ManifestError, match=r"\[1, 64, 6\] does not fit format 'yolox' \[N, A=84 grid cells"):
        describe_onnx(onnx_path, "yolox", ["gap"])
    assert not (tmp_path / MANIFEST_FILENAME).exists()


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("person\nbicycle\ncar\n", ".names", ["person", "bicycle", "car"]),
        ("  person \r\nbicycle", ".txt", ["person", "bicycle"]),
        ("names: [shelf, gap]\n", ".yaml", ["shelf", "gap"]),
        ("path: .\nnames:\n  0: shelf\n  1: gap\n", ".yml", ["shelf", "gap"]),
    ],
    ids=["names-file", "whitespace-crlf", "yaml-list", "yaml-map"],
)
def test_read_classes(tmp_path: Path, content: str, suffix: str, expected: list[str]) -> None:
    path = tmp_path / f"classes{suffix}"
    path.write_text(content, encoding="utf-8")
    assert read_classes(path) == expected


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("person\n\ncar\n", ".names", r"classes\.names:2: empty class name"),
        ("\n\n", ".names", "the class list is empty"),
        ("names:\n  0: a\n  2: b\n", ".yaml", "expected a 'names' list or an id -> name map"),
        ("names: [a, b\n", ".yaml", "invalid YAML"),
    ],
    ids=["blank-line-inside", "empty", "yaml-gap-in-ids", "yaml-broken"],
)
def test_bad_class_lists_are_one_line(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"classes{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match=message) as caught:
        read_classes(path)
    assert "\n" not in str(caught.value)


def test_classes_default_to_the_names_an_ultralytics_export_stores(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "u.onnx", metadata={"names": "{0: 'shelf', 1: 'gap'}", "stride": "32"})
    assert describe_onnx(onnx_path, "yolov8", None).classes == ["shelf", "gap"]
    bare = pooled_head(tmp_path / "bare" / "b.onnx")
    with pytest.raises(ManifestError, match="no class list given and the model's metadata holds no 'names'"):
        describe_onnx(bare, "yolov8", None)


def _two_inputs(path: Path) -> Path:
    return make_onnx(
        path,
        [helper.make_node("Add", ["a", "b"], ["output"])],
        [("a", TensorProto.FLOAT, [1, 3, 8, 8]), ("b", TensorProto.FLOAT, [1, 3, 8, 8])],
        [("output", [1, 3, 8, 8])],
    )


def _two_outputs(path: Path) -> Path:
    return make_onnx(
        path,
        [
            helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Concat", ["pooled", "pooled"], ["six"], axis=1),
            helper.make_node("Reshape", ["six", "keep_batch"], ["output"]),
            helper.make_node("Identity", ["images"], ["proto"]),
        ],
        [("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [("output", [1, 6, 64]), ("proto", [1, 3, 64, 64])],
    )


@pytest.mark.parametrize(
    ("build", "fmt", "options", "message"),
    [
        (lambda p: pooled_head(p), "yolov5", {}, r"\[1, 6, 64\] does not fit format 'yolov5'.*fits format 'yolov8'"),
        (lambda p: pooled_head(p), "yolov8", {"classes": ["a", "b", "c"]}, "no format fits 3 classes"),
        (lambda p: pooled_head(p), "yolov8", {"name": ""}, None),
        (lambda p: pooled_head(p), "yolov8", {"channel_order": "RGBA"}, r"field 'input\.channel_order'"),
        (lambda p: pooled_head(p), "yolov8", {"std": (1, 0, 1)}, r"field 'input\.std'.*positive"),
        (lambda p: pooled_head(p), "yolov8", {"input_hw": (32, 64)}, "has fixed H = 64, but input_hw asks 32"),
        (lambda p: pooled_head(p), "yolov8", {"output_names": ["boxes"]}, r"output\(s\) \['boxes'\] not in"),
        (lambda p: pooled_head(p, input_type=TensorProto.UINT8), "yolov8", {}, "is tensor\\(uint8\\); only float32"),
        (_two_inputs, "yolov8", {}, r"take 1 input, the model has \['a', 'b'\]"),
        (_two_outputs, "yolov8", {}, "reads exactly 1 output tensor, the model has 2"),
        (lambda p: p.write_bytes(b"not a protobuf"), "yolov8", {}, "onnxruntime cannot load the model"),
    ],
    ids=[
        "format-misfit", "class-count", "empty-name-uses-stem", "channel-order", "std", "input-hw-conflict",
        "unknown-output", "uint8-input", "two-inputs", "two-outputs", "junk-file",
    ],
)  # fmt: skip
def test_refusals_are_one_line_and_write_nothing(
    tmp_path: Path, build: object, fmt: str, options: dict, message: str | None
) -> None:
    onnx_path = tmp_path / "model.onnx"
    build(onnx_path)  # type: ignore[operator]
    options = {"classes": ["a", "b"], **options}
    if message is None:  # the control case: same model, accepted
        assert describe_onnx(onnx_path, fmt, **options).name == "model"
        return
    with pytest.raises(ManifestError, match=message) as caught:
        describe_onnx(onnx_path, fmt, **options)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / MANIFEST_FILENAME).exists()


def test_two_outputs_work_when_the_detection_output_is_named(tmp_path: Path) -> None:
    manifest = describe_onnx(_two_outputs(tmp_path / "seg.onnx"), "yolov8", ["a", "b"], output_names=["output"])
    assert manifest.output.names == ["output"]


def test_model_must_live_inside_the_manifest_folder(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "shared" / "det.onnx")
    with pytest.raises(ManifestError, match=r"must be inside the manifest folder .*artifact paths are relative"):
        describe_onnx(onnx_path, "yolov8", ["a", "b"], tmp_path / "elsewhere")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "det.onnx").symlink_to(onnx_path)
    with pytest.raises(ManifestError, match="symlink leading outside; copy the file instead"):
        describe_onnx(tmp_path / "deploy" / "det.onnx", "yolov8", ["a", "b"])
    with pytest.raises(ManifestError, match="ONNX file not found"):
        describe_onnx(tmp_path / "nope.onnx", "yolov8", ["a", "b"])


def test_an_existing_manifest_is_replaced_only_when_asked(tmp_path: Path) -> None:
    onnx_path = pooled_head(tmp_path / "det.onnx")
    describe_onnx(onnx_path, "yolov8", ["a", "b"])
    with pytest.raises(ManifestError, match="a manifest already exists; pass overwrite"):
        describe_onnx(onnx_path, "yolov8", ["shelf", "gap"])
    assert load_manifest(tmp_path).classes == ["a", "b"]
    describe_onnx(onnx_path, "yolov8", ["shelf", "gap"], overwrite=True)
    assert load_manifest(tmp_path).classes == ["shelf", "gap"]
