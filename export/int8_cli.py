"""``export-model ... --int8``: the flags, their checks and the run -> exit status (called from ``export.cli``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shelfsight.export.int8_pipeline import Int8ExportOptions, run_int8_export
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import MANIFEST_FILENAME, load_manifest, resolve_artifact


def summary_lines(report_json: Path) -> list[str]:
    """A few lines for the CLI to print after a run."""
    data = json.loads(report_json.read_text(encoding="utf-8"))
    lines = [data["verdict"]]
    score = "agreement mAP50" if data.get("accuracy", {}).get("mode") == "agreement" else "mAP50"
    for v in data["variants"]:
        latency = v["latency"]["median_ms"] if v.get("latency") else None
        lines.append(
            f"  {v['name']:<20} {score} {v['map50']:.4f}"
            + (f"  drop vs FP32 {v['map50_drop_vs_fp32']:+.4f}" if v.get("map50_drop_vs_fp32") is not None else "")
            + (f"  {latency:.2f} ms" if latency is not None else "")
        )
    return lines


_INT8_ONLY_FLAGS = {
    "calib_data": None,
    "val_data": None,
    "prune": None,
    "finetune_epochs": 0,
    "train_data": None,
    "max_map_drop": None,
    "max_prune_drop": None,
    "agreement_data": None,
    "min_agreement": None,
    "float_leading_convs": 0,
    "calib_method": "minmax",
    "calib_images": 300,
    "calib_cache": None,
    "force": False,
    "latency_runs": 50,
    "no_tensorrt_variant": False,
}


def add_int8_arguments(parser: Any) -> None:
    """The ``--int8`` flags of ``export-model CHECKPOINT``; --out, --imgsz, --name and --opset are shared."""
    group = parser.add_argument_group("INT8 export (with --int8)")
    group.add_argument("--int8", action="store_true", help="also quantize to INT8, evaluate every variant and gate")
    group.add_argument("--calib-data", type=Path, help="calibration images: a folder or a data.yaml (train split)")
    group.add_argument(
        "--val-data", type=Path, help="data.yaml whose val split scores every variant (required for a checkpoint; "
        "without it a model folder is gated on agreement with FP32)"
    )
    group.add_argument("--calib-images", type=int, default=300, help="calibration images to use (default 300)")
    group.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    group.add_argument("--calib-cache", type=Path, help="calibration range cache (default ~/.cache/shelfsight)")
    group.add_argument(
        "--max-map-drop", type=float, help="with --val-data: max mAP50 loss vs FP32 (default 0.01)"
    )
    group.add_argument(
        "--min-agreement", type=float, help="without --val-data: min INT8 mAP50 against FP32's detections (default 0.9)"
    )
    group.add_argument(
        "--agreement-data", type=Path, metavar="DIR",
        help="without --val-data: images to measure agreement on (default: --calib-data images not calibrated on)",
    )
    group.add_argument(
        "--float-leading-convs", type=int, default=0, metavar="N",
        help="keep the first N convolutions (and what precedes them) in float; 2 for YOLOX (default 0)",
    )
    group.add_argument("--prune", type=float, metavar="RATIO", help="also export a channel-pruned variant (0-1)")
    group.add_argument("--max-prune-drop", type=float, help="max mAP50 loss of pruning (default: --max-map-drop)")
    group.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the pruned model N epochs")
    group.add_argument("--train-data", type=Path, help="data.yaml to fine-tune the pruned model on")
    group.add_argument("--latency-runs", type=int, default=50, help="timed runs per variant (default 50)")
    group.add_argument("--no-tensorrt-variant", action="store_true", help="skip the symmetric Q/DQ TensorRT model")
    group.add_argument("--force", action="store_true", help="replace an --out folder that holds another model")


def int8_requested(args: Any) -> bool:
    """True when --int8 or any INT8-only flag was given (the latter without --int8 is an error later)."""
    return bool(getattr(args, "int8", False)) or any(
        getattr(args, name, default) != default for name, default in _INT8_ONLY_FLAGS.items()
    )


def options_from_args(args: Any, command: str) -> Int8ExportOptions:
    from pydantic import ValidationError

    if not args.int8:
        given = [f"--{n.replace('_', '-')}" for n, d in _INT8_ONLY_FLAGS.items() if getattr(args, n, d) != d]
        raise ShelfSightError(
            f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to an INT8 export: add --int8"
        )
    for flag in ("parity_images", "include_checkpoint"):
        if getattr(args, flag, None):
            raise ShelfSightError(f"--{flag.replace('_', '-')} is not supported together with --int8")
    if args.calib_data is None:
        raise ShelfSightError("--int8 needs --calib-data (an image folder or a data.yaml)")
    # Flags left at their default are not passed, so a flag that does not fit the gate is an error only when given.
    optional = {
        name: getattr(args, name, None)
        for name in ("max_map_drop", "min_agreement", "agreement_data")
        if getattr(args, name, None) is not None
    }
    try:
        return Int8ExportOptions(
            **optional,
            calib_data=args.calib_data,
            val_data=args.val_data,
            float_leading_convs=getattr(args, "float_leading_convs", 0),
            imgsz=args.imgsz,
            name=args.name,
            opset=args.opset,
            calib_method=args.calib_method,
            calib_images=args.calib_images,
            calib_cache=args.calib_cache,
            prune=args.prune,
            finetune_epochs=args.finetune_epochs,
            train_data=args.train_data,
            max_prune_drop=args.max_prune_drop,
            latency_runs=args.latency_runs,
            tensorrt_variant=not args.no_tensorrt_variant,
            force=args.force,
            command=command,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-") if first["loc"] else "options"
        raise ShelfSightError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None


def source_from_args(args: Any) -> Path:
    """The export source: the positional CHECKPOINT / model folder, or ``--onnx FILE`` and/or ``--manifest JSON``.

    ``--manifest`` names the model it describes; ``--onnx`` alone uses the manifest.json beside it; given together,
    the manifest's model artifact must be that file (its sha256 is checked when the source is opened).
    """
    onnx_file: Path | None = getattr(args, "onnx", None)
    manifest: Path | None = getattr(args, "manifest", None)
    if args.checkpoint is not None:
        if onnx_file is not None or manifest is not None:
            raise ShelfSightError("give the source once: a positional SOURCE or --onnx/--manifest, not both")
        return Path(args.checkpoint)
    if onnx_file is None and manifest is None:
        raise ShelfSightError("no source: give a checkpoint / model folder, or --onnx MODEL.onnx --manifest JSON")
    if manifest is None:
        assert onnx_file is not None
        manifest = Path(onnx_file).parent / MANIFEST_FILENAME
        if not manifest.is_file():
            raise ShelfSightError(
                f"{onnx_file}: no {MANIFEST_FILENAME} beside it; write one with 'export-model describe' or give "
                "--manifest"
            )
    if onnx_file is not None:
        described = resolve_artifact(Path(manifest), load_manifest(manifest).artifact("model"))
        if not Path(onnx_file).is_file():
            raise ShelfSightError(f"{onnx_file}: --onnx file not found")
        if described.resolve() != Path(onnx_file).resolve():
            raise ShelfSightError(f"{manifest}: describes {described}, not the --onnx file {onnx_file}")
    return Path(manifest)


def run_int8_from_args(args: Any, argv: list[str]) -> int:
    """``export-model CHECKPOINT --int8 ...`` -> exit status (Int8GateError propagates as a ShelfSightError)."""
    import shlex

    options = options_from_args(args, "export-model " + shlex.join(argv))
    report = run_int8_export(source_from_args(args), args.out, options)
    print("\n".join(summary_lines(report)))
    print(f"report: {report.with_suffix('.md')}")
    return 0
