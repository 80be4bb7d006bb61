"""Training loop: AdamW/SGD, linear warmup + cosine LR, weight EMA, per-epoch validation, resumable checkpoints.

Determinism: every epoch reseeds torch and the data order from ``(seed, epoch)`` and each augmentation draws from
``(seed, epoch, image index)``, so a run resumed from ``last.pt`` continues exactly as if it had not stopped, and
the result does not depend on the number of data-loader workers.

``last.pt`` = EMA weights as ``state_dict`` (loadable like any checkpoint) plus ``train_state`` (raw model,
optimizer, schedule step, EMA update count, best fitness, seed). ``best.pt`` = EMA weights of the best epoch only.
On ``resume`` the architecture and input size come from ``last.pt``; every other setting comes from the new command
line (pass the same ones, or a larger ``epochs`` to extend a finished run).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm import tqdm

from shelfsight.export.data import (
    AugmentConfig,
    YoloDataset,
    load_data_yaml,
    make_loader,
)
from shelfsight.export.evaluate import (
    EVAL_CONF_THRESHOLD,
    EVAL_IOU_THRESHOLD,
    EvalResult,
    evaluate_detector,
)
from shelfsight.export.loss import DetectionLoss
from shelfsight.export.model import (
    Detector,
    ModelConfig,
    build_model,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
)
from shelfsight.export.torch_detector import TorchDetector
from shelfsight.runtime.errors import ShelfSightError

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    epochs: int = Field(50, ge=1)
    imgsz: int = Field(320, ge=32, multiple_of=32)
    batch: int = Field(16, ge=1)
    lr: float = Field(0.002, gt=0)
    final_lr_ratio: float = Field(0.05, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: float = Field(1.0, ge=0)
    seed: int = 0
    width: float = Field(0.5, gt=0)
    depth: float = Field(0.33, gt=0)
    workers: int = Field(2, ge=0)
    threads: int = Field(2, ge=1)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_tau: float = Field(2000.0, gt=0, description="updates until the EMA decay reaches ~63% of ema_decay")
    val_every: int = Field(1, ge=1, description="validate every k epochs (and always after the last)")
    val_limit: int | None = Field(None, ge=1)
    grad_clip: float = Field(10.0, gt=0)
    box_gain: float = Field(7.5, ge=0)
    cls_gain: float = Field(0.5, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    resume: bool = False
    init: Path | None = None
    # Fine-tuning on a small or shifted set: keep the BatchNorm running statistics of the --init weights (layers in
    # eval mode; their scale and shift still learn), so the statistics do not drift towards the new images and
    # away from the ones the model already handles.
    freeze_bn: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _freeze_bn_needs_weights(self) -> TrainConfig:
        if self.freeze_bn and self.init is None and not self.resume:
            raise ValueError("freeze_bn keeps the BatchNorm statistics of --init weights: give --init")
        return self


@dataclass(frozen=True)
class TrainResult:
    out: Path
    last: Path
    best: Path | None
    epochs_run: int
    best_metrics: dict[str, Any]


class ModelEMA:
    """Exponential moving average of weights and BN statistics; decay ramps up so early epochs follow the model."""

    def __init__(self, model: nn.Module, decay: float, tau: float, updates: int = 0) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        live = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(live[name].detach(), alpha=1 - d)
            else:
                value.copy_(live[name])


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_ratio: float) -> float:
    """Linear warmup from 10% to ``base_lr``, then cosine down to ``base_lr * final_ratio``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (0.1 + 0.9 * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN parameters and biases: decaying them only fights the normalization."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.937, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def _seed_everything(seed: int) -> None:
    # Augmentation draws from its own per-image numpy Generators; the global numpy/random states are never used.
    random.seed(seed)
    torch.manual_seed(seed)


def init_from_checkpoint(model: Detector, path: Path) -> int:
    """Copy every tensor whose name and shape match (fine-tuning, possibly with another class count)."""
    source, _ = load_checkpoint(path)
    own = model.state_dict()
    matched = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ShelfSightError(f"{path}: no weights match this model (width/depth differ?)")
    model.load_state_dict(matched, strict=False)
    log.info("initialized %d/%d tensors from %s", len(matched), len(own), path)
    return len(matched)


def validate(
    model: Detector, class_names: list[str], data: Path, imgsz: int, limit: int | None, progress: bool = False
) -> EvalResult:
    detector = TorchDetector(model, class_names, imgsz, EVAL_CONF_THRESHOLD, EVAL_IOU_THRESHOLD)
    return evaluate_detector(detector.detect, load_data_yaml(data), "val", limit=limit, progress=progress)


def train(
    cfg: TrainConfig,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    model: Detector | None = None,
) -> TrainResult:
    """Train from scratch, from ``cfg.init`` weights, from ``last.pt`` (``cfg.resume``), or fine-tune an already
    built ``model`` (e.g. a channel-pruned one whose layer widths no longer follow its config)."""
    torch.set_num_threads(cfg.threads)
    if model is not None and (cfg.resume or cfg.init is not None):
        raise ShelfSightError("a given model is fine-tuned as it is: it cannot be combined with resume or init")
    spec = load_data_yaml(cfg.data)
    cfg.out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = cfg.out / LAST_CHECKPOINT, cfg.out / BEST_CHECKPOINT

    resume_state: dict[str, Any] | None = None
    start_epoch = 0
    if cfg.resume:
        if not last_path.is_file():
            raise ShelfSightError(f"{last_path}: nothing to resume (no last.pt in the run folder)")
        saved = read_checkpoint(last_path)
        resume_state = saved.get("train_state")
        if not isinstance(resume_state, dict):
            raise ShelfSightError(f"{last_path}: has no train_state; only last.pt of a run can be resumed")
        model_cfg = ModelConfig.from_dict(saved["model_config"])
        if saved["class_names"] != spec.names:
            raise ShelfSightError(f"{last_path}: classes {saved['class_names']} differ from {cfg.data}: {spec.names}")
        start_epoch = int(saved["epoch"]) + 1
        _seed_everything(cfg.seed)
    elif model is not None:
        model_cfg = model.cfg
        if model_cfg.num_classes != spec.num_classes:
            raise ShelfSightError(f"{cfg.data}: {spec.num_classes} classes but the model has {model_cfg.num_classes}")
        _seed_everything(cfg.seed)
    else:
        model_cfg = ModelConfig(num_classes=spec.num_classes, width=cfg.width, depth=cfg.depth, imgsz=cfg.imgsz)
        _seed_everything(cfg.seed)

    if model is None:
        model = build_model(model_cfg)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    elif cfg.init is not None:
        init_from_checkpoint(model, cfg.init)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
    optimizer = _make_optimizer(model, cfg)
    best_fitness, best_metrics = -1.0, {}
    step = 0
    if resume_state is not None:
        ema.model.load_state_dict(saved["state_dict"])
        ema.updates = int(resume_state["ema_updates"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step = int(resume_state["scheduler"]["step"])
        best_fitness = float(resume_state["best_fitness"])
        best_metrics = dict(resume_state.get("best_metrics") or {})

    dataset = YoloDataset(spec, "train", model_cfg.imgsz, augment=cfg.augment, seed=cfg.seed)
    generator = torch.Generator()
    loader = make_loader(dataset, cfg.batch, shuffle=True, workers=cfg.workers, generator=generator)
    criterion = DetectionLoss(spec.num_classes, box_gain=cfg.box_gain, cls_gain=cfg.cls_gain)
    total_steps = cfg.epochs * len(loader)
    warmup_steps = round(cfg.warmup_epochs * len(loader))
    points, strides = model.anchors(model_cfg.imgsz, model_cfg.imgsz, torch.device("cpu"))

    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        generator.manual_seed(cfg.seed * 100_003 + epoch)
        dataset.epoch = epoch
        model.train()
        if cfg.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        running: dict[str, float] = {"loss": 0.0, "box": 0.0, "cls": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress)
        for i, batch in enumerate(bar):
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.final_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, distances = model(batch["images"])
            parts = criterion(
                logits,
                distances,
                points,
                strides,
                batch["labels"],
                batch["boxes"],
                batch["box_mask"],
                batch["class_mask"],
            )
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
            for key, value in (("loss", parts.total.item()), ("box", parts.box.item()), ("cls", parts.cls.item())):
                running[key] += (value - running[key]) / (i + 1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"lr": f"{lr:.2e}"})
        bar.close()

        metrics: dict[str, Any] = {f"train_{k}": round(v, 5) for k, v in running.items()}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            result = validate(ema.model, spec.names, cfg.data, model_cfg.imgsz, cfg.val_limit, cfg.progress)
            metrics.update(result.as_metrics(validation_set=str(cfg.data)))
            metrics["fitness"] = round(result.fitness, 5)
            if cfg.progress:
                tqdm.write(f"epoch {epoch + 1}: {result.summary()}")
            if result.fitness > best_fitness:
                best_fitness, best_metrics = result.fitness, metrics
                best = make_checkpoint(ema.model, spec.names, model_cfg.imgsz, epoch, metrics, train_config=_plain(cfg))
                _atomic_save(best, best_path)
        train_state = {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": warmup_steps},
            "ema_updates": ema.updates,
            "best_fitness": best_fitness,
            "best_metrics": best_metrics,
            "seed": cfg.seed,
        }
        checkpoint = make_checkpoint(
            ema.model, spec.names, model_cfg.imgsz, epoch, metrics, train_config=_plain(cfg), train_state=train_state
        )
        _atomic_save(checkpoint, last_path)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    return TrainResult(
        out=cfg.out,
        last=last_path,
        best=best_path if best_path.is_file() else None,
        epochs_run=max(0, epoch + 1 - start_epoch),
        best_metrics=best_metrics,
    )


def _plain(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """An interrupted save must not destroy the previous last.pt."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
