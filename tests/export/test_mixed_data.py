"""Mixed datasets: polygon label lines, per-source class remapping, class masks, repeats, and a mixed validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from shelfsight.export.data import (
    AugmentConfig,
    LabelledImage,
    YoloDataset,
    collate,
    image_files,
    labelled_images,
    load_data_yaml,
    read_labels,
)
from shelfsight.export.evaluate import evaluate_detector, evaluate_labelled
from shelfsight.export.loss import DetectionLoss
from shelfsight.export.model import ModelConfig, build_model
from shelfsight.export.train import TrainConfig, train
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ShelfSightError

REAL_GAPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-shelf-gaps"
SPLIT_FILE = Path(__file__).resolve().parents[2] / "docs" / "real-gaps-split.txt"
MIXED_NAMES = {0: "product", 1: "gap"}


def _gap_only_source(synthetic_yaml: Path, root: Path) -> Path:
    """A 'real-like' source: the synthetic images with only their gaps labelled, as class 0, one line a polygon."""
    synthetic = synthetic_yaml.parent
    for split in ("train", "val"):
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split).mkdir(parents=True)
        for image in sorted((synthetic / "images" / split).glob("*.jpg")):
            (root / "images" / split / image.name).symlink_to(image)
            rows = np.loadtxt(synthetic / "labels" / split / f"{image.stem}.txt", ndmin=2)
            gaps = rows[rows[:, 0] == 1]
            lines = [f"0 {cx} {cy} {w} {h}" for _, cx, cy, w, h in gaps]
            if lines:  # the first gap as a polygon (a rectangle traced clockwise, closed)
                _, cx, cy, w, h = gaps[0]
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
                lines[0] = f"0 {x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2} {x1} {y1}"
            (root / "labels" / split / f"{image.stem}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def mixed_yaml(tiny_data: Path, tmp_path: Path) -> Path:
    real = _gap_only_source(tiny_data, tmp_path / "real")
    data = tmp_path / "mixed.yaml"
    source = {"names": {0: "gap"}, "classes_present": ["gap"]}
    document = {
        "path": str(tiny_data.parent),
        "names": MIXED_NAMES,
        "train": [{"path": str(real / "images" / "train"), "repeat": 3, **source}, "images/train"],
        "val": [{"path": str(real / "images" / "val"), **source}, "images/val"],
    }
    data.write_text(yaml.safe_dump(document, sort_keys=False))
    return data


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0 0.5 0.5 0.2 0.4", [0, 0.5, 0.5, 0.2, 0.4]),
        ("0 0.1 0.2 0.5 0.2 0.3 0.6", [0, 0.3, 0.4, 0.4, 0.4]),  # triangle -> its bounding box
        ("1 0.8 0.1 0.6 0.3 0.9 0.5 0.8 0.1", [1, 0.75, 0.3, 0.3, 0.4]),  # closed polygon (first point repeated)
        ("0 -0.1 0.2 0.4 0.2 0.4 1.2", [0, 0.2, 0.6, 0.4, 0.8]),  # points outside the image are clipped to it
    ],
)
def test_polygon_lines_become_bounding_boxes(tmp_path: Path, line: str, expected: list[float]) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(f"1 0.5 0.5 0.1 0.1\n\n{line}\n")
    table = read_labels(path, 2)
    assert table.shape == (2, 5)
    np.testing.assert_allclose(table[1], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("0 0.1 0.2 0.5 0.2 0.3\n", r"labels\.txt:1: expected 'class cx cy w h', got 6 fields"),  # odd coordinate
        ("0 0.1 0.2 0.5 0.2 0.3 0.6 0.7 0.8 0.9\n", "got 10 fields .*at least 3 points"),
        ("0 0.5 0.5 0.1 0.1\n\n0 0.1 0.2 0.5 0.2 0.3 oops\n", r"labels\.txt:3: label values must be numbers"),
        ("0 0.5 0.5 0.1 0.1\n\n2 0.1 0.2 0.5 0.2 0.3 0.6\n", r"labels\.txt:3: class id 2 outside 0\.\.1"),
    ],
)
def test_bad_polygon_lines_are_refused_with_their_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(content)
    with pytest.raises(ShelfSightError, match=message):
        read_labels(path, 2)


def test_class_map_remaps_source_ids_and_bounds_them_by_the_source(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("0 0.5 0.5 0.1 0.1\n0 0.2 0.2 0.1 0.1 0.3 0.3\n")
    assert read_labels(path, 2, class_map=[1])[:, 0].tolist() == [1, 1]
    path.write_text("1 0.5 0.5 0.1 0.1\n")  # a valid dataset id, but the source only has id 0
    with pytest.raises(ShelfSightError, match=r"class id 1 outside 0\.\.0"):
        read_labels(path, 2, class_map=[1])


def test_mixed_yaml_remaps_masks_and_repeats_training_only(mixed_yaml: Path, tiny_data: Path) -> None:
    spec = load_data_yaml(mixed_yaml)
    plain_train = len(image_files(load_data_yaml(tiny_data), "train"))
    real_train = labelled_images(spec, "train")[:plain_train]
    assert not spec.is_plain("train") and load_data_yaml(tiny_data).is_plain("train")
    assert len(image_files(spec, "train")) == 2 * plain_train  # every image once for non-training users
    assert all(item.class_mask.tolist() == [0.0, 1.0] for item in real_train)
    assert all(set(item.labels[:, 0].tolist()) <= {1.0} for item in real_train)  # source gap 0 -> dataset gap 1
    assert sum(len(item.labels) for item in real_train) > 0

    training = YoloDataset(spec, "train", 128, augment=None)
    validation = YoloDataset(spec, "val", 128)
    assert len(training) == 2 * plain_train and len(validation) == len(image_files(spec, "val"))
    augmented = YoloDataset(spec, "train", 128, augment=AugmentConfig(), seed=0)
    assert len(augmented) == 3 * plain_train + plain_train
    batch = collate([augmented[0], augmented[3 * plain_train]])
    assert batch["class_mask"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert set(batch["labels"][0][batch["box_mask"][0]].tolist()) <= {1}
    # The three copies of one real image are augmented differently.
    assert not torch.equal(augmented[0]["image"], augmented[plain_train]["image"])


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("train_entry", "message"),
    [
        ("{path: images, names: {0: gap}, weight: 2}", r"data\.yaml:4: field 'train\[0\]\.weight': Extra inputs"),
        ("{path: images, names: {0: shelf}}", r"train\[0\]: source names \['shelf'\] are not dataset classes"),
        ("{path: images, classes_present: [box]}", r"train\[0\]: classes_present \['box'\] are not dataset"),
        ("{path: images, names: {0: gap}, classes_present: [product]}", r"labels \['gap'\] but classes_present"),
        ("{path: images, names: {1: gap}}", "class ids must be 0..0 without gaps"),
        ("{path: images, names: [gap, gap]}", "class names must be unique"),
        ("{path: images, repeat: 0}", r"data\.yaml:4: field 'train\[0\]\.repeat': Input should be greater"),
    ],
)
def test_bad_source_entries_are_refused(tmp_path: Path, train_entry: str, message: str) -> None:
    data = _write(tmp_path, f"names: {{0: product, 1: gap}}\nval: images\ntrain:\n  - {train_entry}\n")
    with pytest.raises(ShelfSightError, match=message):
        load_data_yaml(data)


def test_loss_ignores_the_classification_of_masked_classes() -> None:
    """With product masked, product logits get no gradient; gap logits and boxes still learn."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2, width=0.125, imgsz=64))
    points, strides = model.anchors(64, 64, torch.device("cpu"))
    logits = torch.randn(2, points.shape[0], 2, requires_grad=True)
    distances = (torch.rand(2, points.shape[0], 4) * 8 + 1).requires_grad_(True)
    boxes = torch.tensor([[[8.0, 8.0, 30.0, 40.0]], [[8.0, 8.0, 30.0, 40.0]]])
    labels = torch.tensor([[1], [1]])
    box_mask = torch.ones(2, 1, dtype=torch.bool)
    class_mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    loss = DetectionLoss(2)(logits, distances, points, strides, labels, boxes, box_mask, class_mask)
    loss.total.backward()
    assert logits.grad is not None and distances.grad is not None
    assert float(logits.grad[0, :, 0].abs().sum()) == 0.0  # masked: "no product here" is not taught
    assert float(logits.grad[1, :, 0].abs().sum()) > 0.0  # the fully labelled image still pushes product down
    assert float(logits.grad[0, :, 1].abs().sum()) > 0.0 and float(distances.grad[0].abs().sum()) > 0.0


