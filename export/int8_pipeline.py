"""``export-model --int8``: FP32 -> (prune -> fine-tune) -> calibrate -> quantize -> evaluate -> gate -> report.

Each step is a function ``step(inputs, options) -> Path`` with typed options, so a step can be run, tested and
reasoned about on its own; :func:`run_int8_export` only strings them together. Options that do not make sense
together are refused when the options are built, never quietly adjusted.

Output folder (written to a temporary sibling and renamed at the end, so a crash never leaves a half-written folder
that looks valid)::

    OUT/fp32/            model.onnx + manifest.json           the FP32 parent
    OUT/int8/            Q/DQ INT8 for ONNX Runtime CPU       (QUInt8 activations, QInt8 per-channel weights)
    OUT/int8-tensorrt/   Q/DQ INT8 for TensorRT               (symmetric QInt8 everywhere; explicit quantization)
    OUT/pruned-fp32/     pruned (+ fine-tuned) FP32, with pruned.pt
    OUT/pruned-int8/     ... and its INT8 versions
    OUT/report.json, report.md, report.png
    OUT/rejected/        INT8 variants whose mAP50 drop exceeded --max-map-drop (the command then exits non-zero)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shelfsight.calibration.cache import CalibMethodName, calibrate_tensor_ranges
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
from shelfsight.export.report import LatencyStats, VariantResult, measure_ort_latency, write_report
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    Metrics,
    Provenance,
    artifact_for,
    load_manifest,
    resolve_artifact,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
CALIBRATION_FILENAME = "calibration.json"
PRUNED_CHECKPOINT = "pruned.pt"
REJECTED_DIR = "rejected"


class Int8GateError(ShelfSightError):
    """An INT8 variant lost more accuracy than allowed; it was moved to ``rejected/`` with the report."""


class OutputFolderError(ShelfSightError):
    """The output folder holds something this run must not overwrite."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shelfsight" / "calibration"


class Int8ExportOptions(BaseModel):
    """Everything ``export-model CHECKPOINT --int8`` accepts. Incompatible combinations raise on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_data: Path = Field(description="image folder or data.yaml to calibrate on")
    val_data: Path = Field(description="data.yaml whose val split scores every variant")
    imgsz: int | None = Field(None, ge=32, multiple_of=32)
    name: str | None = None
    calib_method: CalibMethodName = "minmax"
    calib_images: int = Field(300, ge=1)
    calib_seed: int = 0
    calib_split: Literal["train", "val", "test"] = "train"
    calib_cache: Path | None = None
    prune: float | None = Field(None, gt=0.0, lt=1.0)
    finetune_epochs: int = Field(0, ge=0)
    train_data: Path | None = None
    finetune_batch: int = Field(8, ge=1)
    finetune_lr: float = Field(0.001, gt=0)
    max_map_drop: float = Field(0.01, ge=0.0, le=1.0)
    val_limit: int | None = Field(None, ge=1)
    latency_threads: int = Field(1, ge=1)
    latency_runs: int = Field(50, ge=1)
    tensorrt_variant: bool = True
    opset: int = Field(17, ge=13, le=23)
    force: bool = False
    command: str | None = None

    @model_validator(mode="after")
    def _compatible(self) -> Int8ExportOptions:
        if self.finetune_epochs and self.prune is None:
            raise ValueError("--finetune-epochs fine-tunes a pruned model: add --prune RATIO")
        if self.finetune_epochs and self.train_data is None:
            raise ValueError("--finetune-epochs needs --train-data DATA_YAML")
        if self.train_data is not None and not self.finetune_epochs:
            raise ValueError("--train-data is only used for fine-tuning: add --finetune-epochs N")
        if self.val_data.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"--val-data must be a data.yaml, got {self.val_data}")
        return self

    def quantize_options(self, target: Literal["cpu", "tensorrt"]) -> QuantizeOptions:
        if target == "tensorrt":
            return QuantizeOptions.for_tensorrt(calib_method=self.calib_method)
        return QuantizeOptions(calib_method=self.calib_method)


# --- steps ---------------------------------------------------------------------------------------------------------


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "torch-pruning", "shelfsight"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


@dataclass(frozen=True)
class Fp32StepOptions:
    imgsz: int | None
    name: str | None
    opset: int
    command: str | None


def export_fp32_step(checkpoint: Path, out_dir: Path, options: Fp32StepOptions) -> Path:
    """Checkpoint -> FP32 ONNX folder via the detector's exporter (with its PyTorch-vs-ORT parity gate)."""
    from shelfsight.export.onnx_export import ExportOptions, export_onnx

    return export_onnx(
        checkpoint,
        out_dir,
        ExportOptions(imgsz=options.imgsz, name=options.name, opset=options.opset, command=options.command),
    )


