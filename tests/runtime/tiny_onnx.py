"""Hand-built tiny ONNX detectors (no torch) and model folders with a manifest, for tests anywhere in the suite.

From another test folder: ``importlib`` this file by path, or copy the two calls you need; it only needs ``onnx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shelfsight.runtime.manifest import InputSpec, Manifest, OutputSpec, artifact_for, write_manifest


def build_detector_onnx(
    path: str | Path,
    boxes: np.ndarray,
    scores: np.ndarray,
    input_shape: Sequence[int] = (1, 3, 64, 64),
    input_name: str = "images",
    output_name: str = "output",
    dynamic_batch: bool = False,
    scores_follow_brightness: bool = False,
    input_dtype: int = TensorProto.FLOAT,
) -> Path:
    """A 'shelfsight'-format model: output [N, A, 4+nc] = fixed boxes (input px) and fixed class scores.

    With ``scores_follow_brightness`` each image's scores are multiplied by the mean of its input tensor, so
    different frames in one batch give different, predictable confidences.
    """
    boxes = np.asarray(boxes, np.float32).reshape(1, -1, 4)
    scores = np.asarray(scores, np.float32).reshape(1, boxes.shape[1], -1)
    anchors, classes = boxes.shape[1], scores.shape[2]
    batch: int | str = "batch" if dynamic_batch else int(input_shape[0])
    x = helper.make_tensor_value_info(input_name, input_dtype, [batch, *input_shape[1:]])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, anchors, 4 + classes])
    initializers = [
        numpy_helper.from_array(boxes, "boxes"),
        numpy_helper.from_array(scores, "scores"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "per_image"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Cast", [input_name], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x32"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "per_image"], ["mean"]),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["boxes", "nothing"], ["boxes_n"]),
        helper.make_node(
            "Mul" if scores_follow_brightness else "Add",
            ["scores", "mean" if scores_follow_brightness else "nothing"],
            ["scores_n"],
        ),
        helper.make_node("Concat", ["boxes_n", "scores_n"], [output_name], axis=2),
    ]
    graph = helper.make_graph(nodes, "tiny_detector", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def write_model_folder(
    folder: str | Path,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str] | None = None,
    input_shape: Sequence[int] = (1, 3, 64, 64),
    onnx_input_shape: Sequence[int] | None = None,
    **build_options: object,
) -> Path:
    """Write ``model.onnx`` + ``manifest.json`` (RGB, 1/255, letterbox 114 center) and return the manifest path.

    ``onnx_input_shape`` lets the model disagree with the manifest on purpose.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, np.float32)
    classes = list(classes) if classes is not None else [f"c{i}" for i in range(scores.shape[-1])]
    build_detector_onnx(folder / "model.onnx", boxes, scores, onnx_input_shape or input_shape, **build_options)  # type: ignore[arg-type]
    manifest = Manifest(
        name="tiny",
        classes=classes,
        input=InputSpec(name=str(build_options.get("input_name", "images")), shape=list(input_shape)),
        output=OutputSpec(format="shelfsight", names=[str(build_options.get("output_name", "output"))]),
        artifacts=[artifact_for(folder, "model.onnx")],
    )
    return write_manifest(manifest, folder)
