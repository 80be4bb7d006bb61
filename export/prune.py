"""Structured channel pruning of the ShelfSight detector with torch-pruning's dependency graph.

Whole output channels are removed from convolutions together with every tensor coupled to them (BatchNorms, the
next layers' inputs, residual additions, concatenations), so the result is a smaller dense network that runs faster
on every backend, unlike sparse weights. Channel counts are rounded to multiples of 8 (the width the CPU's vector
kernels and TensorRT's tensor cores work in) and the head's output convolutions are never pruned, so the output
tensor keeps its shape.

The CSP blocks split one convolution's output in two halves with ``Tensor.split(hidden)``, a Python int that
torch-pruning cannot rewrite. Before pruning each block's input convolution is therefore cut into two convolutions
(one per half, an exact rewrite); after pruning they are merged back and the block's ``hidden`` becomes the list of
the two pruned half widths. The pruned model keeps the original module tree and state_dict keys, only the shapes
change, so :func:`reshape_to_state_dict` can rebuild it from any checkpoint's weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from shelfsight.export.model import (
    ConvBnAct,
    CSPBlock,
    Detector,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
)
from shelfsight.runtime.errors import ShelfSightError

log = logging.getLogger(__name__)

PRUNING_KEY = "pruning"  # checkpoint key holding the pruning record (plain types: weights_only-safe)


class PruneError(ShelfSightError):
    """Pruning was asked for with impossible options or left the model inconsistent."""


class PruneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of channels removed from each prunable group")
    round_to: int = Field(default=8, ge=1)
    importance_norm: Literal[1, 2] = 2
    imgsz: int = Field(default=320, ge=32, multiple_of=32)


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int


@dataclass(frozen=True)
class PruneResult:
    model: Detector
    before: ModelCost
    after: ModelCost
    options: PruneOptions

    def record(self) -> dict[str, Any]:
        """What a checkpoint and the report keep about this pruning (plain types only)."""
        return {
            "ratio": self.options.ratio,
            "round_to": self.options.round_to,
            "importance": f"group_magnitude_l{self.options.importance_norm}",
            "params_before": self.before.params,
            "params_after": self.after.params,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
        }


class _SplitFreeCSP(nn.Module):
    """A CSPBlock whose input conv is two convs, one per half: what torch-pruning can follow channel by channel."""

    def __init__(self, block: CSPBlock) -> None:
        super().__init__()
        first, second = _half_widths(block)
        self.cv1a = _slice_conv_bn_act(block.cv1, 0, first)
        self.cv1b = _slice_conv_bn_act(block.cv1, first, first + second)
        self.blocks = block.blocks
        self.cv2 = block.cv2
        self.train(block.training)  # new layers start in training mode; follow the block's mode

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.cv1a(x), self.cv1b(x)]
        for bottleneck in self.blocks:
            parts.append(bottleneck(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))

    def merged(self) -> CSPBlock:
        """Back to a CSPBlock (same state_dict keys as the unpruned model), ``hidden`` = the two half widths."""
        c_in = self.cv1a.conv.in_channels
        first, second = self.cv1a.conv.out_channels, self.cv1b.conv.out_channels
        block = CSPBlock.__new__(CSPBlock)
        nn.Module.__init__(block)
        block.cv1 = _concat_conv_bn_act(self.cv1a, self.cv1b, c_in)
        block.blocks = self.blocks
        block.cv2 = self.cv2
        # Tensor.split takes a list of sizes as well as one size.
        block.hidden = first if first == second else [first, second]
        return block.train(self.training)


def _half_widths(block: CSPBlock) -> tuple[int, int]:
    hidden: Any = block.hidden
    if isinstance(hidden, int):
        return hidden, hidden
    return int(hidden[0]), int(hidden[1])


def _new_conv_bn_act(template: ConvBnAct, c_in: int, c_out: int) -> ConvBnAct:
    conv = template.conv
    layer = ConvBnAct(c_in, c_out, conv.kernel_size[0], conv.stride[0], act=not isinstance(template.act, nn.Identity))
    if not isinstance(template.bn, nn.BatchNorm2d):
        raise PruneError("prune the trainable model, not a fused (BatchNorm-folded) copy")
    layer.bn = nn.BatchNorm2d(c_out, eps=template.bn.eps, momentum=template.bn.momentum)
    return layer


@torch.no_grad()
def _slice_conv_bn_act(source: ConvBnAct, start: int, stop: int) -> ConvBnAct:
    layer = _new_conv_bn_act(source, source.conv.in_channels, stop - start)
    layer.conv.weight.copy_(source.conv.weight[start:stop])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(layer.bn, name).copy_(getattr(source.bn, name)[start:stop])
    return layer


@torch.no_grad()
def _concat_conv_bn_act(first: ConvBnAct, second: ConvBnAct, c_in: int) -> ConvBnAct:
    layer = _new_conv_bn_act(first, c_in, first.conv.out_channels + second.conv.out_channels)
    layer.conv.weight.copy_(torch.cat([first.conv.weight, second.conv.weight]))
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(layer.bn, name).copy_(torch.cat([getattr(first.bn, name), getattr(second.bn, name)]))
    return layer


def _replace_children(module: nn.Module, kind: type, make: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replace_children(child, kind, make)


def head_output_convs(model: Detector) -> list[nn.Module]:
    """The 1x1 predictors whose output channels are the class scores and box sides: never pruned."""
    return [branch[-1] for branch in model.head.cls_branches] + [branch[-1] for branch in model.head.box_branches]


def measure_cost(model: nn.Module, imgsz: int) -> ModelCost:
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, imgsz, imgsz))
    model.train(was_training)
    return ModelCost(params=int(params), macs=int(macs))


def prune_detector(model: Detector, options: PruneOptions) -> PruneResult:
    """Return a pruned copy of ``model`` (the input is not modified)."""
    import torch_pruning as tp

    if any(not isinstance(m.bn, nn.BatchNorm2d) for m in model.modules() if isinstance(m, ConvBnAct)):
        raise PruneError("prune the trainable model, not a fused (BatchNorm-folded) copy")
    work = copy.deepcopy(model).eval()
    work._anchor_cache = {}
    before = measure_cost(work, options.imgsz)
    _replace_children(work, CSPBlock, _SplitFreeCSP)
    example = torch.zeros(1, 3, options.imgsz, options.imgsz)
    pruner = tp.pruner.BasePruner(
        work,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=options.importance_norm),
        pruning_ratio=options.ratio,
        ignored_layers=head_output_convs(work),
        round_to=options.round_to,
    )
    pruner.step()
    _replace_children(work, _SplitFreeCSP, lambda block: block.merged())
    work._anchor_cache = {}
    after = measure_cost(work, options.imgsz)
    check_pruned(work, conv_widths(model), options.round_to)
    log.info(
        "pruned %.0f%%: params %d -> %d, MACs %.1fM -> %.1fM",
        options.ratio * 100,
        before.params,
        after.params,
        before.macs / 1e6,
        after.macs / 1e6,
    )
    return PruneResult(model=work, before=before, after=after, options=options)


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def check_pruned(model: Detector, original_widths: dict[str, int], round_to: int) -> None:
    """Every conv whose width changed is a multiple of ``round_to``; the head's outputs are untouched.

    Layers narrower than ``round_to`` to begin with (tiny models) cannot be rounded and are left as they were.
    """
    protected = {id(m) for m in head_output_convs(model)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or id(module) in protected:
            continue
        changed = module.out_channels != original_widths.get(name)
        if changed and module.out_channels % round_to:
            raise PruneError(f"pruned conv '{name}' has {module.out_channels} channels, not a multiple of {round_to}")
    for branch in model.head.cls_branches:
        if branch[-1].out_channels != model.num_classes:
            raise PruneError("pruning changed the number of class outputs")


def reshape_to_state_dict(model: Detector, state_dict: dict[str, Tensor]) -> Detector:
    """Resize ``model``'s convolutions and BatchNorms (in place) to the shapes stored in ``state_dict``.

    This is how a pruned checkpoint is loaded: build the architecture from its config, then shrink every layer to
    the saved widths. Unknown or missing keys are left for ``check_state_dict`` to report.
    """
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        weight = state_dict.get(f"{name}.weight") if name else None
        if weight is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(module, nn.Conv2d) and tuple(weight.shape) != tuple(module.weight.shape):
            c_out, c_in_per_group = int(weight.shape[0]), int(weight.shape[1])
            setattr(
                parent,
                child,
                nn.Conv2d(
                    c_in_per_group * module.groups,
                    c_out,
                    module.kernel_size,  # type: ignore[arg-type]
                    module.stride,  # type: ignore[arg-type]
                    module.padding,  # type: ignore[arg-type]
                    bias=module.bias is not None,
                    groups=module.groups,
                ),
            )
        elif isinstance(module, nn.BatchNorm2d) and weight.shape[0] != module.num_features:
            setattr(parent, child, nn.BatchNorm2d(int(weight.shape[0]), eps=module.eps, momentum=module.momentum))
    for module in model.modules():
        if isinstance(module, CSPBlock) and len(module.blocks):
            second = module.blocks[0].cv1.conv.in_channels
            first = module.cv1.conv.out_channels - second
            module.hidden = first if first == second else [first, second]
    model._anchor_cache = {}
    return model


def save_pruned_checkpoint(
    result: PruneResult,
    model: Detector,
    class_names: list[str],
    imgsz: int,
    path: str | Path,
    epoch: int = -1,
    metrics: dict[str, Any] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (the pruned, possibly fine-tuned network) with its pruning record."""
    record = result.record() | dict(extra_record or {})
    checkpoint = make_checkpoint(model, class_names, imgsz, epoch, metrics, **{PRUNING_KEY: record})
    return _atomic_save(checkpoint, Path(path))


