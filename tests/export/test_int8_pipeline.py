"""``export-model --int8`` end to end on the tiny trained detector from the export conftest, plus its pure parts.

Real everything: the detector's trainer and ONNX exporter, ORT calibration and quantization, the runtime's loader
and the COCO evaluator. The accuracy gate is exercised for real by a deliberately broken calibration set.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from shelfsight.calibration.images import select_calibration_images
from shelfsight.calibration.reader import calibration_digest
from shelfsight.export.cli import export_parser
from shelfsight.export.int8_cli import int8_requested, options_from_args
from shelfsight.export.int8_pipeline import Int8ExportOptions, run_int8_export
from shelfsight.export.int8_steps import (
    REJECTED_DIR,
    Int8GateError,
    OutputFolderError,
    apply_gate,
    check_output_folder,
)
from shelfsight.export.model import load_checkpoint
from shelfsight.export.prune import (
    PRUNING_KEY,
    FinetuneStepOptions,
    PruneStepOptions,
    conv_widths,
    finetune_step,
    prune_step,
    trainer_accepts_model,
)
from shelfsight.export.report import VariantResult
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import load_manifest, sha256_file
from shelfsight.runtime.model import load_model

VARIANTS = ["fp32", "int8", "int8-tensorrt", "pruned-fp32", "pruned-int8", "pruned-int8-tensorrt"]


@pytest.fixture(scope="module")
def exported(trained_run: Any, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One full run: FP32, INT8, TensorRT Q/DQ and pruned variants of the tiny trained detector."""
    root = tmp_path_factory.mktemp("int8export")
    options = Int8ExportOptions(
        calib_data=tiny_data,
        val_data=tiny_data,
        calib_images=6,
        calib_cache=root / "cache",
        prune=0.5,
        latency_runs=3,
        max_map_drop=1.0,  # the gate itself is tested below with a real failure; this run checks everything else
    )
    report = run_int8_export(trained_run.best, root / "out", options)
    return root, report, trained_run.best


def test_every_variant_is_a_loadable_model_folder(exported: tuple[Path, Path, Path], tiny_data: Path) -> None:
    root, _, checkpoint = exported
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*VARIANTS, "report.json", "report.md", "report.png"])
    frame = cv2.imread(str(next((tiny_data.parent / "images" / "val").glob("*.jpg"))))
    for name in VARIANTS:
        manifest = load_manifest(out / name)
        assert manifest.precision == ("fp32" if name.endswith("fp32") else "int8")
        assert manifest.provenance.source_checkpoint_sha256 == sha256_file(checkpoint)
        assert manifest.metrics.map50 is not None and manifest.metrics.validation_set == str(tiny_data)
        with load_model(out / name) as detector:  # verifies the sha256 of every artifact on the way
            detections = detector.detect(frame)
        assert detections.xyxy.dtype == np.float32
    assert not list(root.glob(".out.tmp-*")), "staging folder left behind"


def test_int8_manifest_records_calibration_and_parent(exported: tuple[Path, Path, Path], tiny_data: Path) -> None:
    root, _, _ = exported
    out = root / "out"
    fp32, int8 = load_manifest(out / "fp32"), load_manifest(out / "int8")
    images = select_calibration_images(tiny_data, count=6)
    assert int8.provenance.calibration_method == "minmax"
    assert int8.provenance.calibration_image_count == 6
    assert int8.provenance.calibration_digest == calibration_digest(images, fp32.input)
    assert int8.metrics.parent_map50 == fp32.metrics.map50
    assert "ort_cpu_1t_median" in int8.metrics.latency_ms
    assert {a.role for a in int8.artifacts} == {"model", "calibration_cache"}
    trt = load_manifest(out / "int8-tensorrt")
    assert "symmetric" in (trt.provenance.exporter or "")
    pruned = load_manifest(out / "pruned-fp32")
    assert pruned.provenance.pruning_ratio == 0.5 and pruned.metrics.parent_map50 == fp32.metrics.map50
    assert load_manifest(out / "pruned-int8").provenance.pruning_ratio == 0.5


def test_report_has_every_variant_with_measured_figures(exported: tuple[Path, Path, Path]) -> None:
    root, report, _ = exported
    data = json.loads(report.read_text())
    by_name = {v["name"]: v for v in data["variants"]}
    assert list(by_name) == VARIANTS
    assert by_name["pruned-fp32"]["params"] < 0.5 * by_name["fp32"]["params"]
    assert by_name["pruned-fp32"]["macs"] < by_name["fp32"]["macs"]
    for name in ("fp32", "int8", "pruned-fp32", "pruned-int8"):
        assert by_name[name]["latency"]["median_ms"] > 0 and by_name[name]["latency"]["runs"] == 3
    for name in ("int8-tensorrt", "pruned-int8-tensorrt"):
        assert by_name[name]["latency"] is None
    assert by_name["int8"]["model_bytes"] < 0.6 * by_name["fp32"]["model_bytes"]
    kernels = by_name["int8"]["int8_kernels"]
    assert "convolutions run as INT8 kernels" in kernels and "1 float (1 expected)" in kernels  # the float stem
    assert all(by_name[n]["passed"] for n in by_name if by_name[n]["gated"])
    md = (root / "out" / "report.md").read_text()
    assert all(f"| {name} |" in md for name in VARIANTS)
    chart = cv2.imread(str(root / "out" / "report.png"))
    assert chart is not None and chart.shape[0] > 200 and chart.shape[1] > 600


