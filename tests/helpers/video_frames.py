"""Decoding a test video with real OpenCV, frame by frame."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np


def video_frames(video: Path, step: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, BGR image) of every ``step``-th frame, from the first, until the video ends."""
    capture = cv2.VideoCapture(str(video))
    assert capture.isOpened(), f"OpenCV cannot open {video}"
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                return
            if index % step == 0:
                yield index, image
            index += 1
    finally:
        capture.release()
