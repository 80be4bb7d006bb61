"""``export-model``: export a checkpoint to ONNX, or ``train`` / ``eval`` a detector. A thin shell over pure functions.

The first argument picks the mode: ``train`` or ``eval`` select that subcommand; anything else is the checkpoint
to export. Every ShelfSightError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from shelfsight.runtime.errors import ShelfSightError

SUBCOMMANDS = ("train", "eval", "build-engine", "describe")

EXPORT_EXAMPLES = """\
examples:
  export-model runs/shelf/best.pt --out models/shelf-320
  export-model runs/shelf/best.pt --out models/shelf-640 --imgsz 640 --name shelf-640 --opset 17
  export-model train --data sim_data/data.yaml --out runs/shelf --epochs 60 --imgsz 320 --batch 16
  export-model eval models/shelf-320 --data sim_data/data.yaml

  # FP32 + INT8 (+ a 20 % channel-pruned, fine-tuned pair), each scored on the val set; INT8 refused if it
  # loses more than 0.01 mAP50 against its FP32 parent, the pruned model if it loses more than that against FP32
  export-model runs/shelf/best.pt --int8 --calib-data sim_data/images/train --val-data sim_data/data.yaml \\
      --out models/shelf-int8 --calib-images 300 --calib-method percentile
  export-model runs/shelf/best.pt --int8 --prune 0.2 --finetune-epochs 8 --train-data sim_data/data.yaml \\
      --calib-data sim_data/data.yaml --val-data sim_data/data.yaml --out models/shelf-int8-pruned
  export-model build-engine models/shelf-int8 --int8                 # on the Jetson: TensorRT engine
  export-model describe yolox_nano.onnx --format yolox --classes coco.names --channel-order BGR \\
      --pixel-scale 1 --letterbox-align top-left                    # manifest for a third-party ONNX
  # INT8 of that third-party model without labels: gated on agreement with its own FP32 detections on the
  # --calib-data images not used for calibration (or --agreement-data DIR); refused below --min-agreement 0.9
  export-model --onnx yolox_nano.onnx --manifest manifest.json --int8 --calib-data photos/ --calib-images 12 \\
      --float-leading-convs 2 --out models/yolox-int8

subcommands (see 'export-model SUBCOMMAND --help'):
  train         train a detector on a YOLO-format data.yaml
  eval          COCO mAP50 / mAP50-95 of a checkpoint (.pt) or an exported model folder / manifest.json
  build-engine  serialized TensorRT engine from an exported model folder (needs TensorRT: Jetson / GPU host)
  describe      write manifest.json for a third-party YOLOv8/YOLO11, YOLOv5 or YOLOX ONNX file
"""

TRAIN_EXAMPLES = """\
examples:
  export-model train --data sim_data/data.yaml --out runs/shelf --epochs 60 --imgsz 320 --batch 16
  export-model train --data sim_data/data.yaml --out runs/shelf --epochs 80 --resume      # continue last.pt
  export-model train --data real/data.yaml --out runs/real --epochs 20 --init runs/shelf/best.pt --lr 0.001
