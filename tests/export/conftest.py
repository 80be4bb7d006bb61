"""Export-test fixtures: tiny YOLO datasets drawn with OpenCV (coloured 'products' and dark 'gaps' on a textured
shelf), a tiny training configuration and a two-epoch training run shared by several tests.

Helpers are handed to tests through fixtures: with --import-mode=importlib a test module cannot import conftest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from shelfsight.export.train import TrainConfig, TrainResult, train

NAMES = ["product", "gap"]


def draw_shelf(
    rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """-> (BGR image, YOLO rows (class, cx, cy, w, h) normalized)."""
    base = rng.integers(90, 160, size=3)
    image = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    rows: list[tuple[int, float, float, float, float]] = []
    shelves = int(rng.integers(2, 4))
    band = height // shelves
    for s in range(shelves):
        y1 = s * band + int(band * 0.15)
        y2 = (s + 1) * band - int(band * 0.1)
        cv2.rectangle(image, (0, (s + 1) * band - 3), (width, (s + 1) * band), (40, 40, 40), -1)
        slots = int(rng.integers(3, 6))
        slot_w = width // slots
        for k in range(slots):
            x1 = k * slot_w + 3
            x2 = (k + 1) * slot_w - 3
            is_gap = rng.random() < 0.3
            if is_gap:
                cv2.rectangle(image, (x1, y1), (x2, y2), (25, 25, 25), -1)
            else:
                colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
                cv2.rectangle(image, (x1, y1), (x2, y2), colour, -1)
                cv2.rectangle(image, (x1, y1), (x2, y2), (255, 255, 255), 1)
            cls = 1 if is_gap else 0
            rows.append((cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height))
    return image, rows


def make_yolo_dataset(
    root: Path, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (192, 144), seed: int = 0
) -> Path:
    """Write images/{train,val}/*.jpg, labels/{train,val}/*.txt and data.yaml under ``root``; return the yaml path."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, rows = draw_shelf(rng, *size)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            text = "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in rows)
            (root / "labels" / split / f"{i:04d}.txt").write_text(text)
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
        )
    )
    return data


def tiny_train_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """A model small enough that an epoch over the tiny dataset takes well under a second."""
    settings: dict[str, object] = {
        "data": data,
        "out": out,
        "epochs": 2,
        "imgsz": 128,
        "batch": 4,
        "width": 0.125,
        "workers": 0,
        "lr": 0.004,
        "ema_tau": 20.0,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig.model_validate(settings)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_yolo_dataset(tmp_path_factory.mktemp("shelfdata"))


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Two epochs of training, shared by the trainer, evaluator and export tests."""
    torch.set_num_threads(2)
    return train(tiny_train_config(tiny_data, tmp_path_factory.mktemp("run")))


@pytest.fixture
def make_train_config() -> Callable[..., TrainConfig]:
    return tiny_train_config
