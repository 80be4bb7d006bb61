"""Load a model from its manifest and run frames through preprocess -> backend -> postprocess."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import numpy as np

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta, create_backend
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import Manifest, load_manifest, resolve_artifact
from shelfsight.runtime.postprocess import get_decoder, postprocess
from shelfsight.runtime.preprocess import Preprocessor

STAGES = ("preprocess", "infer", "postprocess")
_FEEDABLE = (np.dtype(np.float32), np.dtype(np.float16))


class Detector:
    """A loaded model. ``detect``/``detect_batch`` are not thread-safe: buffers are reused between calls."""

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        max_det: int = 300,
    ) -> None:
        if not 0.0 <= conf_threshold <= 1.0:
            raise ValueError(f"conf_threshold must be in [0, 1], got {conf_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.manifest = manifest
        self.backend = backend
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_det = max_det
        self.preprocessor = Preprocessor(manifest.input)
        self.stage_ns: dict[str, int] = dict.fromkeys(STAGES, 0)
        meta = backend.input_meta[manifest.input.name]
        batch_dim = meta.shape[0]
        # A fixed-batch model always gets exactly that many rows; a dynamic one gets as many frames as it is given.
        self.max_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._input_dtype = meta.dtype
        self._feed = np.empty((0, 3, manifest.input.height, manifest.input.width), np.float32)
        self._feed_cast = np.empty((0,), meta.dtype)

    @property
    def model_sha256(self) -> str:
        return self.manifest.artifact("model").sha256

    def detect(self, frame: np.ndarray) -> Detections:
        """One BGR uint8 frame -> Detections in frame pixels. A malformed frame raises ValueError."""
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        """Frames -> one Detections each; a fixed-batch model runs them in chunks of its batch size."""
        totals = dict.fromkeys(STAGES, 0)
        results: list[Detections] = []
        chunk = self.max_batch or max(1, len(frames))
        for start in range(0, len(frames), chunk):
            part = frames[start : start + chunk]
            t0 = time.perf_counter_ns()
            feed = self._feed_rows(chunk if self.max_batch else len(part))
            transforms = self.preprocessor.fill_batch(part, feed)
            tensor = self._as_input_dtype(feed)
            t1 = time.perf_counter_ns()
            outputs = self.backend.infer({self.manifest.input.name: tensor})
            t2 = time.perf_counter_ns()
            results += postprocess(
                [outputs[name] for name in self.manifest.output.names],
                self.manifest.output,
                transforms,
                self.conf_threshold,
                self.iou_threshold,
                self.max_det,
                (self.manifest.input.height, self.manifest.input.width),
            )
            t3 = time.perf_counter_ns()
            totals["preprocess"] += t1 - t0
            totals["infer"] += t2 - t1
            totals["postprocess"] += t3 - t2
        self.stage_ns = totals
        return results

    def _feed_rows(self, rows: int) -> np.ndarray:
        if len(self._feed) < rows:
            self._feed = np.empty((rows, *self._feed.shape[1:]), np.float32)
        return self._feed[:rows]

    def _as_input_dtype(self, feed: np.ndarray) -> np.ndarray:
        if self._input_dtype == feed.dtype:
            return feed
        if self._feed_cast.shape != feed.shape:
            self._feed_cast = np.empty(feed.shape, self._input_dtype)
        np.copyto(self._feed_cast, feed, casting="same_kind")
        return self._feed_cast

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self) -> Detector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_model_against_manifest(
    manifest_path: str | Path, manifest: Manifest, inputs: dict[str, TensorMeta], outputs: dict[str, TensorMeta]
) -> None:
    """Refuse a model whose tensors disagree with what the manifest promises; errors name both sides."""
    spec = manifest.input
    if list(inputs) != [spec.name]:
        raise ManifestError(f"{manifest_path}: manifest input '{spec.name}' but the model's inputs are {list(inputs)}")
    meta = inputs[spec.name]
    if not meta.accepts_shape(tuple(spec.shape)):
        raise ManifestError(
            f"{manifest_path}: manifest input '{spec.name}' shape {_shape_text(spec.shape)} does not match "
            f"the model's {_shape_text(meta.shape)}"
        )
    if meta.dtype not in _FEEDABLE:
        raise ManifestError(f"{manifest_path}: model input '{spec.name}' is {meta.dtype}; only float32/float16 work")
    missing = [name for name in manifest.output.names if name not in outputs]
    if missing:
        raise ManifestError(
            f"{manifest_path}: manifest outputs {manifest.output.names} but the model's outputs are {list(outputs)}"
        )
    if manifest.output.format != "shelfsight":
        from shelfsight.runtime.decoders import check_output_layout

        shapes = [outputs[name].shape for name in manifest.output.names]
        check_output_layout(manifest.output.format, shapes, (spec.height, spec.width), len(manifest.classes),
                            where=str(manifest_path))
    else:
        out = outputs[manifest.output.names[0]]
        want = [spec.shape[0], None, 4 + len(manifest.classes)]
        columns = out.shape[-1] if out.shape else None
        if len(out.shape) != 3 or (isinstance(columns, int) and columns != want[2]):
            raise ManifestError(
                f"{manifest_path}: output '{out.name}' shape {_shape_text(out.shape)} does not match the manifest's "
                f"{_shape_text(want)} ('shelfsight' format with {len(manifest.classes)} classes)"
            )


def _backend_options(backend: str, providers: Sequence[Any] | None, threads: int | None) -> dict[str, Any]:
    if backend == "onnxruntime":
        return {"providers": providers, "intra_op_threads": threads}
    if providers is not None or threads is not None:
        raise BackendError(f"providers and threads apply to the onnxruntime backend only, not '{backend}'")
    return {}


def _model_file(manifest_path: str | Path, manifest: Manifest, backend: str) -> Path:
    """TensorRT runs a serialized engine built for this device; every other backend runs the ONNX file."""
    if backend == "tensorrt":
        engines = [art for art in manifest.artifacts if art.role == "engine"]
        if engines:
            return resolve_artifact(manifest_path, engines[0])
        if manifest.artifact("model").path.endswith(".onnx"):
            raise ManifestError(
                f"{manifest_path}: no TensorRT engine listed for '{manifest.name}'; build one on the device with "
                "'export-model build-engine MODEL_DIR' or use --backend onnxruntime"
            )
    model_file = resolve_artifact(manifest_path, manifest.artifact("model"))
    if model_file.suffix.lower() == ".onnx":
        _check_external_data(manifest_path, manifest, model_file)
    return model_file


def _check_external_data(manifest_path: str | Path, manifest: Manifest, model_file: Path) -> None:
    """Tensors stored outside ``model.onnx`` must stay in the folder and be listed (and verified) in the manifest."""
    from shelfsight.runtime.onnx_external import OnnxParseError, external_data_locations

    try:
        references = external_data_locations(model_file)
    except (OnnxParseError, OSError) as exc:
        raise ManifestError(f"{model_file}: cannot read as an ONNX model ({exc}); refusing to load") from None
    base = PurePosixPath(manifest.artifact("model").path).parent
    listed = {PurePosixPath(art.path): art for art in manifest.artifacts}
    for tensor, location in dict.fromkeys(references):
        pure = PurePosixPath(location)
        if not location.strip() or pure.is_absolute() or ".." in pure.parts or "\\" in location:
            raise ManifestError(f"{model_file}: tensor '{tensor}' reads external data from '{location}', "
                                "outside the model folder; refusing to load")
        artifact = listed.get(base / pure)
        if artifact is None:
            raise ManifestError(f"{model_file}: tensor '{tensor}' reads external data from '{location}', which the "
                                "manifest does not list with a sha256; refusing to load")
        resolve_artifact(manifest_path, artifact)


def load_model(
    manifest_path: str | Path,
    backend: str = "onnxruntime",
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    max_det: int = 300,
) -> Detector:
    """Read the manifest, verify the model file's sha256, load it and check its tensors against the manifest."""
    manifest = load_manifest(manifest_path)
    get_decoder(manifest.output.format)  # an unsupported format fails before any model is loaded
    options = _backend_options(backend, providers, threads)
    runner = create_backend(backend, _model_file(manifest_path, manifest, backend), **options)
    runner.activate()
    try:
        check_model_against_manifest(manifest_path, manifest, runner.input_meta, runner.output_meta)
        return Detector(manifest, runner, conf_threshold, iou_threshold, max_det)
    except BaseException:
        runner.deactivate()
        raise
