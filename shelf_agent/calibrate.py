"""``shelf-agent calibrate``: a shelf layout from one fully stocked reference frame.

Rows come from the vertical clustering of product boxes; within a row, neighbouring facings that look alike
(colour histogram and size) form one slot. Histograms, not mean colours: two different products often share a
mean colour (white label on purple vs white label on green), and a histogram does not mind a box a few pixels off.
Slot boundaries sit halfway between neighbouring products; a slot spans from the
underside of the board above to the board it stands on. A PNG with the slots drawn goes next to the YAML so a person
can check it before the agent trusts it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.layout import FrameSize, ShelfLayout, SlotSpec, save_layout
from shelfsight.shelf_agent.zones import product_gap_class_ids


@dataclass(frozen=True)
class CalibrationOptions:
    min_confidence: float = 0.4
    facings_per_slot: int | None = None  # fixed grouping instead of appearance
    appearance_threshold: float = 0.46  # Bhattacharyya distance of neighbouring facings' histograms: a new slot
    size_threshold: float = 0.5  # relative width/height change that, with a half-threshold colour change, does too
    store_id: str = "demo-store"
    camera_id: str = "cam-1"


def split_rows(centers_y: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Row index per box (0 = top): a new row starts where sorted centres jump by more than half a box height."""
    order = np.argsort(centers_y)
    jumps = np.diff(centers_y[order]) > 0.5 * float(np.median(heights))
    rows_sorted = np.concatenate([[0], np.cumsum(jumps)])
    rows = np.empty_like(rows_sorted)
    rows[order] = rows_sorted
    return rows


def _histograms(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hsv = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)
    hue_sat = cv2.calcHist([hsv], [0, 1], None, [18, 8], [0, 180, 0, 256])
    bgr = cv2.calcHist([crop], [0, 1, 2], None, [6, 6, 6], [0, 256, 0, 256, 0, 256])
    return _unit(hue_sat.ravel()), _unit(bgr.ravel())


def _unit(values: np.ndarray) -> np.ndarray:
    return (values / max(float(np.linalg.norm(values)), 1e-12)).astype(np.float32)


