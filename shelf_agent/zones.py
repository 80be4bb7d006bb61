"""Slot geometry: which detections fall in which shelf slot, and how much of each slot they cover.

``SlotZones`` is immutable geometry in the spirit of supervision's ``PolygonZone``: everything that depends only
on the layout (a slot-index label map on a coarse grid, slot areas, bounding boxes, adjacency) is computed once;
``measure(detections)`` turns one frame's detections into a ``SlotObservation`` with numpy only, no per-box or
per-slot Python loop. Slot *state* lives in ``slot_state.py``; publishing lives elsewhere.

Coverage is measured on a grid of at most ``grid_width`` cells across the slots' region: a cell counts as covered
when its centre lies inside a box, and a slot's coverage is covered cells / slot cells, so the error is at most
one cell row/column along each box edge (about 1-3 % of a slot at the default resolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ConfigError, ManifestError, ShelfSightError
from shelfsight.shelf_agent.layout import ShelfLayout

PRODUCT_CLASS_NAME = "product"
GAP_CLASS_NAME = "gap"
# A frame whose aspect ratio differs more than this from the layout's is a different camera view, not a rescale.
_MAX_ASPECT_MISMATCH = 0.02
# Slots whose bounding boxes, grown by this fraction of their size, touch are neighbours (occlusion grouping).
_ADJACENCY_GROWTH = 0.15
# A gap box that covers this fraction of a slot's bounding box belongs to the slot even if its centre is elsewhere.
_GAP_OVERLAP_FOR_SLOT = 0.3
# About this many pixels are sampled for the per-slot mean colours.
_COLOR_SAMPLES = 8192


class ClassRoles:
    """Which of a model's classes count as ``product`` and which as ``gap``.

    A third-party model names its classes its own way (``object``, ``sku``, ``empty``, or dozens of SKUs): the
    config lists the names per role and ``apply`` rewrites detections to class 0 (product) and 1 (gap), dropping
    every other class, so slot geometry and trackers never see a foreign class id."""

    PRODUCT, GAP = 0, 1

    def __init__(self, classes: Sequence[str], product: Sequence[str] = (PRODUCT_CLASS_NAME,),
                 gap: Sequence[str] = (GAP_CLASS_NAME,)) -> None:
        names = list(classes)
        for role, wanted in (("product", product), ("gap", gap)):
            unknown = [name for name in wanted if name not in names]
            if not wanted or unknown:
                raise ManifestError(
                    f"model classes {names[:20]}{' ...' if len(names) > 20 else ''} lack {role} class(es) "
                    f"{list(unknown or wanted)}: name them with model.{role}_classes (--{role}-classes)")
        overlap = set(product) & set(gap)
        if overlap:
            raise ConfigError(f"classes {sorted(overlap)} are both product and gap")
        self.lut = np.full(len(names), -1, np.int64)
        self.lut[[names.index(n) for n in product]] = self.PRODUCT
        self.lut[[names.index(n) for n in gap]] = self.GAP
        self.identity = len(names) == 2 and self.lut.tolist() == [0, 1]

    def apply(self, detections: Detections) -> Detections:
        if self.identity or not len(detections):
            return detections
        role = self.lut[detections.class_id]
        keep = role >= 0
        return Detections(detections.xyxy[keep], detections.confidence[keep], role[keep])


def product_gap_class_ids(classes: Sequence[str]) -> tuple[int, int]:
    """Class ids of ``product`` and ``gap`` from a manifest's class names (never assume 0 and 1)."""
    names = list(classes)
    missing = [name for name in (PRODUCT_CLASS_NAME, GAP_CLASS_NAME) if name not in names]
    if missing:
        raise ManifestError(f"model classes {names} lack {missing}: slot tracking needs 'product' and 'gap'")
    return names.index(PRODUCT_CLASS_NAME), names.index(GAP_CLASS_NAME)