def test_mixed_evaluation_drops_detections_of_unlabelled_classes(mixed_yaml: Path) -> None:
    """A detector that finds every box and also reports 'product' on gap-only photos scores 1.0: those products
    are not false positives. Without the class mask they would be."""
    spec = load_data_yaml(mixed_yaml)
    items = labelled_images(spec, "val")
    truth = {str(item.path): item for item in items}
    real_images = {str(item.path) for item in items if item.class_mask[0] == 0}
    assert real_images and len(real_images) < len(items)

    order = iter(())

    def detect(frame: np.ndarray) -> Detections:
        """The truth at score 0.9, plus products at score 1.0 where the gap-only labels say nothing."""
        path = str(next(order))
        item = truth[path]
        height, width = frame.shape[:2]
        cx, cy, w, h = (item.labels[:, i] for i in range(1, 5))
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * [width, height, width, height]
        classes, scores = item.labels[:, 0], np.full(len(item.labels), 0.9)
        if path in real_images:
            xyxy = np.concatenate([xyxy, [[0, 0, width / 4, height / 4]]])
            classes, scores = np.append(classes, 0), np.append(scores, 1.0)
        return Detections(xyxy, scores, classes.astype(np.int64))

    order = iter([item.path for item in items])
    result = evaluate_labelled(detect, items, spec.names)
    assert result.per_class_ap50 == pytest.approx({"product": 1.0, "gap": 1.0})
    unmasked = [LabelledImage(item.path, item.labels, np.ones(2, np.float32)) for item in items]
    order = iter([item.path for item in unmasked])
    assert evaluate_labelled(detect, unmasked, spec.names).per_class_ap50["product"] < 0.95
    # `export-model eval` on the mixed data.yaml takes the same remapped, masked path (gap ids not read as product)
    order = iter([item.path for item in items])
    assert evaluate_detector(detect, spec, "val").per_class_ap50 == pytest.approx({"product": 1.0, "gap": 1.0})


