"""Calibration ranges are computed once per (images + preprocessing, model, method) and then read from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnxruntime.quantization import create_calibrator
from onnxruntime.quantization.calibrate import load_tensors_data

from shelfsight.calibration.cache import CalibrationCacheError, cache_file, calibrate_tensor_ranges
from shelfsight.calibration.images import select_calibration_images
from shelfsight.calibration.reader import ImageCalibrationReader, calibration_digest
from shelfsight.runtime.manifest import InputSpec


class CountingCalibratorFactory:
    """Wraps ORT's real ``create_calibrator`` and counts how often calibration actually runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(str(kwargs["calibrate_method"]))
        return create_calibrator(*args, **kwargs)


@pytest.fixture
def reader_and_digest(image_folder: Path, input_spec: InputSpec) -> tuple[ImageCalibrationReader, str]:
    chosen = select_calibration_images(image_folder, count=6)
    return ImageCalibrationReader(chosen, input_spec), calibration_digest(chosen, input_spec)


def test_second_run_reads_the_cache(
    conv_onnx: Path, tmp_path: Path, reader_and_digest: tuple[ImageCalibrationReader, str]
) -> None:
    reader, digest = reader_and_digest
    factory = CountingCalibratorFactory()
    first = calibrate_tensor_ranges(conv_onnx, reader, "minmax", digest, tmp_path / "cache", calibrator_factory=factory)
    second = calibrate_tensor_ranges(
        conv_onnx, reader, "minmax", digest, tmp_path / "cache", calibrator_factory=factory
    )
    assert len(factory.calls) == 1
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.cache_path == second.cache_path and first.cache_path.is_file()
    ranges = load_tensors_data(first.cache_path).data
    # The real calibrator saw real tensors: ReLU output is non-negative with a positive maximum.
    low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges["r1"].range_value)
    assert low >= 0.0 and high > 0.0
    assert {"images", "c1", "r1", "out"} <= set(ranges)


@pytest.mark.parametrize("change", ["method", "images", "model"])
def test_any_key_change_recalibrates(
    conv_onnx: Path,
    tmp_path: Path,
    image_folder: Path,
    input_spec: InputSpec,
    reader_and_digest: tuple[ImageCalibrationReader, str],
    change: str,
) -> None:
    reader, digest = reader_and_digest
    factory = CountingCalibratorFactory()
    cache = tmp_path / "cache"
    first = calibrate_tensor_ranges(conv_onnx, reader, "minmax", digest, cache, calibrator_factory=factory)
    method, model = "minmax", conv_onnx
    if change == "method":
        method = "percentile"
    elif change == "images":
        fewer = select_calibration_images(image_folder, count=3)
        reader, digest = ImageCalibrationReader(fewer, input_spec), calibration_digest(fewer, input_spec)
    else:
        # Same graph, another name: a different file, so a different sha256 and a fresh calibration.
        model = tmp_path / "other.onnx"
        model.write_bytes(conv_onnx.read_bytes().replace(b"tiny", b"tinz"))
    second = calibrate_tensor_ranges(model, reader, method, digest, cache, calibrator_factory=factory)
    assert len(factory.calls) == 2
    assert not second.cache_hit and second.cache_path != first.cache_path


def test_cache_holding_another_method_is_refused(
    conv_onnx: Path, tmp_path: Path, reader_and_digest: tuple[ImageCalibrationReader, str]
) -> None:
    reader, digest = reader_and_digest
    minmax = calibrate_tensor_ranges(conv_onnx, reader, "minmax", digest, tmp_path / "cache")
    entropy = calibrate_tensor_ranges(conv_onnx, reader, "entropy", digest, tmp_path / "cache")
    # Simulate a cache file swapped on disk: the method stored inside must match the one asked for.
    entropy.cache_path.write_bytes(minmax.cache_path.read_bytes())
    with pytest.raises(CalibrationCacheError, match="expected entropy"):
        calibrate_tensor_ranges(conv_onnx, reader, "entropy", digest, tmp_path / "cache")


def test_unreadable_cache_is_a_clear_error(
    conv_onnx: Path, tmp_path: Path, reader_and_digest: tuple[ImageCalibrationReader, str]
) -> None:
    reader, digest = reader_and_digest
    result = calibrate_tensor_ranges(conv_onnx, reader, "minmax", digest, tmp_path / "cache")
    assert cache_file(tmp_path / "cache", result.key) == result.cache_path
    result.cache_path.write_text("{not json")
    with pytest.raises(CalibrationCacheError, match="unreadable calibration cache"):
        calibrate_tensor_ranges(conv_onnx, reader, "minmax", digest, tmp_path / "cache")


def test_unknown_method_is_refused(conv_onnx: Path, tmp_path: Path, reader_and_digest: tuple[Any, str]) -> None:
    reader, digest = reader_and_digest
    with pytest.raises(CalibrationCacheError, match="unknown calibration method 'kl'"):
        calibrate_tensor_ranges(conv_onnx, reader, "kl", digest, tmp_path / "cache")
