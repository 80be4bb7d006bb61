"""``export-model CHECKPOINT --int8``: FP32 -> (prune -> fine-tune) -> calibrate -> quantize -> evaluate -> gate.

Each step is a function ``step(inputs, options) -> Path`` with typed options (in ``shelfsight.export.int8_steps``;
the pruning steps live in ``shelfsight.export.prune``), so a step can be run and tested on its own;
:func:`run_int8_export` only strings them together. Options that do not make sense together are refused when the
options are built, never quietly adjusted.

Output folder, written to a temporary sibling and renamed at the end so a crash never leaves a half-written folder
that looks valid::

    OUT/fp32/                 model.onnx + manifest.json: the FP32 parent
    OUT/int8/                 Q/DQ INT8 for ONNX Runtime on CPU (QUInt8 activations, QInt8 per-channel weights)
    OUT/int8-tensorrt/        Q/DQ INT8 for TensorRT explicit quantization (symmetric QInt8 everywhere)
    OUT/pruned-fp32/          pruned (+ fine-tuned) FP32 with pruned.pt; OUT/pruned-int8*/ its INT8 versions
    OUT/report.json, report.md, report.png
    OUT/rejected/             INT8 variants whose mAP50 drop exceeded --max-map-drop, with a copy of the report
                              (the run then raises Int8GateError: non-zero exit)

Accuracy gate, one rule per kind of source:

- with labels (``--val-data data.yaml``, required for a checkpoint): each variant's mAP50 on the val split;
  a variant fails when it loses more than ``--max-map-drop`` (default 0.01) against the model it was made from.
- without labels (an exported / third-party model folder or manifest and no ``--val-data``): *agreement with FP32*,
  the mAP50 of each variant against the FP32 model's own detections on held-out images (see
  ``shelfsight.export.agreement``); an INT8 variant fails when its agreement is below ``--min-agreement``
  (default 0.9). ``--max-map-drop`` is refused there, and ``--min-agreement`` / ``--agreement-data`` are refused
  with labels: one gate per run, never a silently ignored flag.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shelfsight.calibration.cache import CalibMethodName
from shelfsight.calibration.images import CalibrationImageSet
from shelfsight.export.agreement import PSEUDO_TRUTH_CONF, AgreementSet
from shelfsight.export.int8_steps import (
    DEFAULT_MIN_AGREEMENT,
    REJECTED_DIR,
    REPORT_FILES,
    CalibrationStepOptions,
    EvaluateStepOptions,
    Fp32StepOptions,
    Int8GateError,
    QuantizeStepOptions,
    apply_gate,
    calibration_set_step,
    check_output_folder,
    evaluate_step,
    export_fp32_step,
    finalize_output,
    quantize_step,
    record_metrics,
)
from shelfsight.export.quantize import (
    QuantizeOptions,
)
from shelfsight.export.report import VariantResult, measure_ort_latency, write_report
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import (
    MANIFEST_FILENAME,
    Metrics,
    load_manifest,
    resolve_artifact,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shelfsight" / "calibration"


class Int8ExportOptions(BaseModel):
    """Everything ``export-model CHECKPOINT --int8`` accepts. Incompatible combinations raise on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_data: Path = Field(description="image folder or data.yaml to calibrate on")
    val_data: Path | None = Field(
        default=None, description="data.yaml whose val split scores every variant; None: agreement with FP32"
    )
    agreement_data: Path | None = Field(default=None, description="held-out images for the agreement gate")
    min_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    agreement_conf: float = Field(default=PSEUDO_TRUTH_CONF, gt=0.0, lt=1.0)
    float_leading_convs: int = Field(default=0, ge=0)
    imgsz: int | None = Field(default=None, ge=32, multiple_of=32)
    name: str | None = None
    calib_method: CalibMethodName = "minmax"
    calib_images: int = Field(default=300, ge=1)
    calib_seed: int = 0
    calib_split: Literal["train", "val", "test"] = "train"
    calib_cache: Path | None = None
    prune: float | None = Field(default=None, gt=0.0, lt=1.0)
    finetune_epochs: int = Field(default=0, ge=0)
    train_data: Path | None = None
    finetune_batch: int = Field(default=8, ge=1)
    finetune_lr: float = Field(default=0.001, gt=0)
    max_map_drop: float = Field(default=0.01, ge=0.0, le=1.0)  # labels only (see _compatible)
    max_prune_drop: float | None = Field(default=None, ge=0.0, le=1.0)
    val_limit: int | None = Field(default=None, ge=1)
    latency_threads: int = Field(default=1, ge=1)
    latency_runs: int = Field(default=50, ge=1)
    tensorrt_variant: bool = True
    opset: int = Field(default=17, ge=13, le=23)
    force: bool = False
    command: str | None = None

    @model_validator(mode="after")
    def _compatible(self) -> Int8ExportOptions:
        if self.finetune_epochs and self.prune is None:
            raise ValueError("--finetune-epochs fine-tunes a pruned model: add --prune RATIO")
        if self.finetune_epochs and self.train_data is None:
            raise ValueError("--finetune-epochs needs --train-data DATA_YAML")
        if self.max_prune_drop is not None and self.prune is None:
            raise ValueError("--max-prune-drop applies to a pruned variant: add --prune RATIO")
        if self.train_data is not None and not self.finetune_epochs:
            raise ValueError("--train-data is only used for fine-tuning: add --finetune-epochs N")
        if self.val_data is not None and self.val_data.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"--val-data must be a data.yaml, got {self.val_data}")
        if self.labelled:
            given = [f for f in ("agreement_data", "min_agreement") if getattr(self, f) is not None]
            if "agreement_conf" in self.model_fields_set:
                given.append("agreement_conf")
            if given:
                flags = " and ".join("--" + f.replace("_", "-") for f in given)
                raise ValueError(
                    f"{flags} set the agreement gate used without labels; with --val-data the gate is --max-map-drop"
                )
        else:
            if "max_map_drop" in self.model_fields_set:
                raise ValueError(
                    "without --val-data the gate is agreement with FP32: use --min-agreement (default "
                    f"{DEFAULT_MIN_AGREEMENT}) instead of --max-map-drop, or give labels with --val-data"
                )
            if self.prune is not None:
                raise ValueError("--prune is scored on labels: add --val-data DATA_YAML")
        return self

    @property
    def labelled(self) -> bool:
        """True: gate on mAP50 against labels; False: gate on agreement with the FP32 model."""
        return self.val_data is not None

    @property
    def agreement_floor(self) -> float:
        return self.min_agreement if self.min_agreement is not None else DEFAULT_MIN_AGREEMENT

    def quantize_options(self, target: Literal["cpu", "tensorrt"]) -> QuantizeOptions:
        if target == "tensorrt":
            return QuantizeOptions.for_tensorrt(
                calib_method=self.calib_method, float_leading_convs=self.float_leading_convs
            )
        return QuantizeOptions(calib_method=self.calib_method, float_leading_convs=self.float_leading_convs)