def appearance(frame: np.ndarray, xyxy: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hue-saturation and BGR histograms of each box's inner 80 %: the features that tell SKUs apart."""
    h, w = frame.shape[:2]
    feats = []
    for x1, y1, x2, y2 in xyxy.astype(int):  # one small ROI per product, once per calibration
        dx, dy = (x2 - x1) // 10, (y2 - y1) // 10
        top, left = max(y1 + dy, 0), max(x1 + dx, 0)
        crop = frame[top : min(max(y2 - dy, top + 1), h), left : min(max(x2 - dx, left + 1), w)]
        if crop.size == 0:
            crop = np.zeros((1, 1, 3), np.uint8)
        feats.append(_histograms(np.ascontiguousarray(crop)))
    return feats


def neighbour_distances(feats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean Bhattacharyya distance (0 same .. 1 disjoint) of the two histograms of facing i and i + 1."""
    method = cv2.HISTCMP_BHATTACHARYYA
    return np.array(
        [(cv2.compareHist(a[0], b[0], method) + cv2.compareHist(a[1], b[1], method)) / 2 for a, b in pairwise(feats)],
        np.float32,
    )


def group_facings(distances: np.ndarray, sizes: np.ndarray, options: CalibrationOptions) -> np.ndarray:
    """Slot index per facing of one row (facings sorted left to right), from neighbour appearance distances and
    box sizes (width, height)."""
    n = len(sizes)
    if options.facings_per_slot:
        return np.arange(n) // options.facings_per_slot
    size_change = np.abs(np.diff(sizes, axis=0)) / np.maximum(np.maximum(sizes[:-1], sizes[1:]), 1.0)
    # Size alone is a weak cue (detector boxes of one product vary by a third); with some colour change it counts.
    new_slot = (distances > options.appearance_threshold) | (
        (size_change.max(axis=1) > options.size_threshold) & (distances > options.appearance_threshold / 2)
    )
    return np.concatenate([[0], np.cumsum(new_slot)])


def layout_from_detections(frame: np.ndarray, detections: Detections, product_class: int,
                           options: CalibrationOptions) -> ShelfLayout:
    products = detections[(detections.class_id == product_class) & (detections.confidence >= options.min_confidence)]
    if len(products) < 2:
        raise ShelfSightError(f"calibration needs a fully stocked shelf: only {len(products)} products detected")
    height, width = frame.shape[:2]
    boxes = products.xyxy
    rows = split_rows(products.center[:, 1], boxes[:, 3] - boxes[:, 1])
    row_ids = np.unique(rows)
    bottoms = np.array([boxes[rows == r, 3].max() for r in row_ids])
    pitch = float(np.median(np.diff(bottoms))) if len(bottoms) > 1 else float(np.ptp(boxes[:, 1::2])) * 1.2
    board = 0.1 * pitch  # shelf boards are about a tenth of the row pitch
    slots: list[SlotSpec] = []
    for r_index, r in enumerate(row_ids):
        in_row = boxes[rows == r]
        in_row = in_row[np.argsort(in_row[:, 0])]
        sizes = np.stack([in_row[:, 2] - in_row[:, 0], in_row[:, 3] - in_row[:, 1]], axis=1)
        groups = group_facings(neighbour_distances(appearance(frame, in_row)), sizes, options)
        bottom = float(bottoms[r_index])
        top = float(bottoms[r_index - 1]) + board if r_index > 0 else max(0.0, bottom - pitch + board)
        # Boundaries halfway between neighbouring products; the outer edges mirror the inner spacing.
        gaps = (in_row[1:, 0] - in_row[:-1, 2]) if len(in_row) > 1 else np.array([0.0])
        half_gap = max(float(np.median(gaps)), 0.0) / 2
        mids = (in_row[1:, 0] + in_row[:-1, 2]) / 2
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            first, last = members[0], members[-1]
            x1 = float(mids[first - 1]) if first > 0 else float(in_row[first, 0]) - half_gap
            x2 = float(mids[last]) if last < len(in_row) - 1 else float(in_row[last, 2]) + half_gap
            x1, x2 = max(0.0, x1), min(float(width), x2)
            slots.append(SlotSpec(
                id=f"R{r_index + 1}S{len([s for s in slots if s.id.startswith(f'R{r_index + 1}S')]) + 1}",
                polygon=[(x1, top), (x2, top), (x2, bottom), (x1, bottom)],
                min_facings=len(members),
            ))
    return ShelfLayout(store_id=options.store_id, camera_id=options.camera_id,
                       frame_size=FrameSize(width=width, height=height), slots=slots)


def draw_layout(frame: np.ndarray, layout: ShelfLayout) -> np.ndarray:
    canvas = frame.copy()
    for slot in layout.slots:
        poly = np.round(np.asarray(slot.polygon)).astype(np.int32)
        cv2.polylines(canvas, [poly], True, (0, 255, 255), 2, cv2.LINE_AA)
        x, y = poly[:, 0].min() + 3, poly[:, 1].min() + 16
        cv2.putText(canvas, f"{slot.id} x{slot.min_facings}", (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 255, 255), 1, cv2.LINE_AA)
    return canvas


def read_reference_frame(source: str, skip: int = 0) -> np.ndarray:
    """An image file, or frame ``skip`` of any camera source the agent accepts."""
    path = Path(source)
    if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"}:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ShelfSightError(f"{source}: cannot read the reference image")
        return image
    from shelfsight.shelf_agent.sources import open_capture, parse_camera

    capture = open_capture(parse_camera(source))
    frame: np.ndarray | None = None
    try:
        for _ in range(skip + 1):
            ok, frame = capture.read()
            if not ok or frame is None:
                raise ShelfSightError(f"{source}: no frame could be read for calibration")
    finally:
        capture.release()
    assert frame is not None
    return frame


def calibrate_main(argv: list[str]) -> int:
    from shelfsight.runtime.model import load_model
    from shelfsight.shelf_agent.agent import bundled_model_dir

    p = argparse.ArgumentParser(prog="shelf-agent calibrate",
                                description="Build layout.yaml from a fully stocked reference frame.")
    p.add_argument("--camera", required=True, help="reference image, video file or camera source")
    p.add_argument("--out", type=Path, required=True, help="layout.yaml to write (a .png is written beside it)")
    p.add_argument("--model", type=Path)
    p.add_argument("--skip-frames", type=int, default=0, help="use this frame of a video/camera (auto exposure)")
    p.add_argument("--facings-per-slot", type=int, help="group facings by count instead of by appearance")
    p.add_argument("--store-id", default="demo-store")
    p.add_argument("--camera-id", default="cam-1")
    args = p.parse_args(argv)
    frame = read_reference_frame(args.camera, args.skip_frames)
    with load_model(args.model or bundled_model_dir(), conf_threshold=0.3) as detector:
        detections = detector.detect(frame)
        product_class, _ = product_gap_class_ids(detector.manifest.classes)
    options = CalibrationOptions(facings_per_slot=args.facings_per_slot, store_id=args.store_id,
                                 camera_id=args.camera_id)
    layout = layout_from_detections(frame, detections, product_class, options)
    save_layout(layout, args.out)
    picture = args.out.with_suffix(".png")
    cv2.imwrite(str(picture), draw_layout(frame, layout))
    rows = len({s.id.split("S")[0] for s in layout.slots})
    print(f"{len(layout.slots)} slots in {rows} rows -> {args.out} (check {picture})")
    return 0
