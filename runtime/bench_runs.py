"""Model variants x backends, each timed through the agent's own ShelfPipeline on the fixed frames.

A backend that cannot run here (no GPU, no TensorRT, no torch, no engine) is recorded as "not available" with the
reason; nothing is faked. PyTorch eager plugs into the same Detector as a Backend, so only inference differs.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.backends.base import Backend, BackendError, TensorMeta
from shelfsight.runtime.bench_frames import FixedFrames
from shelfsight.runtime.bench_stats import ResourceMeter, summarize_ns
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import Manifest, load_manifest, resolve_artifact
from shelfsight.runtime.model import Detector, load_model

PIPELINE_STAGES = ("preprocess", "infer", "postprocess", "slot_update", "event_outbox")
ALL_STAGES = ("capture_decode", *PIPELINE_STAGES)

# name -> (backend, ORT providers, threads); "torch" is handled apart.
BACKEND_TARGETS: dict[str, tuple[str, list[str] | None, int | None]] = {
    "ort-cpu-1t": ("onnxruntime", ["CPUExecutionProvider"], 1),
    "ort-cpu-2t": ("onnxruntime", ["CPUExecutionProvider"], 2),
    "ort-cuda": ("onnxruntime", ["CUDAExecutionProvider", "CPUExecutionProvider"], None),
    "ort-tensorrt-ep": ("onnxruntime", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                        None),
    "tensorrt": ("tensorrt", None, None),
    "torch-eager": ("torch", None, 2),
}
DEFAULT_BACKENDS = tuple(BACKEND_TARGETS)


@dataclass(frozen=True)
class Variant:
    name: str  # the folder relative to MODEL_DIR ("." for MODEL_DIR itself)
    manifest_path: Path
    manifest: Manifest

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def model_file(self) -> Path:
        return self.manifest_path.parent / self.manifest.artifact("model").path

    @property
    def pruned(self) -> bool:
        return self.manifest.provenance.pruning_ratio is not None or "pruned" in self.name


def find_variants(model_dir: Path) -> list[Variant]:
    """Every manifest.json under MODEL_DIR (itself included), FP32 first; rejected variants are skipped."""
    if model_dir.is_file() and model_dir.name == "manifest.json":
        model_dir = model_dir.parent
    if not model_dir.is_dir():
        raise ShelfSightError(f"{model_dir}: model folder not found")
    variants = []
    for path in sorted(model_dir.rglob("manifest.json")):
        relative = path.parent.relative_to(model_dir)
        if "rejected" in relative.parts or any(part.startswith(".") for part in relative.parts):
            continue
        name = model_dir.resolve().name if relative == Path(".") else relative.as_posix()
        variants.append(Variant(name, path, load_manifest(path)))
    if not variants:
        raise ShelfSightError(f"{model_dir}: no manifest.json found (expected a model folder from export-model)")
    return sorted(variants, key=lambda v: (v.precision != "fp32", v.pruned, v.name))


class TorchEagerBackend(Backend):
    """The manifest's PyTorch checkpoint, in eval mode on the CPU. torch is imported on activation only."""

    name = "torch"

    def __init__(self, model_path: str | Path, manifest: Manifest, threads: int | None = None) -> None:
        super().__init__(model_path)
        self.manifest = manifest
        self.threads = threads
        self._model: Any = None
        self._torch: Any = None

    def _activate_impl(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        import torch

        from shelfsight.export.model import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        self._torch = torch
        self._model, _ = load_checkpoint(self.model_path)
        spec = self.manifest.input
        inputs = {spec.name: TensorMeta(spec.name, tuple(spec.shape), np.dtype(np.float32))}
        out_name = self.manifest.output.names[0]
        outputs = {out_name: TensorMeta(out_name, (spec.shape[0], None, 4 + len(self.manifest.classes)),
                                        np.dtype(np.float32))}
        return inputs, outputs

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            output = self._model(self._torch.from_numpy(feed[self.manifest.input.name]))
        return {self.manifest.output.names[0]: output.numpy()}

    def _deactivate_impl(self) -> None:
        self._model = None


def unavailable_reason(target: str, variant: Variant) -> str | None:
    """Why ``target`` cannot run ``variant`` on this machine, or None when it can be tried."""
    backend, providers, _ = BACKEND_TARGETS[target]
    if backend == "onnxruntime" and providers:
        import onnxruntime as ort

        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            return f"not available: this onnxruntime build has no {', '.join(missing)}"
    if backend == "tensorrt":
        from shelfsight.runtime.backends.tensorrt import import_tensorrt

        try:
            import_tensorrt()
        except BackendError as exc:
            return f"not available: {exc}"
        if not any(art.role == "engine" for art in variant.manifest.artifacts):
            return "not available: no TensorRT engine in the manifest (export-model build-engine on the device)"
    if backend == "torch":
        if importlib.util.find_spec("torch") is None:
            return "not available: torch is not installed"
        if variant.precision != "fp32":
            return "not applicable: PyTorch eager is the FP32 reference"
        if not any(art.role == "checkpoint" for art in variant.manifest.artifacts):
            return "not available: no checkpoint artifact in the manifest"
    return None


def open_target(target: str, variant: Variant, conf_threshold: float, iou_threshold: float) -> Detector:
    backend, providers, threads = BACKEND_TARGETS[target]
    if backend == "torch":
        checkpoint = resolve_artifact(variant.manifest_path, variant.manifest.artifact("checkpoint"))
        runner = TorchEagerBackend(checkpoint, variant.manifest, threads)
        runner.activate()
        return Detector(variant.manifest, runner, conf_threshold, iou_threshold)
    return load_model(variant.manifest_path, backend=backend, providers=providers, threads=threads,
                      conf_threshold=conf_threshold, iou_threshold=iou_threshold)


def make_pipeline(detector: Detector, layout_path: Path | None, frame_size: tuple[int, int], work_dir: Path) -> Any:
    """The agent's pipeline (``build_pipeline``) with its outbox and journal in ``work_dir``; returns it and closers."""
    from shelfsight.shelf_agent.agent import build_pipeline
    from shelfsight.shelf_agent.config import AgentConfig
    from shelfsight.shelf_agent.journal import Journal
    from shelfsight.shelf_agent.layout import load_layout
    from shelfsight.shelf_agent.outbox import Outbox

    config = AgentConfig(layout=layout_path)
    layout = load_layout(layout_path) if layout_path is not None else None
    outbox = Outbox(work_dir / "outbox.sqlite", max_messages=config.outbox.max_messages,
                    max_bytes=config.outbox.max_bytes)
    journal = Journal(work_dir / "journal.sqlite")
    pipeline = build_pipeline(config, detector, layout, frame_size, outbox, journal, time_origin=time.time())
    return pipeline, (outbox, journal)


def agent_thresholds() -> tuple[float, float]:
    from shelfsight.shelf_agent.config import ModelConfig

    defaults = ModelConfig()
    return defaults.conf_threshold, defaults.iou_threshold


def time_pipeline(
    detector: Detector, frames: FixedFrames, capture_ns: list[int], layout: Path | None, warmup: int
) -> dict[str, Any]:
    """Warm up on a throwaway pipeline, then time every frame through a fresh one exactly as the agent calls it."""
    with tempfile.TemporaryDirectory(prefix="shelf-bench-") as tmp:
        warm_dir, run_dir = Path(tmp) / "warm", Path(tmp) / "run"
        warm_dir.mkdir()
        run_dir.mkdir()
        scratch, closers = make_pipeline(detector, layout, frames.frame_size, warm_dir)
        for i in range(min(warmup, len(frames.images))):
            scratch.process(frames.images[i], frames.timestamps_s[i])
        for closer in closers:
            closer.close()
        pipeline, closers = make_pipeline(detector, layout, frames.frame_size, run_dir)
        per_stage: dict[str, list[int]] = {stage: [] for stage in PIPELINE_STAGES}
        process_ns: list[int] = []
        detections: list[int] = []
        alerts = 0
        with ResourceMeter() as meter:
            for image, ts in zip(frames.images, frames.timestamps_s, strict=True):
                start = time.perf_counter_ns()
                result = pipeline.process(image, ts)
                process_ns.append(time.perf_counter_ns() - start)
                for stage in PIPELINE_STAGES:
                    per_stage[stage].append(result.stage_ns.get(stage, 0))
                detections.append(len(result.detections))
                alerts += len(result.alerts)
        for closer in closers:
            closer.close()
    return stage_report(per_stage, process_ns, capture_ns, meter, detections, alerts)


def stage_report(
    per_stage: dict[str, list[int]], process_ns: list[int], capture_ns: list[int], meter: ResourceMeter,
    detections: list[int], alerts: int = 0,
) -> dict[str, Any]:
    """Per-stage summaries, end to end (= this frame's capture/decode + the pipeline's wall time), throughput."""
    process = np.asarray(process_ns, np.int64)
    capture = np.asarray(capture_ns[: len(process)], np.int64)
    end_to_end = process + capture
    accounted = sum(np.asarray(v, np.int64) for v in per_stage.values())
    stages = {"capture_decode": summarize_ns(capture)}
    stages.update({stage: summarize_ns(values) for stage, values in per_stage.items()})
    stages["python_glue"] = summarize_ns(np.maximum(process - accounted, 0))
    total_s = end_to_end.sum() / 1e9
    return {
        "status": "ok",
        "frames": len(process),
        "stages": stages,
        "process": summarize_ns(process),
        "end_to_end": summarize_ns(end_to_end),
        "end_to_end_ns": end_to_end.tolist(),
        "throughput_fps": round(len(process) / total_s, 2) if total_s > 0 else 0.0,
        "pipeline_efficiency": round(float(np.sum(per_stage["infer"]) / end_to_end.sum()), 4)
        if "infer" in per_stage and end_to_end.sum() else None,
        "resources": {**meter.as_dict(), "cpu_ms_per_frame": round(meter.cpu_s * 1000 / max(len(process), 1), 2)},
        "detections_per_frame": detections,
        "alerts": alerts,
    }
