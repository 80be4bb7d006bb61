"""Benchmark input: the video (rendered from a scenario or given), its layout, and the fixed frames decoded once.

Capture/decode is timed on its own, by reading the file through the same opener the agent's capture thread uses;
every other stage runs on frames decoded once up front, so each backend and peer sees exactly the same pixels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shelfsight.runtime.errors import ShelfSightError


class BenchInputError(ShelfSightError):
    """The benchmark's video, scenario or frame count cannot be used."""


@dataclass(frozen=True)
class BenchSource:
    video: Path
    layout: Path | None  # None: the agent's planogram-free gap mode
    description: str


@dataclass
class FixedFrames:
    images: list[np.ndarray]
    timestamps_s: list[float]
    fps: float

    @property
    def frame_size(self) -> tuple[int, int]:
        height, width = self.images[0].shape[:2]
        return width, height


def render_scenario_source(scenario_file: Path, out_dir: Path, min_frames: int) -> BenchSource:
    """Render just enough of a scenario (at least ``min_frames`` frames) into ``out_dir``."""
    from shelfsight.sim.scenario import load_scenario
    from shelfsight.sim.video import render_scenario

    scenario = load_scenario(scenario_file)
    needed_s = math.ceil(min_frames / scenario.fps) + 1
    if scenario.duration_s > needed_s:
        # Events after the cut are simply not reached; the scenario's validation is about its own duration.
        events = [event for event in scenario.events if event.t < needed_s]
        scenario = scenario.model_copy(update={"duration_s": needed_s, "events": events})
    result = render_scenario(scenario, out_dir)
    assert result.video is not None
    return BenchSource(result.video, result.layout,
                       f"scenario {scenario_file.name} ({scenario.duration_s} s rendered)")


def video_source(video: Path, layout: Path | None = None) -> BenchSource:
    """A video file; its layout is ``layout`` or a ``layout.yaml`` beside it (as ``shelf-sim render`` writes)."""
    if not video.is_file():
        raise BenchInputError(f"{video}: video file not found")
    if layout is None and (video.parent / "layout.yaml").is_file():
        layout = video.parent / "layout.yaml"
    return BenchSource(video, layout, f"video {video.name}")


def _open(video: Path) -> cv2.VideoCapture:
    # The agent's opener: the same backend selection and options a file camera gets.
    from shelfsight.shelf_agent.sources import open_capture, parse_camera

    capture = open_capture(parse_camera(str(video)))
    return capture


def decode_frames(video: Path, count: int) -> FixedFrames:
    """The first ``count`` frames, decoded once (frame times from the file's fps)."""
    capture = _open(video)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
        images: list[np.ndarray] = []
        while len(images) < count:
            ok, image = capture.read()
            if not ok or image is None:
                break
            images.append(image)
    finally:
        capture.release()
    if len(images) < count:
        raise BenchInputError(f"{video}: has {len(images)} frames, the benchmark needs {count} (lower --frames)")
    return FixedFrames(images, [i / fps for i in range(count)], float(fps))


def time_capture(video: Path, count: int, warmup: int) -> list[int]:
    """Nanoseconds per ``read()`` (demux + decode + colour conversion) for ``count`` frames after ``warmup``."""
    capture = _open(video)
    timings: list[int] = []
    try:
        for index in range(warmup + count):
            start = time.perf_counter_ns()
            ok, _ = capture.read()
            elapsed = time.perf_counter_ns() - start
            if not ok:
                raise BenchInputError(f"{video}: ended after {index} frames while timing capture")
            if index >= warmup:
                timings.append(elapsed)
    finally:
        capture.release()
    return timings
