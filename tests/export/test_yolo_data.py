from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from shelfsight.export.data import (
    AugmentConfig,
    YoloDataset,
    collate,
    label_path_for,
    labels_to_xyxy,
    load_data_yaml,
    read_labels,
)
from shelfsight.export.model import input_spec_for
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.preprocess import preprocess_frame

NO_COLOUR = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "contrast": 0.0, "blur_p": 0.0, "noise_p": 0.0}


def _white_boxes_dataset(root: Path) -> Path:
    """Dark frames (non-square, so letterboxing pads) with white rectangles exactly where the labels say."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, (w, h) in enumerate([(320, 200), (200, 300)]):
            frame = np.full((h, w, 3), 30, np.uint8)
            rects = [(20, 30, 100, 90), (w - 90, h - 70, w - 20, h - 15)]
            lines = []
            for x1, y1, x2, y2 in rects:
                frame[y1:y2, x1:x2] = 255
                lines.append(f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), frame)
            (root / "labels" / split / f"{i}.txt").write_text("".join(lines))
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": ["a", "b"]}))
    return data


def test_data_yaml_resolves_relative_root_and_names(tmp_path: Path) -> None:
    data = _white_boxes_dataset(tmp_path)
    spec = load_data_yaml(data)
    assert spec.names == ["a", "b"] and spec.num_classes == 2
    assert spec.splits["train"] == [tmp_path.resolve() / "images" / "train"]


def test_label_path_follows_yolo_convention() -> None:
    assert label_path_for(Path("/d/images/train/x.jpg")) == Path("/d/labels/train/x.txt")
    assert label_path_for(Path("/images/d/images/val/y.png")) == Path("/images/d/labels/val/y.txt")


def test_validation_item_is_the_runtime_preprocessing(tmp_path: Path) -> None:
    spec = load_data_yaml(_white_boxes_dataset(tmp_path))
    dataset = YoloDataset(spec, "val", 160)
    item = dataset[0]
    frame = cv2.imread(item["path"])
    assert frame is not None
    expected, transform = preprocess_frame(frame, input_spec_for(160))
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    gt, _ = labels_to_xyxy(read_labels(label_path_for(Path(item["path"])), 2), frame.shape[1], frame.shape[0])
    np.testing.assert_allclose(item["boxes"].numpy(), transform.to_input(gt), atol=1e-4)


@pytest.mark.parametrize("fliplr", [0.0, 1.0])
def test_augmented_boxes_stay_on_their_objects(tmp_path: Path, fliplr: float) -> None:
    spec = load_data_yaml(_white_boxes_dataset(tmp_path))
    augment = AugmentConfig(fliplr=fliplr, scale=0.4, translate=0.1, **NO_COLOUR)
    dataset = YoloDataset(spec, "train", 160, augment=augment, seed=3)
    checked = 0
    for epoch in range(3):
        dataset.epoch = epoch
        for index in range(len(dataset)):
            item = dataset[index]
            image = item["image"].numpy().mean(0)
            for x1, y1, x2, y2 in item["boxes"].round().int().tolist():
                inner = image[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
                assert inner.size and inner.mean() > 0.9, (epoch, index, (x1, y1, x2, y2))
                # A ring just outside the box is background or pad, never object.
                if x1 >= 3:
                    assert image[y1 + 2 : y2 - 2, x1 - 3].mean() < 0.5
                checked += 1
    assert checked >= 8


def test_augmentation_is_deterministic_per_seed_and_epoch(tmp_path: Path, tiny_data: Path) -> None:
    spec = load_data_yaml(tiny_data)
    a = YoloDataset(spec, "train", 128, augment=AugmentConfig(), seed=1)
    b = YoloDataset(spec, "train", 128, augment=AugmentConfig(), seed=1)
    torch.testing.assert_close(a[2]["image"], b[2]["image"])
    torch.testing.assert_close(a[2]["boxes"], b[2]["boxes"])
    b.epoch = 1
    assert not torch.equal(a[2]["image"], b[2]["image"])


def test_collate_pads_boxes_and_keeps_a_class_mask(tiny_data: Path) -> None:
    dataset = YoloDataset(load_data_yaml(tiny_data), "val", 128)
    items = [dataset[i] for i in range(3)]
    batch = collate(items)
    counts = [len(item["labels"]) for item in items]
    assert batch["images"].shape == (3, 3, 128, 128)
    assert batch["boxes"].shape == (3, max(counts), 4)
    assert batch["box_mask"].sum(1).tolist() == counts
    assert batch["class_mask"].shape == (3, 2) and bool((batch["class_mask"] == 1).all())
    for i, count in enumerate(counts):
        torch.testing.assert_close(batch["boxes"][i, :count], items[i]["boxes"])
        assert float(batch["boxes"][i, count:].abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n", r"labels\.txt:2: class id 2 outside 0\.\.1"),
        ("0 0.5 0.5 0.2\n", r"labels\.txt:1: expected 'class cx cy w h', got 4 fields"),
        ("0 0.5 zero 0.2 0.2\n", "must be numbers"),
    ],
)
def test_bad_label_files_are_refused_with_their_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(content)
    with pytest.raises(ShelfSightError, match=message):
        read_labels(path, 2)


def test_missing_label_file_means_no_objects(tmp_path: Path) -> None:
    assert read_labels(tmp_path / "none.txt", 2).shape == (0, 5)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"train": "images/train", "names": ["a"]}, "data.yaml:1: field 'val'"),
        ({"train": "images/train", "val": "images/val", "names": ["a"], "nc": 2}, "nc=2 but 1 names"),
        ({"train": "images/train", "val": "nowhere", "names": ["a"]}, "neither a folder nor a .txt list"),
    ],
)
def test_bad_data_yaml_is_refused(tmp_path: Path, document: dict, message: str) -> None:
    _white_boxes_dataset(tmp_path)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(document))
    with pytest.raises(ShelfSightError, match=message):
        YoloDataset(load_data_yaml(data), "val", 128)
