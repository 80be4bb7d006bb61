"""The steps of ``export-model --int8`` as pure functions with typed options, and the output-folder rules.

``shelfsight.export.int8_pipeline`` strings these together (with the pruning steps of ``shelfsight.export.prune``);
each can be run and tested on its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shelfsight.calibration.cache import calibrate_tensor_ranges
from shelfsight.calibration.images import CalibrationImageSet, select_calibration_images
from shelfsight.calibration.reader import ImageCalibrationReader, calibration_digest
from shelfsight.export.quantize import (
    Int8KernelReport,
    QuantizeOptions,
    expected_float_convs,
    inspect_int8_kernels,
    preprocess_for_quantization,
    quantize_qdq,
    verify_int8_kernels,
)
from shelfsight.export.report import VariantResult
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import (
    MANIFEST_FILENAME,
    Metrics,
    artifact_for,
    load_manifest,
    resolve_artifact,
    write_manifest,
)

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
CALIBRATION_FILENAME = "calibration.json"
REJECTED_DIR = "rejected"
REPORT_FILES = ("report.json", "report.md", "report.png")
DEFAULT_MIN_AGREEMENT = 0.9


class Int8GateError(ShelfSightError):
    """An INT8 variant lost more accuracy than allowed; it was moved to ``rejected/`` with the report."""


class OutputFolderError(ShelfSightError):
    """The output folder holds something this run must not overwrite."""


# --- steps ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp32StepOptions:
    imgsz: int | None = None
    name: str | None = None
    opset: int = 17
    command: str | None = None


def export_fp32_step(checkpoint: Path, out_dir: Path, options: Fp32StepOptions) -> Path:
    """Checkpoint -> FP32 ONNX folder via the detector's exporter (with its PyTorch-vs-ORT parity gate)."""
    from shelfsight.export.onnx_export import ExportOptions, export_onnx

    export_options = ExportOptions(imgsz=options.imgsz, name=options.name, opset=options.opset, command=options.command)
    return export_onnx(checkpoint, out_dir, export_options)


@dataclass(frozen=True)
class CalibrationStepOptions:
    source: Path
    count: int = 300
    seed: int = 0
    split: str = "train"


def calibration_set_step(options: CalibrationStepOptions) -> CalibrationImageSet:
    return select_calibration_images(options.source, options.count, options.seed, options.split)


@dataclass(frozen=True)
class QuantizeStepOptions:
    quantize: QuantizeOptions
    cache_dir: Path
    target: Literal["cpu", "tensorrt"] = "cpu"


@dataclass(frozen=True)
class QuantizeOutcome:
    manifest: Path
    kernels: Int8KernelReport | None
    calibration_cache_hit: bool


