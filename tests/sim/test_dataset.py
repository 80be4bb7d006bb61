"""YOLO dataset generation: layout on disk, valid labels, byte-for-byte determinism by seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.sim.cli import main
from shelfsight.sim.dataset import generate_dataset, missing_facings, synth_image

SIZE = ["--width", "320", "--height", "192"]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"  # data.yaml holds the absolute folder path
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "a"
    assert main(["dataset", "--out", str(out), "--images", "10", "--seed", "0", *SIZE, "--quiet"]) == 0
    return out


def test_dataset_layout_and_data_yaml(dataset: Path):
    data = yaml.safe_load((dataset / "data.yaml").read_text())
    assert data == {
        "path": str(dataset.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": {0: "product", 1: "gap"},
        "nc": 2,
    }
    train = sorted(p.stem for p in (dataset / "images" / "train").glob("*.jpg"))
    val = sorted(p.stem for p in (dataset / "images" / "val").glob("*.jpg"))
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    for split, stems in (("train", train), ("val", val)):
        assert sorted(p.stem for p in (dataset / "labels" / split).glob("*.txt")) == stems
    image = cv2.imread(str(dataset / "images" / "train" / f"{train[0]}.jpg"))
    assert image is not None
    assert image.shape == (192, 320, 3)


def test_labels_are_normalized_yolo_rows_with_both_classes(dataset: Path):
    rows = []
    for label in dataset.rglob("labels/*/*.txt"):
        text = label.read_text().strip()
        if text:
            rows.append(np.loadtxt(label, ndmin=2))
    table = np.concatenate(rows)
    assert table.shape[1] == 5
    assert set(np.unique(table[:, 0]).tolist()) == {0.0, 1.0}
    assert (table[:, 1:] >= 0).all() and (table[:, 1:] <= 1).all()
    assert (table[:, 3:] > 0).all()
    # Boxes stay inside the image: centre +- half size within [0, 1].
    assert (table[:, 1] - table[:, 3] / 2 >= -1e-5).all() and (table[:, 1] + table[:, 3] / 2 <= 1 + 1e-5).all()


def test_same_seed_is_byte_identical_and_another_seed_is_not(dataset: Path, tmp_path: Path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    assert main(["dataset", "--out", str(again), "--images", "10", "--seed", "0", *SIZE, "--quiet"]) == 0
    assert main(["dataset", "--out", str(other), "--images", "10", "--seed", "1", *SIZE, "--quiet"]) == 0
    reference = _hashes(dataset)
    assert _hashes(again) == reference
    different = _hashes(other)
    assert different.keys() == reference.keys()
    assert all(different[k] != reference[k] for k in reference if k.endswith(".jpg"))


def test_camera_distances_span_small_and_large_products():
    widths = np.concatenate(
        [
            synth.boxes[synth.classes == 0, 2] - synth.boxes[synth.classes == 0, 0]
            for synth in (synth_image(3, i, (640, 384)) for i in range(24))
        ]
    )
    assert widths.min() < 16 and widths.max() > 90


def test_missing_facings_are_contiguous_runs_of_the_right_share():
    rng = np.random.default_rng(0)
    for _ in range(50):
        facings = rng.integers(1, 5, size=int(rng.integers(12, 50))).tolist()
        present = missing_facings(rng, facings)
        missing = sum(int((~p).sum()) for p in present)
        assert 0.05 * sum(facings) <= missing <= 0.35 * sum(facings) + max(facings)
        for mask in present:
            runs = np.count_nonzero(np.diff(np.concatenate([[0], (~mask).astype(int), [0]])) == 1)
            assert runs <= 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"images": 0}, "--images must be at least 1"),
        ({"images": 3, "val_fraction": 1.0}, "--val-fraction"),
        ({"images": 3, "width": 10}, "outside 64..4096"),
    ],
)
def test_bad_dataset_arguments(tmp_path: Path, kwargs: dict, words: str):
    with pytest.raises(ShelfSightError, match=words):
        generate_dataset(tmp_path / "x", **kwargs)
