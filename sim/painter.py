"""Drawing: the empty and the fully stocked shelf canvas, product sprites and shopper silhouettes.

Runs once per scene (not per frame): loops over products and marks are fine here, pixels are never looped over.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shelfsight.sim.scene import BGR, ProductDesign, Rect, ShelfScene, ShelfStyle, SlotGeometry

_SKIN = ((74, 106, 141), (96, 138, 190), (120, 165, 215), (141, 185, 224), (60, 85, 110))


@dataclass(frozen=True)
class Sprite:
    """A picture with a hard mask, placed with its top-left corner at (x, y) in frame pixels."""

    bgr: np.ndarray
    mask: np.ndarray  # bool, same height/width as bgr
    x: int
    y: int


def _clip_rect(rect: Rect, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (round(v) for v in rect)
    return max(0, x1), max(0, y1), min(width, x2), min(height, y2)


def _fill(img: np.ndarray, rect: Rect, colour: BGR | np.ndarray, profile: np.ndarray | None = None) -> None:
    """Fill a rectangle, optionally shaded by a per-row brightness profile sampled over its full height."""
    x1, y1, x2, y2 = _clip_rect(rect, img.shape[1], img.shape[0])
    if x2 <= x1 or y2 <= y1:
        return
    colour_arr = np.asarray(colour, dtype=np.float32)
    if profile is None:
        img[y1:y2, x1:x2] = colour_arr.astype(np.uint8)
        return
    rows = np.interp(np.arange(y1, y2), np.linspace(rect[1], rect[3], len(profile)), profile)
    shaded = np.clip(rows[:, None] * colour_arr[None, :], 0, 255).astype(np.uint8)
    img[y1:y2, x1:x2] = shaded[:, None, :]


def _darken(colour: BGR, factor: float) -> BGR:
    return (
        min(255, round(colour[0] * factor)),
        min(255, round(colour[1] * factor)),
        min(255, round(colour[2] * factor)),
    )


def _text_marks(img: np.ndarray, rect: Rect, colour: BGR, rng: np.random.Generator, lines: int) -> None:
    """Rows of dashes that read as small print from a few metres away."""
    x1, y1, x2, y2 = rect
    if x2 - x1 < 3 or y2 - y1 < 3:
        return
    line_h = (y2 - y1) / (lines * 1.8)
    thickness = max(1, round(line_h))
    for i in range(lines):
        y = round(y1 + (i * 1.8 + 0.9) * line_h)
        x = x1
        while x < x2:
            dash = (x2 - x1) * rng.uniform(0.08, 0.3)
            end = min(x + dash, x2)
            cv2.line(img, (round(x), y), (round(end), y), colour, thickness, cv2.LINE_AA)
            x = end + (x2 - x1) * rng.uniform(0.04, 0.1)


def _draw_label(img: np.ndarray, design: ProductDesign, rect: Rect, rng: np.random.Generator) -> None:
    x1, y1, x2, y2 = rect
    w, h = x2 - x1, y2 - y1
    cv2.rectangle(img, (round(x1), round(y1)), (round(x2), round(y2)), design.label, -1)
    ink: BGR = (30, 30, 30) if sum(design.label) > 380 else (235, 235, 235)
    if design.label_style == "stripes":
        bands = int(rng.integers(2, 5))
        diagonal = rng.uniform() < 0.4
        for i in range(bands):
            t = max(1, round(h / (bands * 3)))
            yy = round(y1 + (i + 0.5) * h / bands)
            start, end = (round(x1), yy), (round(x2), yy - round(0.6 * w) if diagonal else yy)
            cv2.line(img, start, end, design.accent if i % 2 == 0 else design.colour, t, cv2.LINE_AA)
    elif design.label_style == "blocks":
        for _ in range(int(rng.integers(2, 5))):
            bx, by = x1 + rng.uniform(0, 0.6) * w, y1 + rng.uniform(0, 0.6) * h
            bw, bh = rng.uniform(0.2, 0.5) * w, rng.uniform(0.15, 0.4) * h
            colour = design.accent if rng.uniform() < 0.6 else design.colour
            cv2.rectangle(img, (round(bx), round(by)), (round(bx + bw), round(by + bh)), colour, -1)
    else:
        cv2.ellipse(
            img,
            (round(x1 + w / 2), round(y1 + 0.25 * h)),
            (max(1, round(0.3 * w)), max(1, round(0.14 * h))),
            0,
            0,
            360,
            design.accent,
            -1,
            cv2.LINE_AA,
        )
        _text_marks(
            img, (x1 + 0.12 * w, y1 + 0.45 * h, x2 - 0.12 * w, y2 - 0.08 * h), ink, rng, int(rng.integers(2, 5))
        )


def _rounded_rect(img: np.ndarray, rect: Rect, radius: float, colour: BGR | int) -> None:
    x1, y1, x2, y2 = (round(v) for v in rect)
    r = max(0, min(round(radius), (x2 - x1) // 2, (y2 - y1) // 2))
    cv2.rectangle(img, (x1 + r, y1), (x2 - r, y2), colour, -1)
    cv2.rectangle(img, (x1, y1 + r), (x2, y2 - r), colour, -1)
    if r > 0:
        for cx, cy in ((x1 + r, y1 + r), (x2 - r, y1 + r), (x1 + r, y2 - r), (x2 - r, y2 - r)):
            cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)


def product_sprite(design: ProductDesign, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(BGR uint8, alpha float32 in [0, 1]) of one product, drawn supersampled so small ones stay smooth."""
    ss = 4 if max(width, height) < 48 else 2 if max(width, height) < 120 else 1
    W, H = width * ss, height * ss
    rng = np.random.default_rng(design.seed)
    img: np.ndarray = np.empty((H, W, 3), np.uint8)
    img[:] = design.colour
    mask = np.zeros((H, W), np.uint8)
    if design.shape == "box":
        mask[:] = 255
        label = (0.08 * W, 0.14 * H, 0.92 * W, 0.86 * H)
    elif design.shape == "bottle":
        neck = (0.32 * W, 0.07 * H, 0.68 * W, 0.32 * H)
        cv2.rectangle(mask, (round(neck[0]), round(neck[1])), (round(neck[2]), round(neck[3])), 255, -1)
        shoulder = np.array([[neck[0], neck[3]], [neck[2], neck[3]], [W, 0.45 * H], [0, 0.45 * H]], np.int32)
        cv2.fillConvexPoly(mask, shoulder, 255, cv2.LINE_AA)
        _rounded_rect(mask, (0, 0.44 * H, W - 1, H - 1), 0.12 * W, 255)
        cap = (0.3 * W, 0.0, 0.7 * W, 0.1 * H)
        cv2.rectangle(mask, (round(cap[0]), 0), (round(cap[2]), round(cap[3])), 255, -1)
        cv2.rectangle(img, (round(cap[0]), 0), (round(cap[2]), round(cap[3])), _darken(design.accent, 0.8), -1)
        label = (0.0, 0.54 * H, W, 0.86 * H)
    elif design.shape == "can":
        rim = max(1, round(0.06 * H))
        cv2.rectangle(mask, (0, rim), (W - 1, H - 1 - rim), 255, -1)
        for cy in (rim, H - 1 - rim):
            cv2.ellipse(mask, (W // 2, cy), (W // 2, rim), 0, 0, 360, 255, -1, cv2.LINE_AA)
        cv2.rectangle(img, (0, 0), (W - 1, 2 * rim), (190, 190, 195), -1)
        label = (0.0, 0.2 * H, W, 0.82 * H)
    elif design.shape == "bag":
        teeth = max(3, W // max(2, 6 * ss))
        top = [(round(i * (W - 1) / teeth), round(0.05 * H if i % 2 else 0)) for i in range(teeth + 1)]
        outline = [
            *top,
            (W - 1, round(0.5 * H)),
            (round(0.97 * W), H - 1),
            (round(0.03 * W), H - 1),
            (0, round(0.5 * H)),
        ]
        cv2.fillPoly(mask, [np.array(outline, np.int32)], 255, cv2.LINE_AA)
        label = (0.1 * W, 0.25 * H, 0.9 * W, 0.8 * H)
    else:  # jar
        _rounded_rect(mask, (0, 0.13 * H, W - 1, H - 1), 0.15 * W, 255)
        cv2.rectangle(mask, (round(0.06 * W), 0), (round(0.94 * W), round(0.16 * H)), 255, -1)
        cv2.rectangle(img, (round(0.06 * W), 0), (round(0.94 * W), round(0.16 * H)), _darken(design.accent, 0.7), -1)
        label = (0.0, 0.34 * H, W, 0.82 * H)
    _draw_label(img, design, label, rng)

    xs = np.linspace(0.0, 1.0, W, dtype=np.float32)
    if design.shape in ("bottle", "can", "jar"):
        shade = 0.7 + 0.38 * np.cos((xs - 0.38) * np.pi) + 0.35 * np.exp(-(((xs - 0.28) / 0.05) ** 2))
        light: np.ndarray = np.broadcast_to(shade[None, :], (H, W))
    elif design.shape == "bag":
        crinkle = rng.uniform(0.82, 1.12, size=(5, 4)).astype(np.float32)
        light = cv2.resize(crinkle, (W, H), interpolation=cv2.INTER_CUBIC)
    else:
        light = np.broadcast_to((1.06 - 0.2 * xs)[None, :], (H, W))
    shaded = img.astype(np.float32) * light[:, :, None]
    # A darker rim makes neighbouring products of one design separable, as on a real shelf.
    rim_px = max(1, ss)
    edge = (mask > 0) & (cv2.erode(mask, np.ones((2 * rim_px + 1, 2 * rim_px + 1), np.uint8)) == 0)
    shaded[edge] *= 0.55
    img = np.clip(shaded, 0, 255).astype(np.uint8)
    alpha: np.ndarray = mask.astype(np.float32) / 255.0
    if ss > 1:
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_AREA)
    return img, alpha


def product_placement(slot: SlotGeometry, k: int) -> tuple[int, int, int, int]:
    """Integer (x, y, w, h) where facing k's sprite is pasted; truth boxes use exactly this rectangle."""
    x1, y1, x2, y2 = slot.product_rect(k)
    w, h = max(2, round(x2 - x1)), max(2, round(y2 - y1))
    return round(x1), round(y2) - h, w, h


def _paste(canvas: np.ndarray, x: int, y: int, bgr: np.ndarray, alpha: np.ndarray) -> None:
    ch, cw = canvas.shape[:2]
    h, w = alpha.shape
    x1, y1, x2, y2 = max(0, x), max(0, y), min(cw, x + w), min(ch, y + h)
    if x2 <= x1 or y2 <= y1:
        return
    a = alpha[y1 - y : y2 - y, x1 - x : x2 - x, None]
    region = canvas[y1:y2, x1:x2].astype(np.float32)
    sprite = bgr[y1 - y : y2 - y, x1 - x : x2 - x].astype(np.float32)
    canvas[y1:y2, x1:x2] = np.clip(region * (1 - a) + sprite * a + 0.5, 0, 255).astype(np.uint8)


def _slot_row(slot: SlotGeometry) -> int:
    return int(slot.slot_id[1 : slot.slot_id.index("S")])


def _paint_back(canvas: np.ndarray, rect: Rect, style: ShelfStyle, pitch: float) -> None:
    """Dark shelf back with a shadow under the board above and, on some shelves, pegboard holes."""
    _fill(canvas, rect, style.back, profile=np.array([0.45, 0.75, 0.95, 1.0, 1.0, 0.92], np.float32))
    if not style.pegboard:
        return
    x1, y1, x2, y2 = _clip_rect(rect, canvas.shape[1], canvas.shape[0])
    spacing = max(5, round(pitch / 7))
    if x2 - x1 < spacing or y2 - y1 < spacing:
        return
    tile = np.ones((spacing, spacing), np.float32)
    cv2.circle(tile, (spacing // 2, spacing // 2), max(1, spacing // 6), 0.55, -1, cv2.LINE_AA)
    reps = ((y2 - y1) // spacing + 1, (x2 - x1) // spacing + 1)
    holes = np.tile(tile, reps)[: y2 - y1, : x2 - x1]
    canvas[y1:y2, x1:x2] = (canvas[y1:y2, x1:x2] * holes[:, :, None]).astype(np.uint8)


def _paint_board(
    canvas: np.ndarray, board: Rect, slots: list[SlotGeometry], style: ShelfStyle, rng: np.random.Generator
) -> None:
    """Board front edge: a lit lip, the price strip and one price tag per slot."""
    x1, y1, x2, y2 = board
    h = y2 - y1
    _fill(canvas, board, style.strip, profile=np.array([1.1, 1.0, 0.95, 0.85], np.float32))
    _fill(canvas, (x1, y1, x2, y1 + max(1.0, 0.14 * h)), _darken(style.frame, 1.15))
    for slot in slots:
        sx1, _, sx2, _ = slot.rect
        tag_w = min(0.4 * (sx2 - sx1), 3.2 * h)
        tx1 = sx1 + 0.08 * (sx2 - sx1)
        tag = (tx1, y1 + 0.25 * h, tx1 + tag_w, y2 - 0.12 * h)
        _fill(canvas, tag, (245, 245, 245))
        _fill(canvas, (tag[0], tag[1], tag[0] + 0.18 * tag_w, tag[3]), style.tag)
        if tag_w > 8:
            _text_marks(
                canvas, (tag[0] + 0.25 * tag_w, tag[1] + 0.1 * h, tag[2] - 0.06 * tag_w, tag[3]), (25, 25, 25), rng, 1
            )


def paint_shelf(scene: ShelfScene) -> tuple[np.ndarray, np.ndarray]:
    """(fully stocked canvas, empty canvas): a missing facing shows the empty canvas in its cell."""
    style = scene.style
    rng = np.random.default_rng([scene.seed, 2])
    cw, ch = scene.canvas_size
    canvas = np.empty((ch, cw, 3), np.uint8)
    _fill(canvas, (0, 0, cw, ch), style.wall, profile=np.array([1.08, 1.0, 0.9], np.float32))
    uy2 = scene.unit_rect[3]
    _fill(canvas, (0, uy2, cw, ch), style.floor, profile=np.array([0.8, 1.0, 1.05], np.float32))
    _fill(canvas, scene.unit_rect, style.frame, profile=np.array([1.05, 0.95, 0.9], np.float32))
    hx1, hy1, hx2, hy2 = scene.header_rect
    _fill(canvas, scene.header_rect, _darken(style.tag, 0.85))
    if hy2 - hy1 > 6:
        _text_marks(
            canvas,
            (hx1 + 0.3 * (hx2 - hx1), hy1 + 0.2 * (hy2 - hy1), hx1 + 0.7 * (hx2 - hx1), hy2 - 0.2 * (hy2 - hy1)),
            (245, 245, 245),
            rng,
            1,
        )
    rows: dict[int, list[SlotGeometry]] = {}
    for slot in scene.slots:
        rows.setdefault(_slot_row(slot), []).append(slot)
    for board in scene.board_rects:
        # The board's row is the one whose slots stand on it.
        row_slots = next((s for s in rows.values() if abs(s[0].rect[3] - board[1]) < 1e-6), [])
        if row_slots:
            top = row_slots[0].rect[1]
            _paint_back(canvas, (board[0], top, board[2], board[1]), style, board[3] - top)
        _paint_board(canvas, board, row_slots, style, rng)
    empty = canvas.copy()
    for slot in scene.slots:
        sx1, sy1, sx2, sy2 = slot.rect
        if sx2 < 0 or sy2 < 0 or sx1 > cw or sy1 > ch:
            continue  # entirely off the canvas: nothing to draw
        _, _, w, h = product_placement(slot, 0)
        bgr, alpha = product_sprite(slot.design, w, h)
        for k in range(slot.facings):
            px, py, _, _ = product_placement(slot, k)
            _paste(canvas, px, py, bgr, alpha)
    return canvas, empty


def shopper_sprite(
    target: Rect, frame_size: tuple[int, int], rng: np.random.Generator, sway_px: int, blur_sigma: float = 0.0
) -> Sprite:
    """A person standing in front of `target` (frame pixels) who keeps covering it while swaying by sway_px."""
    frame_h = frame_size[1]
    radius = 5
    margin = sway_px + radius + 3
    tx1, ty1, tx2, ty2 = target[0] - margin, target[1] - margin, target[2] + margin, target[3] + margin
    tw, th = tx2 - tx1, ty2 - ty1
    head_r = max(4.0, min(0.24 * tw, 0.3 * th + 8))
    arm_w = max(3.0, 0.13 * tw)
    x0 = int(np.floor(tx1 - arm_w - 2))
    y0 = int(np.floor(ty1 - 2.1 * head_r))
    x1 = int(np.ceil(tx2 + arm_w + 2))
    y1 = max(int(np.ceil(ty2)) + 1, frame_h + sway_px)
    W, H = x1 - x0, y1 - y0
    img = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    shirt = tuple(int(v) for v in rng.integers(30, 230, 3))
    trousers = tuple(int(v) for v in rng.integers(15, 90, 3))
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    hair = tuple(int(v) for v in rng.integers(10, 70, 3))

    def local(rect: Rect) -> Rect:
        return (rect[0] - x0, rect[1] - y0, rect[2] - x0, rect[3] - y0)

    leg_w, gap = 0.42 * tw, 0.08 * tw
    for lx in (tx1 + 0.5 * tw - gap / 2 - leg_w, tx1 + 0.5 * tw + gap / 2):
        leg = local((lx, ty2 - radius, lx + leg_w, y1))
        _rounded_rect(img, leg, 0, trousers)
        _rounded_rect(mask, leg, 0, 255)
    for ax in (tx1 - arm_w + 2, tx2 - 2):
        arm = local((ax, ty1 + 0.04 * th, ax + arm_w, ty1 + 0.8 * th))
        _rounded_rect(img, arm, arm_w / 2, _darken(shirt, 0.85))
        _rounded_rect(mask, arm, arm_w / 2, 255)
        hand = local((ax, ty1 + 0.78 * th, ax + arm_w, ty1 + 0.78 * th + 1.2 * arm_w))
        _rounded_rect(img, hand, arm_w / 2, skin)
        _rounded_rect(mask, hand, arm_w / 2, 255)
    torso = local((tx1, ty1, tx2, ty2))
    _rounded_rect(img, torso, radius, shirt)
    _rounded_rect(mask, torso, radius, 255)
    if rng.uniform() < 0.4:
        stripe = max(2, round(th / 12))
        for yy in range(round(torso[1]) + stripe, round(torso[3]), 3 * stripe):
            cv2.line(img, (round(torso[0]) + radius, yy), (round(torso[2]) - radius, yy), _darken(shirt, 0.6), stripe)
    centre = (round(tx1 + tw / 2 - x0), round(ty1 - 0.95 * head_r - y0))
    cv2.circle(img, centre, round(head_r), skin, -1, cv2.LINE_AA)
    cv2.circle(mask, centre, round(head_r), 255, -1)
    cv2.ellipse(img, centre, (round(head_r), round(head_r)), 0, 180, 360, hair, -1, cv2.LINE_AA)
    # Soft body shading so the shopper is not a flat cut-out.
    light = np.linspace(1.12, 0.78, W, dtype=np.float32)[None, :, None]
    img = np.clip(img.astype(np.float32) * light, 0, 255).astype(np.uint8)
    if blur_sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur_sigma)
    return Sprite(bgr=img, mask=mask > 0, x=x0, y=y0)