# --- orchestration -------------------------------------------------------------------------------------------------


@dataclass
class _Variant:
    result: VariantResult
    manifest: Path
    parent: _Variant | None = None
    evaluation: Any = None


def _model_file(manifest_path: Path) -> Path:
    return manifest_path.parent / load_manifest(manifest_path).artifact("model").path


def _fp32_variant(name: str, manifest: Path, checkpoint: Path | None, imgsz: int, parent: _Variant | None) -> _Variant:
    """An FP32 variant; params and MACs are counted when its PyTorch checkpoint is at hand."""
    result = VariantResult(name, "fp32", name, _model_file(manifest).stat().st_size)
    if checkpoint is not None:
        from shelfsight.export.model import load_checkpoint
        from shelfsight.export.prune import measure_cost

        model, _ = load_checkpoint(checkpoint)
        cost = measure_cost(model, imgsz)
        result.params, result.macs = cost.params, cost.macs
    result.parent = parent.result.name if parent else None
    return _Variant(result, manifest, parent)


@dataclass(frozen=True)
class ExportSource:
    """What ``run_int8_export`` starts from: a PyTorch checkpoint, or an already exported FP32 model folder."""

    path: Path
    sha256: str
    imgsz: int
    classes: list[str]
    checkpoint: Path | None
    manifest: Path | None

    @classmethod
    def open(cls, path: Path, options: Int8ExportOptions) -> ExportSource:
        if path.is_dir() or path.suffix == ".json":
            manifest_path = path / MANIFEST_FILENAME if path.is_dir() else path
            manifest = load_manifest(manifest_path)
            model_file = resolve_artifact(manifest_path, manifest.artifact("model"))  # sha256 checked
            if manifest.precision != "fp32":
                raise ShelfSightError(f"{manifest_path}: source model is {manifest.precision}; --int8 needs FP32")
            if options.prune is not None:
                raise ShelfSightError(f"{path}: --prune needs a PyTorch checkpoint, not an exported model folder")
            if options.imgsz is not None and options.imgsz != manifest.input.height:
                raise ShelfSightError(f"{path}: --imgsz cannot change the input size of an exported model")
            return cls(path, sha256_file(model_file), manifest.input.height, manifest.classes, None, manifest_path)
        from shelfsight.export.model import read_checkpoint

        header = read_checkpoint(path)  # refuses non-checkpoints and unsafe pickles before any work
        imgsz = options.imgsz or int(header["imgsz"])
        return cls(path, sha256_file(path), imgsz, [str(n) for n in header["class_names"]], path, None)