def test_training_on_a_mixed_yaml_validates_on_its_mixed_val(
    mixed_yaml: Path, tmp_path: Path, make_train_config: Callable[..., TrainConfig]
) -> None:
    seen: list[dict] = []
    result = train(make_train_config(mixed_yaml, tmp_path / "run", epochs=1), lambda _, metrics: seen.append(metrics))
    assert result.epochs_run == 1 and result.best is not None
    assert set(seen[0]["per_class_ap50"]) == {"product", "gap"}
    assert 0.0 <= seen[0]["map50"] <= 1.0


@pytest.mark.skipif(not REAL_GAPS.is_dir(), reason=f"real photos not available ({REAL_GAPS} is absent)")
def test_real_gap_labels_read_as_boxes_and_the_split_is_a_partition() -> None:
    labels = sorted((REAL_GAPS / "labels").glob("*.txt"))
    tables = [read_labels(path, 2, class_map=[1]) for path in labels]
    boxes = np.concatenate(tables)
    assert len(labels) == 150 and len(boxes) == 738
    assert set(boxes[:, 0].tolist()) == {1.0}
    assert bool((boxes[:, 3:] > 0).all()) and bool((boxes[:, 1:3] >= 0).all() and (boxes[:, 1:3] <= 1).all())
    lines = [line.split() for line in SPLIT_FILE.read_text().splitlines() if line and not line.startswith("#")]
    split = {name: kind for kind, name in lines}
    assert sorted(split) == sorted(p.name for p in (REAL_GAPS / "images").iterdir())
    assert sorted(split.values()).count("train") == 120 and sorted(split.values()).count("val") == 30
