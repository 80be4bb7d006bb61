"""SlotZones: counts, coverage, confidences and gap boxes per slot, checked by hand and against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ConfigError, ManifestError, ShelfSightError
from shelfsight.shelf_agent.layout import ShelfLayout
from shelfsight.shelf_agent.zones import SlotZones, product_gap_class_ids

PRODUCT, GAP, OTHER = 0, 1, 2


def layout_of(polygons: dict[str, list[tuple[float, float]]], width: int, height: int) -> ShelfLayout:
    slots = [{"id": slot_id, "polygon": polygon} for slot_id, polygon in polygons.items()]
    return ShelfLayout(store_id="s1", camera_id="c1", frame_size={"width": width, "height": height}, slots=slots)


def rect(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def dets(*boxes: tuple[float, float, float, float, float, int]) -> Detections:
    if not boxes:
        return Detections.empty()
    array = np.array(boxes, dtype=np.float64)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(int))


# Two 200x100 slots side by side in a 400x100 frame. Box edges are multiples of 5 px, so every grid below
# (1, 1.25 and 5 px cells) represents them exactly and the expected values are exact.
TWO_SLOTS = layout_of({"R1S1": rect(0, 0, 200, 100), "R1S2": rect(200, 0, 400, 100)}, 400, 100)
NAN = float("nan")

HAND_CASES = [
    # id, boxes (x1, y1, x2, y2, conf, class), product_count, gap_count, product_cov, gap_cov, product_conf,
    # gap_conf, gap_bbox per slot
    ("nothing", [], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [[NAN] * 4, [NAN] * 4]),
    (
        "product left half",
        [(0, 0, 100, 100, 0.8, PRODUCT)],
        [1, 0],
        [0, 0],
        [0.5, 0],
        [0, 0],
        [0.8, 0],
        [0, 0],
        [[NAN] * 4, [NAN] * 4],
    ),
    (
        "overlapping products count once in coverage",
        [(0, 0, 100, 100, 0.4, PRODUCT), (50, 0, 150, 100, 0.9, PRODUCT)],
        [2, 0],
        [0, 0],
        [0.75, 0],
        [0, 0],
        [0.9, 0],
        [0, 0],
        [[NAN] * 4, [NAN] * 4],
    ),
    (
        "box straddling two slots is counted where its centre is",
        [(150, 0, 260, 100, 0.6, PRODUCT)],
        [0, 1],
        [0, 0],
        [0.25, 0.3],
        [0, 0],
        [0, 0.6],
        [0, 0],
        [[NAN] * 4, [NAN] * 4],
    ),
    (
        "gap fills the right slot",
        [(200, 0, 400, 100, 0.7, GAP), (0, 0, 200, 100, 0.9, PRODUCT)],
        [1, 0],
        [0, 1],
        [1, 0],
        [0, 1],
        [0.9, 0],
        [0, 0.7],
        [[NAN] * 4, [200, 0, 400, 100]],
    ),
    (
        "one gap box spanning both slots belongs to both, clipped",
        [(100, 0, 400, 100, 0.5, GAP)],
        [0, 0],
        [0, 1],
        [0, 0],
        [0.5, 1],
        [0, 0],
        [0.5, 0.5],
        [[100, 0, 200, 100], [200, 0, 400, 100]],
    ),
    (
        "a small gap belongs to its own slot only",
        [(180, 20, 220, 80, 0.3, GAP)],
        [0, 0],
        [0, 1],
        [0, 0],
        [0.06, 0.06],
        [0, 0],
        [0, 0.3],
        [[NAN] * 4, [200, 20, 220, 80]],
    ),
    (
        "other classes are ignored, boxes leaving the frame are clipped",
        [(0, 0, 200, 100, 0.9, OTHER), (-50, 0, 50, 100, 0.5, PRODUCT)],
        [1, 0],
        [0, 0],
        [0.25, 0],
        [0, 0],
        [0.5, 0],
        [0, 0],
        [[NAN] * 4, [NAN] * 4],
    ),
]


@pytest.mark.parametrize("grid_width", [400, 320, 80])
@pytest.mark.parametrize(
    ("boxes", "n_prod", "n_gap", "cov_prod", "cov_gap", "conf_prod", "conf_gap", "gap_bbox"),
    [case[1:] for case in HAND_CASES],
    ids=[case[0] for case in HAND_CASES],
)
def test_measure_matches_hand_computed_values(
    grid_width, boxes, n_prod, n_gap, cov_prod, cov_gap, conf_prod, conf_gap, gap_bbox
):
    zones = SlotZones(TWO_SLOTS, grid_width=grid_width)
    obs = zones.measure(dets(*boxes))
    assert obs.slot_ids == ("R1S1", "R1S2")
    np.testing.assert_array_equal(obs.product_count, n_prod)
    np.testing.assert_array_equal(obs.gap_count, n_gap)
    np.testing.assert_allclose(obs.product_coverage, cov_prod, atol=1e-6)
    np.testing.assert_allclose(obs.gap_coverage, cov_gap, atol=1e-6)
    np.testing.assert_allclose(obs.product_confidence, conf_prod, atol=1e-6)
    np.testing.assert_allclose(obs.gap_confidence, conf_gap, atol=1e-6)
    np.testing.assert_allclose(obs.gap_bbox, np.array(gap_bbox, dtype=np.float32), atol=1e-4)
    np.testing.assert_allclose(obs.slot_bbox, [[0, 0, 200, 100], [200, 0, 400, 100]])


def test_class_ids_come_from_the_manifest_names():
    zones = SlotZones(TWO_SLOTS, product_class=1, gap_class=0)  # a model trained with the other order
    obs = zones.measure(dets((0, 0, 100, 100, 0.9, 1), (200, 0, 400, 100, 0.9, 0)))
    np.testing.assert_array_equal(obs.product_count, [1, 0])
    np.testing.assert_array_equal(obs.gap_count, [0, 1])
    assert product_gap_class_ids(["gap", "product"]) == (1, 0)
    assert product_gap_class_ids(["person", "product", "gap"]) == (1, 2)
    with pytest.raises(ManifestError, match="'gap'"):
        product_gap_class_ids(["product", "price_tag"])


@pytest.mark.parametrize(("frame_w", "frame_h"), [(800, 200), (200, 50), (1000, 250)])
def test_frames_of_another_size_scale_the_layout(frame_w, frame_h):
    boxes = [(0, 0, 100, 100, 0.8, PRODUCT), (150, 0, 260, 100, 0.6, PRODUCT), (200, 0, 400, 100, 0.7, GAP)]
    reference = SlotZones(TWO_SLOTS).measure(dets(*boxes))
    s = frame_w / 400
    scaled = [(x1 * s, y1 * s, x2 * s, y2 * s, c, k) for x1, y1, x2, y2, c, k in boxes]
    zones = SlotZones(TWO_SLOTS, (frame_w, frame_h))
    obs = zones.measure(dets(*scaled))
    np.testing.assert_array_equal(obs.product_count, reference.product_count)
    np.testing.assert_array_equal(obs.gap_count, reference.gap_count)
    np.testing.assert_allclose(obs.product_coverage, reference.product_coverage, atol=0.02)
    np.testing.assert_allclose(obs.gap_coverage, reference.gap_coverage, atol=0.02)
    np.testing.assert_allclose(obs.slot_bbox, reference.slot_bbox * s, rtol=1e-6)
    np.testing.assert_allclose(obs.gap_bbox[1], reference.gap_bbox[1] * s, rtol=1e-5)


def test_a_frame_with_another_aspect_ratio_is_refused():
    with pytest.raises(ConfigError, match="aspect ratio"):
        SlotZones(TWO_SLOTS, (400, 400))


def test_a_slot_hidden_by_a_later_slot_is_refused():
    layout = layout_of({"R1S1": rect(0, 0, 100, 100), "R1S2": rect(0, 0, 200, 100)}, 400, 100)
    with pytest.raises(ConfigError, match="R1S1"):
        SlotZones(layout)


def test_trigger_gives_the_slot_of_each_box_centre():
    zones = SlotZones(TWO_SLOTS)
    index = zones.trigger(dets((0, 0, 10, 10, 1, 0), (390, 90, 400, 100, 1, 1), (500, 0, 600, 10, 1, 0)))
    np.testing.assert_array_equal(index, [0, 1, -1])


def convex_mask(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """Reference rasterization: pixel centres on the inner side of every edge of a convex polygon."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = np.ones((height, width), bool)
    signed = 0.0
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        signed += x0 * y1 - x1 * y0
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside &= cross * np.sign(signed) >= 0
    return inside