def copy_model_step(manifest_path: Path, out_dir: Path) -> Path:
    """An exported model folder copied as the FP32 parent (every artifact hash verified on the way)."""
    manifest = load_manifest(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for artifact in manifest.artifacts:
        target = out_dir / artifact.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_artifact(manifest_path, artifact), target)
    return write_manifest(manifest, out_dir)


def _int8_variants(
    parent: _Variant, images: CalibrationImageSet, staging: Path, options: Int8ExportOptions
) -> list[_Variant]:
    targets: list[Literal["cpu", "tensorrt"]] = ["cpu", "tensorrt"] if options.tensorrt_variant else ["cpu"]
    prefix = "" if parent.result.name == "fp32" else parent.result.name.removesuffix("-fp32") + "-"
    variants = []
    for target in targets:
        name = f"{prefix}int8" + ("-tensorrt" if target == "tensorrt" else "")
        step_options = QuantizeStepOptions(
            options.quantize_options(target), options.calib_cache or default_cache_dir(), target
        )
        outcome = quantize_step(parent.manifest, images, staging / name, step_options)
        result = VariantResult(
            name,
            "int8",
            name,
            _model_file(outcome.manifest).stat().st_size,
            parent=parent.result.name,
            params=parent.result.params,
            macs=parent.result.macs,
            gated=True,
        )
        if outcome.kernels is not None:
            result.int8_kernels = outcome.kernels.summary()
        else:
            result.notes.append(
                "symmetric INT8 for TensorRT: ONNX Runtime's CPU kernels leave many of its "
                "convolutions in float, so no CPU latency is reported for it"
            )
        result.notes.append("calibration ranges " + ("from cache" if outcome.calibration_cache_hit else "computed"))
        variants.append(_Variant(result, outcome.manifest, parent))
    return variants


def _pruned_variant(
    checkpoint: Path, fp32: _Variant, staging: Path, imgsz: int, options: Int8ExportOptions
) -> _Variant:
    from shelfsight.export.prune import (
        FinetuneStepOptions,
        PrunedExportOptions,
        PruneStepOptions,
        export_pruned_step,
        finetune_step,
        prune_step,
    )

    assert options.prune is not None
    with tempfile.TemporaryDirectory(prefix="shelfsight-prune-") as tmp:
        pruned = prune_step(checkpoint, Path(tmp) / "pruned.pt", PruneStepOptions(options.prune, imgsz))
        if options.finetune_epochs:
            assert options.train_data is not None  # enforced by Int8ExportOptions
            finetune = FinetuneStepOptions(
                options.train_data,
                options.finetune_epochs,
                options.finetune_batch,
                options.finetune_lr,
                imgsz,
                options.val_limit,
            )
            pruned = finetune_step(pruned, Path(tmp) / "finetune", finetune)
        export_options = PrunedExportOptions(
            f"{load_manifest(fp32.manifest).name}-pruned", imgsz, options.opset, options.command
        )
        manifest = export_pruned_step(pruned, staging / "pruned-fp32", export_options)
        variant = _fp32_variant("pruned-fp32", manifest, pruned, imgsz, fp32)
        variant.result.gated = True
    variant.result.notes.append(
        f"{options.prune:.0%} of channels pruned, fine-tuned {options.finetune_epochs} epoch(s)"
    )
    return variant


