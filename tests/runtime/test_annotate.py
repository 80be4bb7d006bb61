"""Annotation draws each class in its own colour, with labels, where the boxes are."""

from __future__ import annotations

import numpy as np

from shelfsight.runtime.annotate import class_colors, draw_detections
from shelfsight.runtime.detections import Detections

DETS = Detections(
    xyxy=np.array([[20, 30, 120, 90], [150, 100, 250, 180]], np.float32),
    confidence=np.array([0.91, 0.42]),
    class_id=np.array([0, 1]),
)


def test_boxes_are_drawn_in_their_class_colour() -> None:
    frame = np.zeros((200, 300, 3), np.uint8)
    out = draw_detections(frame, DETS, ["product", "gap"], show_labels=False)
    assert out is frame  # in place by default
    colors = class_colors(2)
    assert not np.array_equal(colors[0], colors[1])
    np.testing.assert_array_equal(frame[60, 20], colors[0])  # left edge of box 0, mid-height
    np.testing.assert_array_equal(frame[140, 250], colors[1])  # right edge of box 1
    assert frame[60, 70].sum() == 0 and frame[5, 5].sum() == 0  # inside and outside stay untouched


def test_labels_and_copy_mode() -> None:
    frame = np.zeros((200, 300, 3), np.uint8)
    plain = draw_detections(frame, DETS, ["product", "gap"], show_labels=False, copy=True)
    labelled = draw_detections(frame, DETS, ["product"], copy=True)  # class 1 has no name: 'class 1'
    assert frame.sum() == 0  # copy=True leaves the input alone
    label_area = (slice(0, 27), slice(20, 120))  # above box 0, where its label goes
    assert plain[label_area].sum() == 0 and labelled[label_area].sum() > 0


def test_no_detections_leaves_the_frame_alone() -> None:
    frame = np.full((50, 50, 3), 7, np.uint8)
    assert draw_detections(frame, Detections.empty(), ["a"]) is frame
    assert (frame == 7).all()