@dataclass(frozen=True)
class SlotObservation:
    """What one frame's detections say about every slot; arrays are indexed like ``slot_ids``."""

    slot_ids: tuple[str, ...]
    product_count: np.ndarray  # (S,) int32, product boxes whose centre is in the slot
    gap_count: np.ndarray  # (S,) int32, gap boxes whose centre is in the slot
    product_coverage: np.ndarray  # (S,) float32 in [0, 1], union of product boxes / slot area
    gap_coverage: np.ndarray  # (S,) float32 in [0, 1], union of gap boxes / slot area
    product_confidence: np.ndarray  # (S,) float32, max over the slot's product boxes, 0 if none
    gap_confidence: np.ndarray  # (S,) float32, max over the slot's gap boxes, 0 if none
    gap_bbox: np.ndarray  # (S, 4) float32 frame px, union of the slot's gap boxes clipped to the slot; NaN if none
    slot_bbox: np.ndarray  # (S, 4) float32 frame px
    mean_color: np.ndarray | None = None  # (S, 3) float32 BGR mean over the slot, when a frame was given

    def __len__(self) -> int:
        return len(self.slot_ids)


class SlotZones:
    """Precomputed slot geometry for one camera; ``measure`` is the per-frame entry point."""

    def __init__(
        self,
        layout: ShelfLayout,
        frame_size: tuple[int, int] | None = None,
        *,
        product_class: int = 0,
        gap_class: int = 1,
        grid_width: int = 320,
    ) -> None:
        """``frame_size`` = (width, height) of the frames the detections come from; defaults to the layout's."""
        layout_w, layout_h = layout.frame_size.width, layout.frame_size.height
        frame_w, frame_h = frame_size if frame_size is not None else (layout_w, layout_h)
        if frame_w <= 0 or frame_h <= 0:
            raise ConfigError(f"frame size must be positive, got {frame_w}x{frame_h}")
        scale_x, scale_y = frame_w / layout_w, frame_h / layout_h
        if abs(scale_x / scale_y - 1.0) > _MAX_ASPECT_MISMATCH:
            raise ConfigError(
                f"layout for {layout.camera_id} is {layout_w}x{layout_h} but frames are {frame_w}x{frame_h}: "
                "the aspect ratio differs, recalibrate the layout for this camera view"
            )
        if grid_width < 8:
            raise ConfigError(f"grid_width must be at least 8, got {grid_width}")
        if product_class == gap_class:
            raise ConfigError(f"product and gap class ids must differ, both are {product_class}")

        self.layout = layout
        self.frame_size = (int(frame_w), int(frame_h))
        self.scale = (scale_x, scale_y)
        self.product_class = int(product_class)
        self.gap_class = int(gap_class)
        self.slot_ids: tuple[str, ...] = tuple(slot.id for slot in layout.slots)
        self.min_facings = np.array([slot.min_facings for slot in layout.slots], dtype=np.int32)

        polygons = [np.asarray(slot.polygon, dtype=np.float64) * np.array([scale_x, scale_y]) for slot in layout.slots]
        self.polygons: tuple[np.ndarray, ...] = tuple(p.astype(np.float32) for p in polygons)
        mins = np.array([p.min(axis=0) for p in polygons])
        maxs = np.array([p.max(axis=0) for p in polygons])
        self.slot_bbox = np.clip(np.hstack([mins, maxs]), 0, [frame_w, frame_h, frame_w, frame_h]).astype(np.float32)
        self.slot_area_px = np.array([abs(cv2.contourArea(p.astype(np.float32))) for p in polygons], np.float32)

        # The grid covers only the slots' region: nothing outside a slot is ever measured.
        x0, y0 = np.floor(self.slot_bbox[:, :2].min(axis=0))
        x1, y1 = np.ceil(self.slot_bbox[:, 2:].max(axis=0))
        self._origin = np.array([x0, y0, x0, y0], dtype=np.float32)
        roi_w, roi_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cells_x = int(min(grid_width, roi_w))
        cells_y = max(1, round(roi_h * cells_x / roi_w))
        self._cells = (cells_x, cells_y)
        self._cell_scale = np.array([cells_x / roi_w, cells_y / roi_h] * 2, dtype=np.float32)
        self._roi = (int(x0), int(y0), int(np.ceil(roi_w)), int(np.ceil(roi_h)))

        self.label_map = self._rasterize(polygons)
        flat = self.label_map.ravel()
        self._inside = np.flatnonzero(flat).astype(np.intp)
        self._inside_labels = flat[self._inside].astype(np.intp) - 1
        n_slots = len(self.slot_ids)
        self.slot_cells = np.bincount(self._inside_labels, minlength=n_slots).astype(np.float32)
        hidden = [self.slot_ids[i] for i in np.flatnonzero(self.slot_cells == 0)]
        if hidden:
            raise ConfigError(
                f"slots {hidden} of {layout.camera_id} cover no grid cell: too small, or hidden by later slots"
            )
        self.adjacency = self._adjacency()
        # Coverage counts live in a (cells_y + 1, cells_x + 1, 2) difference array, channel 0 = product, 1 = gap;
        # its integral image has one leading zero row and column, so cell (y, x) reads at (y + 1, x + 1). The
        # slot cells of both planes are grouped by (plane, slot) so one ``reduceat`` counts the covered ones.
        ys, xs = np.divmod(self._inside, cells_x)
        summed_index = ((ys + 1) * (cells_x + 2) + xs + 1) * 2
        order = np.argsort(self._inside_labels, kind="stable")
        self._summed_cells = np.concatenate([summed_index[order], summed_index[order] + 1])
        slot_starts = np.concatenate([[0], np.cumsum(self.slot_cells.astype(np.intp))[:-1]])
        self._summed_starts = np.concatenate([slot_starts, slot_starts + len(self._inside)]).astype(np.intp)
        self._diff = np.zeros((cells_y + 1, cells_x + 1, 2), dtype=np.float32)
        self._color_pixels, self._color_starts = self._color_samples(ys, xs)

    def __len__(self) -> int:
        return len(self.slot_ids)

    def _rasterize(self, polygons: list[np.ndarray]) -> np.ndarray:
        """Label map: 0 = no slot, i + 1 = slot i; a later slot wins where polygons overlap."""
        cells_x, cells_y = self._cells
        label_map = np.zeros((cells_y, cells_x), dtype=np.int16)
        shift = 4  # sub-cell vertex precision for fillPoly
        for index, polygon in enumerate(polygons):
            # fillPoly treats integer coordinates as pixel centres; cell i's centre is at (i + 0.5) / scale.
            grid = (polygon - self._origin[:2]) * self._cell_scale[:2] - 0.5
            points = np.round(grid * (1 << shift)).astype(np.int32)
            cv2.fillPoly(label_map, [points], index + 1, lineType=cv2.LINE_8, shift=shift)
        return label_map

    def _adjacency(self) -> np.ndarray:
        box = self.slot_bbox
        grow = (box[:, 2:] - box[:, :2]) * _ADJACENCY_GROWTH
        grown = np.hstack([box[:, :2] - grow, box[:, 2:] + grow])
        overlap_x = (grown[:, None, 0] <= grown[None, :, 2]) & (grown[None, :, 0] <= grown[:, None, 2])
        overlap_y = (grown[:, None, 1] <= grown[None, :, 3]) & (grown[None, :, 1] <= grown[:, None, 3])
        adjacency = overlap_x & overlap_y
        np.fill_diagonal(adjacency, False)
        return adjacency

    def _grid_boxes(self, xyxy: np.ndarray) -> np.ndarray:
        """Box edges -> half-open cell ranges [x1, x2) x [y1, y2) of the cells whose centre lies inside."""
        cells_x, cells_y = self._cells
        grid = (xyxy - self._origin) * self._cell_scale
        return np.clip(np.ceil(grid - 0.5), 0, [cells_x, cells_y, cells_x, cells_y]).astype(np.intp)

    def trigger(self, detections: Detections) -> np.ndarray:
        """Slot index (into ``slot_ids``) of each detection's box centre, -1 outside every slot."""
        if len(detections) == 0:
            return np.zeros(0, dtype=np.intp)
        cells_x, cells_y = self._cells
        centre = (detections.center - self._origin[:2]) * self._cell_scale[:2]
        cx = np.floor(centre[:, 0]).astype(np.intp)
        cy = np.floor(centre[:, 1]).astype(np.intp)
        inside = (cx >= 0) & (cx < cells_x) & (cy >= 0) & (cy < cells_y)
        labels = np.zeros(len(detections), dtype=np.intp)
        labels[inside] = self.label_map[cy[inside], cx[inside]]
        return labels - 1

    def measure(self, detections: Detections, frame: np.ndarray | None = None) -> SlotObservation:
        """Per-slot counts, coverage, confidences and gap boxes of one frame; ``frame`` adds mean colours."""
        n_slots = len(self.slot_ids)
        is_product = detections.class_id == self.product_class
        is_gap = detections.class_id == self.gap_class
        keep = is_product | is_gap
        xyxy = detections.xyxy[keep]
        confidence = detections.confidence[keep]
        plane = is_gap[keep].astype(np.intp)  # 0 = product, 1 = gap
        slot = self.trigger(detections[keep])

        # Counts and max confidence by box centre, both classes in one (2, S + 1) table; column S = outside.
        column = np.where(slot >= 0, slot, n_slots)
        flat_index = plane * (n_slots + 1) + column
        counts = np.bincount(flat_index, minlength=2 * (n_slots + 1)).reshape(2, n_slots + 1)
        best_flat = np.zeros(2 * (n_slots + 1), dtype=np.float32)
        np.maximum.at(best_flat, flat_index, confidence)
        best = best_flat.reshape(2, n_slots + 1)

        coverage = self._coverage(xyxy, plane)
        gap_confidence, gap_bbox = self._gap_boxes(xyxy[plane == 1], confidence[plane == 1], slot[plane == 1])
        gap_confidence = np.maximum(gap_confidence, best[1, :n_slots])
        return SlotObservation(
            slot_ids=self.slot_ids,
            product_count=counts[0, :n_slots].astype(np.int32),
            gap_count=counts[1, :n_slots].astype(np.int32),
            product_coverage=coverage[0],
            gap_coverage=coverage[1],
            product_confidence=best[0, :n_slots],
            gap_confidence=gap_confidence,
            gap_bbox=gap_bbox,
            slot_bbox=self.slot_bbox,
            mean_color=None if frame is None else self._mean_color(frame),
        )

    def _coverage(self, xyxy: np.ndarray, plane: np.ndarray) -> np.ndarray:
        """(2, S) covered fraction of each slot by the union of product (row 0) and gap (row 1) boxes."""
        n_slots = len(self.slot_ids)
        diff = self._diff
        diff.fill(0)
        if len(xyxy):
            # 2-D difference array: +1 at each box's top-left, -1/-1/+1 at the other corners; its integral
            # image then gives, per cell, how many boxes contain the cell's centre (exact in float32).
            cells = self._grid_boxes(xyxy)
            x1, y1, x2, y2 = cells.T
            cols = self._cells[0] + 1
            corners = 2 * np.concatenate([y1 * cols + x1, y1 * cols + x2, y2 * cols + x1, y2 * cols + x2])
            corners += np.tile(plane, 4)
            signs = np.repeat(np.array([1, -1, -1, 1], dtype=np.float32), len(xyxy))
            np.add.at(diff.reshape(-1), corners, signs)
        summed = cv2.integral(diff, sdepth=cv2.CV_32F)
        covered = summed.reshape(-1)[self._summed_cells] > 0.5
        counts = np.add.reduceat(covered, self._summed_starts, dtype=np.int32)
        return (counts.reshape(2, n_slots) / self.slot_cells).astype(np.float32)

    def _gap_boxes(self, xyxy: np.ndarray, confidence: np.ndarray, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Max confidence and clipped union box of the gap boxes belonging to each slot.

        A gap box belongs to the slot holding its centre and to every slot it covers substantially, so one
        detector box spanning two empty slots counts for both.
        """
        n_slots = len(self.slot_ids)
        if len(xyxy) == 0:
            return np.zeros(n_slots, np.float32), np.full((n_slots, 4), np.nan, np.float32)
        box = self.slot_bbox
        overlap_x = np.minimum(xyxy[:, None, 2], box[None, :, 2]) - np.maximum(xyxy[:, None, 0], box[None, :, 0])
        overlap_y = np.minimum(xyxy[:, None, 3], box[None, :, 3]) - np.maximum(xyxy[:, None, 1], box[None, :, 1])
        inter = np.clip(overlap_x, 0, None) * np.clip(overlap_y, 0, None)  # (G, S)
        box_area = np.clip(box[:, 2:] - box[:, :2], 1e-6, None).prod(axis=1)
        belongs = (inter / box_area >= _GAP_OVERLAP_FOR_SLOT) | (slot[:, None] == np.arange(n_slots))
        belongs &= inter > 0
        # Few (box, slot) pairs belong together: reduce over those pairs only.
        rows, cols = np.nonzero(belongs)
        confidence_max = np.zeros(n_slots, np.float32)
        np.maximum.at(confidence_max, cols, confidence[rows])
        union = np.full((n_slots, 4), np.nan, np.float32)
        union_lo = np.full((n_slots, 2), np.inf, np.float32)
        union_hi = np.full((n_slots, 2), -np.inf, np.float32)
        np.minimum.at(union_lo, cols, np.maximum(xyxy[rows, :2], box[cols, :2]))
        np.maximum.at(union_hi, cols, np.minimum(xyxy[rows, 2:], box[cols, 2:]))
        has_gap = np.isfinite(union_lo[:, 0])
        union[has_gap, :2] = union_lo[has_gap]
        union[has_gap, 2:] = union_hi[has_gap]
        return confidence_max, union

    def _color_samples(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat frame-pixel indices at (a subset of) the slot cells' centres, grouped by slot, and each slot's start.

        A slot's mean colour from a few hundred point samples is as good a change cue as a full average and
        costs a gather instead of a resize of the whole frame; grouping the samples by slot lets one
        ``np.add.reduceat`` sum them (a weighted bincount over every channel costs about three times as much).
        """
        n_slots = len(self.slot_ids)
        stride = max(1, int(np.sqrt(len(xs) / _COLOR_SAMPLES)))
        pick = ((ys % stride) == 0) & ((xs % stride) == 0)
        if np.bincount(self._inside_labels[pick], minlength=n_slots).min() == 0:
            pick[:] = True  # a slot too thin for the stride: sample every cell
        labels = self._inside_labels[pick]
        counts = np.bincount(labels, minlength=n_slots)
        self._color_counts = counts.astype(np.float32)
        frame_w, frame_h = self.frame_size
        px = np.clip((self._origin[0] + (xs[pick] + 0.5) / self._cell_scale[0]).astype(np.intp), 0, frame_w - 1)
        py = np.clip((self._origin[1] + (ys[pick] + 0.5) / self._cell_scale[1]).astype(np.intp), 0, frame_h - 1)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        return (py * frame_w + px)[order], starts

    def _mean_color(self, frame: np.ndarray) -> np.ndarray:
        frame_w, frame_h = self.frame_size
        if frame.ndim != 3 or frame.shape[:2] != (frame_h, frame_w) or frame.shape[2] != 3:
            raise ShelfSightError(
                f"frame of shape {frame.shape} does not match the zones' {frame_w}x{frame_h} BGR frame size"
            )
        samples = frame.reshape(-1, 3)[self._color_pixels]  # (K, 3), grouped by slot
        sums = np.add.reduceat(samples, self._color_starts, axis=0, dtype=np.uint32)
        return (sums / self._color_counts[:, None]).astype(np.float32)
