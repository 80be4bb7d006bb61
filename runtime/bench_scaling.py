"""N cameras in one process: N capture threads (the agent's, replaying files in real time, newest frame wins) feeding
one loop that processes each camera at most ``fps_cap`` times per second of source time, like ``Agent.run``.

Two ways to run the detector: one ``detect`` call per camera (what each camera's ShelfPipeline does on its own), or
one ``detect_batch`` call over every camera that has a frame due, whose results the cameras' pipelines then take
instead of calling the model themselves. Everything after detection is each camera's own ShelfPipeline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.bench_runs import Variant, make_pipeline, open_target
from shelfsight.runtime.detections import Detections
from shelfsight.runtime.manifest import Manifest
from shelfsight.runtime.model import Detector

MODES = ("per_camera", "batched")


class PrecomputedDetector:
    """Stands in for a camera's Detector in batched mode: ``detect`` hands over the batch result for this camera."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.stage_ns: dict[str, int] = {}
        self.result: Detections | None = None

    def detect(self, image: np.ndarray) -> Detections:
        assert self.result is not None, "batched mode sets the result before process()"
        result, self.result = self.result, None
        return result


def camera_files(video: Path, count: int, work_dir: Path) -> list[Path]:
    """``count`` separate video files (links to, or copies of, one recording): one decoder per camera."""
    files = []
    for index in range(count):
        target = work_dir / f"camera-{index + 1}{video.suffix}"
        if not target.exists():
            try:
                os.link(video, target)
            except OSError:
                shutil.copyfile(video, target)
        files.append(target)
    return files


def run_cameras(
    detector: Detector, videos: list[Path], layout: Path | None, mode: str, duration_s: float, fps_cap: float,
) -> dict[str, Any]:
    from shelfsight.shelf_agent.capture import CaptureOptions, CaptureThread, ReplayMode
    from shelfsight.shelf_agent.sources import parse_camera

    options = CaptureOptions(replay=ReplayMode.REALTIME, loop=True)
    captures = [CaptureThread(parse_camera(str(video)), options) for video in videos]
    views = [PrecomputedDetector(detector.manifest) for _ in videos]
    processed = [0] * len(videos)
    last_ts: list[float | None] = [None] * len(videos)
    ages_ms: list[float] = []
    min_interval = 1.0 / fps_cap
    pipelines: list[Any] = [None] * len(videos)
    closers: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="shelf-bench-cams-") as tmp:
        for capture in captures:
            capture.start()
        started = time.monotonic()
        try:
            while time.monotonic() - started < duration_s:
                due = []
                for index, capture in enumerate(captures):
                    frame = capture.read(timeout=0)
                    if frame is None:
                        continue
                    previous = last_ts[index]
                    if previous is None or frame.timestamp_s - previous >= min_interval - 1e-6:
                        last_ts[index] = frame.timestamp_s
                        due.append((index, frame))
                if not due:
                    time.sleep(0.001)
                    continue
                if mode == "batched":
                    for (index, _), result in zip(due, detector.detect_batch([f.image for _, f in due]), strict=True):
                        views[index].result = result
                for index, frame in due:
                    if pipelines[index] is None:
                        work = Path(tmp) / f"cam{index}"
                        work.mkdir()
                        height, width = frame.image.shape[:2]
                        runner = views[index] if mode == "batched" else detector
                        pipelines[index], opened = make_pipeline(runner, layout, (width, height), work)
                        closers.extend(opened)
                    pipelines[index].process(frame.image, frame.timestamp_s)
                    ages_ms.append(frame.age_s * 1000.0)
                    processed[index] += 1
            wall = time.monotonic() - started
        finally:
            for capture in captures:
                capture.stop()
            dropped = [capture.stats.frames_dropped for capture in captures]
            for closer in closers:
                closer.close()
    per_camera = [count / wall for count in processed]
    return {
        "cameras": len(videos),
        "mode": mode,
        "wall_s": round(wall, 2),
        "fps_per_camera_min": round(min(per_camera), 2),
        "fps_per_camera_mean": round(float(np.mean(per_camera)), 2),
        "frame_age_p50_ms": round(float(np.percentile(ages_ms, 50)), 1) if ages_ms else None,
        "frame_age_p99_ms": round(float(np.percentile(ages_ms, 99)), 1) if ages_ms else None,
        "frames_dropped_by_capture": int(sum(dropped)),
    }


def run_scaling(
    variant: Variant, target: str, video: Path, layout: Path | None, camera_counts: tuple[int, ...],
    duration_s: float, fps_cap: float, conf: float, iou: float,
) -> dict[str, Any]:
    detector = open_target(target, variant, conf, iou)
    runs = []
    try:
        detector.detect(np.zeros((720, 1280, 3), np.uint8))  # warm the session before the first timed camera
        with tempfile.TemporaryDirectory(prefix="shelf-bench-videos-") as tmp:
            videos = camera_files(video, max(camera_counts), Path(tmp))
            for count in camera_counts:
                for mode in MODES:
                    runs.append(run_cameras(detector, videos[:count], layout, mode, duration_s, fps_cap))
    finally:
        detector.close()
    return {
        "variant": variant.name,
        "backend": target,
        "fps_cap": fps_cap,
        "duration_s_per_run": duration_s,
        "model_batch": detector.max_batch,
        "note": "a fixed-batch model runs detect_batch in chunks of its batch size"
        if detector.max_batch else "dynamic batch: one inference call per round",
        "runs": runs,
    }


def cameras_sustained(scaling: dict[str, Any], fps: float = 5.0, tolerance: float = 0.95) -> int:
    """The most cameras at which every camera got at least ``tolerance * fps`` frames/s, in either mode."""
    best = 0
    for run in scaling.get("runs", []):
        if run["fps_per_camera_min"] >= tolerance * fps:
            best = max(best, run["cameras"])
    return best
