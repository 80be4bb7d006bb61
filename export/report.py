"""Measured figures for each exported variant, and the report that shows them: report.json, report.md, report.png.

Latency is measured, never inferred from MACs: a pruned layer count or an INT8 graph only counts as faster if ONNX
Runtime runs it faster on this CPU. Every variant is timed the same way (same threads, same input, median of many
runs after a warm-up), interleaved so a neighbour's load on a shared machine hits all variants alike.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.errors import ShelfSightError


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int

    def as_manifest(self) -> dict[str, float]:
        """Keys for ``Metrics.latency_ms`` of the manifest."""
        return {
            f"ort_cpu_{self.threads}t_median": round(self.median_ms, 3),
            f"ort_cpu_{self.threads}t_p90": round(self.p90_ms, 3),
        }


@dataclass
class VariantResult:
    """One exported model and everything measured about it."""

    name: str  # "fp32", "int8", "pruned-fp32", "pruned-int8"
    precision: str
    folder: str
    model_bytes: int
    parent: str | None = None
    params: int | None = None
    macs: int | None = None
    latency: LatencyStats | None = None
    map50: float | None = None
    map50_95: float | None = None
    parent_map50: float | None = None
    fp32_map50: float | None = None  # the original FP32 model's: what the gate compares against
    gated: bool = False
    passed: bool | None = None
    int8_kernels: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def map50_drop(self) -> float | None:
        """Loss against the direct parent (INT8 vs its FP32 model, pruned FP32 vs the original FP32)."""
        if self.map50 is None or self.parent_map50 is None:
            return None
        return self.parent_map50 - self.map50

    @property
    def map50_drop_vs_fp32(self) -> float | None:
        """Loss against the original FP32 model: the accuracy gate."""
        if self.map50 is None or self.fp32_map50 is None:
            return None
        return self.fp32_map50 - self.map50


def _session(onnx_path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
        if meta.type != "tensor(float)":
            raise ShelfSightError(f"latency measurement feeds float32 inputs; '{meta.name}' is {meta.type}")
        feed[meta.name] = rng.random(shape, dtype=np.float32)
    return feed


def measure_ort_latency(
    onnx_paths: Sequence[str | Path], threads: int = 1, runs: int = 50, warmup: int = 10, seed: int = 0
) -> list[LatencyStats]:
    """Median ONNX Runtime CPU latency of each model, timed round-robin (one run of each model per round).

    The order inside each round is shuffled (seeded), so a neighbour's load burst or a cache effect does not always
    hit the same model.
    """
    if runs < 1 or warmup < 0 or threads < 1:
        raise ShelfSightError(f"latency: runs >= 1, warmup >= 0 and threads >= 1 required (got {runs}, {warmup})")
    sessions = [_session(Path(p), threads) for p in onnx_paths]
    feeds = [_feed(s, seed) for s in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    order = np.random.default_rng(seed)
    for _ in range(runs):
        for i in order.permutation(len(sessions)):
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            samples[i].append((time.perf_counter() - start) * 1000.0)
    return [
        LatencyStats(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            min_ms=float(np.min(ms)),
            runs=runs,
            threads=threads,
        )
        for ms in samples
    ]


def _fmt(value: float | int | None, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value if scale == 1.0 else value / scale, spec)


def _ratio(result: VariantResult, baseline: VariantResult | None) -> str:
    if baseline is None or result.latency is None or baseline.latency is None:
        return "-"
    return f"{result.latency.median_ms / baseline.latency.median_ms:.3f}"


def _is_agreement(accuracy: dict[str, Any] | None) -> bool:
    return bool(accuracy) and accuracy.get("mode") == "agreement"  # type: ignore[union-attr]


def render_markdown(
    results: Sequence[VariantResult],
    settings: dict[str, Any],
    verdict: str,
    accuracy: dict[str, Any] | None = None,
) -> str:
    baseline = next((r for r in results if r.name == "fp32"), None)
    threads = next((r.latency.threads for r in results if r.latency is not None), None)
    agreement = _is_agreement(accuracy)
    if agreement:
        assert accuracy is not None
        scored = (
            f"**Accuracy: {accuracy['label']}.** mAP50 / mAP50-95 below are each variant's agreement with the FP32 "
            f"model: scored against FP32's own {accuracy['pseudo_truth_boxes']} detections (conf >= "
            f"{accuracy['pseudo_truth_conf']}) on {accuracy['images']} image(s) of `{accuracy['source']}`"
            + (" not used for calibration" if accuracy.get("held_out_from_calibration") else "")
            + ". FP32 scored against itself is the ceiling (1.0, or a little less when its own lower-confidence "
            "detections outrank pseudo-truth boxes); this is agreement, not accuracy on labels."
        )
    else:
        scored = "mAP on the validation set (labels), runtime ORT backend."
    prefix = "agreement " if agreement else ""
    lines = [
        "# ShelfSight export report",
        "",
        f"**Verdict:** {verdict}",
        "",
        scored,
        "",
        f"Latency: ONNX Runtime CPU, {threads} thread(s), median of the measured runs (see report.json), "
        f"on `{platform.processor() or platform.machine()}`.",
        "",
        "| variant | parent | precision | size (MB) | params | MACs (G) | latency median (ms) | min (ms) | x FP32 "
        f"| {prefix}mAP50 | {prefix}mAP50-95 | mAP50 drop vs parent | vs FP32 | gate |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        gate = "-" if not r.gated else ("pass" if r.passed else "**REJECTED**")
        lines.append(
            f"| {r.name} | {r.parent or '-'} | {r.precision} | {_fmt(r.model_bytes, '.2f', 1e6)} "
            f"| {_fmt(r.params, ',d')} "
            f"| {_fmt(r.macs, '.3f', 1e9)} | {_fmt(r.latency.median_ms if r.latency else None, '.2f')} "
            f"| {_fmt(r.latency.min_ms if r.latency else None, '.2f')} "
            f"| {_ratio(r, baseline)} | {_fmt(r.map50, '.4f')} | {_fmt(r.map50_95, '.4f')} "
            f"| {_fmt(r.map50_drop, '+.4f')} | {_fmt(r.map50_drop_vs_fp32, '+.4f')} | {gate} |"
        )
    notes = [(r.name, note) for r in results for note in ([r.int8_kernels] if r.int8_kernels else []) + r.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {note}" for name, note in notes]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def render_chart(results: Sequence[VariantResult], path: Path, map_title: str = "mAP50") -> Path:
    """Three bar charts side by side: model size, latency, mAP50. Uses the Agg canvas: no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in results]
    panels = [
        ("model size (MB)", [r.model_bytes / 1e6 for r in results]),
        ("latency (ms, median)", [r.latency.median_ms if r.latency else 0.0 for r in results]),
        (map_title, [r.map50 or 0.0 for r in results]),
    ]
    colors = ["#4c72b0" if r.precision == "fp32" else "#dd8452" for r in results]
    figure = Figure(figsize=(4.2 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    for index, (title, values) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), index)
        bars = axis.bar(names, values, color=colors)
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(
                f"{value:.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        if title == map_title:
            axis.set_ylim(0, 1.05)
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_report(
    results: Sequence[VariantResult],
    folder: str | Path,
    settings: dict[str, Any],
    verdict: str,
    accuracy: dict[str, Any] | None = None,
) -> tuple[Path, Path, Path]:
    """``accuracy`` says how mAP was measured (``{"mode": "labels" | "agreement", "label": ...}``); it is written at
    the top of report.json and report.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": "shelfsight.export_report/1",
        "verdict": verdict,
        "accuracy": accuracy or {"mode": "labels"},
        "machine": {
            "processor": platform.processor(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "settings": settings,
        "variants": [
            {**asdict(r), "map50_drop": r.map50_drop, "map50_drop_vs_fp32": r.map50_drop_vs_fp32} for r in results
        ],
    }
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    md_path = folder / "report.md"
    md_path.write_text(render_markdown(results, settings, verdict, accuracy), encoding="utf-8")
    title = "agreement mAP50 vs FP32 (no labels)" if _is_agreement(accuracy) else "mAP50"
    png_path = render_chart(results, folder / "report.png", title)
    return json_path, md_path, png_path