def resave_with_record(checkpoint_path: str | Path, out_path: str | Path, record: dict[str, Any]) -> Path:
    """Copy a checkpoint written by code that knows nothing of pruning (the trainer), adding the pruning record."""
    data = read_checkpoint(checkpoint_path)
    data.pop("train_state", None)  # optimizer state of the fine-tune run: not needed to export or to resume pruning
    data[PRUNING_KEY] = dict(record)
    return _atomic_save(data, Path(out_path))


def _atomic_save(checkpoint: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path


# --- pipeline steps: prune -> fine-tune -> export ---------------------------------------------------------------------


@dataclass(frozen=True)
class PruneStepOptions:
    ratio: float
    imgsz: int | None = None


def prune_step(checkpoint: Path, out_path: Path, options: PruneStepOptions) -> Path:
    """Checkpoint -> pruned checkpoint (channels removed, not yet fine-tuned), with its pruning record."""
    from shelfsight.runtime.manifest import sha256_file

    model, meta = load_checkpoint(checkpoint)
    imgsz = options.imgsz or meta.imgsz
    result = prune_detector(model, PruneOptions(ratio=options.ratio, imgsz=imgsz))
    record = {"source_checkpoint_sha256": sha256_file(checkpoint)}
    return save_pruned_checkpoint(result, result.model, meta.class_names, imgsz, out_path, extra_record=record)


@dataclass(frozen=True)
class FinetuneStepOptions:
    train_data: Path
    epochs: int
    batch: int = 8
    lr: float = 0.001
    imgsz: int | None = None
    val_limit: int | None = None


def trainer_accepts_model() -> bool:
    """Whether the project's trainer can fine-tune an already-built (pruned) model: ``train(cfg, model=...)``."""
    import inspect

    from shelfsight.export import train as trainer

    return "model" in inspect.signature(trainer.train).parameters


def finetune_step(pruned_checkpoint: Path, out_dir: Path, options: FinetuneStepOptions) -> Path:
    """Fine-tune a pruned checkpoint with the project's trainer -> ``out_dir/pruned.pt`` (trained weights + record)."""
    from shelfsight.export import train as trainer
    from shelfsight.export.data import load_data_yaml

    if not trainer_accepts_model():
        raise PruneError(
            "fine-tuning a pruned model needs the trainer to accept a built model (train(cfg, model=...)); "
            "this version's trainer does not"
        )
    model, meta = load_checkpoint(pruned_checkpoint)
    classes = load_data_yaml(options.train_data).names
    if classes != meta.class_names:
        raise PruneError(f"{options.train_data}: classes {classes} differ from the model's {meta.class_names}")
    config = trainer.TrainConfig(
        data=options.train_data,
        out=out_dir,
        epochs=options.epochs,
        imgsz=options.imgsz or meta.imgsz,
        batch=options.batch,
        lr=options.lr,
        warmup_epochs=0.0,
        val_every=options.epochs,
        val_limit=options.val_limit,
        progress=False,
    )
    train: Any = trainer.train  # the model= hook is checked above; older trainers lack it
    result = train(config, model=model)
    return resave_with_record(result.best or result.last, out_dir / "pruned.pt", meta.extra.get(PRUNING_KEY) or {})


@dataclass(frozen=True)
class PrunedExportOptions:
    name: str
    imgsz: int | None = None
    opset: int = 17
    command: str | None = None
    model_filename: str = "model.onnx"
    checkpoint_filename: str = "pruned.pt"


def export_pruned_step(pruned_checkpoint: Path, out_dir: Path, options: PrunedExportOptions) -> Path:
    """Pruned checkpoint -> FP32 ONNX folder + manifest, through the detector's ONNX writer and parity gate."""
    import shutil
    import sys

    from shelfsight.export.onnx_export import ExportError, ExportOptions, check_parity, parity_frames, write_onnx
    from shelfsight.export.torch_detector import TorchDetector
    from shelfsight.runtime.manifest import Manifest, Provenance, artifact_for, write_manifest

    model, meta = load_checkpoint(pruned_checkpoint)
    imgsz = options.imgsz or meta.imgsz
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = write_onnx(model, imgsz, out_dir / options.model_filename, options.opset)
    parity_options = ExportOptions(imgsz=imgsz, opset=options.opset)
    reference = TorchDetector(model, meta.class_names, imgsz, conf_threshold=parity_options.parity_conf)
    parity = check_parity(onnx_path, reference, parity_frames(parity_options, imgsz), parity_options)
    if not parity.ok(parity_options):
        raise ExportError(f"{onnx_path}: ONNX Runtime output differs from PyTorch: {parity.summary()}")
    shutil.copyfile(pruned_checkpoint, out_dir / options.checkpoint_filename)
    record = meta.extra.get(PRUNING_KEY) or {}
    manifest = Manifest(
        name=options.name,
        classes=meta.class_names,
        input=reference.input_spec,
        output=reference.output_spec,
        precision="fp32",
        artifacts=[
            artifact_for(out_dir, options.model_filename, "model"),
            artifact_for(out_dir, options.checkpoint_filename, "checkpoint"),
        ],
        provenance=Provenance(
            source_checkpoint_sha256=record.get("source_checkpoint_sha256"),
            pruning_ratio=record.get("ratio"),
            exporter=f"torch.onnx.export(dynamo=True, opset={options.opset}), BN folded, channel-pruned",
            command=options.command or " ".join(sys.argv),
            tool_versions=tool_versions(),
        ),
    )
    return write_manifest(manifest, out_dir)


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped an exported model, for the manifest's provenance."""
    import contextlib
    from importlib import metadata

    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "torch-pruning", "shelfsight"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
