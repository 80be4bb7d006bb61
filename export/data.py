"""YOLO-format datasets (a ``data.yaml`` with train/val image folders and parallel ``labels/`` text files).

Validation images go through ``shelfsight.runtime.preprocess.preprocess_frame``, and augmented training images are
finished by it too (their letterboxed canvas is already the input size, so it only reorders channels and scales),
so training, validation, calibration and the device all see one preprocessing.

A batch is a dict: ``images`` [B,3,H,W] float32, ``boxes`` [B,M,4] xyxy input pixels (zero padded), ``labels`` [B,M]
long, ``box_mask`` [B,M] bool, ``class_mask`` [B,nc] float (1 = the image is labelled for that class; all ones
unless a dataset says otherwise), ``paths`` list[str].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, Dataset

from shelfsight.export.model import input_spec_for
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.preprocess import letterbox_geometry, preprocess_frame
from shelfsight.runtime.yamlio import load_yaml_model

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MIN_BOX_PX = 2.0  # boxes thinner than this after augmentation carry no learnable signal
MIN_VISIBLE_FRACTION = 0.3  # a box cut by the image border below this fraction of its area is dropped


class DataYaml(BaseModel):
    """The usual YOLO ``data.yaml``. Unknown keys are ignored: exporters (Roboflow, CVAT) add their own."""

    model_config = ConfigDict(extra="ignore")

    path: str | None = None
    train: str | list[str]
    val: str | list[str]
    test: str | list[str] | None = None
    names: dict[int, str] | list[str] = Field(min_length=1)
    nc: int | None = None

    @field_validator("names")
    @classmethod
    def _dense_ids(cls, names: dict[int, str] | list[str]) -> dict[int, str] | list[str]:
        if isinstance(names, dict) and sorted(names) != list(range(len(names))):
            raise ValueError(f"class ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
        return names


@dataclass(frozen=True)
class DataSpec:
    """A resolved data.yaml: absolute image sources per split and the class names in id order."""

    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.names)


def load_data_yaml(path: str | Path) -> DataSpec:
    path = Path(path)
    raw = load_yaml_model(path, DataYaml)
    names = [raw.names[i] for i in range(len(raw.names))] if isinstance(raw.names, dict) else list(raw.names)
    if raw.nc is not None and raw.nc != len(names):
        raise ShelfSightError(f"{path}: nc={raw.nc} but {len(names)} names are listed")
    root = Path(raw.path) if raw.path else Path(".")
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    splits: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        value = getattr(raw, split)
        if value is None:
            continue
        entries = [value] if isinstance(value, str) else value
        splits[split] = [p if p.is_absolute() else root / p for p in map(Path, entries)]
    return DataSpec(yaml_path=path, root=root, splits=splits, names=names)


def image_files(spec: DataSpec, split: str) -> list[Path]:
    """Images of a split, sorted: each source is a folder (searched recursively) or a .txt list of image paths."""
    if split not in spec.splits:
        raise ShelfSightError(f"{spec.yaml_path}: no '{split}' split (has {', '.join(spec.splits)})")
    files: list[Path] = []
    for source in spec.splits[split]:
        if source.is_dir():
            files.extend(sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif source.suffix == ".txt" and source.is_file():
            listed = [Path(line.strip()) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            files.extend(p if p.is_absolute() else spec.root / p for p in listed)
        else:
            raise ShelfSightError(f"{spec.yaml_path}: {split} source {source} is neither a folder nor a .txt list")
    if not files:
        sources = ", ".join(map(str, spec.splits[split]))
        raise ShelfSightError(f"{spec.yaml_path}: the '{split}' split has no images ({sources})")
    return files


def label_path_for(image: Path) -> Path:
    """YOLO convention: the last ``images`` folder in the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_labels(path: Path, num_classes: int) -> np.ndarray:
    """-> (n, 5) float32 rows ``class cx cy w h`` (normalized); a missing file is an image without objects."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r]
    for number, row in enumerate(rows, start=1):
        if len(row) != 5:
            raise ShelfSightError(f"{path}:{number}: expected 'class cx cy w h', got {len(row)} fields")
    try:
        table = np.array(rows, dtype=np.float32).reshape(-1, 5)
    except ValueError:
        raise ShelfSightError(f"{path}: label values must be numbers") from None
    bad = np.flatnonzero((table[:, 0] < 0) | (table[:, 0] >= num_classes) | (table[:, 0] != np.round(table[:, 0])))
    if len(bad):
        raise ShelfSightError(f"{path}:{bad[0] + 1}: class id {table[bad[0], 0]:g} outside 0..{num_classes - 1}")
    return table


def labels_to_xyxy(table: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized ``class cx cy w h`` rows -> (xyxy float32 frame pixels, class ids int64)."""
    cx, cy, w, h = (table[:, i] for i in range(1, 5))
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * np.array(
        [width, height, width, height], np.float32
    )
    return xyxy.astype(np.float32), table[:, 0].astype(np.int64)


