"""PNG plots of a benchmark result. matplotlib is imported here, lazily: without it the JSON and Markdown still work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.bench_report import STAGE_ORDER

COLOURS = ("#8c8c8c", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#cccccc")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_bars(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    runs = [r for r in result["runs"] if r.get("status") == "ok"]
    labels = [f"{r['variant']}\n{r['precision']} {r['backend']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(runs) + 2), 4.5))
    bottom = np.zeros(len(runs))
    for stage, colour in zip(STAGE_ORDER, COLOURS, strict=True):
        values = np.array([r["stages"].get(stage, {}).get("mean_ms", 0.0) for r in runs])
        ax.bar(labels, values, bottom=bottom, label=stage, color=colour)
        bottom += values
    ax.set_ylabel("mean ms per frame")
    ax.set_title("Where a frame's time goes (end to end, stacked by stage)")
    ax.legend(fontsize=8, loc="upper right")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        if run.get("status") != "ok":
            continue
        curves = [(f"{run['variant']} {run['backend']}", run["end_to_end_ns"], "-")]
        curves += [(f"{run['variant']} {name}", peer["end_to_end_ns"], ":")
                   for name, peer in run.get("peers", {}).items() if peer.get("status") == "ok"]
        for label, samples, style in curves:
            values = np.sort(np.asarray(samples, np.float64) / 1e6)
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=label)
    ax.set_xlabel("end-to-end latency per frame (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("Latency CDF (ours solid, peers dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def camera_scaling(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    scaling = result.get("scaling") or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for mode, style in (("per_camera", "o-"), ("batched", "s--")):
        runs = [r for r in scaling.get("runs", []) if r["mode"] == mode]
        cams = [r["cameras"] for r in runs]
        left.plot(cams, [r["fps_per_camera_min"] for r in runs], style, label=mode)
        right.plot(cams, [r["frame_age_p99_ms"] or 0 for r in runs], style, label=mode)
    left.axhline(5.0, color="grey", lw=0.8, ls=":", label="5 fps target")
    left.set_xlabel("cameras")
    left.set_ylabel("frames/s per camera (slowest camera)")
    right.set_xlabel("cameras")
    right.set_ylabel("p99 frame age (ms)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Cameras in one process ({scaling.get('variant', '?')}, {scaling.get('backend', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    written = [stage_bars(result, out_dir / "stages.png"), latency_cdf(result, out_dir / "latency_cdf.png")]
    if (result.get("scaling") or {}).get("runs"):
        written.append(camera_scaling(result, out_dir / "camera_scaling.png"))
    return written
