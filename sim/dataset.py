"""YOLO-format detection dataset (0 = product, 1 = gap) from random shelves, through the scenario renderer.

Image i depends only on (seed, i), so a run is reproducible byte for byte and any image can be regenerated alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.sim.painter import Sprite, shopper_sprite
from shelfsight.sim.progress import progress
from shelfsight.sim.renderer import CLASS_NAMES, NoiseBank, SceneRenderer
from shelfsight.sim.scene import ShelfScene, random_scene

JPEG_QUALITY = 90
SHOPPER_PROBABILITY = 0.3


@dataclass(frozen=True)
class SynthImage:
    image: np.ndarray  # BGR uint8, owned
    classes: np.ndarray  # int64
    boxes: np.ndarray  # float32 xyxy in pixels, visible objects only


def missing_facings(rng: np.random.Generator, facings: list[int]) -> list[np.ndarray]:
    """Per slot a present-mask: 10-35 % of all facings gone, as one contiguous run per touched slot,
    with a few slots emptied completely."""
    present = [np.ones(count, bool) for count in facings]
    total = sum(facings)
    wanted = round(rng.uniform(0.10, 0.35) * total)
    missing = 0
    order = rng.permutation(len(facings))
    whole = int(rng.integers(0, 3))
    for position, slot in enumerate(order.tolist()):
        if missing >= wanted:
            break
        count = facings[slot]
        # The first few slots drawn are emptied completely; the rest lose one run each until enough is gone.
        run = count if position < whole else min(int(rng.integers(1, count + 1)), wanted - missing)
        start = int(rng.integers(0, count - run + 1))
        present[slot][start : start + run] = False
        missing += run
    return present


def _random_shoppers(rng: np.random.Generator, scene: ShelfScene) -> list[Sprite]:
    if rng.uniform() >= SHOPPER_PROBABILITY:
        return []
    width, height = scene.frame_size
    shoppers = []
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(0.1, 0.3) * width, rng.uniform(0.25, 0.5) * height
        x, y = rng.uniform(-0.1 * width, width - 0.5 * w), rng.uniform(0.1, 0.55) * height
        blur = scene.look.blur_sigma
        shoppers.append(shopper_sprite((x, y, x + w, y + h), scene.frame_size, rng, 0, blur))
    return shoppers


def synth_image(seed: int, index: int, frame_size: tuple[int, int]) -> SynthImage:
    """One random shelf photo with its visible product and gap boxes."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng, frame_size)
    renderer = SceneRenderer(scene)
    for slot_index, present in enumerate(missing_facings(rng, [slot.facings for slot in scene.slots])):
        renderer.set_present(slot_index, present)
    shoppers = _random_shoppers(rng, scene)
    noise = None
    if scene.look.noise_sigma > 0.5:
        noise = NoiseBank(frame_size, scene.look.noise_sigma, rng, tiles=1, margin=0).tile(0, 0, 0)
    image, classes, boxes = renderer.compose(shoppers, 1.0, noise)
    return SynthImage(image.copy(), classes.copy(), boxes.copy())


def yolo_labels(classes: np.ndarray, boxes: np.ndarray, frame_size: tuple[int, int]) -> str:
    """'cls cx cy w h' lines, normalized to [0, 1]."""
    if len(boxes) == 0:
        return ""
    width, height = frame_size
    scale = np.array([width, height, width, height], np.float64)
    xyxy = np.clip(boxes.astype(np.float64) / scale, 0.0, 1.0)
    table = np.column_stack(
        [
            classes,
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ]
    )
    buffer = io.StringIO()
    np.savetxt(buffer, table, fmt=["%d", "%.6f", "%.6f", "%.6f", "%.6f"])
    return buffer.getvalue()


def _prepare(out: Path) -> None:
    """Create the split folders and clear the files a previous run left in them (only ours: *.jpg, *.txt)."""
    for kind, pattern in (("images", "*.jpg"), ("labels", "*.txt")):
        for split in ("train", "val"):
            folder = out / kind / split
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(pattern):
                stale.unlink()


def generate_dataset(
    out_dir: str | Path,
    images: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    width: int = 640,
    height: int = 384,
    show_progress: bool = False,
) -> Path:
    """Write images/{train,val}/*.jpg, labels/{train,val}/*.txt and data.yaml; returns the data.yaml path."""
    if images < 1:
        raise ShelfSightError(f"--images must be at least 1, got {images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ShelfSightError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not (64 <= width <= 4096 and 64 <= height <= 4096):
        raise ShelfSightError(f"image size {width}x{height} is outside 64..4096 pixels")
    if seed < 0:
        raise ShelfSightError(f"--seed must be >= 0, got {seed}")
    out = Path(out_dir).resolve()
    try:
        _prepare(out)
    except OSError as exc:
        raise ShelfSightError(f"{out}: cannot prepare dataset folder: {exc.strerror or exc}") from None
    val_count = round(images * val_fraction)
    if val_fraction > 0 and images > 1:
        val_count = max(1, val_count)
    val_count = min(val_count, images - 1) if images > 1 else 0
    val = set(np.round(np.linspace(0, images - 1, val_count)).astype(int).tolist()) if val_count else set()
    size = (width, height)
    for index in progress(range(images), images, "dataset", show_progress, "img"):
        synth = synth_image(seed, index, size)
        split = "val" if index in val else "train"
        ok, encoded = cv2.imencode(".jpg", synth.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ShelfSightError(f"cannot encode image {index} as JPEG")
        (out / "images" / split / f"{index:06d}.jpg").write_bytes(encoded.tobytes())
        (out / "labels" / split / f"{index:06d}.txt").write_text(yolo_labels(synth.classes, synth.boxes, size))
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(CLASS_NAMES)),
        "nc": len(CLASS_NAMES),
    }
    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data_yaml
