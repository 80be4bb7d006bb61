"""A compact anchor-free detector in plain PyTorch (no torchvision), built from ONNX- and INT8-friendly ops only.

Conv (BN folded at export) + ReLU, MaxPool, nearest Upsample, Concat, Add, Split. A CSP (C2f-style) backbone, a
PAN/FPN neck and a decoupled head at strides 8/16/32. Each location regresses ltrb distances
(``softplus(raw) * stride``); in eval/export mode the box decode and the class sigmoid run inside the graph so the
network emits the ``shelfsight`` output format directly: one tensor [N, A, 4 + nc] (xyxy in input pixels, class
scores in [0, 1]). NMS stays outside, in ``shelfsight.runtime.postprocess``.

ReLU rather than SiLU/Hardswish: it quantizes without a lookup and fuses into the preceding Conv in ORT's QDQ
kernels, which matters for the INT8 export.
"""

from __future__ import annotations

import copy
import math
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import InputSpec, OutputSpec

INPUT_NAME = "images"
OUTPUT_NAME = "detections"

STRIDES: tuple[int, int, int] = (8, 16, 32)
# Channels at width 1.0 for the stem and stages at strides 2, 4, 8, 16, 32.
BASE_CHANNELS: tuple[int, int, int, int, int] = (32, 64, 128, 256, 256)
# Bottlenecks per CSP block (stages at strides 4, 8, 16, 32) at depth 1.0.
BASE_DEPTHS: tuple[int, int, int, int] = (3, 6, 6, 3)
CLASS_PRIOR = 0.01  # initial foreground probability: keeps the early BCE from drowning in background


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; plain types only so it round-trips through a checkpoint dict."""

    num_classes: int = 2
    width: float = 0.5
    depth: float = 0.33
    imgsz: int = 320

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ShelfSightError(f"model config: num_classes must be >= 1, got {self.num_classes}")
        if not 0.05 <= self.width <= 4.0:
            raise ShelfSightError(f"model config: width must be in [0.05, 4], got {self.width}")
        if not 0.0 < self.depth <= 4.0:
            raise ShelfSightError(f"model config: depth must be in (0, 4], got {self.depth}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ShelfSightError(f"model config: imgsz must be a positive multiple of 32, got {self.imgsz}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ShelfSightError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShelfSightError(f"model config: unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})")
        return cls(**data)

    @property
    def channels(self) -> tuple[int, ...]:
        # Multiples of 8 keep convolutions on the fast vectorized paths of CPU kernels.
        return tuple(max(8, _round8(c * self.width)) for c in BASE_CHANNELS)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(max(1, round(n * self.depth)) for n in BASE_DEPTHS)


def _round8(value: float) -> int:
    return int(math.ceil(value / 8) * 8)


class ConvBnAct(nn.Module):
    """Conv2d + BatchNorm + ReLU; ``fuse()`` folds the BN into the conv for export."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act: nn.Module = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn = self.bn
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            self.conv.in_channels,
            self.conv.out_channels,
            self.conv.kernel_size,  # type: ignore[arg-type]
            self.conv.stride,  # type: ignore[arg-type]
            self.conv.padding,  # type: ignore[arg-type]
            bias=True,
        ).to(self.conv.weight.device)
        fused.weight.copy_(self.conv.weight * scale.reshape(-1, 1, 1, 1))
        assert fused.bias is not None
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv = fused
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(channels, channels, 3)
        self.cv2 = ConvBnAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """C2f-style CSP: split in two, run bottlenecks on one half, concatenate every intermediate, mix with 1x1."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBnAct(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))
        self.cv2 = ConvBnAct((2 + n) * self.hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        # Two slices rather than Tensor.split: the exporter emits Split with the opset-18 'num_outputs' attribute,
        # which survives the down-conversion to opset 17 and fails the ONNX checker.
        parts = [y[:, : self.hidden], y[:, self.hidden :]]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.cv1 = ConvBnAct(channels, hidden, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBnAct(hidden * 4, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        p1 = self.pool(x)
        p2 = self.pool(p1)
        return self.cv2(torch.cat([x, p1, p2, self.pool(p2)], dim=1))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = cfg.channels
        n2, n3, n4, n5 = cfg.depths
        self.stem = ConvBnAct(3, c1, 3, 2)
        self.stage2 = nn.Sequential(ConvBnAct(c1, c2, 3, 2), CSPBlock(c2, c2, n2, True))
        self.stage3 = nn.Sequential(ConvBnAct(c2, c3, 3, 2), CSPBlock(c3, c3, n3, True))
        self.stage4 = nn.Sequential(ConvBnAct(c3, c4, 3, 2), CSPBlock(c4, c4, n4, True))
        self.stage5 = nn.Sequential(ConvBnAct(c4, c5, 3, 2), CSPBlock(c5, c5, n5, True), SPPF(c5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class PANNeck(nn.Module):
    """Top-down FPN then bottom-up PAN; outputs at strides 8/16/32 with the backbone's channel counts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _, _, c3, c4, c5 = cfg.channels
        n = cfg.depths[-1]
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = CSPBlock(c5 + c4, c4, n, False)
        self.td3 = CSPBlock(c4 + c3, c3, n, False)
        self.down3 = ConvBnAct(c3, c3, 3, 2)
        self.bu4 = CSPBlock(c3 + c4, c4, n, False)
        self.down4 = ConvBnAct(c4, c4, 3, 2)
        self.bu5 = CSPBlock(c4 + c5, c5, n, False)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([self.up(p5), p4], dim=1))
        n3 = self.td3(torch.cat([self.up(t4), p3], dim=1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], dim=1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], dim=1))
        return n3, n4, n5


