"""``shelf-agent detect``: detections drawn on every frame of a video, and the measured frame rate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shelfsight.runtime.annotate import draw_detections
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.model import Detector


@dataclass(frozen=True)
class DetectRunStats:
    frames: int
    wall_s: float
    detect_ms_median: float
    detections_per_frame: float

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0


def annotate_video(detector: Detector, source: Path, out: Path | None, max_frames: int | None = None) -> DetectRunStats:
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise ShelfSightError(f"{source}: OpenCV cannot open this video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    writer: cv2.VideoWriter | None = None
    detect_ms: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()
    try:
        while max_frames is None or len(detect_ms) < max_frames:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            t0 = time.perf_counter()
            detections = detector.detect(frame)
            detect_ms.append((time.perf_counter() - t0) * 1000.0)
            counts.append(len(detections))
            if out is not None:
                if writer is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
                    if not writer.isOpened():
                        raise ShelfSightError(f"{out}: cannot write video")
                writer.write(draw_detections(frame, detections, detector.manifest.classes))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if not detect_ms:
        raise ShelfSightError(f"{source}: no frame could be decoded")
    return DetectRunStats(len(detect_ms), time.perf_counter() - start, float(np.median(detect_ms)),
                          float(np.mean(counts)))
