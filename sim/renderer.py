"""The one renderer behind scenario videos and training images.

A scene is painted and warped once into two camera-space pictures, fully stocked and empty; the current stock
is kept in a base image that changes only where a facing leaves or returns. A frame is then: base (+ shoppers
pasted through their masks) -> one warpAffine for camera shake -> one addWeighted for lighting and sensor noise
(a tile from a precomputed bank). Truth boxes are cached per stock state; visibility under shoppers comes from
an integral image of the shopper mask, so nothing loops over pixels or boxes per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from shelfsight.sim.painter import Sprite, paint_shelf, product_placement
from shelfsight.sim.scene import ShelfScene

PRODUCT, GAP = 0, 1
CLASS_NAMES = ("product", "gap")
# A box is labelled only while at least this share of it is in the frame and not behind a shopper.
MIN_VISIBLE_FRACTION = 0.6


class NoiseBank:
    """Sensor noise as a few precomputed tiles (128 = no change) read at random offsets, never generated per frame."""

    def __init__(
        self, frame_size: tuple[int, int], sigma: float, rng: np.random.Generator, tiles: int = 4, margin: int = 32
    ):
        width, height = frame_size
        self.margin = margin
        self.frame_size = frame_size
        self.tiles = [self._tile(rng, sigma, (height + margin, width + margin)) for _ in range(tiles)]

    @staticmethod
    def _tile(rng: np.random.Generator, sigma: float, shape: tuple[int, int]) -> np.ndarray:
        noise = rng.standard_normal(size=(*shape, 3), dtype=np.float32)
        return np.clip(noise * np.float32(sigma) + np.float32(128.0), 0, 255).astype(np.uint8)

    def tile(self, index: int, dx: int, dy: int) -> np.ndarray:
        width, height = self.frame_size
        return self.tiles[index % len(self.tiles)][dy : dy + height, dx : dx + width]


def project(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(..., 2) canvas points -> frame points."""
    flat = np.asarray(points, np.float64).reshape(-1, 1, 2)
    return cv2.perspectiveTransform(flat, homography).reshape(np.shape(points))


def _bbox(quads: np.ndarray) -> np.ndarray:
    """(N, 4, 2) quads -> (N, 4) axis-aligned x1, y1, x2, y2."""
    return np.concatenate([quads.min(axis=1), quads.max(axis=1)], axis=1).astype(np.float32)