def test_random_scene_agrees_with_a_full_resolution_brute_force():
    width, height = 640, 360
    rng = np.random.default_rng(3)
    polygons = {}
    for row in range(2):
        for col in range(4):
            x0, y0 = col * 160 + 4, row * 180 + 6
            # Trapezoids: a camera looking slightly up at the shelf.
            polygons[f"R{row + 1}S{col + 1}"] = [(x0 + 6, y0), (x0 + 146, y0), (x0 + 152, y0 + 166), (x0, y0 + 166)]
    layout = layout_of(polygons, width, height)
    xy = rng.uniform(-20, 620, (300, 2)) * [1, 0.56]
    wh = rng.uniform(10, 90, (300, 2))
    detections = Detections(np.hstack([xy, xy + wh]), rng.uniform(0.2, 1, 300), rng.integers(0, 3, 300))
    obs = SlotZones(layout).measure(detections)

    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    for i, polygon in enumerate(polygons.values()):
        slot = convex_mask(np.array(polygon), width, height)
        for cls, coverage, count in (
            (PRODUCT, obs.product_coverage, obs.product_count),
            (GAP, obs.gap_coverage, obs.gap_count),
        ):
            union = np.zeros((height, width), bool)
            centres_in = 0
            for (x1, y1, x2, y2), c in zip(detections.xyxy, detections.class_id, strict=True):
                if c != cls:
                    continue
                union |= (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
                cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
                centres_in += bool(0 <= cx < width and 0 <= cy < height and slot[cy, cx])
            expected = (union & slot).sum() / slot.sum()
            assert coverage[i] == pytest.approx(expected, abs=0.03), (i, cls)
            # Centres within a grid cell of the slot edge may land either way.
            assert abs(int(count[i]) - centres_in) <= 1, (i, cls)


def test_mean_colour_per_slot_and_frame_checks():
    zones = SlotZones(TWO_SLOTS)
    frame = np.zeros((100, 400, 3), np.uint8)
    frame[:, :200] = (10, 20, 200)
    frame[:, 200:] = (90, 90, 90)
    obs = zones.measure(Detections.empty(), frame)
    assert obs.mean_color is not None
    np.testing.assert_allclose(obs.mean_color, [[10, 20, 200], [90, 90, 90]], atol=1e-3)
    assert zones.measure(Detections.empty()).mean_color is None
    with pytest.raises(ShelfSightError, match="does not match"):
        zones.measure(Detections.empty(), np.zeros((100, 300, 3), np.uint8))


def test_adjacency_links_touching_slots_only():
    polygons = {f"R1S{c + 1}": rect(c * 100 + 2, 2, c * 100 + 98, 98) for c in range(4)}
    polygons["R2S1"] = rect(2, 300, 98, 396)  # far below the first row
    zones = SlotZones(layout_of(polygons, 400, 400))
    adjacency = zones.adjacency
    assert adjacency[0, 1] and adjacency[1, 2] and adjacency[2, 3]
    assert not adjacency[0, 2] and not adjacency[0, 4] and not adjacency.diagonal().any()
    np.testing.assert_array_equal(adjacency, adjacency.T)