def test_rerun_uses_the_calibration_cache_and_refuses_another_model(
    exported: tuple[Path, Path, Path], trained_run: Any, tiny_data: Path
) -> None:
    root, report, checkpoint = exported
    notes = {v["name"]: v["notes"] for v in json.loads(report.read_text())["variants"]}
    # int8 computed the FP32 model's ranges; int8-tensorrt (same FP32 model, same images) reused them.
    assert "calibration ranges computed" in notes["int8"]
    assert "calibration ranges from cache" in notes["int8-tensorrt"]
    other = root / "other.pt"
    shutil.copyfile(trained_run.last, other)
    options = Int8ExportOptions(calib_data=tiny_data, val_data=tiny_data, calib_images=2)
    with pytest.raises(OutputFolderError, match="already holds a different model"):
        run_int8_export(other, root / "out", options)
    check_output_folder(root / "out", sha256_file(other), force=True)  # --force lets it through
    check_output_folder(root / "out", sha256_file(checkpoint), force=False)  # same source: may be replaced


def test_accuracy_gate_rejects_a_broken_calibration(
    exported: tuple[Path, Path, Path], tiny_data: Path, tmp_path: Path
) -> None:
    """Calibrating on flat grey frames gives activation ranges far too narrow: INT8 accuracy collapses.

    Starts from the exported FP32 folder of the main run (the model-folder source), so nothing is re-exported.
    """
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        cv2.imwrite(str(grey / f"{i}.png"), np.full((96, 128, 3), 120 + i, np.uint8))
    options = Int8ExportOptions(
        calib_data=grey,
        val_data=tiny_data,
        calib_images=3,
        calib_cache=tmp_path / "cache",
        max_map_drop=0.0,
        latency_runs=2,
        tensorrt_variant=False,
    )
    fp32_folder = exported[0] / "out" / "fp32"
    with pytest.raises(Int8GateError, match="REJECTED int8") as info:
        run_int8_export(fp32_folder, tmp_path / "out", options)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    assert not (out / "int8").exists()
    assert (out / REJECTED_DIR / "int8" / "model.onnx").is_file()
    assert (out / REJECTED_DIR / "report.md").read_text().count("REJECTED") >= 1
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert variants["int8"]["passed"] is False and variants["int8"]["map50_drop_vs_fp32"] > 0
    assert variants["int8"]["folder"] == f"{REJECTED_DIR}/int8"
    assert load_manifest(out / "fp32").artifact().sha256 == load_manifest(fp32_folder).artifact().sha256


def test_bad_inputs_fail_before_any_work(trained_run: Any, tiny_data: Path, tmp_path: Path) -> None:
    other_classes = tmp_path / "other.yaml"
    other_classes.write_text(tiny_data.read_text().replace("gap", "hole"))
    empty = tmp_path / "empty"
    empty.mkdir()
    pickle_ckpt = tmp_path / "pickled.pt"
    torch.save({"format": "shelfsight.checkpoint/1", "model": argparse.Namespace(x=1)}, pickle_ckpt)
    cases: list[tuple[Path, dict[str, object], str]] = [
        (trained_run.best, {"val_data": other_classes}, "validation classes .* do not match"),
        (trained_run.best, {"calib_data": empty}, "no images found"),
        (trained_run.best, {"calib_data": tmp_path / "missing"}, "does not exist"),
        (pickle_ckpt, {}, "refusing to load|not a readable"),
    ]
    for source, changes, message in cases:
        values: dict[str, object] = {"calib_data": tiny_data, "val_data": tiny_data, "calib_images": 2} | changes
        with pytest.raises(ShelfSightError, match=message) as info:
            run_int8_export(source, tmp_path / "out", Int8ExportOptions(**values))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_model_folder_source_refuses_pruning_and_resizing(exported: tuple[Path, Path, Path], tiny_data: Path) -> None:
    fp32_folder = exported[0] / "out" / "fp32"
    for changes, message in (({"prune": 0.3}, "--prune needs a PyTorch checkpoint"), ({"imgsz": 256}, "--imgsz")):
        options = Int8ExportOptions(calib_data=tiny_data, val_data=tiny_data, **changes)
        with pytest.raises(ShelfSightError, match=message):
            run_int8_export(fp32_folder, exported[0] / "never", options)
    with pytest.raises(ShelfSightError, match="source model is int8"):
        run_int8_export(exported[0] / "out" / "int8", exported[0] / "never", options)
    assert not (exported[0] / "never").exists()