def _predictor_bias(branch: nn.Module) -> Tensor:
    """The bias of a head branch's final 1x1 conv."""
    assert isinstance(branch, nn.Sequential)
    conv = branch[-1]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    return conv.bias


class DecoupledHead(nn.Module):
    """Per level: a classification branch and a box branch, two 3x3 convs each, then a 1x1 predictor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _, _, c3, c4, c5 = cfg.channels
        # Two or a handful of classes need far less than the neck's width; this halves the head's cost.
        hidden = max(16, c3 // 2)
        self.num_classes = cfg.num_classes
        self.cls_branches = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, hidden, 3), ConvBnAct(hidden, hidden, 3), nn.Conv2d(hidden, cfg.num_classes, 1))
            for c in (c3, c4, c5)
        )
        self.box_branches = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, hidden, 3), ConvBnAct(hidden, hidden, 3), nn.Conv2d(hidden, 4, 1))
            for c in (c3, c4, c5)
        )
        self.reset_bias()

    def reset_bias(self) -> None:
        prior = -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR)
        for branch in self.cls_branches:
            nn.init.constant_(_predictor_bias(branch), prior)
        for branch in self.box_branches:
            # softplus(raw) * stride starts at 2 strides per side: a box about the size of the level's objects.
            nn.init.constant_(_predictor_bias(branch), math.log(math.expm1(2.0)))

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """-> (class logits [N, A, nc], raw box outputs [N, A, 4]), levels concatenated stride 8 first."""
        cls = [branch(f).flatten(2) for branch, f in zip(self.cls_branches, feats, strict=True)]
        box = [branch(f).flatten(2) for branch, f in zip(self.box_branches, feats, strict=True)]
        return torch.cat(cls, dim=2).transpose(1, 2), torch.cat(box, dim=2).transpose(1, 2)


def make_anchors(height: int, width: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Anchor centres [A, 2] (x, y in input pixels) and their strides [A, 1] for an input of ``height x width``."""
    points, strides = [], []
    for stride in STRIDES:
        h, w = height // stride, width // stride
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * stride
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
        strides.append(torch.full((h * w, 1), float(stride), device=device))
    return torch.cat(points), torch.cat(strides)


def decode_boxes(anchor_points: Tensor, distances: Tensor) -> Tensor:
    """ltrb distances [..., A, 4] (input pixels) around anchor centres [A, 2] -> xyxy [..., A, 4]."""
    return torch.cat([anchor_points - distances[..., :2], anchor_points + distances[..., 2:]], dim=-1)


