"""YOLO-format datasets (a ``data.yaml`` with train/val image folders and parallel ``labels/`` text files).

Validation images go through ``shelfsight.runtime.preprocess.preprocess_frame``, and augmented training images are
finished by it too (their letterboxed canvas is already the input size, so it only reorders channels and scales),
so training, validation, calibration and the device all see one preprocessing.

A batch is a dict: ``images`` [B,3,H,W] float32, ``boxes`` [B,M,4] xyxy input pixels (zero padded), ``labels`` [B,M]
long, ``box_mask`` [B,M] bool, ``class_mask`` [B,nc] float (1 = the image is labelled for that class; all ones
unless a dataset says otherwise), ``paths`` list[str].

Mixed datasets. Any split may list, besides plain folders / ``.txt`` lists, *source entries* that carry their own
class ids and say which classes their images are labelled for::

    names: {0: product, 1: gap}
    train:
      - {path: /data/real/train.txt, names: {0: gap}, classes_present: [gap], repeat: 5}
      - images/train                     # a plain source: the dataset's own ids, every class labelled

- ``names``: the source's own ``id -> name`` table; each id is remapped by name to the dataset's id (real
  ``0 = gap`` becomes dataset ``1 = gap``). Omitted: the label files already use the dataset's ids.
- ``classes_present``: the classes these images are labelled for (default: the source's ``names``, or every
  class). The others get ``class_mask`` 0, so the loss never teaches "no product here" from photos whose
  products were simply not labelled.
- ``repeat``: the source's images appear this many times per epoch (training only; each copy is augmented
  differently), to balance a small real set against a large synthetic one.

Label lines are ``class cx cy w h`` or a polygon ``class x1 y1 x2 y2 x3 y3 ...`` (Roboflow / Ultralytics
segmentation export), which is reduced to its bounding box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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


def _check_dense_ids(names: dict[int, str] | list[str]) -> dict[int, str] | list[str]:
    if isinstance(names, dict) and sorted(names) != list(range(len(names))):
        raise ValueError(f"class ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
    listed = list(names.values()) if isinstance(names, dict) else names
    if len(set(listed)) != len(listed):
        raise ValueError(f"class names must be unique, got {listed}")
    return names


def _names_in_order(names: dict[int, str] | list[str]) -> list[str]:
    return [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)


class DataSource(BaseModel):
    """One image source of a split with its own class ids, labelled classes and weight (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    names: dict[int, str] | list[str] | None = Field(None, min_length=1)
    classes_present: list[str] | None = Field(None, min_length=1)
    repeat: int = Field(1, ge=1, le=1000)

    @field_validator("names")
    @classmethod
    def _dense_ids(cls, names: dict[int, str] | list[str] | None) -> dict[int, str] | list[str] | None:
        return None if names is None else _check_dense_ids(names)


def _as_source_list(value: Any) -> Any:
    """``images/train``, ``[a, b]`` and ``[{path: ..}, b]`` all become a list of source entries, so a bad entry is
    reported by its own field (``train.0.weight``) instead of as a failed alternative of a union."""
    if value is None:
        return None
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        return value
    return [{"path": entry} if isinstance(entry, str) else entry for entry in entries]


class DataYaml(BaseModel):
    """The usual YOLO ``data.yaml``. Unknown keys are ignored: exporters (Roboflow, CVAT) add their own."""

    model_config = ConfigDict(extra="ignore")

    path: str | None = None
    train: list[DataSource] = Field(min_length=1)
    val: list[DataSource] = Field(min_length=1)
    test: list[DataSource] | None = None
    names: dict[int, str] | list[str] = Field(min_length=1)
    nc: int | None = None

    _sources = field_validator("train", "val", "test", mode="before")(_as_source_list)

    @field_validator("names")
    @classmethod
    def _dense_ids(cls, names: dict[int, str] | list[str]) -> dict[int, str] | list[str]:
        return _check_dense_ids(names)


@dataclass(frozen=True)
class ResolvedSource:
    """A source with an absolute path; ``class_map[source id] = dataset id`` (None: ids are already the dataset's)."""

    path: Path
    class_map: tuple[int, ...] | None
    class_mask: tuple[float, ...]
    repeat: int = 1

    @property
    def is_plain(self) -> bool:
        return self.class_map is None and all(self.class_mask) and self.repeat == 1


@dataclass(frozen=True)
class LabelledImage:
    """One image with its labels in dataset class ids (``class cx cy w h`` rows) and its per-class mask."""

    path: Path
    labels: np.ndarray
    class_mask: np.ndarray


@dataclass(frozen=True)
class DataSpec:
    """A resolved data.yaml: absolute image sources per split and the class names in id order."""

    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]
    sources: dict[str, list[ResolvedSource]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def split_sources(self, split: str) -> list[ResolvedSource]:
        if split not in self.splits:
            raise ShelfSightError(f"{self.yaml_path}: no '{split}' split (has {', '.join(self.splits)})")
        plain = [ResolvedSource(p, None, (1.0,) * self.num_classes) for p in self.splits[split]]
        return self.sources.get(split, plain)

    def is_plain(self, split: str) -> bool:
        """True when every source of the split uses the dataset's ids, labels every class and is not repeated."""
        return all(source.is_plain for source in self.split_sources(split))


def _resolve_source(entry: DataSource, names: list[str], root: Path, where: str) -> ResolvedSource:
    path = Path(entry.path)
    path = path if path.is_absolute() else root / path
    class_map: tuple[int, ...] | None = None
    labelled = list(names)
    if entry.names is not None:
        labelled = _names_in_order(entry.names)
        unknown = [name for name in labelled if name not in names]
        if unknown:
            raise ShelfSightError(f"{where}: source names {unknown} are not dataset classes {names}")
        class_map = tuple(names.index(name) for name in labelled)
    present = labelled if entry.classes_present is None else entry.classes_present
    unknown = [name for name in present if name not in names]
    if unknown:
        raise ShelfSightError(f"{where}: classes_present {unknown} are not dataset classes {names}")
    unlabelled = [name for name in labelled if name not in present]
    if unlabelled:
        raise ShelfSightError(f"{where}: the source labels {unlabelled} but classes_present leaves them out")
    mask = tuple(1.0 if name in present else 0.0 for name in names)
    return ResolvedSource(path=path, class_map=class_map, class_mask=mask, repeat=entry.repeat)


def load_data_yaml(path: str | Path) -> DataSpec:
    path = Path(path)
    raw = load_yaml_model(path, DataYaml)
    names = _names_in_order(raw.names)
    if raw.nc is not None and raw.nc != len(names):
        raise ShelfSightError(f"{path}: nc={raw.nc} but {len(names)} names are listed")
    root = Path(raw.path) if raw.path else Path(".")
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    splits: dict[str, list[Path]] = {}
    sources: dict[str, list[ResolvedSource]] = {}
    for split in ("train", "val", "test"):
        value = getattr(raw, split)
        if value is None:
            continue
        resolved = [_resolve_source(entry, names, root, f"{path}: {split}[{i}]") for i, entry in enumerate(value)]
        sources[split] = resolved
        splits[split] = [source.path for source in resolved]
    return DataSpec(yaml_path=path, root=root, splits=splits, names=names, sources=sources)


def _source_images(spec: DataSpec, split: str, source: Path) -> list[Path]:
    """A folder (searched recursively, sorted) or a .txt list of image paths (relative to the dataset root)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.suffix == ".txt" and source.is_file():
        listed = [Path(line.strip()) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [p if p.is_absolute() else spec.root / p for p in listed]
    raise ShelfSightError(f"{spec.yaml_path}: {split} source {source} is neither a folder nor a .txt list")


def image_files(spec: DataSpec, split: str) -> list[Path]:
    """Images of a split, each once (``repeat`` is for training only), in source order."""
    files = [image for source in spec.split_sources(split) for image in _source_images(spec, split, source.path)]
    if not files:
        sources = ", ".join(map(str, spec.splits[split]))
        raise ShelfSightError(f"{spec.yaml_path}: the '{split}' split has no images ({sources})")
    return files


def labelled_images(spec: DataSpec, split: str, repeat: bool = False) -> list[LabelledImage]:
    """Images of a split with labels in dataset ids and class masks; ``repeat`` lists each source ``repeat`` times.

    Labels are read once per image even when repeated (the copies share the arrays).
    """
    items: list[LabelledImage] = []
    for source in spec.split_sources(split):
        mask = np.asarray(source.class_mask, np.float32)
        once = [
            LabelledImage(path, read_labels(label_path_for(path), spec.num_classes, source.class_map), mask)
            for path in _source_images(spec, split, source.path)
        ]
        items.extend(once * (source.repeat if repeat else 1))
    if not items:
        sources = ", ".join(map(str, spec.splits[split]))
        raise ShelfSightError(f"{spec.yaml_path}: the '{split}' split has no images ({sources})")
    return items


def label_path_for(image: Path) -> Path:
    """YOLO convention: the last ``images`` folder in the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _label_row(fields: list[str], path: Path, number: int) -> list[float]:
    """One label line -> ``[class, cx, cy, w, h]``; a polygon line is reduced to its bounding box (clipped to 0..1)."""
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise ShelfSightError(f"{path}:{number}: label values must be numbers") from None
    if len(values) == 5:
        return values
    if len(values) >= 7 and len(values) % 2 == 1:
        xy = np.clip(np.asarray(values[1:], np.float64).reshape(-1, 2), 0.0, 1.0)
        (x1, y1), (x2, y2) = xy.min(axis=0), xy.max(axis=0)
        return [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    raise ShelfSightError(
        f"{path}:{number}: expected 'class cx cy w h', got {len(values)} fields "
        "(a polygon line is 'class x1 y1 x2 y2 x3 y3 ...' with at least 3 points)"
    )


def read_labels(path: Path, num_classes: int, class_map: Sequence[int] | None = None) -> np.ndarray:
    """-> (n, 5) float32 rows ``class cx cy w h`` (normalized); a missing file is an image without objects.

    ``class_map[source id] = dataset id`` remaps a source's ids (``num_classes`` then bounds the source's ids by
    ``len(class_map)``). Polygon lines become their bounding boxes.
    """
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [_label_row(fields, path, number) for number, fields in enumerate(lines, start=1) if fields]
    numbers = np.array([number for number, fields in enumerate(lines, start=1) if fields], np.int64)
    table = np.array(rows, dtype=np.float32).reshape(-1, 5)
    bound = len(class_map) if class_map is not None else num_classes
    bad = np.flatnonzero((table[:, 0] < 0) | (table[:, 0] >= bound) | (table[:, 0] != np.round(table[:, 0])))
    if len(bad):
        raise ShelfSightError(f"{path}:{numbers[bad[0]]}: class id {table[bad[0], 0]:g} outside 0..{bound - 1}")
    if class_map is not None and len(table):
        table[:, 0] = np.asarray(class_map, np.float32)[table[:, 0].astype(np.int64)]
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
        # Sources are repeated for training only: validation scores each image once.
        items = labelled_images(spec, split, repeat=augment is not None)
        items = items[:limit] if limit is not None else items
        self.images = [item.path for item in items]
        self.labels = [item.labels for item in items]
        self.class_masks = torch.from_numpy(np.stack([item.class_mask for item in items]))

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