@pytest.mark.skipif(not trainer_accepts_model(), reason="trainer hook train(cfg, model=...) not wired yet")
def test_pruned_model_is_fine_tuned_with_the_project_trainer(trained_run: Any, tiny_data: Path, tmp_path: Path) -> None:
    pruned = prune_step(trained_run.best, tmp_path / "pruned.pt", PruneStepOptions(0.25))
    before, _ = load_checkpoint(pruned)
    tuned = finetune_step(pruned, tmp_path / "finetune", FinetuneStepOptions(tiny_data, epochs=1, batch=4))
    after, meta = load_checkpoint(tuned)
    assert meta.extra[PRUNING_KEY]["ratio"] == 0.25
    assert conv_widths(after) == conv_widths(before)  # same pruned architecture ...
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed  # ... with trained weights


def _result(name: str, drop: float | None) -> VariantResult:
    """A measured variant ``drop`` mAP50 below its parent (parent named by the lineage in ``name``)."""
    parent = {"int8": "fp32", "pruned-fp32": "fp32", "pruned-int8": "pruned-fp32"}[name]
    precision = "fp32" if name.endswith("fp32") else "int8"
    result = VariantResult(name, precision, name, 1, parent=parent, gated=True, parent_map50=0.8)
    result.map50 = None if drop is None else 0.8 - drop
    return result


@pytest.mark.parametrize(
    ("drops", "limits", "failed"),
    [
        ({"int8": 0.005}, (0.01, None), []),
        ({"int8": 0.01}, (0.01, None), []),
        ({"int8": 0.0101}, (0.01, None), ["int8"]),
        ({"int8": -0.02}, (0.0, None), []),  # INT8 better than FP32 passes
        ({"int8": None}, (0.5, None), ["int8"]),  # not measured = not proven
        ({"int8": 0.0, "pruned-fp32": 0.03, "pruned-int8": 0.0}, (0.01, None), ["pruned-fp32", "pruned-int8"]),
        ({"int8": 0.0, "pruned-fp32": 0.03, "pruned-int8": 0.005}, (0.01, 0.05), []),
        ({"int8": 0.0, "pruned-fp32": 0.03, "pruned-int8": 0.02}, (0.01, 0.05), ["pruned-int8"]),
    ],
)
def test_gate(drops: dict[str, float | None], limits: tuple[float, float | None], failed: list[str]) -> None:
    fp32 = VariantResult("fp32", "fp32", "fp32", 1)
    fp32.map50 = 0.8
    results = [fp32] + [_result(name, drop) for name, drop in drops.items()]
    assert apply_gate(results, *limits) == failed
    assert all(r.passed is (r.name not in failed) for r in results if r.gated)
    assert fp32.passed is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"finetune_epochs": 3}, "add --prune RATIO"),
        ({"finetune_epochs": 3, "prune": 0.3}, "needs --train-data"),
        ({"train_data": "data.yaml"}, "add --finetune-epochs N"),
        ({"val_data": "images/"}, "--val-data must be a data.yaml"),
        ({"prune": 1.5}, "less than 1"),
        ({"calib_method": "kl"}, "minmax"),
        ({"calib_images": 0}, "greater than or equal to 1"),
        ({"imgsz": 300}, "multiple of 32"),
        ({"max_prune_drop": 0.05}, "--max-prune-drop applies to a pruned variant"),
    ],
)
def test_incompatible_options_are_errors(changes: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"calib_data": "calib", "val_data": "data.yaml"} | changes
    with pytest.raises(ValueError, match=message):
        Int8ExportOptions(**values)


def parsed(*flags: str) -> Any:
    """What ``export-model best.pt --out out FLAGS`` parses to, through the real parser."""
    return export_parser().parse_args(["best.pt", "--out", "out", *flags])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--prune", "0.3"], "--prune only applies to an INT8 export: add --int8"),
        (["--int8", "--val-data", "d.yaml"], "--int8 needs --calib-data"),
        (
            ["--int8", "--calib-data", "c", "--val-data", "d.yaml", "--include-checkpoint"],
            "--include-checkpoint is not supported together with --int8",
        ),
        (["--int8", "--calib-data", "c", "--val-data", "d.yaml", "--finetune-epochs", "2"], "add --prune RATIO"),
    ],
)
def test_cli_flags_are_checked(given: list[str], message: str) -> None:
    args = parsed(*given)
    assert int8_requested(args)
    with pytest.raises(ShelfSightError, match=message):
        options_from_args(args, "export-model ...")


def test_plain_export_is_not_an_int8_request() -> None:
    assert not int8_requested(parsed())
    options = options_from_args(parsed("--int8", "--calib-data", "c", "--val-data", "d.yaml"), "cmd")
    assert options.calib_images == 300 and options.max_map_drop == 0.01 and options.tensorrt_variant