"""

EVAL_EXAMPLES = """\
examples:
  export-model eval runs/shelf/best.pt --data sim_data/data.yaml
  export-model eval models/shelf-320 --data sim_data/data.yaml --json models/shelf-320/eval.json
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-model",
        description="Export a ShelfSight checkpoint to a single-file FP32 ONNX model with manifest.json "
        "(written only after ONNX Runtime matches PyTorch on test frames).",
        epilog=EXPORT_EXAMPLES,
        formatter_class=_formatter,
    )
    parser.add_argument(
        "checkpoint", type=Path, nargs="?", metavar="SOURCE",
        help="checkpoint (.pt) written by 'export-model train'; with --int8 also an FP32 model folder / manifest.json",
    )
    parser.add_argument("--onnx", type=Path, help="with --int8: a third-party FP32 ONNX file (see --manifest)")
    parser.add_argument(
        "--manifest", type=Path, help="with --int8: the manifest.json describing the model ('export-model describe')"
    )
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (model.onnx, manifest.json)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size, multiple of 32 (default: checkpoint's)")
    parser.add_argument("--name", default=None, help="model name in the manifest (default: checkpoint file stem)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, the newest TensorRT 8.6 reads)")
    parser.add_argument("--parity-images", type=Path, default=None, help="folder of images for the parity check")
    parser.add_argument("--include-checkpoint", action="store_true", help="copy the checkpoint into the folder")
    from shelfsight.export.int8_cli import add_int8_arguments

    add_int8_arguments(parser)
    return parser


def describe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-model describe",
        description="Inspect a third-party ONNX detector and write its manifest.json (hashes, shapes, preprocessing); "
        "a format that does not fit the output shape is refused.",
        formatter_class=_formatter,
    )
    parser.add_argument("onnx", type=Path, help="the ONNX file (the manifest is written beside it)")
    parser.add_argument("--format", required=True, choices=("yolov8", "yolov5", "yolox", "shelfsight"))
    parser.add_argument("--classes", required=True, help="class names file (one per line) or a data.yaml")
    parser.add_argument("--name", default=None)
    parser.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")
    parser.add_argument("--pixel-scale", type=float, default=1.0 / 255.0, help="1/255 (default) or 1 for 0-255")
    parser.add_argument("--mean", type=float, nargs=3, default=(0.0, 0.0, 0.0))
    parser.add_argument("--std", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    parser.add_argument("--resize", choices=("letterbox", "resize"), default="letterbox")
    parser.add_argument("--letterbox-align", choices=("center", "top-left"), default="center")
    parser.add_argument("--pad-value", type=int, default=114)
    parser.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    return parser


def run_describe(args: argparse.Namespace) -> int:
    from shelfsight.runtime.describe import describe_onnx

    manifest = describe_onnx(
        args.onnx, args.format, args.classes, name=args.name, channel_order=args.channel_order,
        pixel_scale=args.pixel_scale, mean=tuple(args.mean), std=tuple(args.std), resize=args.resize,
        letterbox_align=args.letterbox_align, pad_value=args.pad_value, overwrite=args.force,
    )
    print(f"{args.onnx.parent / 'manifest.json'}: {manifest.name}, format {manifest.output.format}, "
          f"input {manifest.input.shape} {manifest.input.channel_order}, {len(manifest.classes)} classes")
    return 0


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-model train",
        description="Train the ShelfSight detector; writes RUN_DIR/last.pt every epoch and RUN_DIR/best.pt.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=_formatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="YOLO data.yaml (train/val folders, names)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--imgsz", type=int, default=320, help="square input size, multiple of 32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.002, help="peak learning rate")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier (0.25-0.5: ~0.4-1.5 M params)")
    parser.add_argument("--depth", type=float, default=0.33, help="block-count multiplier")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--val-every", type=int, default=1, help="validate every K epochs (and after the last)")
    parser.add_argument("--val-limit", type=int, default=None, help="validate on the first N val images only")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (fine-tuning)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="keep the BatchNorm statistics of --init while fine-tuning")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-model eval",
        description="COCO mAP50 / mAP50-95 and per-class AP50 (conf 0.001, max 300 detections per image).",
        epilog=EVAL_EXAMPLES,
        formatter_class=_formatter,
    )
    parser.add_argument("model", type=Path, help="checkpoint (.pt), model folder or manifest.json")
    parser.add_argument("--data", type=Path, required=True, help="YOLO data.yaml")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--imgsz", type=int, default=None, help="checkpoints only: input size (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return parser


def run_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from shelfsight.export.int8_cli import int8_requested, run_int8_from_args

    if int8_requested(args) or args.onnx is not None or args.manifest is not None:
        if not args.int8:
            raise ShelfSightError("--onnx / --manifest name a model to quantize: add --int8 --calib-data DIR")
        return run_int8_from_args(args, list(argv))
    if args.checkpoint is None:
        raise ShelfSightError("no checkpoint given (export-model CHECKPOINT --out DIR; see --help)")
    from shelfsight.export.data import IMAGE_SUFFIXES
    from shelfsight.export.onnx_export import ExportOptions, export_onnx

    parity_images: list[Path] = []
    if args.parity_images is not None:
        if not args.parity_images.is_dir():
            raise ShelfSightError(f"{args.parity_images}: --parity-images must be a folder of images")
        parity_images = sorted(p for p in args.parity_images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:8]
        if not parity_images:
            raise ShelfSightError(f"{args.parity_images}: no images in the --parity-images folder")
    options = ExportOptions(
        imgsz=args.imgsz,
        name=args.name,
        opset=args.opset,
        parity_images=parity_images,
        include_checkpoint=args.include_checkpoint,
        command="export-model " + shlex.join(argv),
    )
    manifest = export_onnx(args.checkpoint, args.out, options)
    print(f"wrote {manifest.parent / 'model.onnx'} and {manifest}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch

    from shelfsight.export.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    config = TrainConfig(
        data=args.data,
        out=args.out,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        width=args.width,
        depth=args.depth,
        workers=args.workers,
        threads=args.threads,
        val_every=args.val_every,
        val_limit=args.val_limit,
        resume=args.resume,
        init=args.init,
        freeze_bn=args.freeze_bn,
        progress=not args.no_progress,
    )
    result = train(config)
    best = result.best_metrics
    print(f"last: {result.last}")
    if result.best is not None:
        print(f"best: {result.best} (mAP50 {best.get('map50', 0):.4f}, mAP50-95 {best.get('map50_95', 0):.4f})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from shelfsight.export.evaluate import EVAL_CONF_THRESHOLD, EVAL_IOU_THRESHOLD, EVAL_MAX_DET, evaluate_detector

    if args.model.suffix == ".pt":
        import torch

        from shelfsight.export.torch_detector import TorchDetector

        torch.set_num_threads(args.threads)
        detector = TorchDetector.from_checkpoint(
            args.model, args.imgsz, EVAL_CONF_THRESHOLD, EVAL_IOU_THRESHOLD, EVAL_MAX_DET
        )
        result = evaluate_detector(detector.detect, args.data, args.split, args.limit, progress=True)
    else:
        from shelfsight.runtime.model import load_model

        if args.imgsz is not None:
            raise ShelfSightError("--imgsz applies to checkpoints only; an exported model has a fixed input size")
        with load_model(
            args.model,
            threads=args.threads,
            conf_threshold=EVAL_CONF_THRESHOLD,
            iou_threshold=EVAL_IOU_THRESHOLD,
            max_det=EVAL_MAX_DET,
        ) as runtime_detector:
            result = evaluate_detector(runtime_detector.detect, args.data, args.split, args.limit, progress=True)
    print(result.summary())
    if args.json is not None:
        payload = result.as_metrics(validation_set=f"{args.data}:{args.split}") | {
            "num_images": result.num_images,
            "num_instances": result.num_instances,
            "model": str(args.model),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv and argv[0] == "train":
            return run_train(train_parser().parse_args(argv[1:]))
        if argv and argv[0] == "eval":
            return run_eval(eval_parser().parse_args(argv[1:]))
        if argv and argv[0] == "build-engine":
            from shelfsight.export.tensorrt_build import build_engine_parser, run_build_engine

            return run_build_engine(build_engine_parser().parse_args(argv[1:]))
        if argv and argv[0] == "describe":
            return run_describe(describe_parser().parse_args(argv[1:]))
        return run_export(export_parser().parse_args(argv), argv)
    except ShelfSightError as exc:
        print(f"export-model: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<options>"
        print(f"export-model: error: {field}: {first['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-model: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


if __name__ == "__main__":
    sys.exit(main())