def visible_boxes(
    boxes: np.ndarray, frame_size: tuple[int, int], occlusion_integral: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, boxes clipped to the frame) for boxes mostly inside the frame and not behind a shopper."""
    width, height = frame_size
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6)
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    visible = np.maximum(cw, 0) * np.maximum(ch, 0)
    if occlusion_integral is not None and len(boxes):
        ix1, iy1 = np.floor(clipped[:, 0]).astype(np.intp), np.floor(clipped[:, 1]).astype(np.intp)
        ix2, iy2 = np.ceil(clipped[:, 2]).astype(np.intp), np.ceil(clipped[:, 3]).astype(np.intp)
        grid = occlusion_integral
        covered = grid[iy2, ix2] - grid[iy1, ix2] - grid[iy2, ix1] + grid[iy1, ix1]
        pixels = np.maximum((ix2 - ix1) * (iy2 - iy1), 1)
        visible = visible * (1.0 - covered / pixels)
    keep = (visible / area >= MIN_VISIBLE_FRACTION) & (cw >= 2) & (ch >= 2)
    return keep, clipped


class SceneRenderer:
    def __init__(self, scene: ShelfScene):
        self.scene = scene
        self.frame_size = scene.frame_size
        width, height = scene.frame_size
        full_canvas, empty_canvas = paint_shelf(scene)
        gain = self._gain_map()
        self.full = self._to_camera(full_canvas, gain)
        self.empty = self._to_camera(empty_canvas, gain)
        self.base = self.full.copy()
        self._work = np.empty_like(self.full)
        self._shifted = np.empty_like(self.full)
        self._out = np.empty_like(self.full)
        self._occlusion = np.zeros((height, width), np.uint8)

        homography = scene.homography
        slots = scene.slots
        corners = np.array([[[x1, y1], [x2, y1], [x2, y2], [x1, y2]] for x1, y1, x2, y2 in (s.rect for s in slots)])
        self.slot_quads = project(homography, corners).astype(np.float32)  # (slots, 4, 2) TL TR BR BL
        self._edges: list[np.ndarray] = []  # per slot (facings+1, 2, 2): each cell boundary at the slot top/bottom
        self._product_boxes: list[np.ndarray] = []
        self._cells: list[list[tuple[tuple[int, int, int, int], np.ndarray]]] = []
        for slot in slots:
            x1, y1, x2, y2 = slot.rect
            xs = np.linspace(x1, x2, slot.facings + 1)
            edges = np.stack([np.stack([xs, np.full_like(xs, y1)], 1), np.stack([xs, np.full_like(xs, y2)], 1)], 1)
            edges = project(homography, edges)
            self._edges.append(edges)
            placed = [product_placement(slot, k) for k in range(slot.facings)]
            rects = np.array([[[x, y], [x + w, y], [x + w, y + h], [x, y + h]] for x, y, w, h in placed], np.float64)
            self._product_boxes.append(_bbox(project(homography, rects)))
            self._cells.append([self._cell_mask(edges[k : k + 2]) for k in range(slot.facings)])
        self.present = [np.ones(slot.facings, bool) for slot in slots]
        self._boxes: tuple[np.ndarray, np.ndarray] | None = None

    # --- scene build -------------------------------------------------------------------------------------------
    def _gain_map(self) -> np.ndarray:
        look = self.scene.look
        width, height = self.frame_size
        nx = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        ny = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
        slope = look.gradient_strength * 0.5 * (nx * math.cos(look.gradient_angle) + ny * math.sin(look.gradient_angle))
        vignette = 1.0 - 0.5 * look.vignette * (nx**2 + ny**2)
        return (look.brightness * (1.0 + slope) * vignette).astype(np.float32)

    def _to_camera(self, canvas: np.ndarray, gain: np.ndarray) -> np.ndarray:
        look = self.scene.look
        image = cv2.warpPerspective(
            canvas, self.scene.homography, self.frame_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        if look.blur_sigma > 0.3:
            image = cv2.GaussianBlur(image, (0, 0), look.blur_sigma)
        if look.motion_blur_px > 1:
            kernel = np.full((1, look.motion_blur_px), 1.0 / look.motion_blur_px, np.float32)
            image = cv2.filter2D(image, -1, kernel)
        return np.clip(image.astype(np.float32) * gain[:, :, None] + 0.5, 0, 255).astype(np.uint8)

    def _cell_mask(self, edges: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """Frame ROI and mask of one facing cell: the quad between two consecutive cell boundaries."""
        width, height = self.frame_size
        quad = np.array([edges[0, 0], edges[1, 0], edges[1, 1], edges[0, 1]])
        x0, y0 = (int(v) for v in np.floor(quad.min(axis=0)))
        x1, y1 = (int(v) for v in np.ceil(quad.max(axis=0)) + 1)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        mask = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        if mask.size:
            # Sub-pixel vertices (shift=4) so adjacent cells tile the slot without gaps.
            points = np.round((quad - [x0, y0]) * 16).astype(np.int32)
            cv2.fillConvexPoly(mask, points, 1, cv2.LINE_8, 4)
        return (x0, y0, x1, y1), mask.astype(bool)

    # --- stock --------------------------------------------------------------------------------------------------
    def set_present(self, slot_index: int, present: np.ndarray) -> None:
        """Show exactly the facings marked True in one slot; only the cells that change are redrawn."""
        current = self.present[slot_index]
        present = np.asarray(present, bool)
        for k in np.flatnonzero(present != current):
            (x0, y0, x1, y1), mask = self._cells[slot_index][k]
            if mask.size:
                source = self.full if present[k] else self.empty
                np.copyto(self.base[y0:y1, x0:x1], source[y0:y1, x0:x1], where=mask[:, :, None])
        self.present[slot_index] = present.copy()
        self._boxes = None

    def set_facings(self, slot_index: int, count: int) -> None:
        """Facings fill a slot from the left: removals happen right-to-left, restocking left-to-right."""
        self.set_present(slot_index, np.arange(len(self.present[slot_index])) < count)

    def stock_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, xyxy) of every present product and every contiguous empty span, ignoring occlusion."""
        if self._boxes is None:
            classes: list[np.ndarray] = []
            boxes: list[np.ndarray] = []
            for index, present in enumerate(self.present):
                boxes.append(self._product_boxes[index][present])
                classes.append(np.full(int(present.sum()), PRODUCT, np.int64))
                if present.all():
                    continue
                steps = np.diff(np.concatenate([[0], (~present).astype(np.int8), [0]]))
                starts, stops = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)
                edges = self._edges[index]
                quads = np.stack([edges[starts, 0], edges[stops, 0], edges[stops, 1], edges[starts, 1]], axis=1)
                boxes.append(_bbox(quads))
                classes.append(np.full(len(starts), GAP, np.int64))
            self._boxes = (np.concatenate(classes), np.concatenate(boxes).astype(np.float32).reshape(-1, 4))
        return self._boxes

    # --- frames -------------------------------------------------------------------------------------------------
    def _paste_shoppers(self, shoppers: Sequence[Sprite]) -> None:
        width, height = self.frame_size
        np.copyto(self._work, self.base)
        self._occlusion.fill(0)
        for sprite in shoppers:
            h, w = sprite.mask.shape
            x0, y0 = max(0, sprite.x), max(0, sprite.y)
            x1, y1 = min(width, sprite.x + w), min(height, sprite.y + h)
            if x1 <= x0 or y1 <= y0:
                continue
            mask = sprite.mask[y0 - sprite.y : y1 - sprite.y, x0 - sprite.x : x1 - sprite.x]
            bgr = sprite.bgr[y0 - sprite.y : y1 - sprite.y, x0 - sprite.x : x1 - sprite.x]
            np.copyto(self._work[y0:y1, x0:x1], bgr, where=mask[:, :, None])
            np.bitwise_or(self._occlusion[y0:y1, x0:x1], mask, out=self._occlusion[y0:y1, x0:x1])

    def compose(
        self,
        shoppers: Sequence[Sprite] = (),
        gain: float = 1.0,
        noise: np.ndarray | None = None,
        shift: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame, class ids, xyxy of visible objects). The frame is a reused buffer: copy it to keep it."""
        width, height = self.frame_size
        classes, boxes = self.stock_boxes()
        source = self.base
        integral = None
        if shoppers:
            self._paste_shoppers(shoppers)
            source = self._work
            integral = cv2.integral(self._occlusion)
        keep, clipped = visible_boxes(boxes, self.frame_size, integral)
        classes, clipped = classes[keep], clipped[keep]
        dx, dy = shift
        if dx or dy:
            matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
            cv2.warpAffine(
                source,
                matrix,
                (width, height),
                dst=self._shifted,
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT_101,
            )
            source = self._shifted
            clipped = clipped + np.array([dx, dy, dx, dy], np.float32)
            np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
            np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
        if noise is not None:
            # frame * gain + (noise - 128) in one saturating pass: lighting and sensor noise together.
            cv2.addWeighted(source, gain, noise, 1.0, -128.0, dst=self._out)
        elif gain != 1.0:
            cv2.convertScaleAbs(source, dst=self._out, alpha=gain)
        else:
            np.copyto(self._out, source)
        return self._out, classes, clipped