class Detector(nn.Module):
    """Training mode: ``forward`` -> (class logits, ltrb distances in pixels). Eval mode: the ``shelfsight`` tensor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.neck = PANNeck(cfg)
        self.head = DecoupledHead(cfg)
        self._anchor_cache: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def anchors(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached per input size: at export time they become graph constants, so the ONNX graph has no Range ops."""
        key = (height, width, str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = make_anchors(height, width, device)
        return self._anchor_cache[key]

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (class logits [N, A, nc], ltrb distances [N, A, 4] in input pixels)."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ShelfSightError(f"detector input height and width must be multiples of 32, got {tuple(x.shape)}")
        logits, raw_box = self.head(self.neck(self.backbone(x)))
        _, strides = self.anchors(x.shape[-2], x.shape[-1], x.device)
        return logits, F.softplus(raw_box) * strides

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        logits, distances = self.forward_raw(x)
        if self.training:
            return logits, distances
        points, _ = self.anchors(x.shape[-2], x.shape[-1], x.device)
        return torch.cat([decode_boxes(points, distances), logits.sigmoid()], dim=-1)

    def fused(self) -> Detector:
        """An eval-mode copy with every BatchNorm folded into its convolution (what gets exported)."""
        model = copy.deepcopy(self).eval()
        model._anchor_cache = {}
        for module in model.modules():
            if isinstance(module, ConvBnAct):
                module.fuse()
        return model


def input_spec_for(imgsz: int, batch: int = 1) -> InputSpec:
    """This project's preprocessing contract: RGB, /255, no mean/std, centred letterbox padded with 114."""
    return InputSpec(
        name=INPUT_NAME,
        shape=[batch, 3, imgsz, imgsz],
        channel_order="RGB",
        pixel_scale=1.0 / 255.0,
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
        resize="letterbox",
        pad_value=114,
        letterbox_align="center",
    )


def output_spec_for() -> OutputSpec:
    return OutputSpec(format="shelfsight", names=[OUTPUT_NAME])


def build_model(cfg: ModelConfig) -> Detector:
    return Detector(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints -----------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "shelfsight.checkpoint/1"


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything in a checkpoint except the weights; ``extra`` holds keys such as ``train_state``/``train_config``."""

    path: Path
    model_config: ModelConfig
    class_names: list[str]
    imgsz: int
    epoch: int
    metrics: dict[str, Any]
    extra: dict[str, Any]


def make_checkpoint(
    model: Detector,
    class_names: list[str],
    imgsz: int,
    epoch: int,
    metrics: dict[str, Any] | None = None,
    state_dict: dict[str, Tensor] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A checkpoint dict of plain types and tensors only, so ``torch.load(weights_only=True)`` reads it."""
    if len(class_names) != model.num_classes:
        raise ShelfSightError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    weights = state_dict if state_dict is not None else model.state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in weights.items()},
        "class_names": list(class_names),
        "imgsz": int(imgsz),
        "epoch": int(epoch),
        "metrics": dict(metrics or {}),
        **extra,
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the checkpoint dict (weights not yet applied). Refusals are one-line ShelfSightErrors."""
    path = Path(path)
    if not path.is_file():
        raise ShelfSightError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only load failed" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise ShelfSightError(
                f"{path}: refusing to load: the file contains pickled Python objects, not only tensors and plain "
                "types (only weights_only checkpoints are accepted)"
            ) from None
        raise ShelfSightError(f"{path}: not a PyTorch checkpoint ({first})") from None
    except Exception as exc:  # arbitrary bytes make the unpickler raise anything (IndexError, KeyError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShelfSightError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(data, dict):
        raise ShelfSightError(f"{path}: holds a {type(data).__name__}, not a ShelfSight checkpoint dict")
    if "format" not in data:
        if data and all(isinstance(v, Tensor) for v in data.values()):
            raise ShelfSightError(
                f"{path}: is a bare state_dict; expected a ShelfSight checkpoint dict with format '{CHECKPOINT_FORMAT}'"
            )
        raise ShelfSightError(f"{path}: missing 'format' key; not a ShelfSight checkpoint")
    if data["format"] != CHECKPOINT_FORMAT:
        raise ShelfSightError(
            f"{path}: unsupported checkpoint format {data['format']!r} (expected '{CHECKPOINT_FORMAT}')"
        )
    for key, kind in (("model_config", dict), ("state_dict", dict), ("class_names", list), ("imgsz", int)):
        if not isinstance(data.get(key), kind):
            raise ShelfSightError(f"{path}: checkpoint key '{key}' is missing or not a {kind.__name__}")
    bad = next((k for k, v in data["state_dict"].items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise ShelfSightError(f"{path}: state_dict entry '{bad}' is not a tensor")
    return data


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Refuse weights from another architecture, naming the first offending key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ShelfSightError(f"{source}: weights do not fit this architecture: missing key '{missing[0]}'")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ShelfSightError(f"{source}: weights do not fit this architecture: unexpected key '{unexpected[0]}'")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ShelfSightError(
                f"{source}: weights do not fit this architecture: '{key}' has shape {tuple(state_dict[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )


def load_checkpoint(path: str | Path) -> tuple[Detector, CheckpointMeta]:
    """-> (model in eval mode with the checkpoint's weights, metadata)."""
    data = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(data["model_config"])
    except (TypeError, ShelfSightError) as exc:
        raise ShelfSightError(f"{path}: {exc}") from None
    if len(data["class_names"]) != cfg.num_classes:
        raise ShelfSightError(
            f"{path}: {len(data['class_names'])} class names but model_config.num_classes={cfg.num_classes}"
        )
    model = build_model(cfg)
    if isinstance(data.get("pruning"), dict):  # layers narrower than the config says: shrink them to the weights
        from shelfsight.export.prune import reshape_to_state_dict

        reshape_to_state_dict(model, data["state_dict"])
    check_state_dict(model, data["state_dict"], str(path))
    model.load_state_dict(data["state_dict"])
    model.eval()
    known = {"format", "model_config", "state_dict", "class_names", "imgsz", "epoch", "metrics"}
    meta = CheckpointMeta(
        path=Path(path),
        model_config=cfg,
        class_names=[str(n) for n in data["class_names"]],
        imgsz=int(data["imgsz"]),
        epoch=int(data.get("epoch", -1)),
        metrics=dict(data.get("metrics") or {}),
        extra={k: v for k, v in data.items() if k not in known},
    )
    return model, meta
