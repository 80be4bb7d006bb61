"""Write a manifest for an ONNX file nobody here exported (``export-model describe``).

The graph is inspected with ONNX Runtime only (no onnx/torch import, so this runs on a device too): the input
name and shape, the output names and shapes, and the file's sha256 come from the model itself; the user supplies
what a graph cannot say (output format, class names, preprocessing). A format whose layout does not fit the
model's output shape, or a class list of the wrong length, is refused before anything is written.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from shelfsight.runtime.decoders import check_output_layout
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import MANIFEST_FILENAME, Manifest, Precision, artifact_for

_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def read_classes(source: str | Path) -> list[str]:
    """Class names from a text file (one per line, like coco.names) or a YOLO data YAML (``names:`` list or map)."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the class list: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        return _classes_from_yaml(path, text)
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ManifestError(f"{path}: the class list is empty")
    if "" in lines:
        # Class ids are line numbers; silently skipping a blank line would shift every class after it.
        raise ManifestError(f"{path}:{lines.index('') + 1}: empty class name (one class per line, ids follow lines)")
    return lines


def _classes_from_yaml(path: Path, text: str) -> list[str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    names = data.get("names") if isinstance(data, dict) else None
    classes = _names_list(names)
    if classes is None:
        raise ManifestError(f"{path}: expected a 'names' list or an id -> name map")
    return classes


def _names_list(names: Any) -> list[str] | None:
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            return None
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    return None


def _classes_from_metadata(metadata: dict[str, str]) -> list[str] | None:
    """Ultralytics exports store ``names`` as the repr of an id -> name dict in the ONNX metadata."""
    if "names" not in metadata:
        return None
    try:
        return _names_list(ast.literal_eval(metadata["names"]))
    except (ValueError, SyntaxError):
        return None


def _manifest_target(onnx_path: Path, manifest_path: str | Path | None) -> Path:
    if manifest_path is None:
        return onnx_path.parent / MANIFEST_FILENAME
    target = Path(manifest_path)
    return target if target.suffix.lower() == ".json" else target / MANIFEST_FILENAME


def _relative_artifact_path(onnx_path: Path, folder: Path) -> str:
    """The ONNX path relative to the manifest folder, by the loader's rule (resolved, symlinks followed)."""
    target, root = onnx_path.resolve(), folder.resolve()
    if not target.is_relative_to(root):
        hint = " (it is a symlink leading outside; copy the file instead)" if onnx_path.is_symlink() else ""
        raise ManifestError(
            f"{onnx_path}: the model must be inside the manifest folder {folder}{hint}; artifact paths are relative"
        )
    return target.relative_to(root).as_posix()


def _session(onnx_path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ManifestError(f"{onnx_path}: onnxruntime cannot load the model: {first}") from None


def _input_shape(onnx_path: Path, node: Any, input_hw: tuple[int, int] | None) -> list[int]:
    shape = list(node.shape)
    if node.type not in _FLOAT_INPUTS:
        raise ManifestError(f"{onnx_path}: input '{node.name}' is {node.type}; only float32/float16 inputs are fed")
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ManifestError(f"{onnx_path}: input '{node.name}' shape {shape} is not [N, 3, H, W]")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
    fixed_hw = [d if isinstance(d, int) and d > 0 else None for d in shape[2:]]
    if input_hw is not None:
        for axis, (fixed, wanted) in enumerate(zip(fixed_hw, input_hw, strict=True)):
            if fixed is not None and fixed != wanted:
                raise ManifestError(
                    f"{onnx_path}: input '{node.name}' has fixed {'HW'[axis]} = {fixed}, but input_hw asks {wanted}"
                )
        return [batch, 3, int(input_hw[0]), int(input_hw[1])]
    if None in fixed_hw:
        raise ManifestError(
            f"{onnx_path}: input '{node.name}' has a dynamic size {shape}; give the network input size (input_hw)"
        )
    return [batch, 3, int(shape[2]), int(shape[3])]


def _output_shapes(session: Any, names: list[str], input_name: str, input_shape: list[int], dtype: Any) -> list[list]:
    """Declared output shapes; when one is dynamic, the shapes of one real run on a blank input instead."""
    declared = {node.name: list(node.shape) for node in session.get_outputs()}
    shapes = [declared[name] for name in names]
    if all(isinstance(d, int) and d >= 0 for shape in shapes for d in shape):
        return shapes
    results = session.run(names, {input_name: np.zeros(input_shape, dtype)})
    return [list(result.shape) for result in results]


def describe_onnx(
    onnx_path: str | Path,
    fmt: str,
    classes: Sequence[str] | str | Path | None,
    manifest_path: str | Path | None = None,
    *,
    name: str | None = None,
    channel_order: str = "RGB",
    pixel_scale: float = 1.0 / 255.0,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    resize: str = "letterbox",
    letterbox_align: str = "center",
    pad_value: int = 114,
    input_hw: tuple[int, int] | None = None,
    output_names: Sequence[str] | None = None,
    precision: Precision | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Inspect ``onnx_path``, check ``fmt`` against its output shape, write and return its manifest.

    ``classes``: a list of names, a path to a names file (one per line) or a YOLO data YAML, or None to use the
    ``names`` an Ultralytics export stores in its metadata. ``manifest_path``: a ``.json`` file or a folder
    (default: ``manifest.json`` beside the ONNX); the ONNX must be inside that folder. ``mean``/``std`` apply
    after ``pixel_scale``: value = (pixel * pixel_scale - mean) / std. ``input_hw`` is required when the input size
    is dynamic. ``precision`` defaults to fp16 for a float16 input, else fp32 (say int8 for a Q/DQ model).
    An existing manifest is only replaced with ``overwrite``.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ManifestError(f"{onnx_path}: ONNX file not found")
    target = _manifest_target(onnx_path, manifest_path)
    if target.exists() and not overwrite:
        raise ManifestError(f"{target}: a manifest already exists; pass overwrite to replace it")
    relative = _relative_artifact_path(onnx_path, target.parent)

    session = _session(onnx_path)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ManifestError(f"{onnx_path}: detectors here take 1 input, the model has {[i.name for i in inputs]}")
    input_shape = _input_shape(onnx_path, inputs[0], input_hw)
    available = [node.name for node in session.get_outputs()]
    names = list(output_names) if output_names else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ManifestError(f"{onnx_path}: output(s) {unknown} not in the model's outputs {available}")

    if classes is None:
        class_names = _classes_from_metadata(session.get_modelmeta().custom_metadata_map)
        if class_names is None:
            raise ManifestError(f"{onnx_path}: no class list given and the model's metadata holds no 'names'")
    elif isinstance(classes, (str, Path)):
        class_names = read_classes(classes)
    else:
        class_names = [str(c) for c in classes]
        if not class_names:
            raise ManifestError(f"{onnx_path}: the class list is empty")

    shapes = _output_shapes(session, names, inputs[0].name, input_shape, _FLOAT_INPUTS[inputs[0].type])
    check_output_layout(fmt, shapes, (input_shape[2], input_shape[3]), len(class_names), where=str(onnx_path))

    import onnxruntime as ort

    document = {
        "name": name or onnx_path.stem,
        "classes": class_names,
        "input": {
            "name": inputs[0].name,
            "shape": input_shape,
            "channel_order": channel_order,
            "pixel_scale": pixel_scale,
            "mean": list(mean),
            "std": list(std),
            "resize": resize,
            "pad_value": pad_value,
            "letterbox_align": letterbox_align,
        },
        "output": {"format": fmt, "names": names},
        "precision": precision or ("fp16" if inputs[0].type == "tensor(float16)" else "fp32"),
        "artifacts": [artifact_for(target.parent, relative).model_dump()],
        "provenance": {
            "exporter": "third-party ONNX described by shelfsight.runtime.describe",
            "tool_versions": {"onnxruntime": ort.__version__},
        },
    }
    try:
        # Validated as one document, so an error names its full field path (e.g. input.std).
        manifest = Manifest.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<manifest>"
        raise ManifestError(f"{onnx_path}: field '{field}': {first['msg']}") from None

    # Written beside the model through a temporary name, so an interrupted write never leaves half a manifest.
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return manifest