def read_image(path: Path) -> np.ndarray:
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise ShelfSightError(f"{path}: cannot decode image")
    return frame


class AugmentConfig(BaseModel):
    """Training-time augmentation; each knob 0 disables that transform."""

    model_config = ConfigDict(extra="forbid")

    hsv_h: float = Field(0.015, ge=0, le=0.5)
    hsv_s: float = Field(0.5, ge=0, le=1)
    hsv_v: float = Field(0.4, ge=0, le=1)
    fliplr: float = Field(0.5, ge=0, le=1)
    scale: float = Field(0.3, ge=0, lt=1)
    translate: float = Field(0.1, ge=0, le=0.5)
    contrast: float = Field(0.2, ge=0, lt=1)
    blur_p: float = Field(0.1, ge=0, le=1)
    noise_p: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(6.0, ge=0, description="Gaussian noise sigma in 0-255 pixel units")


def _random_affine(
    frame: np.ndarray, imgsz: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, float, float, float, float, bool]:
    """Letterbox + random scale/translate (+ flip) in one warp -> (canvas, sx, sy, ox, oy, flipped).

    A frame point maps to ``(sx * x + ox, sy * y + oy)``; with ``flipped`` sx is negative (x1 and x2 swap).
    """
    spec = input_spec_for(imgsz)
    transform, _, _ = letterbox_geometry(frame.shape[1], frame.shape[0], spec)
    gain = float(rng.uniform(1 - aug.scale, 1 + aug.scale)) if aug.scale else 1.0
    shift_x, shift_y = (rng.uniform(-aug.translate, aug.translate, 2) * imgsz) if aug.translate else (0.0, 0.0)
    centre = imgsz / 2
    # Scale about the canvas centre, then shift: x' = gain * (sx * x + pad_x - c) + c + shift.
    sx, sy = transform.scale_x * gain, transform.scale_y * gain
    ox = gain * (transform.pad_x - centre) + centre + shift_x
    oy = gain * (transform.pad_y - centre) + centre + shift_y
    flipped = bool(rng.random() < aug.fliplr)
    if flipped:
        sx, ox = -sx, imgsz - ox
    matrix = np.array([[sx, 0.0, ox], [0.0, sy, oy]], np.float64)
    pad = (spec.pad_value,) * 3
    canvas = cv2.warpAffine(frame, matrix, (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=pad)
    return canvas, sx, sy, float(ox), float(oy), flipped


def _colour_jitter(canvas: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    if aug.hsv_h or aug.hsv_s or aug.hsv_v:
        gains = rng.uniform(-1, 1, 3) * np.array([aug.hsv_h, aug.hsv_s, aug.hsv_v]) + 1
        hue, sat, val = cv2.split(cv2.cvtColor(canvas, cv2.COLOR_BGR2HSV))
        lut = np.arange(256, dtype=np.float64)
        lut_h = ((lut * gains[0]) % 180).astype(np.uint8)
        lut_s = np.clip(lut * gains[1], 0, 255).astype(np.uint8)
        lut_v = np.clip(lut * gains[2], 0, 255).astype(np.uint8)
        hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
        canvas = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if aug.contrast:
        alpha = float(rng.uniform(1 - aug.contrast, 1 + aug.contrast))
        canvas = cv2.convertScaleAbs(canvas, alpha=alpha, beta=128 * (1 - alpha))
    if aug.blur_p and rng.random() < aug.blur_p:
        kernel = int(rng.choice([3, 5]))
        canvas = cv2.GaussianBlur(canvas, (kernel, kernel), 0)
    if aug.noise_p and aug.noise_std and rng.random() < aug.noise_p:
        noise = rng.normal(0.0, aug.noise_std, canvas.shape)
        canvas = np.clip(canvas.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return canvas


class YoloDataset(Dataset):
    """One split of a YOLO dataset at a square input size; ``augment=None`` is the exact runtime preprocessing."""

    def __init__(
        self,
        spec: DataSpec,
        split: str,
        imgsz: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        self.spec = spec
        self.imgsz = imgsz
        self.input_spec = input_spec_for(imgsz)
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # set by the trainer before each epoch; with the seed it fixes every random choice
        files = image_files(spec, split)
        self.images = files[:limit] if limit is not None else files
        self.labels = [read_labels(label_path_for(p), spec.num_classes) for p in self.images]
        self.class_masks = torch.ones(len(self.images), spec.num_classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame = read_image(self.images[index])
        height, width = frame.shape[:2]
        boxes, classes = labels_to_xyxy(self.labels[index], width, height)
        if self.augment is None:
            tensor, transform = preprocess_frame(frame, self.input_spec)
            boxes = transform.to_input(boxes)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            canvas, sx, sy, ox, oy, flipped = _random_affine(frame, self.imgsz, self.augment, rng)
            canvas = _colour_jitter(canvas, self.augment, rng)
            tensor, _ = preprocess_frame(canvas, self.input_spec)
            boxes = boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32)
            if flipped:
                boxes = boxes[:, [2, 1, 0, 3]]
            boxes, classes = _clip_boxes(boxes, classes, self.imgsz)
        return {
            "image": torch.from_numpy(tensor),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(classes.astype(np.int64)),
            "class_mask": self.class_masks[index],
            "path": str(self.images[index]),
        }


def _clip_boxes(boxes: np.ndarray, classes: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the canvas; drop boxes mostly pushed out or too thin to learn from."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = np.clip(boxes, 0, imgsz)
    wh = clipped[:, 2:] - clipped[:, :2]
    keep = (wh.min(axis=1) >= MIN_BOX_PX) & (wh[:, 0] * wh[:, 1] >= MIN_VISIBLE_FRACTION * np.maximum(area, 1e-6))
    return clipped[keep], classes[keep]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; pad boxes/labels to the batch's largest box count with a validity mask."""
    max_boxes = max((len(item["labels"]) for item in items), default=0)
    batch = len(items)
    boxes = torch.zeros(batch, max_boxes, 4)
    labels = torch.zeros(batch, max_boxes, dtype=torch.long)
    box_mask = torch.zeros(batch, max_boxes, dtype=torch.bool)
    for i, item in enumerate(items):  # per image, not per box
        count = len(item["labels"])
        boxes[i, :count] = item["boxes"]
        labels[i, :count] = item["labels"]
        box_mask[i, :count] = True
    return {
        "images": torch.stack([item["image"] for item in items]),
        "boxes": boxes,
        "labels": labels,
        "box_mask": box_mask,
        "class_mask": torch.stack([item["class_mask"] for item in items]),
        "paths": [item["path"] for item in items],
    }


def make_loader(
    dataset: YoloDataset, batch_size: int, shuffle: bool, workers: int, generator: torch.Generator | None = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        drop_last=False,
        persistent_workers=False,  # workers re-pickle the dataset each epoch, so dataset.epoch reaches them
    )