def export_pruned_fp32_step(pruned_checkpoint: Path, out_dir: Path, options: Fp32StepOptions) -> Path:
    """Pruned checkpoint -> FP32 ONNX folder, with the same writer and parity gate as the unpruned export."""
    from shelfsight.export.onnx_export import ExportError, ExportOptions, check_parity, parity_frames, write_onnx
    from shelfsight.export.prune import PRUNING_KEY, load_pruned_checkpoint
    from shelfsight.export.torch_detector import TorchDetector

    model, meta = load_pruned_checkpoint(pruned_checkpoint)
    imgsz = options.imgsz or meta.imgsz
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = write_onnx(model, imgsz, out_dir / MODEL_FILENAME, options.opset)
    export_options = ExportOptions(imgsz=imgsz, opset=options.opset)
    reference = TorchDetector(model, meta.class_names, imgsz, conf_threshold=export_options.parity_conf)
    parity = check_parity(onnx_path, reference, parity_frames(export_options, imgsz), export_options)
    if not parity.ok(export_options):
        raise ExportError(f"{onnx_path}: ONNX Runtime output differs from PyTorch: {parity.summary()}")
    shutil.copyfile(pruned_checkpoint, out_dir / PRUNED_CHECKPOINT)
    record = meta.extra.get(PRUNING_KEY) or {}
    manifest = Manifest(
        name=options.name or pruned_checkpoint.stem,
        classes=meta.class_names,
        input=reference.input_spec,
        output=reference.output_spec,
        precision="fp32",
        artifacts=[
            artifact_for(out_dir, MODEL_FILENAME, "model"),
            artifact_for(out_dir, PRUNED_CHECKPOINT, "checkpoint"),
        ],
        provenance=Provenance(
            source_checkpoint_sha256=record.get("source_checkpoint_sha256"),
            pruning_ratio=record.get("ratio"),
            exporter=f"torch.onnx.export(dynamo=True, opset={options.opset}), BN folded, pruned",
            command=options.command or " ".join(sys.argv),
            tool_versions=_tool_versions(),
        ),
    )
    return write_manifest(manifest, out_dir)


@dataclass(frozen=True)
class PruneStepOptions:
    ratio: float
    imgsz: int | None


def prune_step(checkpoint: Path, out_path: Path, options: PruneStepOptions) -> Path:
    """Checkpoint -> pruned checkpoint (channels removed, not yet fine-tuned)."""
    from shelfsight.export.model import load_checkpoint
    from shelfsight.export.prune import PruneOptions, prune_detector, save_pruned_checkpoint

    model, meta = load_checkpoint(checkpoint)
    imgsz = options.imgsz or meta.imgsz
    result = prune_detector(model, PruneOptions(ratio=options.ratio, imgsz=imgsz))
    return save_pruned_checkpoint(
        result,
        result.model,
        meta.class_names,
        imgsz,
        out_path,
        extra_record={"source_checkpoint_sha256": sha256_file(checkpoint)},
    )


@dataclass(frozen=True)
class FinetuneStepOptions:
    train_data: Path
    epochs: int
    batch: int
    lr: float
    imgsz: int | None
    val_limit: int | None


def finetune_step(pruned_checkpoint: Path, out_dir: Path, options: FinetuneStepOptions) -> Path:
    """Fine-tune a pruned checkpoint with the project's trainer; -> a pruned checkpoint with the trained weights."""
    from shelfsight.export import train as trainer
    from shelfsight.export.data import load_data_yaml
    from shelfsight.export.prune import PRUNING_KEY, load_pruned_checkpoint, resave_with_record

    if "model" not in inspect.signature(trainer.train).parameters:
        raise ShelfSightError(
            "fine-tuning a pruned model needs the trainer to accept a built model (train(cfg, model=...)); "
            "this version's trainer does not"
        )
    model, meta = load_pruned_checkpoint(pruned_checkpoint)
    classes = load_data_yaml(options.train_data).names
    if classes != meta.class_names:
        raise ShelfSightError(f"{options.train_data}: classes {classes} differ from the model's {meta.class_names}")
    config = trainer.TrainConfig(
        data=options.train_data,
        out=out_dir,
        epochs=options.epochs,
        imgsz=options.imgsz or meta.imgsz,
        batch=options.batch,
        lr=options.lr,
        warmup_epochs=0.0,
        val_every=max(1, options.epochs),
        val_limit=options.val_limit,
        progress=False,
    )
    result = trainer.train(config, model=model)  # type: ignore[call-arg]
    trained = result.best or result.last
    return resave_with_record(trained, out_dir / PRUNED_CHECKPOINT, meta.extra.get(PRUNING_KEY) or {})


