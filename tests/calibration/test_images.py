"""Calibration image sets: deterministic sampling, unreadable files skipped and counted, clear errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from shelfsight.calibration.images import CalibrationDataError, list_candidates, select_calibration_images
from shelfsight.runtime.errors import ShelfSightError


def test_same_seed_same_set_and_order(tmp_path: Path, make_images: Callable[..., list[Path]]) -> None:
    make_images(tmp_path / "many", 20)
    first = select_calibration_images(tmp_path / "many", count=8, seed=3)
    again = select_calibration_images(tmp_path / "many", count=8, seed=3)
    other = select_calibration_images(tmp_path / "many", count=8, seed=4)
    assert first.paths == again.paths
    assert len(first) == 8 and len(set(first.paths)) == 8
    assert first.paths != other.paths
    assert first.available == 20 and first.skipped_count == 0 and first.shortfall == 0


@pytest.mark.parametrize(
    ("broken_name", "content"),
    [("broken.jpg", b"\xff\xd8\xff this is not a jpeg"), ("empty.png", b""), ("text.png", b"hello")],
)
def test_unreadable_image_is_skipped_and_counted(
    image_folder: Path, broken_name: str, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (image_folder / broken_name).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        chosen = select_calibration_images(image_folder, count=100, seed=0)
    assert len(chosen) == 6
    assert chosen.skipped_count == 1
    assert chosen.skipped[0][0].name == broken_name
    assert all(path.name != broken_name for path in chosen.paths)
    assert chosen.shortfall == 94
    assert "skipped 1 unreadable" in caplog.text
    assert "fewer than the 100 asked for" in caplog.text


def test_unreadable_image_is_replaced_by_the_next_candidate(image_folder: Path) -> None:
    (image_folder / "broken.jpg").write_bytes(b"garbage")
    chosen = select_calibration_images(image_folder, count=6, seed=0)
    assert len(chosen) == 6 and chosen.shortfall == 0 and chosen.skipped_count == 1


def test_no_warning_when_enough_images(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        select_calibration_images(image_folder, count=4)
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no images found"),
        ("only-corrupt", "none of the 2 image file(s) could be decoded"),
        ("not-a-folder", "must be an image folder or a data.yaml"),
    ],
)
def test_bad_source_is_one_clear_error(tmp_path: Path, setup: str, message: str) -> None:
    source = tmp_path / "calib"
    if setup == "empty":
        source.mkdir()
        (source / "notes.txt").write_text("not an image")
    elif setup == "only-corrupt":
        source.mkdir()
        (source / "a.jpg").write_bytes(b"x")
        (source / "b.png").write_bytes(b"y")
    elif setup == "not-a-folder":
        source = tmp_path / "weights.bin"
        source.write_bytes(b"0")
    with pytest.raises(CalibrationDataError) as info:
        select_calibration_images(source, count=10)
    assert isinstance(info.value, ShelfSightError)
    assert message in str(info.value) and str(source) in str(info.value)
    assert "\n" not in str(info.value)


def test_count_must_be_positive(image_folder: Path) -> None:
    with pytest.raises(CalibrationDataError, match="at least 1"):
        select_calibration_images(image_folder, count=0)


def test_data_yaml_split(tmp_path: Path, make_images: Callable[..., list[Path]]) -> None:
    root = tmp_path / "dataset"
    train = make_images(root / "images" / "train", 5, seed=1, prefix="t")
    val = make_images(root / "images" / "val", 3, seed=2, prefix="v")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": "dataset", "train": "images/train", "val": "images/val", "names": ["a"]}))
    assert list_candidates(data, "train") == sorted(train)
    assert list_candidates(data, "val") == sorted(val)
    chosen = select_calibration_images(data, count=10, split="val")
    assert sorted(chosen.paths) == sorted(val)


def test_data_yaml_list_file_and_missing_split(tmp_path: Path, make_images: Callable[..., list[Path]]) -> None:
    images = make_images(tmp_path / "imgs", 3)
    (tmp_path / "train.txt").write_text("\n".join(f"imgs/{p.name}" for p in images) + "\n")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"train": "train.txt", "val": "nowhere", "names": ["a"]}))
    assert list_candidates(data, "train") == sorted(images)
    with pytest.raises(ShelfSightError, match=r"nowhere is neither a folder nor a \.txt list"):
        list_candidates(data, "val")
    with pytest.raises(ShelfSightError, match="no 'test' split"):
        list_candidates(data, "test")
