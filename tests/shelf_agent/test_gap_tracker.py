"""Planogram-free gap tracking: gap boxes followed by position, raised after dwell, restocked on product evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.gap_tracker import GapTracker, GapTrackerConfig, greedy_match, iou_matrix
from shelfsight.shelf_agent.slot_state import SlotTransition

FPS = 10
DWELL = 10.0
GAP_A = (100.0, 50.0, 200.0, 150.0)
GAP_B = (400.0, 50.0, 480.0, 150.0)
SHELF_PRODUCTS = [(x, 50.0, x + 60.0, 150.0) for x in range(220, 400, 70)]  # always visible elsewhere


def frame(gaps=(), products=(), jitter: float = 0.0, rng=None) -> Detections:
    boxes = [(*g, 0.7, 1) for g in gaps] + [(*p, 0.9, 0) for p in (*products, *SHELF_PRODUCTS)]
    array = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    if jitter and rng is not None:
        array[:, :4] += rng.uniform(-jitter, jitter, (len(array), 4))
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(int))


def play(tracker: GapTracker, script, duration: float, start: float = 0.0, jitter: float = 0.0):
    """``script(t) -> (gaps, products)``; returns [(frame time, transition)]."""
    rng = np.random.default_rng(1)
    out: list[tuple[float, SlotTransition]] = []
    for k in range(round(start * FPS), round(duration * FPS) + 1):
        t = k / FPS
        gaps, products = script(t)
        out += [(t, tr) for tr in tracker.update(frame(gaps, products, jitter, rng), t)]
    return out


def gap_during(t0: float, t1: float, box=GAP_A, missing=()):
    def script(t: float):
        shown = t0 <= t < t1 and not any(abs(t - m) < 1e-9 for m in missing)
        return ([box] if shown else []), []

    return script


CASES = [
    # id, script, duration, expected [(event, slot_id, event_time)]
    ("persisting gap raises after dwell", gap_during(5.0, 99), 30, [("stockout", "G1", 5.0)]),
    ("one missed frame is tolerated", gap_during(5.0, 99, missing=(8.0,)), 30, [("stockout", "G1", 5.0)]),
    ("three missed frames are tolerated", gap_during(5.0, 99, missing=(8.0, 8.1, 8.2)), 30, [("stockout", "G1", 5.0)]),
    ("a transient gap does not fire", gap_during(5.0, 12.0), 40, []),
    (
        "a gap gone for longer than the tolerance restarts",
        gap_during(5.0, 99, missing=tuple(np.arange(80, 100) / 10)),
        30,
        [("stockout", "G1", 10.0)],
    ),
]


@pytest.mark.parametrize(("script", "duration", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gap_events(script, duration, expected):
    transitions = play(GapTracker(GapTrackerConfig(dwell_s=DWELL)), script, duration)
    assert [(tr.event, tr.slot_id, tr.event_time) for _, tr in transitions] == expected
    for t, tr in transitions:
        assert tr.raised_time == t
        assert tr.event_time + DWELL <= tr.raised_time <= tr.event_time + DWELL + 2.5 / FPS


def test_stockout_then_restock_on_product_evidence():
    def script(t: float):
        if t < 30:
            return [GAP_A], []
        if t < 45:
            return [], []  # a shopper in front: neither the gap nor products are visible
        return [], [(100.0, 50.0, 150.0, 150.0), (150.0, 50.0, 200.0, 150.0)]

    config = GapTrackerConfig(dwell_s=DWELL, restock_confirm_s=5.0)
    transitions = [tr for _, tr in play(GapTracker(config), script, 60)]
    assert [(tr.event, tr.slot_id, tr.event_time) for tr in transitions] == [
        ("stockout", "G1", 0.0),
        ("restocked", "G1", 45.0),
    ]
    stockout, restocked = transitions
    assert (stockout.from_state, stockout.to_state, restocked.from_state, restocked.to_state) == (
        "ok",
        "empty",
        "empty",
        "ok",
    )
    np.testing.assert_allclose(stockout.bbox, GAP_A)
    assert stockout.confidence == pytest.approx(0.7)
    assert restocked.empty_for_s == pytest.approx(45.0)
    assert restocked.raised_time == pytest.approx(50.0, abs=0.15)


def test_gap_coming_back_during_restock_cancels_it():
    def script(t: float):
        products = [(100.0, 50.0, 200.0, 150.0)]
        if t < 15 or 20 <= t < 40:
            return [GAP_A], []
        return [], products  # 15-20 s: products briefly (a hand holding one), then the gap again

    transitions = play(GapTracker(GapTrackerConfig(dwell_s=DWELL, restock_confirm_s=8.0)), script, 45)
    assert [tr.event for _, tr in transitions] == ["stockout"]


def test_two_gaps_get_stable_ids_and_jitter_does_not_split_tracks():
    def script(t: float):
        return ([GAP_A] if t >= 2 else []) + ([GAP_B] if t >= 4 else []), []

    tracker = GapTracker(GapTrackerConfig(dwell_s=DWELL))
    transitions = play(tracker, script, 30, jitter=4.0)
    assert [(tr.event, tr.slot_id) for _, tr in transitions] == [("stockout", "G1"), ("stockout", "G2")]
    assert len(tracker) == 2
    assert set(tracker.reported_gaps()) == {"G1", "G2"}
    np.testing.assert_allclose(tracker.reported_gaps()["G2"], GAP_B, atol=4.0)


def test_snapshot_restore_does_not_reraise_and_keeps_numbering():
    tracker = GapTracker(GapTrackerConfig(dwell_s=DWELL))
    play(tracker, gap_during(0.0, 99), 15)
    saved = json.loads(json.dumps(tracker.snapshot()))
    restarted = GapTracker(GapTrackerConfig(dwell_s=DWELL))
    restarted.restore(saved)

    def script(t: float):
        return [GAP_A, GAP_B], []

    transitions = play(restarted, script, 40, start=20)
    assert [(tr.event, tr.slot_id, tr.event_time) for _, tr in transitions] == [("stockout", "G2", 20.0)]
    with pytest.raises(ConfigError, match="snapshot"):
        restarted.restore({"version": 1, "reported": [{"id": "G1"}]})


def test_iou_and_greedy_matching():
    a = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [100, 100, 110, 110]], float)
    b = np.array([[21, 0, 31, 10], [0, 0, 10, 5], [1, 0, 11, 10]], float)
    iou = iou_matrix(a, b)
    assert iou.shape == (3, 3)
    assert iou[0, 1] == pytest.approx(0.5)
    assert iou[2].max() == 0.0
    rows, cols = greedy_match(iou, 0.3)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 2), (1, 0)]
    # A contested detection goes to the better track; the loser stays unmatched rather than taking a bad one.
    rows, cols = greedy_match(np.array([[0.9, 0.1], [0.8, 0.2]]), 0.3)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0)]
    rows, cols = greedy_match(np.zeros((0, 4)), 0.3)
    assert len(rows) == len(cols) == 0


def test_config_is_strict():
    with pytest.raises(ValidationError):
        GapTrackerConfig(dwell=3)  # type: ignore[call-arg]