@dataclass(frozen=True)
class CalibrationStepOptions:
    source: Path
    count: int
    seed: int
    split: str


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
    """FP32 model folder -> INT8 Q/DQ model folder. For the CPU target, fails unless every conv runs as INT8."""
    fp32 = load_manifest(fp32_manifest)
    fp32_onnx = resolve_artifact(fp32_manifest, fp32.artifact("model"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shelfsight-quant-") as tmp:
        pre = preprocess_for_quantization(fp32_onnx, Path(tmp) / "pre.onnx")
        digest = calibration_digest(images, fp32.input)
        ranges = calibrate_tensor_ranges(
            pre, ImageCalibrationReader(images, fp32.input), options.quantize.calib_method, digest, options.cache_dir
        )
        quantize_qdq(pre, out_dir / MODEL_FILENAME, ranges.cache_path, options.quantize)
        kernels = None
        if options.target == "cpu":
            kernels = inspect_int8_kernels(out_dir / MODEL_FILENAME, expected_float_convs(pre, options.quantize))
            verify_int8_kernels(kernels, out_dir / MODEL_FILENAME)
    shutil.copyfile(ranges.cache_path, out_dir / CALIBRATION_FILENAME)
    manifest = fp32.model_copy(
        update={
            "name": f"{fp32.name}-int8" + ("-tensorrt" if options.target == "tensorrt" else ""),
            "precision": "int8",
            "artifacts": [
                artifact_for(out_dir, MODEL_FILENAME, "model"),
                artifact_for(out_dir, CALIBRATION_FILENAME, "calibration_cache"),
            ],
            "provenance": fp32.provenance.model_copy(
                update={
                    "calibration_method": options.quantize.calib_method,
                    "calibration_image_count": len(images),
                    "calibration_digest": digest,
                    "exporter": _quantizer_description(options),
                    "tool_versions": _tool_versions(),
                }
            ),
            "metrics": Metrics(),
        }
    )
    return QuantizeOutcome(write_manifest(manifest, out_dir), kernels, ranges.cache_hit)


def _quantizer_description(options: QuantizeStepOptions) -> str:
    q = options.quantize
    return (
        f"onnxruntime quantize_static QDQ for {options.target}: activations {q.activation_type}"
        f"{' symmetric' if q.symmetric_activations else ''}, weights {q.weight_type} "
        f"{'per-channel' if q.per_channel else 'per-tensor'}{', reduce_range' if q.reduce_range else ''}, "
        f"{'float tail' if q.float_tail else 'all ops quantized'}"
    )


@dataclass(frozen=True)
class EvaluateStepOptions:
    val_data: Path
    limit: int | None


def evaluate_step(manifest_path: Path, options: EvaluateStepOptions) -> Any:
    """mAP of an exported folder through the runtime's ORT backend (what the device runs) and the evaluator."""
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
        threads=2,
        conf_threshold=EVAL_CONF_THRESHOLD,
        iou_threshold=EVAL_IOU_THRESHOLD,
        max_det=EVAL_MAX_DET,
    )
    try:
        return evaluate_detector(detector.detect, spec, "val", limit=options.limit)
    finally:
        detector.close()


def record_metrics(manifest_path: Path, metrics: Metrics) -> Path:
    """Write measured metrics into a manifest (the artifacts and their hashes are untouched)."""
    manifest = load_manifest(manifest_path)
    return write_manifest(manifest.model_copy(update={"metrics": metrics}), manifest_path.parent)


# --- output folder -------------------------------------------------------------------------------------------------


def _manifests_under(folder: Path) -> list[Path]:
    return sorted(p for p in [folder / MANIFEST_FILENAME, *folder.glob(f"*/{MANIFEST_FILENAME}")] if p.is_file())


def check_output_folder(out: Path, source_sha256: str, force: bool) -> None:
    """Refuse to replace a folder that holds another model (or anything unrecognised) unless ``force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a folder")
    if force or not any(out.iterdir()):
        return
    manifests = _manifests_under(out)
    if not manifests:
        raise OutputFolderError(f"{out}: not empty and holds no exported model; choose another --out or add --force")
    for path in manifests:
        try:
            source = load_manifest(path).provenance.source_checkpoint_sha256
        except ShelfSightError:
            source = None
        if source != source_sha256:
            raise OutputFolderError(
                f"{out}: already holds a different model ({path.parent.name}: source "
                f"{(source or 'unknown')[:12]}); add --force to replace it"
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


# --- orchestration -------------------------------------------------------------------------------------------------


@dataclass
class _Variant:
    result: VariantResult
    manifest: Path
    eval_metrics: Any = None
    parent: _Variant | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _model_bytes(manifest_path: Path) -> int:
    manifest = load_manifest(manifest_path)
    return (manifest_path.parent / manifest.artifact("model").path).stat().st_size


def _cost(checkpoint: Path, pruned: bool, imgsz: int) -> tuple[int, int]:
    from shelfsight.export.model import load_checkpoint
    from shelfsight.export.prune import load_pruned_checkpoint, measure_cost

    model, _ = (load_pruned_checkpoint if pruned else load_checkpoint)(checkpoint)
    cost = measure_cost(model, imgsz)
    return cost.params, cost.macs


def run_int8_export(checkpoint: Path, out: Path, options: Int8ExportOptions) -> Path:
    """The whole ``--int8`` export. Returns the report.json path; raises Int8GateError after writing a rejection."""
    from shelfsight.export.model import read_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    source_sha = sha256_file(checkpoint) if checkpoint.is_file() else ""
    header = read_checkpoint(checkpoint)  # refuses non-checkpoints and unsafe pickles before any work
    imgsz = options.imgsz or int(header["imgsz"])
    check_output_folder(out, source_sha, options.force)
    images = calibration_set_step(
        CalibrationStepOptions(options.calib_data, options.calib_images, options.calib_seed, options.calib_split)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        verdict, rejected = _run_variants(checkpoint, staging, images, imgsz, options)
        finalize_output(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if rejected:
        raise Int8GateError(f"{out}/{REJECTED_DIR}: {verdict}")
    return out / "report.json"


def _run_variants(
    checkpoint: Path, staging: Path, images: CalibrationImageSet, imgsz: int, options: Int8ExportOptions
) -> tuple[str, list[str]]:
    cache_dir = options.calib_cache or default_cache_dir()
    fp32_options = Fp32StepOptions(imgsz, options.name, options.opset, options.command)
    evaluate_options = EvaluateStepOptions(options.val_data, options.val_limit)
    variants: list[_Variant] = []

    def add_fp32(name: str, manifest: Path, cost: tuple[int, int], parent: _Variant | None) -> _Variant:
        precision = "fp32"
        variant = _Variant(
            VariantResult(name, precision, name, _model_bytes(manifest), params=cost[0], macs=cost[1]), manifest
        )
        variant.parent = parent
        if parent is not None:
            variant.result.parent = parent.result.name
        variants.append(variant)
        return variant

    def add_int8(parent: _Variant, target: Literal["cpu", "tensorrt"]) -> None:
        prefix = "" if parent.result.name == "fp32" else parent.result.name.removesuffix("-fp32") + "-"
        name = f"{prefix}int8" + ("-tensorrt" if target == "tensorrt" else "")
        outcome = quantize_step(
            parent.manifest,
            images,
            staging / name,
            QuantizeStepOptions(options.quantize_options(target), cache_dir, target),
        )
        result = VariantResult(
            name,
            "int8",
            name,
            _model_bytes(outcome.manifest),
            parent=parent.result.name,
            params=parent.result.params,
            macs=parent.result.macs,
            gated=True,
        )
        if outcome.kernels is not None:
            result.int8_kernels = outcome.kernels.summary()
        else:
            result.notes.append(
                "for TensorRT (symmetric INT8): most convolutions stay float on the ORT CPU provider, "
                "so its CPU latency is not measured"
            )
        result.notes.append("calibration cache " + ("hit" if outcome.calibration_cache_hit else "computed"))
        variants.append(_Variant(result, outcome.manifest, parent=parent))

    fp32 = add_fp32(
        "fp32", export_fp32_step(checkpoint, staging / "fp32", fp32_options), _cost(checkpoint, False, imgsz), None
    )
    add_int8(fp32, "cpu")
    if options.tensorrt_variant:
        add_int8(fp32, "tensorrt")
    if options.prune is not None:
        work = staging / ".work"
        pruned_ckpt = prune_step(checkpoint, work / PRUNED_CHECKPOINT, PruneStepOptions(options.prune, imgsz))
        if options.finetune_epochs:
            assert options.train_data is not None  # checked by the options validator
            pruned_ckpt = finetune_step(
                pruned_ckpt,
                work / "finetune",
                FinetuneStepOptions(
                    options.train_data,
                    options.finetune_epochs,
                    options.finetune_batch,
                    options.finetune_lr,
                    imgsz,
                    options.val_limit,
                ),
            )
        pruned_options = Fp32StepOptions(
            imgsz, f"{load_manifest(fp32.manifest).name}-pruned", options.opset, options.command
        )
        pruned_manifest = export_pruned_fp32_step(pruned_ckpt, staging / "pruned-fp32", pruned_options)
        pruned = add_fp32("pruned-fp32", pruned_manifest, _cost(pruned_ckpt, True, imgsz), fp32)
        pruned.result.notes.append(
            f"pruned {options.prune:.0%} of channels, fine-tuned {options.finetune_epochs} epoch(s)"
        )
        add_int8(pruned, "cpu")
        if options.tensorrt_variant:
            add_int8(pruned, "tensorrt")
        shutil.rmtree(work, ignore_errors=True)

    for variant in variants:
        variant.eval_metrics = evaluate_step(variant.manifest, evaluate_options)
        variant.result.map50 = variant.eval_metrics.map50
        variant.result.map50_95 = variant.eval_metrics.map50_95
    timed = [v for v in variants if "tensorrt" not in v.result.name]
    latencies = measure_ort_latency(
        [v.manifest.parent / load_manifest(v.manifest).artifact("model").path for v in timed],
        threads=options.latency_threads,
        runs=options.latency_runs,
    )
    for variant, latency in zip(timed, latencies, strict=True):
        variant.result.latency = latency

    rejected: list[str] = []
    for variant in variants:
        parent = variant.parent
        if parent is not None:
            variant.result.parent_map50 = parent.result.map50
        if variant.result.gated:
            drop = variant.result.map50_drop or 0.0
            variant.result.passed = drop <= options.max_map_drop + 1e-12
            if not variant.result.passed:
                rejected.append(variant.result.name)
        record_metrics(variant.manifest, _manifest_metrics(variant, options.val_data))

    fp32_latency = fp32.result.latency
    for variant in variants:
        if variant is not fp32 and variant.result.latency and fp32_latency:
            ratio = variant.result.latency.median_ms / fp32_latency.median_ms
            variant.result.notes.append(f"latency {ratio:.3f}x FP32")
    if rejected:
        (staging / REJECTED_DIR).mkdir()
        for name in rejected:
            (staging / name).rename(staging / REJECTED_DIR / name)
            next(v for v in variants if v.result.name == name).result.folder = f"{REJECTED_DIR}/{name}"
        verdict = (
            f"REJECTED {', '.join(rejected)}: mAP50 drop above --max-map-drop {options.max_map_drop} (see report.md)"
        )
    else:
        verdict = f"all INT8 variants within --max-map-drop {options.max_map_drop} mAP50"
    settings = options.model_dump(mode="json") | {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "imgsz": imgsz,
        "calibration": {
            "images": len(images),
            "requested": images.requested,
            "skipped_unreadable": images.skipped_count,
            "source": str(images.source),
        },
    }
    write_report([v.result for v in variants], staging, settings, verdict)
    if rejected:
        for name in ("report.json", "report.md", "report.png"):
            shutil.copyfile(staging / name, staging / REJECTED_DIR / name)
    log.info("%s", verdict)
    return verdict, rejected


def _manifest_metrics(variant: _Variant, val_data: Path) -> Metrics:
    result = variant.eval_metrics
    parent = variant.parent.eval_metrics if variant.parent is not None else None
    latency: LatencyStats | None = variant.result.latency
    return Metrics(
        map50=round(result.map50, 5),
        map50_95=round(result.map50_95, 5),
        parent_map50=round(parent.map50, 5) if parent is not None else None,
        parent_map50_95=round(parent.map50_95, 5) if parent is not None else None,
        per_class_ap50={k: round(v, 5) for k, v in result.per_class_ap50.items()},
        validation_set=str(val_data),
        latency_ms=latency.as_manifest() if latency is not None else {},
    )


def summary_lines(report_json: Path) -> list[str]:
    """A few lines for the CLI to print after a successful run."""
    data = json.loads(report_json.read_text(encoding="utf-8"))
    lines = [data["verdict"]]
    for v in data["variants"]:
        latency = v["latency"]["median_ms"] if v.get("latency") else None
        lines.append(
            f"  {v['name']:<20} mAP50 {v['map50']:.4f}"
            + (f"  drop {v['map50_drop']:+.4f}" if v.get("map50_drop") is not None else "")
            + (f"  {latency:.2f} ms" if latency is not None else "")
        )
    return lines