def _metrics(variant: _Variant, validation_set: str) -> Metrics:
    own, parent = variant.evaluation, variant.parent.evaluation if variant.parent else None
    return Metrics(
        map50=round(own.map50, 5),
        map50_95=round(own.map50_95, 5),
        parent_map50=round(parent.map50, 5) if parent else None,
        parent_map50_95=round(parent.map50_95, 5) if parent else None,
        per_class_ap50={k: round(v, 5) for k, v in own.per_class_ap50.items()},
        validation_set=validation_set,
        latency_ms=variant.result.latency.as_manifest() if variant.result.latency else {},
    )


def build_and_measure(
    source: ExportSource,
    staging: Path,
    images: CalibrationImageSet,
    options: Int8ExportOptions,
    agreement: AgreementSet | None = None,
) -> tuple[list[_Variant], dict[str, Any]]:
    """Export every variant into ``staging``, then score and time them all the same way.

    -> the variants and a description of how accuracy was measured (labels, or agreement with FP32 on ``agreement``).
    """
    if source.checkpoint is not None:
        fp32_options = Fp32StepOptions(source.imgsz, options.name, options.opset, options.command)
        fp32_manifest = export_fp32_step(source.checkpoint, staging / "fp32", fp32_options)
    else:
        assert source.manifest is not None
        fp32_manifest = copy_model_step(source.manifest, staging / "fp32")
    fp32 = _fp32_variant("fp32", fp32_manifest, source.checkpoint, source.imgsz, None)
    variants = [fp32, *_int8_variants(fp32, images, staging, options)]
    if options.prune is not None:
        assert source.checkpoint is not None  # ExportSource.open refuses --prune for a model folder
        pruned = _pruned_variant(source.checkpoint, fp32, staging, source.imgsz, options)
        variants += [pruned, *_int8_variants(pruned, images, staging, options)]

    if options.val_data is not None:
        accuracy: dict[str, Any] = {"mode": "labels", "label": f"mAP on {options.val_data} (val split)"}
        for variant in variants:
            evaluation = EvaluateStepOptions(options.val_data, options.val_limit)
            variant.evaluation = evaluate_step(variant.manifest, evaluation)
    else:
        from shelfsight.export import agreement as agree

        assert agreement is not None  # run_int8_export picks the images before any work
        truth = agree.pseudo_truth(fp32.manifest, agreement, options.agreement_conf)
        accuracy = agree.describe(agreement, truth, options.agreement_conf)
        for variant in variants:
            variant.evaluation = agree.agreement_step(variant.manifest, agreement, truth)
        fp32.result.notes.append(
            f"agreement of FP32 with its own detections: mAP50 {fp32.evaluation.map50:.4f} (the ceiling)"
        )
        fp32.result.notes += agreement.notes()
    for variant in variants:
        variant.result.map50 = variant.evaluation.map50
        variant.result.map50_95 = variant.evaluation.map50_95
        variant.result.parent_map50 = variant.parent.evaluation.map50 if variant.parent else None
        variant.result.fp32_map50 = fp32.evaluation.map50 if variant is not fp32 else None
    timed = [v for v in variants if not v.result.name.endswith("-tensorrt")]
    latencies = measure_ort_latency(
        [_model_file(v.manifest) for v in timed], threads=options.latency_threads, runs=options.latency_runs
    )
    for variant, latency in zip(timed, latencies, strict=True):
        variant.result.latency = latency
        if variant is not fp32 and fp32.result.latency:
            variant.result.notes.append(f"latency {latency.median_ms / fp32.result.latency.median_ms:.3f}x FP32")
    return variants, accuracy