def quantize_step(
    fp32_manifest: Path, images: CalibrationImageSet, out_dir: Path, options: QuantizeStepOptions
) -> QuantizeOutcome:
    """FP32 model folder -> INT8 Q/DQ model folder. For the CPU target it fails unless every conv runs as INT8.

    Works for any model folder with a manifest, including hand-written manifests of third-party ONNX models.
    """
    from shelfsight.export.prune import tool_versions

    fp32 = load_manifest(fp32_manifest)
    fp32_onnx = resolve_artifact(fp32_manifest, fp32.artifact("model"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shelfsight-quant-") as tmp:
        pre = preprocess_for_quantization(fp32_onnx, Path(tmp) / "pre.onnx")
        digest = calibration_digest(images, fp32.input)
        reader = ImageCalibrationReader(images, fp32.input)
        ranges = calibrate_tensor_ranges(pre, reader, options.quantize.calib_method, digest, options.cache_dir)
        quantize_qdq(pre, out_dir / MODEL_FILENAME, ranges.cache_path, options.quantize)
        kernels = None
        if options.target == "cpu":
            kernels = inspect_int8_kernels(out_dir / MODEL_FILENAME, expected_float_convs(pre, options.quantize))
            verify_int8_kernels(kernels, out_dir / MODEL_FILENAME)
    shutil.copyfile(ranges.cache_path, out_dir / CALIBRATION_FILENAME)
    provenance = fp32.provenance.model_copy(
        update={
            "calibration_method": options.quantize.calib_method,
            "calibration_image_count": len(images),
            "calibration_digest": digest,
            "exporter": describe_quantization(options),
            "tool_versions": tool_versions(),
        }
    )
    manifest = fp32.model_copy(
        update={
            "name": f"{fp32.name}-int8" + ("-tensorrt" if options.target == "tensorrt" else ""),
            "precision": "int8",
            "artifacts": [
                artifact_for(out_dir, MODEL_FILENAME, "model"),
                artifact_for(out_dir, CALIBRATION_FILENAME, "calibration_cache"),
            ],
            "provenance": provenance,
            "metrics": Metrics(),
        }
    )
    return QuantizeOutcome(write_manifest(manifest, out_dir), kernels, ranges.cache_hit)


def describe_quantization(options: QuantizeStepOptions) -> str:
    q = options.quantize
    parts = [
        f"onnxruntime quantize_static QDQ for {options.target}",
        f"activations {q.activation_type}{' symmetric' if q.symmetric_activations else ''}",
        f"weights {q.weight_type} {'per-channel' if q.per_channel else 'per-tensor'}",
    ]
    parts += [
        label
        for flag, label in (
            (q.reduce_range, "reduce_range"),
            (q.float_tail, "float tail"),
            (q.float_stem, "float stem"),
            (q.float_leading_convs, f"first {q.float_leading_convs} conv(s) float"),
            (q.share_concat_ranges, "shared concat ranges"),
        )
        if flag
    ]
    return ", ".join(parts)


@dataclass(frozen=True)
class EvaluateStepOptions:
    val_data: Path
    limit: int | None = None
    threads: int = 2


def evaluate_step(manifest_path: Path, options: EvaluateStepOptions) -> Any:
    """-> EvalResult of an exported folder, through the runtime's ORT backend (what the device runs)."""
    from shelfsight.export.data import load_data_yaml
    from shelfsight.export.evaluate import EVAL_CONF_THRESHOLD, EVAL_IOU_THRESHOLD, EVAL_MAX_DET, evaluate_detector
    from shelfsight.runtime.model import load_model

    spec = load_data_yaml(options.val_data)
    manifest = load_manifest(manifest_path)
    if spec.names != manifest.classes:
        raise ShelfSightError(
            f"{options.val_data}: validation classes {spec.names} do not match the model's {manifest.classes}"
        )
    detector = load_model(
        manifest_path,
        threads=options.threads,
        conf_threshold=EVAL_CONF_THRESHOLD,
        iou_threshold=EVAL_IOU_THRESHOLD,
        max_det=EVAL_MAX_DET,
    )
    try:
        return evaluate_detector(detector.detect, spec, "val", limit=options.limit)
    finally:
        detector.close()


def record_metrics(manifest_path: Path, metrics: Metrics) -> Path:
    """Write measured metrics into a manifest (artifacts and their hashes are untouched)."""
    manifest = load_manifest(manifest_path)
    return write_manifest(manifest.model_copy(update={"metrics": metrics}), manifest_path.parent)


def apply_gate(
    results: list[VariantResult],
    max_map_drop: float,
    max_prune_drop: float | None = None,
    min_agreement: float | None = None,
) -> list[str]:
    """Mark each gated variant passed/failed -> names of the failed ones. ``results`` lists parents first.

    Each step's loss is bounded against the model it was made from: quantization (INT8 vs its FP32 parent) by
    ``max_map_drop``, pruning + fine-tuning (pruned FP32 vs the original) by ``max_prune_drop`` (default: the same).
    A variant made from a rejected model is rejected too, and one without a measured drop fails: an unmeasured
    model is not proven to be as accurate.

    With ``min_agreement`` (no labels: ``map50`` is the agreement with FP32) an INT8 variant passes when its
    agreement is at least ``min_agreement``; ``max_map_drop`` is not used then.
    """
    failed: list[str] = []
    for result in results:
        if not result.gated:
            continue
        limit = max_map_drop if result.precision == "int8" else max_prune_drop
        limit = max_map_drop if limit is None else limit
        drop = result.map50_drop
        if min_agreement is not None and result.precision == "int8":
            ok = result.map50 is not None and result.map50 >= min_agreement - 1e-9
        else:
            ok = drop is not None and drop <= limit + 1e-9
        result.passed = ok and result.parent not in failed
        if not result.passed:
            failed.append(result.name)
    return failed


# --- output folder -------------------------------------------------------------------------------------------------


def folder_source_sha256(folder: Path) -> str | None:
    """What an existing output folder was made from: an INT8 export's report, or a plain export's manifest."""
    report = folder / "report.json"
    if report.is_file():
        try:
            return json.loads(report.read_text(encoding="utf-8"))["settings"]["source_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if (folder / MANIFEST_FILENAME).is_file():
        try:
            return load_manifest(folder).provenance.source_checkpoint_sha256
        except ShelfSightError:
            return None
    return None


def check_output_folder(out: Path, source_sha256: str, force: bool) -> None:
    """Refuse to replace a folder that holds another model (or anything unrecognised) unless ``force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a folder")
    if force or not any(out.iterdir()):
        return
    existing = folder_source_sha256(out)
    if existing is None:
        raise OutputFolderError(f"{out}: not empty and holds no model export of ours; choose another --out or --force")
    if existing != source_sha256:
        raise OutputFolderError(
            f"{out}: already holds a different model (made from {existing[:12]}, this run from {source_sha256[:12]}); "
            "add --force to replace it"
        )


def finalize_output(staging: Path, out: Path) -> Path:
    """Swap the finished staging folder into place; the old folder is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
