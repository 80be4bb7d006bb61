"""Calibration image sets: which images, chosen how, and which of them could not be read.

A set comes from a plain folder of images or from one split of a YOLO ``data.yaml``. Images are sampled
deterministically from a seed, so the same folder and seed always give the same set (and the same digest, which
keys the calibration cache). Unreadable files are skipped and counted, never silently used as black frames.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from shelfsight.runtime.errors import ShelfSightError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class CalibrationDataError(ShelfSightError):
    """The calibration source is missing, empty, or holds no readable image."""


@dataclass(frozen=True)
class CalibrationImage:
    path: Path
    sha256: str


@dataclass(frozen=True)
class CalibrationImageSet:
    """The chosen images in sampling order, plus what was skipped and why."""

    source: Path
    images: tuple[CalibrationImage, ...]
    requested: int
    available: int
    skipped: tuple[tuple[Path, str], ...] = field(default_factory=tuple)
    seed: int = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def paths(self) -> list[Path]:
        return [image.path for image in self.images]

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    @property
    def shortfall(self) -> int:
        return max(0, self.requested - len(self.images))


def _images_in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def images_from_data_yaml(yaml_path: Path, split: str) -> list[Path]:
    """All image paths of one split (``train``/``val``/``test``) of a YOLO dataset description.

    Resolved by the trainer's own dataset reader, so calibration and training agree on what a data.yaml means.
    """
    from shelfsight.export.data import image_files, load_data_yaml  # torch-side module: import only when needed

    return sorted(set(image_files(load_data_yaml(yaml_path), split)))


def list_candidates(source: str | Path, split: str = "train") -> list[Path]:
    """Every candidate image of a folder or a ``data.yaml`` split, sorted (the order sampling starts from)."""
    source = Path(source)
    if not source.exists():
        raise CalibrationDataError(f"{source}: calibration source does not exist")
    if source.is_dir():
        return _images_in_folder(source)
    if source.suffix.lower() in (".yaml", ".yml"):
        return images_from_data_yaml(source, split)
    raise CalibrationDataError(f"{source}: calibration source must be an image folder or a data.yaml file")


def read_image(path: Path) -> np.ndarray | None:
    """Decode an image as BGR uint8, or None when the file is not a readable image."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return image


def sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_calibration_images(
    source: str | Path,
    count: int = 300,
    seed: int = 0,
    split: str = "train",
    candidates: Sequence[Path] | None = None,
) -> CalibrationImageSet:
    """Pick ``count`` readable images from ``source`` in a seed-determined order.

    Candidates are shuffled with ``seed`` and decoded in that order until ``count`` readable ones are found, so a
    corrupt file is replaced by the next candidate rather than shrinking the set. Fewer readable images than asked
    is a warning (the set is still usable); none at all is an error.
    """
    if count < 1:
        raise CalibrationDataError(f"calibration image count must be at least 1, got {count}")
    source = Path(source)
    pool = list(candidates) if candidates is not None else list_candidates(source, split)
    if not pool:
        raise CalibrationDataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen: list[CalibrationImage] = []
    skipped: list[tuple[Path, str]] = []
    for index in order:
        path = pool[int(index)]
        if read_image(path) is None:
            skipped.append((path, "not a readable image"))
            continue
        chosen.append(CalibrationImage(path, sha256_bytes(path)))
        if len(chosen) == count:
            break
    if skipped:
        log.warning("skipped %d unreadable calibration image(s), e.g. %s", len(skipped), skipped[0][0])
    if not chosen:
        raise CalibrationDataError(f"{source}: none of the {len(pool)} image file(s) could be decoded")
    if len(chosen) < count:
        log.warning(
            "only %d readable calibration image(s) in %s, fewer than the %d asked for", len(chosen), source, count
        )
    return CalibrationImageSet(
        source=source,
        images=tuple(chosen),
        requested=count,
        available=len(pool),
        skipped=tuple(skipped),
        seed=seed,
    )
