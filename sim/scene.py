"""Shelf scene geometry and product designs: what is where, before anything is drawn.

Everything is in *canvas* pixels: the front-on shelf picture that one homography maps into the camera frame.
Two builders share these types: `grid_scene` (a scenario's regular shelf that fits in the frame) and
`random_scene` (training images: random rows, slots, facings, camera distance and perspective).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

Rect = tuple[float, float, float, float]  # x1, y1, x2, y2
BGR = tuple[int, int, int]

SHAPES = ("box", "bottle", "can", "bag", "jar")
SHAPE_WEIGHTS = (0.34, 0.2, 0.16, 0.16, 0.14)
LABEL_STYLES = ("stripes", "blocks", "text")

_BRANDS = (
    "Sunvale",
    "Northfield",
    "Brightleaf",
    "Copperpot",
    "Bluecrest",
    "Meadowly",
    "Oakridge",
    "Tidewater",
    "Goldgrain",
    "Redfern",
    "Silverbrook",
    "Pinehill",
    "Coralbay",
    "Ashford",
    "Willowmere",
    "Stonebridge",
)
_ITEMS = (
    "Oat Crunch",
    "Tomato Soup",
    "Sparkling Water",
    "Peanut Butter",
    "Green Tea",
    "Rice Crackers",
    "Olive Oil",
    "Dish Soap",
    "Corn Flakes",
    "Cola",
    "Pasta Sauce",
    "Coffee Beans",
    "Oat Milk",
    "Paprika Chips",
    "Honey",
    "Laundry Pods",
    "Baked Beans",
    "Granola",
    "Apple Juice",
    "Sea Salt",
)
_SIZES = ("250g", "330ml", "400g", "500g", "750ml", "1l", "1.5l", "200g", "12pk", "6pk")


@dataclass(frozen=True)
class ProductDesign:
    name: str
    shape: str
    width: float  # canvas px
    height: float
    colour: BGR
    accent: BGR
    label: BGR
    label_style: str
    seed: int  # drives the small print (mark positions) so a design always looks the same


@dataclass(frozen=True)
class SlotGeometry:
    slot_id: str
    rect: Rect  # products stand on the bottom edge; the top is the underside of the board above
    facings: int
    design: ProductDesign
    nudges: tuple[float, ...]  # per facing: horizontal offset of the product inside its cell, canvas px

    def cell(self, k: int) -> Rect:
        x1, y1, x2, y2 = self.rect
        width = (x2 - x1) / self.facings
        return (x1 + k * width, y1, x1 + (k + 1) * width, y2)

    def product_rect(self, k: int) -> Rect:
        cx1, _, cx2, cy2 = self.cell(k)
        # One pixel of shelf back stays between neighbours so removing a facing never clips the next one.
        width = min(self.design.width, cx2 - cx1 - 2.0)
        centre = (cx1 + cx2) / 2 + self.nudges[k]
        x1 = min(max(centre - width / 2, cx1 + 1.0), cx2 - 1.0 - width)
        return (x1, cy2 - self.design.height, x1 + width, cy2)


@dataclass(frozen=True)
class ShelfStyle:
    wall: BGR
    floor: BGR
    frame: BGR  # side panels and header
    back: BGR  # the dark shelf back seen through a gap
    strip: BGR  # price strip along the board edge
    tag: BGR
    pegboard: bool


@dataclass(frozen=True)
class CameraLook:
    noise_sigma: float  # 0..255 units
    blur_sigma: float
    motion_blur_px: int
    gradient_strength: float
    gradient_angle: float
    vignette: float
    brightness: float = 1.0


@dataclass(frozen=True)
class ShelfScene:
    frame_size: tuple[int, int]  # width, height
    canvas_size: tuple[int, int]
    homography: np.ndarray = field(compare=False, repr=False)  # canvas -> frame, 3x3 float64
    unit_rect: Rect
    header_rect: Rect
    board_rects: tuple[Rect, ...]
    slots: tuple[SlotGeometry, ...]
    style: ShelfStyle
    look: CameraLook
    seed: int


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> BGR:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val))
    return (round(b * 255), round(g * 255), round(r * 255))


def product_name(rng: np.random.Generator) -> str:
    return f"{rng.choice(_BRANDS)} {rng.choice(_ITEMS)} {rng.choice(_SIZES)}"


def sample_design(rng: np.random.Generator, cell_w: float, slot_h: float) -> ProductDesign:
    shape = str(rng.choice(SHAPES, p=SHAPE_WEIGHTS))
    u = rng.uniform
    if shape == "box":
        width, height = cell_w * u(0.78, 0.94), slot_h * u(0.5, 0.92)
    elif shape == "bottle":
        width = cell_w * u(0.5, 0.78)
        height = min(slot_h * u(0.78, 0.95), width * u(2.4, 4.5))
    elif shape == "can":
        width = cell_w * u(0.6, 0.85)
        height = min(width * u(1.2, 1.9), slot_h * 0.92)
    elif shape == "bag":
        width, height = cell_w * u(0.8, 0.95), slot_h * u(0.6, 0.92)
    else:  # jar
        width = cell_w * u(0.65, 0.88)
        height = min(width * u(0.95, 1.5), slot_h * 0.9)
    height = max(height, min(slot_h * 0.3, 6.0))
    light_label = rng.uniform() < 0.6
    return ProductDesign(
        name=product_name(rng),
        shape=shape,
        width=max(width, 3.0),
        height=max(height, 4.0),
        colour=_colour(rng, (0.45, 1.0), (0.35, 0.95)),
        accent=_colour(rng, (0.6, 1.0), (0.5, 1.0)),
        label=_colour(rng, (0.0, 0.15), (0.85, 1.0)) if light_label else _colour(rng, (0.3, 0.9), (0.15, 0.4)),
        label_style=str(rng.choice(LABEL_STYLES)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_style(rng: np.random.Generator) -> ShelfStyle:
    return ShelfStyle(
        wall=_colour(rng, (0.0, 0.25), (0.7, 0.92)),
        floor=_colour(rng, (0.0, 0.2), (0.35, 0.6)),
        frame=_colour(rng, (0.0, 0.3), (0.55, 0.95)) if rng.uniform() < 0.7 else _colour(rng, (0.5, 0.9), (0.35, 0.7)),
        back=_colour(rng, (0.0, 0.4), (0.1, 0.28)),
        strip=_colour(rng, (0.0, 0.15), (0.85, 1.0)) if rng.uniform() < 0.7 else _colour(rng, (0.6, 1.0), (0.7, 1.0)),
        tag=_colour(rng, (0.7, 1.0), (0.7, 1.0)),
        pegboard=bool(rng.uniform() < 0.5),
    )


def perspective(
    rng: np.random.Generator, frame_size: tuple[int, int], pad: int, corner_shift: float, rotation_deg: float
) -> np.ndarray:
    """A homography canvas -> frame: the padded canvas seen with each frame corner moved a little."""
    width, height = frame_size
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    angle = math.radians(rng.uniform(-rotation_deg, rotation_deg))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([width / 2, height / 2])
    moved = (corners - centre) @ rotation.T + centre
    moved += rng.uniform(-corner_shift, corner_shift, size=(4, 2)) * np.array([width, height])
    source = (corners + pad).astype(np.float32)
    return cv2.getPerspectiveTransform(source, moved.astype(np.float32)).astype(np.float64)


def _rows_layout(
    top: float, x1: float, x2: float, pitches: list[float], board_h: list[float]
) -> tuple[list[tuple[float, float]], list[Rect]]:
    """Per row (slot top, slot bottom) and the board front below it."""
    spans: list[tuple[float, float]] = []
    boards: list[Rect] = []
    y = top
    for pitch, board in zip(pitches, board_h, strict=True):
        spans.append((y, y + pitch - board))
        boards.append((x1, y + pitch - board, x2, y + pitch))
        y += pitch
    return spans, boards


def grid_scene(
    frame_size: tuple[int, int],
    rows: int,
    slots_per_row: int,
    facings_per_slot: int,
    seed: int,
    noise: float = 0.02,
) -> ShelfScene:
    """A scenario's shelf: a regular grid that fits inside the frame with a mild perspective."""
    rng = np.random.default_rng([seed, 1])
    width, height = frame_size
    pad = round(0.06 * max(width, height))
    unit = (pad + 0.035 * width, pad + 0.035 * height, pad + 0.965 * width, pad + 0.968 * height)
    side = max(3.0, 0.012 * (unit[2] - unit[0]))
    header_h = max(4.0, 0.045 * (unit[3] - unit[1]))
    inner_x1, inner_x2 = unit[0] + side, unit[2] - side
    pitch = (unit[3] - unit[1] - header_h) / rows
    board = min(max(4.0, 0.13 * pitch), 40.0)
    spans, boards = _rows_layout(unit[1] + header_h, inner_x1, inner_x2, [pitch] * rows, [board] * rows)
    slot_w = (inner_x2 - inner_x1) / slots_per_row
    cell_w = slot_w / facings_per_slot
    slots: list[SlotGeometry] = []
    for r, (top, bottom) in enumerate(spans):
        for s in range(slots_per_row):
            design = sample_design(rng, cell_w, bottom - top)
            nudges = tuple(float(v) for v in rng.uniform(-0.03, 0.03, facings_per_slot) * cell_w)
            rect = (inner_x1 + s * slot_w, top, inner_x1 + (s + 1) * slot_w, bottom)
            slots.append(SlotGeometry(f"R{r + 1}S{s + 1}", rect, facings_per_slot, design, nudges))
    look = CameraLook(
        noise_sigma=noise * 255.0,
        blur_sigma=0.6,
        motion_blur_px=0,
        gradient_strength=float(rng.uniform(0.04, 0.12)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        vignette=float(rng.uniform(0.05, 0.15)),
    )
    return ShelfScene(
        frame_size=(width, height),
        canvas_size=(width + 2 * pad, height + 2 * pad),
        homography=perspective(rng, frame_size, pad, corner_shift=0.012, rotation_deg=0.6),
        unit_rect=unit,
        header_rect=(unit[0], unit[1], unit[2], unit[1] + header_h),
        board_rects=tuple(boards),
        slots=tuple(slots),
        style=sample_style(rng),
        look=look,
        seed=seed,
    )


def random_scene(rng: np.random.Generator, frame_size: tuple[int, int]) -> ShelfScene:
    """A training image's shelf: random rows/slots/facings at a random camera distance and perspective."""
    width, height = frame_size
    pad = round(0.1 * max(width, height))
    # Camera distance: cell widths from ~13 px (far) to ~135 px (close) at this frame size.
    cell_w = float(math.exp(rng.uniform(math.log(13), math.log(135)))) * width / 640
    coverage = rng.uniform(0.6, 1.0) if rng.uniform() < 0.7 else rng.uniform(1.0, 2.5)
    facings_wanted = coverage * width / cell_w
    rows = int(rng.integers(3, 6))
    base_slots = int(rng.integers(4, 11))
    row_slots = [int(np.clip(base_slots + rng.integers(-2, 3), 4, 10)) for _ in range(rows)]
    mean_f = float(np.clip(facings_wanted / base_slots, 1, 4))
    row_facings = [np.clip(np.round(rng.normal(mean_f, 0.7, n)), 1, 4).astype(int) for n in row_slots]
    row_widths = [rng.uniform(0.92, 1.12, len(f)) * f * cell_w for f in row_facings]
    inner_w = max(float(w.sum()) for w in row_widths)
    pitches = [cell_w * float(rng.uniform(1.5, 2.9)) for _ in range(rows)]
    boards = [float(np.clip(0.13 * p, 3.0, 40.0)) for p in pitches]
    side = max(2.0, 0.012 * inner_w)
    header_h = max(3.0, 0.3 * cell_w)
    unit_w, unit_h = inner_w + 2 * side, header_h + sum(pitches) + 0.4 * cell_w

    def place(extent: float, size: float) -> float:
        # A unit smaller than the frame sits somewhere inside it; a larger one is seen through a window.
        low, high = (0.0, size - extent) if extent <= size else (size - extent, 0.0)
        return pad + float(rng.uniform(low, high))

    x0, y0 = place(unit_w, width), place(unit_h, height)
    unit = (x0, y0, x0 + unit_w, y0 + unit_h)
    spans, board_rects = _rows_layout(y0 + header_h, x0 + side, x0 + side + inner_w, pitches, boards)
    slots: list[SlotGeometry] = []
    for r, ((top, bottom), widths, facings) in enumerate(zip(spans, row_widths, row_facings, strict=True)):
        widths = widths * (inner_w / widths.sum())
        edges = x0 + side + np.concatenate([[0.0], np.cumsum(widths)])
        for s, count in enumerate(facings.tolist()):
            slot_cell_w = float(widths[s]) / count
            design = sample_design(rng, slot_cell_w, bottom - top)
            nudges = tuple(float(v) for v in rng.uniform(-0.05, 0.05, count) * slot_cell_w)
            rect = (float(edges[s]), top, float(edges[s + 1]), bottom)
            slots.append(SlotGeometry(f"R{r + 1}S{s + 1}", rect, count, design, nudges))
    look = CameraLook(
        noise_sigma=float(rng.uniform(0.0, 10.0)),
        blur_sigma=float(rng.uniform(0.0, 1.4)),
        motion_blur_px=int(rng.integers(3, 8)) if rng.uniform() < 0.12 else 0,
        gradient_strength=float(rng.uniform(0.0, 0.35)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        vignette=float(rng.uniform(0.0, 0.35)),
        brightness=float(rng.uniform(0.6, 1.25)),
    )
    return ShelfScene(
        frame_size=(width, height),
        canvas_size=(width + 2 * pad, height + 2 * pad),
        homography=perspective(rng, frame_size, pad, corner_shift=0.05, rotation_deg=3.0),
        unit_rect=unit,
        header_rect=(unit[0], unit[1], unit[2], unit[1] + header_h),
        board_rects=tuple(board_rects),
        slots=tuple(slots),
        style=sample_style(rng),
        look=look,
        seed=int(rng.integers(0, 2**31 - 1)),
    )
