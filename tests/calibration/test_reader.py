"""The calibration reader feeds exactly what the device's preprocessing produces, and can be replayed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from shelfsight.calibration.images import CalibrationDataError, select_calibration_images
from shelfsight.calibration.reader import ImageCalibrationReader, calibration_digest
from shelfsight.runtime.manifest import InputSpec
from shelfsight.runtime.preprocess import Preprocessor, preprocess_frame


def _drain(reader: ImageCalibrationReader) -> list[dict[str, np.ndarray]]:
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append({k: v.copy() for k, v in feed.items()})
    return feeds


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(name="images", shape=[1, 3, 32, 32]),
        InputSpec(name="x", shape=[1, 3, 24, 40], channel_order="BGR", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25]),
        InputSpec(name="x", shape=[1, 3, 32, 48], resize="resize", pixel_scale=1.0),
    ],
    ids=["ours", "bgr-normalized", "plain-resize"],
)
def test_tensors_are_identical_to_the_runtime_preprocessing(image_folder: Path, spec: InputSpec) -> None:
    chosen = select_calibration_images(image_folder, count=6)
    feeds = _drain(ImageCalibrationReader(chosen, spec))
    device = Preprocessor(spec)  # the buffered path shelf-agent runs per camera frame
    assert len(feeds) == 6
    for feed, path in zip(feeds, chosen.paths, strict=True):
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        reference, _ = preprocess_frame(frame, spec)
        on_device, _ = device(frame)
        assert list(feed) == [spec.name]
        assert feed[spec.name].shape == (1, 3, spec.height, spec.width)
        assert feed[spec.name].dtype == np.float32
        np.testing.assert_array_equal(feed[spec.name][0], reference)
        np.testing.assert_array_equal(feed[spec.name], on_device)


def test_rewind_replays_the_same_stream(image_folder: Path, input_spec: InputSpec) -> None:
    reader = ImageCalibrationReader(select_calibration_images(image_folder, count=4), input_spec)
    assert isinstance(reader, CalibrationDataReader)
    first = _drain(reader)
    assert reader.get_next() is None
    reader.rewind()
    second = _drain(reader)
    assert len(first) == len(second) == len(reader) == 4
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    # Different images give different tensors: the stream is not one frame repeated.
    assert not np.array_equal(first[0]["images"], first[1]["images"])


def test_input_name_override(image_folder: Path, input_spec: InputSpec) -> None:
    reader = ImageCalibrationReader(select_calibration_images(image_folder, count=1), input_spec, input_name="pixels")
    feed = reader.get_next()
    assert feed is not None and list(feed) == ["pixels"]


def test_batch_other_than_one_is_refused(image_folder: Path) -> None:
    spec = InputSpec(name="images", shape=[4, 3, 32, 32])
    with pytest.raises(CalibrationDataError, match="batch 1"):
        ImageCalibrationReader(select_calibration_images(image_folder, count=1), spec)


def test_image_that_breaks_after_selection_is_an_error(image_folder: Path, input_spec: InputSpec) -> None:
    chosen = select_calibration_images(image_folder, count=2)
    chosen.paths[0].write_bytes(b"truncated")
    with pytest.raises(CalibrationDataError, match="became unreadable"):
        ImageCalibrationReader(chosen, input_spec).get_next()


def test_digest_depends_on_content_and_spec_not_order(image_folder: Path, input_spec: InputSpec) -> None:
    a = select_calibration_images(image_folder, count=6, seed=1)
    b = select_calibration_images(image_folder, count=6, seed=2)
    assert a.paths != b.paths  # same six files in another order
    assert calibration_digest(a, input_spec) == calibration_digest(b, input_spec)
    other_spec = input_spec.model_copy(update={"pad_value": 0})
    assert calibration_digest(a, other_spec) != calibration_digest(a, input_spec)
    renamed = input_spec.model_copy(update={"name": "other_input_name"})
    assert calibration_digest(a, renamed) == calibration_digest(a, input_spec)
    fewer = select_calibration_images(image_folder, count=5, seed=1)
    assert calibration_digest(fewer, input_spec) != calibration_digest(a, input_spec)
    image = cv2.imread(str(a.paths[0]))
    assert image is not None
    image[0, 0] = 255 - image[0, 0]
    cv2.imwrite(str(a.paths[0]), image)
    edited = select_calibration_images(image_folder, count=6, seed=1)
    assert calibration_digest(edited, input_spec) != calibration_digest(a, input_spec)
