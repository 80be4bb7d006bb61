"""Tensor ranges from calibration, cached by what determines them: images + preprocessing, model, method.

Calibrating runs the model over every image with every intermediate tensor as an output; at 300 images that is
minutes on a CPU. Re-running an export with the same images and model must not pay that again, so the ranges are
stored in ONNX Runtime's own cache format (``save_tensors_data``), which ``quantize_static`` reads back through its
``calibration_cache_path`` argument.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import sha256_file

log = logging.getLogger(__name__)

CalibMethodName = Literal["minmax", "entropy", "percentile"]

CALIBRATION_METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}

CalibratorFactory = Callable[..., Any]


class CalibrationCacheError(ShelfSightError):
    """A cached calibration file is unreadable or was made for something else."""


@dataclass(frozen=True)
class CalibrationRanges:
    """Where the ranges live and whether they came from the cache."""

    cache_path: Path
    key: str
    method: CalibMethodName
    cache_hit: bool
    tensor_count: int


def calibration_op_types() -> list[str]:
    """The op types ``quantize_static`` calibrates by default; matching it keeps cached ranges complete."""
    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibration_key(
    set_digest: str, model_sha256: str, method: CalibMethodName, calibrator_options: dict[str, Any] | None = None
) -> str:
    payload = {
        "calibration_set": set_digest,
        "model_sha256": model_sha256,
        "method": method,
        "calibrator_options": calibrator_options or {},
        # Histogram binning and range rules have changed between releases.
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"calib-{key[:32]}.json"


def _load_cached(path: Path, method: CalibMethodName) -> TensorsData:
    try:
        tensors = load_tensors_data(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationCacheError(f"{path}: unreadable calibration cache ({exc}); delete it to recalibrate") from None
    if tensors.calibration_method != CALIBRATION_METHODS[method]:
        raise CalibrationCacheError(f"{path}: cache holds {tensors.calibration_method} ranges, expected {method}")
    return tensors


def calibrate_tensor_ranges(
    model_path: str | Path,
    reader: CalibrationDataReader,
    method: CalibMethodName,
    set_digest: str,
    cache_dir: str | Path,
    calibrator_options: dict[str, Any] | None = None,
    calibrator_factory: CalibratorFactory = create_calibrator,
) -> CalibrationRanges:
    """Return cached ranges for (images, model, method), computing and storing them on a miss.

    ``model_path`` must be the exact model that will be quantized (after ``quant_pre_process``): tensor names are
    the cache's keys, and the model's sha256 is part of the lookup key.
    """
    if method not in CALIBRATION_METHODS:
        raise CalibrationCacheError(f"unknown calibration method '{method}' (choose {', '.join(CALIBRATION_METHODS)})")
    model_path = Path(model_path)
    cache_dir = Path(cache_dir)
    key = calibration_key(set_digest, sha256_file(model_path), method, calibrator_options)
    path = cache_file(cache_dir, key)
    if path.is_file():
        tensors = _load_cached(path, method)
        log.info("calibration cache hit: %s", path)
        return CalibrationRanges(path, key, method, True, len(tensors.data))

    if hasattr(reader, "rewind"):
        reader.rewind()
    with tempfile.TemporaryDirectory(prefix="shelfsight-calib-") as tmp:
        calibrator = calibrator_factory(
            model_path,
            calibration_op_types(),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options=dict(calibrator_options or {}),
        )
        calibrator.collect_data(reader)
        tensors = calibrator.compute_data()
        del calibrator
    if not isinstance(tensors, TensorsData) or not tensors.data:
        raise CalibrationCacheError(f"{model_path}: calibration produced no tensor ranges")
    # save_tensors_data writes a temp file and renames it, so an interrupted run never leaves a half cache.
    save_tensors_data(tensors, path)
    (cache_dir / f"{path.stem}.meta.json").write_text(
        json.dumps(
            {
                "key": key,
                "set_digest": set_digest,
                "model": str(model_path),
                "method": method,
                "calibrator_options": calibrator_options or {},
                "tensors": len(tensors.data),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("calibrated %d tensors with %s, cached at %s", len(tensors.data), method, path)
    return CalibrationRanges(path, key, method, False, len(tensors.data))
