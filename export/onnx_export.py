"""Checkpoint -> single-file FP32 ONNX model + ``manifest.json``, with an ORT-vs-PyTorch parity gate in between.

Exporter choice: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default since torch
2.9). On this model it gives the cleaner graph: Conv/Relu/Concat/Split/MaxPool/Resize plus the decode ops, static
shapes, no Shape/Expand/Identity leftovers and no stray Constant nodes, which the legacy TorchScript exporter
(``dynamo=False``, deprecated and slated for removal) still emits. BatchNorm is folded into the convolutions by
``Detector.fused()`` *before* export, so the folding does not depend on either exporter's optimizer passes; the
parity check compares against the unfused model, so a wrong fold would fail it.
The exporter builds opset 18 and converts down to the requested opset; opset 17 is the default because TensorRT 8.6
parses up to 17. A conversion that does not land on the requested opset is an error, not a silent upgrade.
``external_data=False`` keeps the weights inside ``model.onnx`` (one file to hash, copy and verify).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict, Field

from shelfsight.export.model import INPUT_NAME, OUTPUT_NAME, CheckpointMeta, Detector, load_checkpoint
from shelfsight.export.torch_detector import TorchDetector
from shelfsight.runtime.compare import ComparisonResult, compare_detections
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    Metrics,
    Provenance,
    artifact_for,
    sha256_file,
    write_manifest,
)
from shelfsight.runtime.postprocess import nms

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
CHECKPOINT_COPY = "source.pt"
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class ExportError(ShelfSightError):
    """The export ran but its result cannot be trusted (checker failure, parity failure, wrong opset)."""


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    imgsz: int | None = Field(None, ge=32, multiple_of=32, description="input size; default: the checkpoint's")
    name: str | None = Field(None, min_length=1, description="model name; default: the checkpoint file stem")
    opset: int = Field(17, ge=13, le=23)
    parity_frames: int = Field(4, ge=1, le=64, description="synthetic frames when no parity_images are given")
    parity_images: list[Path] = Field(default_factory=list)
    parity_conf: float = Field(0.01, ge=0, le=1, description="confidence threshold for the detection comparison")
    parity_iou: float = Field(0.99, gt=0, le=1, description="min IoU of matched torch/ORT boxes")
    parity_score_atol: float = Field(1e-3, gt=0, description="max |score difference|, detections and raw output")
    parity_box_atol: float = Field(0.05, gt=0, description="max |raw box coordinate difference| in input pixels")
    include_checkpoint: bool = Field(False, description="copy the source checkpoint into the model folder")
    metrics: dict[str, Any] | None = Field(None, description="manifest metrics; default: the checkpoint's")
    command: str | None = None


@dataclass(frozen=True)
class ParityReport:
    frames: int
    raw_box_max_abs: float
    raw_score_max_abs: float
    comparisons: list[ComparisonResult]

    def ok(self, options: ExportOptions) -> bool:
        return (
            self.raw_box_max_abs <= options.parity_box_atol
            and self.raw_score_max_abs <= options.parity_score_atol
            and all(c.ok for c in self.comparisons)
        )

    def summary(self) -> str:
        matched = sum(c.matched for c in self.comparisons)
        worst_iou = min((c.worst_iou for c in self.comparisons), default=1.0)
        worst_score = max((c.worst_score_delta for c in self.comparisons), default=0.0)
        unmatched = sum(c.unmatched_a + c.unmatched_b for c in self.comparisons)
        return (
            f"{self.frames} frames, raw max |diff| boxes {self.raw_box_max_abs:.2e} px, scores "
            f"{self.raw_score_max_abs:.2e}; {matched} detections matched, {unmatched} unmatched, worst IoU "
            f"{worst_iou:.5f}, worst score delta {worst_score:.2e}"
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress, torchvision notices and opset conversion chatter; keep only errors."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def write_onnx(model: Detector, imgsz: int, path: Path, opset: int) -> Path:
    """Fold BN, export with static shapes to one file, run the ONNX checker and the structural checks."""
    fused = model.fused()
    dummy = torch.zeros(1, 3, imgsz, imgsz)
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                fused,
                (dummy,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed: {first}") from exc
    check_onnx_file(path, imgsz, model.num_classes, opset)
    return path


def check_onnx_file(path: Path, imgsz: int, num_classes: int, opset: int) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path}: onnx.checker rejected the model: {str(exc).splitlines()[0]}") from exc
    graph = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: weights stored as external data ({external[0]}); expected one self-contained file")
    got_opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise ExportError(f"{path}: requested opset {opset} but the exported model has opset {got_opset}")
    leftovers = sorted({n.op_type for n in graph.graph.node} & {"BatchNormalization", "Identity", "Shape"})
    if leftovers:
        raise ExportError(f"{path}: graph still contains {', '.join(leftovers)} nodes (BN not folded / dynamic shapes)")
    want_in = [1, 3, imgsz, imgsz]
    inputs = {i.name: _static_shape(i) for i in graph.graph.input}
    outputs = {o.name: _static_shape(o) for o in graph.graph.output}
    if inputs != {INPUT_NAME: want_in}:
        raise ExportError(f"{path}: expected input {INPUT_NAME}{want_in}, got {inputs}")
    out_shape = outputs.get(OUTPUT_NAME) or []
    if list(outputs) != [OUTPUT_NAME] or len(out_shape) != 3 or out_shape[2] != 4 + num_classes or min(out_shape) < 1:
        raise ExportError(f"{path}: expected one static output {OUTPUT_NAME}[1, A, {4 + num_classes}], got {outputs}")


def _static_shape(value: onnx.ValueInfoProto) -> list[int]:
    """Dimensions with -1 for anything symbolic, so a dynamic axis fails the comparison."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def parity_frames(options: ExportOptions, imgsz: int) -> list[np.ndarray]:
    """Given images, or deterministic synthetic frames in several aspect ratios (letterbox on both axes)."""
    if options.parity_images:
        frames = []
        for path in options.parity_images:
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                raise ShelfSightError(f"{path}: cannot decode parity image")
            frames.append(frame)
        return frames
    rng = np.random.default_rng(0)
    sizes = [(imgsz, imgsz), (640, 480), (1280, 720), (360, 640), (500, 300), (200, 200)]
    frames = []
    for i in range(options.parity_frames):
        width, height = sizes[i % len(sizes)]
        frame = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
        frame = cv2.GaussianBlur(frame, (0, 0), 3)
        for _ in range(12):  # some edges and flat patches, so the net's activations are not just noise
            x1, y1 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            x2, y2 = x1 + int(rng.integers(8, width // 3 + 9)), y1 + int(rng.integers(8, height // 3 + 9))
            cv2.rectangle(frame, (x1, y1), (x2, y2), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        frames.append(frame)
    return frames


def _same_anchor_detections(
    expected: np.ndarray, actual: np.ndarray, conf: float, iou: float, max_det: int
) -> tuple[Detections, Detections]:
    """The reference's detections, and ORT's boxes and scores at exactly the anchors the reference kept.

    NMS runs once, on the reference. Flat image regions and letterbox padding give many anchors bit-identical
    scores; 1e-7 of float noise then lets NMS keep a different (equivalent) member of a tie, so comparing two
    independently suppressed sets fails good exports at random. Per-anchor comparison has no such ties, and
    the raw-output check bounds every other anchor. Boxes stay in network-input pixels: mapped to the frame they
    would be clipped, and a box lying in the letterbox padding would collapse to zero area (IoU undefined).
    """
    ref_scores, ort_scores = expected[0, :, 4:], actual[0, :, 4:]
    ref_class = ref_scores.argmax(1)
    ref_conf = np.take_along_axis(ref_scores, ref_class[:, None], 1)[:, 0]
    candidates = np.flatnonzero(ref_conf >= conf)
    kept = candidates[nms(expected[0, candidates, :4], ref_conf[candidates], ref_class[candidates], iou, max_det)]
    ours = Detections(expected[0, kept, :4], ref_conf[kept], ref_class[kept])
    # Same class as the reference: with two classes scored alike, an argmax flip is one more tie, and the
    # score delta of the reference's class is what matters.
    theirs_conf = np.take_along_axis(ort_scores[kept], ref_class[kept, None], 1)[:, 0]
    theirs = Detections(actual[0, kept, :4], theirs_conf, ref_class[kept])
    return ours, theirs


def check_parity(
    onnx_path: Path, reference: TorchDetector, frames: list[np.ndarray], options: ExportOptions
) -> ParityReport:
    """Run each frame through torch and ORT (same preprocessing); compare raw outputs and the kept detections."""
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
    box_diff, score_diff, comparisons = 0.0, 0.0, []
    for frame in frames:
        batch, _ = reference.preprocess([frame])
        expected = reference.infer(batch)
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        box_diff = max(box_diff, float(np.abs(actual[..., :4] - expected[..., :4]).max()))
        score_diff = max(score_diff, float(np.abs(actual[..., 4:] - expected[..., 4:]).max()))
        ours, theirs = _same_anchor_detections(
            expected, actual, options.parity_conf, reference.iou_threshold, reference.max_det
        )
        comparisons.append(compare_detections(ours, theirs, options.parity_iou, options.parity_score_atol))
    return ParityReport(len(frames), box_diff, score_diff, comparisons)


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "shelfsight"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _metrics(meta: CheckpointMeta, options: ExportOptions, imgsz: int) -> Metrics:
    """Given metrics, else the checkpoint's validation figures if they were measured at the exported input size."""
    if options.metrics is not None:
        source = options.metrics
    else:
        source = meta.metrics if imgsz == meta.imgsz else {}
    known = set(Metrics.model_fields)
    try:
        return Metrics.model_validate({k: v for k, v in source.items() if k in known})
    except ValueError as exc:
        raise ShelfSightError(f"metrics for the manifest are invalid: {str(exc).splitlines()[0]}") from None


def export_onnx(checkpoint: Path, out_dir: Path, options: ExportOptions) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx``; write ``manifest.json`` only if parity holds. -> manifest."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, meta = load_checkpoint(checkpoint)
    imgsz = options.imgsz or meta.imgsz
    out_dir.mkdir(parents=True, exist_ok=True)
    # A manifest left by an earlier export must not vouch for the model this run writes.
    (out_dir / MANIFEST_FILENAME).unlink(missing_ok=True)
    onnx_path = write_onnx(model, imgsz, out_dir / MODEL_FILENAME, options.opset)

    reference = TorchDetector(model, meta.class_names, imgsz, conf_threshold=options.parity_conf)
    report = check_parity(onnx_path, reference, parity_frames(options, imgsz), options)
    log.info("parity: %s", report.summary())
    if not report.ok(options):
        failing = next((c for c in report.comparisons if not c.ok), None)
        detail = f"; first failing frame: {failing.summary()}" if failing is not None else ""
        raise ExportError(f"{onnx_path}: ONNX Runtime output differs from PyTorch: {report.summary()}{detail}")

    artifacts = [artifact_for(out_dir, MODEL_FILENAME, "model")]
    if options.include_checkpoint:
        shutil.copyfile(checkpoint, out_dir / CHECKPOINT_COPY)
        artifacts.append(artifact_for(out_dir, CHECKPOINT_COPY, "checkpoint"))
    manifest = Manifest(
        name=options.name or checkpoint.stem,
        classes=meta.class_names,
        input=reference.input_spec,
        output=reference.output_spec,
        precision="fp32",
        artifacts=artifacts,
        provenance=Provenance(
            source_checkpoint_sha256=sha256_file(checkpoint),
            exporter=f"torch.onnx.export(dynamo=True, opset={options.opset}), BN folded",
            command=options.command or " ".join(sys.argv),
            tool_versions=_tool_versions(),
        ),
        metrics=_metrics(meta, options, imgsz),
    )
    return write_manifest(manifest, out_dir)
