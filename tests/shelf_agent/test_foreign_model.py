"""`shelf-agent` on a third-party model given only its manifest (issue: real-world models, part 5).

The foreign model is the shipped detector re-exported the way Ultralytics exports YOLOv8 (one [1, 4+nc, A] tensor,
centre/size boxes) with its own class names in its own order and an extra class the shelf does not care about.
Its manifest is written by `describe_onnx`, the same code as `export-model describe`. Run through the agent with
`--product-classes`/`--gap-classes`, it must raise exactly the alerts the native model raises.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shelfsight.runtime.describe import describe_onnx
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import load_manifest
from shelfsight.shelf_agent.zones import ClassRoles

NATIVE = Path(__file__).resolve().parents[2] / "runtime" / "models" / "shelfsight-demo"
FOREIGN_CLASSES = ["empty_facing", "price_tag", "sku"]  # gap, ignored, product

pytestmark = pytest.mark.timeout(180)


def yolov8_layout_copy(native_onnx: Path, out: Path) -> Path:
    """[1, A, x1 y1 x2 y2 product gap] -> [1, 4+3, A]: cx cy w h, then empty_facing, price_tag (always 0), sku."""
    model = onnx.load(str(native_onnx))
    graph = model.graph
    [output] = graph.output
    source = output.name
    to_cxcywh = np.array([[0.5, 0, -1, 0], [0, 0.5, 0, -1], [0.5, 0, 1, 0], [0, 0.5, 0, 1]], np.float32)
    graph.initializer.append(numpy_helper.from_array(to_cxcywh, "foreign_to_cxcywh"))
    for name, value in (("foreign_cuts_0", 0), ("foreign_cuts_4", 4), ("foreign_cuts_5", 5), ("foreign_cuts_6", 6),
                        ("foreign_axis_1", 2)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    graph.node.extend([
        helper.make_node("Slice", [source, "foreign_cuts_0", "foreign_cuts_4", "foreign_axis_1"], ["xyxy"]),
        helper.make_node("Slice", [source, "foreign_cuts_4", "foreign_cuts_5", "foreign_axis_1"], ["product"]),
        helper.make_node("Slice", [source, "foreign_cuts_5", "foreign_cuts_6", "foreign_axis_1"], ["gap"]),
        helper.make_node("Sub", ["product", "product"], ["price_tag"]),
        helper.make_node("MatMul", ["xyxy", "foreign_to_cxcywh"], ["cxcywh"]),
        helper.make_node("Concat", ["cxcywh", "gap", "price_tag", "product"], ["anchors_first"], axis=2),
        helper.make_node("Transpose", ["anchors_first"], ["output0"], perm=[0, 2, 1]),
    ])  # fmt: skip
    graph.output.remove(output)
    graph.output.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 7, "anchors"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def foreign_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("foreign")
    onnx_path = yolov8_layout_copy(NATIVE / "model.onnx", folder / "yolov8-shelf.onnx")
    names = folder / "classes.txt"
    names.write_text("\n".join(FOREIGN_CLASSES) + "\n", encoding="utf-8")
    native = load_manifest(NATIVE / "manifest.json").input
    describe_onnx(onnx_path, "yolov8", names, channel_order=native.channel_order, pixel_scale=native.pixel_scale,
                  mean=tuple(native.mean), std=tuple(native.std), letterbox_align=native.letterbox_align,
                  pad_value=native.pad_value)
    return folder


def run_agent(command: list[str], scenario: Path, out: Path, model: Path, *extra: str,
              layout: bool = True) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--camera", str(scenario / "video.mp4"), "--as-fast-as-possible", "--fps", "5", "--dwell", "2",
            "--no-mqtt", "--model", str(model), "--outbox", str(out / "outbox.sqlite"),
            "--journal", str(out / "journal.sqlite"), *extra]
    if layout:
        args += ["--layout", str(scenario / "layout.yaml")]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=150)


def alerts(out: Path) -> list[tuple[str, str, float]]:
    with sqlite3.connect(out / "journal.sqlite") as conn:
        rows = conn.execute("SELECT payload FROM alerts ORDER BY seq").fetchall()
    return [(p["type"], p["slot_id"], p["event_frame_ts"]) for p in (json.loads(r[0]) for r in rows)]


def test_foreign_manifest_describes_a_yolov8_graph(foreign_model: Path) -> None:
    manifest = load_manifest(foreign_model / "manifest.json")
    assert manifest.output.format == "yolov8" and manifest.classes == FOREIGN_CLASSES
    assert manifest.input.shape == load_manifest(NATIVE / "manifest.json").input.shape


@pytest.mark.parametrize("layout", [True, False], ids=["with-layout", "gap-mode"])
def test_agent_on_the_foreign_model_raises_the_native_alerts(foreign_model: Path, small_scenario: Path,
                                                             shelf_agent_command: list[str], tmp_path: Path,
                                                             layout: bool) -> None:
    roles = ["--product-classes", "sku", "--gap-classes", "empty_facing"]
    foreign = run_agent(shelf_agent_command, small_scenario, tmp_path / "foreign", foreign_model, *roles,
                        layout=layout)
    assert foreign.returncode == 0, foreign.stderr[-2000:]
    native = run_agent(shelf_agent_command, small_scenario, tmp_path / "native", NATIVE, layout=layout)
    assert native.returncode == 0, native.stderr[-2000:]
    expected = alerts(tmp_path / "native")
    assert any(kind == "stockout" for kind, _, _ in expected)
    assert alerts(tmp_path / "foreign") == expected


def test_foreign_model_without_roles_is_a_one_line_error(foreign_model: Path, small_scenario: Path,
                                                         shelf_agent_command: list[str], tmp_path: Path) -> None:
    result = run_agent(shelf_agent_command, small_scenario, tmp_path, foreign_model)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert any("--product-classes" in line and "product" in line for line in lines), result.stderr


Case = tuple[list[str], list[str], list[str], Any]
ROLE_CASES: list[Case] = [
    (["product", "gap"], ["product"], ["gap"], [0, 1]),
    (["gap", "product"], ["product"], ["gap"], [1, 0]),
    (["empty", "tag", "cola", "tea"], ["cola", "tea"], ["empty"], [1, -1, 0, 0]),
    (["object"], ["object"], ["gap"], ManifestError),
    (["a", "b"], ["a"], ["a"], Exception),
]


@pytest.mark.parametrize(("classes", "product", "gap", "expected"), ROLE_CASES)
def test_class_roles(classes: list[str], product: list[str], gap: list[str], expected: Any) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            ClassRoles(classes, product, gap)
        return
    roles = ClassRoles(classes, product, gap)
    assert roles.lut.tolist() == expected
    ids = np.arange(len(classes))
    mapped = roles.apply(Detections(np.tile([0, 0, 10, 10], (len(classes), 1)), np.full(len(classes), 0.9), ids))
    kept = [role for role in expected if role >= 0]
    assert mapped.class_id.tolist() == kept and len(mapped) == len(kept)