def run_int8_export(source_path: Path, out: Path, options: Int8ExportOptions) -> Path:
    """The whole ``--int8`` export -> report.json. Raises Int8GateError (after writing everything) on a rejection.

    ``source_path`` is a checkpoint (.pt) or an exported FP32 model folder / manifest (e.g. a third-party ONNX
    model with a hand-written manifest; pruning then is not available).
    """
    from shelfsight.export.data import load_data_yaml

    out = Path(out)
    source = ExportSource.open(Path(source_path), options)
    if source.checkpoint is not None and options.val_data is None:
        raise ShelfSightError(f"{source.path}: a checkpoint export is scored on labels: add --val-data DATA_YAML")
    # Every input is checked before any work, so a bad one costs seconds, not a whole export.
    for data, role in ((options.val_data, "validation"), (options.train_data, "fine-tuning")):
        names = load_data_yaml(data).names if data is not None else source.classes
        if names != source.classes:
            raise ShelfSightError(f"{data}: {role} classes {names} do not match the model's {source.classes}")
    check_output_folder(out, source.sha256, options.force)
    images = calibration_set_step(
        CalibrationStepOptions(options.calib_data, options.calib_images, options.calib_seed, options.calib_split)
    )
    agreement = None
    if not options.labelled:
        from shelfsight.export.agreement import agreement_images

        agreement = agreement_images(images, options.agreement_data, options.calib_split, options.val_limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        variants, accuracy = build_and_measure(source, staging, images, options, agreement)
        results = [v.result for v in variants]
        floor = None if options.labelled else options.agreement_floor
        rejected = apply_gate(results, options.max_map_drop, options.max_prune_drop, floor)
        validation_set = str(options.val_data) if options.labelled else _agreement_set_text(accuracy)
        for variant in variants:
            record_metrics(variant.manifest, _metrics(variant, validation_set))
        if rejected:
            (staging / REJECTED_DIR).mkdir()
            for variant in variants:
                if variant.result.name in rejected:
                    (staging / variant.result.name).rename(staging / REJECTED_DIR / variant.result.name)
                    variant.result.folder = f"{REJECTED_DIR}/{variant.result.name}"
            lost = "mAP50 lost beyond" if options.labelled else "agreement with FP32 (no labels) below"
            verdict = f"REJECTED {', '.join(rejected)}: {lost} {_limits(options)}"
        else:
            kept = "every variant within" if options.labelled else "agreement with FP32 (no labels) within"
            verdict = f"{kept} {_limits(options)}"
        settings = options.model_dump(mode="json") | {
            "source": str(source.path),
            "source_sha256": source.sha256,
            "accuracy": accuracy,
            "imgsz": source.imgsz,
            "calibration": {
                "images": len(images),
                "requested": images.requested,
                "skipped_unreadable": images.skipped_count,
                "source": str(images.source),
            },
        }
        write_report(results, staging, settings, verdict, accuracy)
        if rejected:
            for name in REPORT_FILES:
                shutil.copyfile(staging / name, staging / REJECTED_DIR / name)
        finalize_output(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("%s", verdict)  # the CLI prints it with the summary
    if rejected:
        raise Int8GateError(f"{out / REJECTED_DIR}: {verdict} (see report.md)")
    return out / "report.json"


def _agreement_set_text(accuracy: dict[str, Any]) -> str:
    return (
        f"{accuracy['label']}: {accuracy['images']} image(s) of {accuracy['source']}, the FP32 model's "
        f"{accuracy['pseudo_truth_boxes']} detections at conf >= {accuracy['pseudo_truth_conf']} as ground truth"
    )


def _limits(options: Int8ExportOptions) -> str:
    if not options.labelled:
        return f"--min-agreement {options.agreement_floor} (INT8 mAP50 against FP32's detections)"
    text = f"--max-map-drop {options.max_map_drop} mAP50 (INT8 vs its FP32 parent)"
    if options.prune is not None:
        prune = options.max_prune_drop if options.max_prune_drop is not None else options.max_map_drop
        text += f", --max-prune-drop {prune} (pruned vs FP32)"
    return text
