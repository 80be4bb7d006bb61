"""Slot state machine driven by synthetic detection sequences with frame timestamps (no wall clock)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from pydantic import ValidationError

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.layout import ShelfLayout
from shelfsight.shelf_agent.slot_state import SlotStateConfig, SlotStateMachine, SlotTransition
from shelfsight.shelf_agent.zones import SlotZones

FPS = 10
DWELL = 10.0
ROWS, COLS, SLOT_W, SLOT_H = 2, 4, 200, 100


def shelf(min_facings: dict[str, int] | None = None) -> ShelfLayout:
    slots = []
    for r in range(ROWS):
        for c in range(COLS):
            slot_id = f"R{r + 1}S{c + 1}"
            x, y = c * SLOT_W, r * SLOT_H
            polygon = [(x, y), (x + SLOT_W, y), (x + SLOT_W, y + SLOT_H), (x, y + SLOT_H)]
            slots.append({"id": slot_id, "polygon": polygon, "min_facings": (min_facings or {}).get(slot_id, 1)})
    return ShelfLayout(
        store_id="s1", camera_id="c1", frame_size={"width": COLS * SLOT_W, "height": ROWS * SLOT_H}, slots=slots
    )


def slot_boxes(slot_id: str, look: str) -> list[tuple[float, float, float, float, float, int]]:
    """What the detector sees in one slot, like the simulator's truth: facings left to right, one gap box over
    the missing ones. 'ok' 3 facings, 'two', 'low' 1 facing, 'empty' a gap only, 'none' nothing (a shopper in
    front), 'partly hidden' 1 facing and nothing else (the shopper hides the rest)."""
    r, c = int(slot_id[1]) - 1, int(slot_id[3]) - 1
    x, y = c * SLOT_W, r * SLOT_H
    facings = {"ok": 3, "two": 2, "low": 1, "partly hidden": 1}.get(look, 0)
    boxes = [(x + 5 + k * 65, y + 5, x + 65 + k * 65, y + 95, 0.9, 0) for k in range(facings)]
    if look in ("two", "low", "empty"):
        boxes.append((x + 5 + facings * 65, y + 5, x + SLOT_W - 5, y + SLOT_H - 5, 0.8, 1))
    return boxes


@dataclass
class Run:
    transitions: list[tuple[float, SlotTransition]] = field(default_factory=list)
    states_at: dict[float, dict[str, str]] = field(default_factory=dict)

    @property
    def events(self) -> list[SlotTransition]:
        return [tr for _, tr in self.transitions if tr.event is not None]


def play(
    machine: SlotStateMachine,
    zones: SlotZones,
    segments: list[tuple[str | tuple[str, ...], float, float, str]],
    duration: float,
    start: float = 0.0,
    probes: tuple[float, ...] = (),
) -> Run:
    """Feed frames at FPS from ``start`` to ``duration``; every slot looks 'ok' unless a segment says otherwise."""
    run = Run()
    for k in range(round(start * FPS), round(duration * FPS) + 1):
        t = k / FPS
        look = dict.fromkeys(zones.slot_ids, "ok")
        for slots, t0, t1, appearance in segments:
            if t0 <= t < t1:
                for slot_id in (slots,) if isinstance(slots, str) else slots:
                    look[slot_id] = appearance
        boxes = [box for slot_id, appearance in look.items() for box in slot_boxes(slot_id, appearance)]
        array = np.array(boxes, dtype=np.float64).reshape(-1, 6)
        detections = Detections(array[:, :4], array[:, 4], array[:, 5].astype(int))
        run.transitions += [(t, tr) for tr in machine.update(zones.measure(detections), t)]
        if any(abs(t - p) < 1e-9 for p in probes):
            run.states_at[t] = machine.states()
    return run


def machine_for(layout: ShelfLayout, **config) -> tuple[SlotStateMachine, SlotZones]:
    zones = SlotZones(layout)
    return SlotStateMachine.from_zones(zones, SlotStateConfig(**config)), zones


SHOPPER = ("R1S1", "R1S2", "R2S1", "R2S2")

EVENT_CASES = [
    # id, min_facings, segments, duration, expected [(event, slot, event_time[, raised_time if not + DWELL])]
    (
        "single-frame flicker of every kind",
        {},
        [
            ("R1S2", 15.0, 15.1, "empty"),
            ("R1S3", 18.0, 18.1, "none"),
            ("R2S1", 21.0, 21.1, "low"),
            ("R2S4", 24.0, 24.1, "empty"),
            ("R2S4", 26.0, 26.1, "empty"),
            ("R2S4", 28.0, 28.1, "empty"),
        ],
        45,
        [],
    ),
    ("stockout", {}, [("R1S2", 20.0, 99, "empty")], 45, [("stockout", "R1S2", 20.0)]),
    (
        "stockout then restock",
        {},
        [("R1S2", 20.0, 45.0, "empty")],
        70,
        [("stockout", "R1S2", 20.0), ("restocked", "R1S2", 45.0)],
    ),
    (
        "empty with one-frame blips is still one stockout from the first empty frame",
        {},
        [("R1S2", 20.0, 99, "empty"), ("R1S2", 25.0, 25.1, "ok"), ("R1S2", 27.0, 27.1, "low")],
        45,
        [("stockout", "R1S2", 20.0)],
    ),
    ("empty from the start", {}, [("R2S3", 0.0, 99, "empty")], 20, [("stockout", "R2S3", 0.0)]),
    (
        "occluder for 30 s: no event",
        {},
        [(SHOPPER[:3], 20.0, 50.0, "none")],
        70,
        [],
    ),
    (
        "goes empty while occluded: reported after the occlusion plus dwell",
        {},
        [("R1S2", 20.0, 40.0, "none"), ("R1S2", 40.0, 99, "empty")],
        60,
        [("stockout", "R1S2", 40.0)],
    ),
    (
        "empty, then a shopper, then still empty: the dwell clock was frozen, not restarted",
        {},
        [("R1S2", 20.0, 26.0, "empty"), ("R1S2", 26.0, 40.0, "none"), ("R1S2", 40.0, 99, "empty")],
        60,
        [("stockout", "R1S2", 20.0, 20.0 + DWELL + 14.0)],  # 14 s occluded do not count
    ),
    ("one facing taken is not a stockout", {}, [("R1S3", 20.0, 99, "two"), ("R1S4", 20.0, 99, "low")], 45, []),
    (
        "a shopper hiding part of a multi-facing slot is not low stock",
        {"R1S3": 3},
        [("R1S3", 20.0, 60.0, "partly hidden")],
        70,
        [],
    ),
    (
        "low stock only where min_facings > 1, then empty, then restocked",
        {"R1S3": 2},
        [("R1S3", 20.0, 40.0, "low"), ("R1S4", 20.0, 40.0, "low"), ("R1S3", 40.0, 60.0, "empty")],
        80,
        [("low_stock", "R1S3", 20.0), ("stockout", "R1S3", 40.0), ("restocked", "R1S3", 60.0)],
    ),
    (
        "depleted facing by facing: one stockout from the moment it is empty",
        {"R2S2": 2},
        [("R2S2", 20.0, 22.0, "two"), ("R2S2", 22.0, 24.0, "low"), ("R2S2", 24.0, 99, "empty")],
        45,
        [("stockout", "R2S2", 24.0)],
    ),
    (
        "a restock seen in full keeps confirming while a shopper hides part of the slot",
        {"R1S2": 3},
        [("R1S2", 0.0, 20.0, "empty"), ("R1S2", 25.0, 40.0, "partly hidden")],
        50,
        [("stockout", "R1S2", 0.0), ("restocked", "R1S2", 20.0)],
    ),
    (
        "a partly hidden slot never starts a restock by itself",
        {"R1S2": 3},
        [("R1S2", 0.0, 20.0, "empty"), ("R1S2", 20.0, 60.0, "partly hidden")],
        60,
        [("stockout", "R1S2", 0.0)],
    ),
    (
        "a low slot refilled without a stock-out returns to ok without a restocked alert",
        {"R1S3": 2},
        [("R1S3", 20.0, 40.0, "low")],
        80,
        [("low_stock", "R1S3", 20.0)],
    ),
    (
        "empty, partly refilled, then full: the stock-out is closed by one restocked",
        {"R2S2": 2},
        [("R2S2", 20.0, 40.0, "empty"), ("R2S2", 40.0, 60.0, "low")],
        90,
        [("stockout", "R2S2", 20.0), ("low_stock", "R2S2", 40.0), ("restocked", "R2S2", 60.0)],
    ),
    (
        "partly refilled after a stockout is low, not restocked",
        {"R2S2": 2},
        [("R2S2", 20.0, 99, "empty"), ("R2S2", 40.0, 99, "low")],
        65,
        [("stockout", "R2S2", 20.0), ("low_stock", "R2S2", 40.0)],
    ),
]


@pytest.mark.parametrize(
    ("min_facings", "segments", "duration", "expected"),
    [case[1:] for case in EVENT_CASES],
    ids=[case[0] for case in EVENT_CASES],
)
def test_events(min_facings, segments, duration, expected):
    machine, zones = machine_for(shelf(min_facings), dwell_s=DWELL)
    run = play(machine, zones, segments, duration)
    got = [(tr.event, tr.slot_id, tr.event_time) for tr in run.events]
    assert got == [e[:3] for e in expected]
    for tr, exp in zip(run.events, expected, strict=True):
        # Confirmed after the dwell, within a frame or two of it.
        raised = exp[3] if len(exp) > 3 else tr.event_time + DWELL
        assert raised - 1e-6 <= tr.raised_time <= raised + 2.5 / FPS
        assert 0.0 < tr.confidence <= 1.0
    assert all(tr.event is None for _, tr in run.transitions if tr.to_state == "occluded")


def test_stockout_fields():
    machine, zones = machine_for(shelf(), dwell_s=DWELL)
    run = play(machine, zones, [("R1S2", 20.0, 45.0, "empty")], 70)
    stockout, restocked = run.events
    assert (stockout.from_state, stockout.to_state) == ("ok", "empty")
    assert stockout.empty_for_s == pytest.approx(stockout.raised_time - 20.0)
    assert stockout.confidence == pytest.approx(0.8)
    np.testing.assert_allclose(stockout.bbox, (205, 5, 395, 95))  # the gap box, in frame pixels
    assert (restocked.from_state, restocked.to_state) == ("empty", "ok")
    assert restocked.empty_for_s == pytest.approx(25.0)
    assert restocked.confidence == pytest.approx(0.9)
    assert restocked.bbox == (200.0, 0.0, 400.0, 100.0)  # the slot


def test_start_is_unknown_then_ok_without_event():
    machine, zones = machine_for(shelf(), dwell_s=DWELL)
    run = play(machine, zones, [], 15, probes=(5.0, 12.0))
    assert set(run.states_at[5.0].values()) == {"unknown"}
    assert set(run.states_at[12.0].values()) == {"ok"}
    assert run.events == []
    assert {(tr.from_state, tr.to_state) for _, tr in run.transitions} == {("unknown", "ok")}


def test_occluder_shows_occluded_and_returns_to_ok_without_events():
    machine, zones = machine_for(shelf(), dwell_s=DWELL)
    run = play(machine, zones, [(SHOPPER, 20.0, 50.0, "none")], 60, probes=(35.0, 49.0, 55.0))
    for probe in (35.0, 49.0):
        states = run.states_at[probe]
        assert all(states[s] == "occluded" for s in SHOPPER)
        assert all(states[s] == "ok" for s in states if s not in SHOPPER)
    assert set(run.states_at[55.0].values()) == {"ok"}
    assert run.events == []
    # One change into 'occluded' and one back per shopper slot: the published state does not flap.
    shopper_changes = [tr for t, tr in run.transitions if t > 15 and tr.slot_id in SHOPPER]
    assert sorted((tr.from_state, tr.to_state) for tr in shopper_changes) == sorted(
        [("ok", "occluded"), ("occluded", "ok")] * len(SHOPPER)
    )


MASS_CASES = [
    # id, slots that suddenly show a gap for 4 s (a shopper's dark coat), expected stockouts with dwell 2 s
    ("four adjacent slots at once are held", SHOPPER, []),
    ("three adjacent slots in a row are held", ("R2S2", "R2S3", "R2S4"), []),
    ("a single slot is a real stockout", ("R1S3",), ["R1S3"]),
    ("two far-apart slots are real stockouts", ("R1S1", "R2S4"), ["R1S1", "R2S4"]),
]


@pytest.mark.parametrize(("slots", "expected"), [c[1:] for c in MASS_CASES], ids=[c[0] for c in MASS_CASES])
def test_mass_change_is_held_for_the_settle_time(slots, expected):
    # mass_fraction 0.5: on this 8-slot shelf only the adjacency rule decides.
    machine, zones = machine_for(shelf(), dwell_s=2.0, occlusion={"settle_s": 3.0, "mass_fraction": 0.5})
    run = play(machine, zones, [(slots, 20.0, 24.0, "empty")], 35)
    assert sorted(tr.slot_id for tr in run.events if tr.event == "stockout") == sorted(expected)


def test_snapshot_restore_does_not_reraise():
    layout = shelf()
    machine, zones = machine_for(layout, dwell_s=DWELL)
    first = play(machine, zones, [("R1S2", 20.0, 99, "empty")], 40)
    assert [tr.event for tr in first.events] == ["stockout"]
    saved = json.loads(json.dumps(machine.snapshot()))  # what the agent persists

    restarted, zones = machine_for(layout, dwell_s=DWELL)
    restarted.restore(saved)
    # The agent comes back at t = 50 (frame timestamps continue); the slot is still empty until t = 80.
    second = play(restarted, zones, [("R1S2", 50.0, 80.0, "empty")], 100, start=50.0, probes=(75.0,))
    assert second.states_at[75.0]["R1S2"] == "empty"
    assert [(tr.event, tr.slot_id, tr.event_time) for tr in second.events] == [("restocked", "R1S2", 80.0)]
    assert second.events[0].empty_for_s == pytest.approx(80.0 - 20.0)  # empty since the first run's event time


def test_restore_rejects_malformed_snapshots_and_ignores_unknown_slots():
    machine, _ = machine_for(shelf())
    with pytest.raises(ConfigError, match="version"):
        machine.restore({"reported": {}})
    with pytest.raises(ConfigError, match="R1S1"):
        machine.restore({"version": 1, "reported": {"R1S1": {"reported_empty": True}}})
    machine.restore({"version": 1, "reported": {"R9S9": {"reported_empty": True, "reported_low": False}}})
    assert machine.snapshot() == {"version": 1, "reported": {}}


def test_colour_jump_in_neighbouring_slots_holds_them_but_global_dimming_does_not():
    layout = shelf()
    zones = SlotZones(layout)
    machine = SlotStateMachine.from_zones(zones, SlotStateConfig(dwell_s=DWELL))
    boxes = np.array([b for s in zones.slot_ids for b in slot_boxes(s, "ok")], dtype=np.float64)
    detections = Detections(boxes[:, :4], boxes[:, 4], boxes[:, 5].astype(int))
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (ROWS * SLOT_H, COLS * SLOT_W, 3)).astype(np.float32)

    def step(t: float, frame: np.ndarray) -> np.ndarray:
        machine.update(zones.measure(detections, frame.clip(0, 255).astype(np.uint8)), t)
        return machine.held

    for k in range(20):
        assert not step(k / FPS, base).any()
    dimmed = step(2.0, base * 0.6)  # the lights dim: every slot changes alike
    assert not dimmed.any()
    for k in range(21, 80):
        step(k / FPS, base * 0.6)
    shopper = base * 0.6
    shopper[:SLOT_H, : 2 * SLOT_W] = (30, 40, 160)  # a red coat in front of R1S1 and R1S2 ...
    shopper[SLOT_H:, :SLOT_W] = (30, 40, 160)  # ... and R2S1
    held = step(8.0, shopper)
    assert [s for s, h in zip(zones.slot_ids, held, strict=True) if h] == ["R1S1", "R1S2", "R2S1"]


def test_config_is_strict():
    with pytest.raises(ValidationError):
        SlotStateConfig(dwel_s=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SlotStateConfig(occlusion={"settle": 1})
    with pytest.raises(ValidationError, match="hysteresis"):
        SlotStateConfig(low_coverage=0.5, ok_coverage=0.3)


HYSTERESIS_CASES = [
    # id, min_facings of R1S1, looks over time [(t0, look)], states at probe times
    ("low needs a clear refill: all facings and no gap", 2, [(0, "low"), (25, "ok")], {20: "low", 40: "ok"}),
    ("a low slot back to enough facings but a gap left stays low", 2, [(0, "low"), (25, "two")], {40: "low"}),
    ("an ok slot at exactly min_facings with a gap stays ok", 2, [(0, "ok"), (15, "two")], {14: "ok", 40: "ok"}),
    ("single-facing slot: one product back after empty is ok", 1, [(0, "empty"), (25, "low")], {20: "empty", 40: "ok"}),
]


@pytest.mark.parametrize(
    ("min_facings", "looks", "probes"), [c[1:] for c in HYSTERESIS_CASES], ids=[c[0] for c in HYSTERESIS_CASES]
)
def test_hysteresis(min_facings, looks, probes):
    machine, zones = machine_for(shelf({"R1S1": min_facings}), dwell_s=DWELL)
    segments = [("R1S1", t0, t1, look) for (t0, look), (t1, _) in zip(looks, [*looks[1:], (999, "")], strict=True)]
    run = play(machine, zones, segments, max(probes), probes=tuple(float(p) for p in probes))
    assert {p: run.states_at[float(p)]["R1S1"] for p in probes} == probes


def test_timestamps_going_backwards_do_not_confirm_anything():
    machine, zones = machine_for(shelf(), dwell_s=DWELL)
    play(machine, zones, [], 12)
    # A camera clock reset: timestamps restart at 0; 5 s of empty frames must not count as 12 + s.
    run = play(machine, zones, [("R1S1", 0.0, 99, "empty")], 5)
    assert run.events == []


TRUTH_SCENARIO = """\
name: slot-state-truth
seed: 11
duration_s: 50
fps: 5
camera: {width: 640, height: 360, noise: 0.02, jitter_px: 1.0}
shelf: {rows: 3, slots_per_row: 6, facings_per_slot: 3}
events:
  - {t: 2, type: deplete, slot: R2S4, duration_s: 3}
  - {t: 8, type: occlude, slots: [R1S1, R1S2, R2S1, R2S2], duration_s: 15}
  - {t: 26, type: restock, slot: R2S4, duration_s: 2}
  - {t: 30, type: lighting, factor: 0.6, duration_s: 6}
  - {t: 34, type: deplete, slot: R3S6, duration_s: 2}
"""


def test_simulator_truth_boxes_give_exactly_the_expected_alerts(tmp_path):
    """shelf-sim render -> truth.json + layout.yaml -> zones + state machine -> DESIGN section 4 scoring."""
    sim_cli = pytest.importorskip("shelfsight.sim.cli")
    from shelfsight.shelf_agent.layout import load_layout
    from shelfsight.shelf_agent.scoring import score_alerts
    from shelfsight.shelf_agent.zones import product_gap_class_ids

    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(TRUTH_SCENARIO, encoding="utf-8")
    out = tmp_path / "render"
    assert sim_cli.main(["render", str(scenario), "--out", str(out)]) == 0
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    layout = load_layout(out / "layout.yaml")
    product, gap = product_gap_class_ids(truth["classes"])
    frame_size = (truth["frame_size"]["width"], truth["frame_size"]["height"])
    zones = SlotZones(layout, frame_size, product_class=product, gap_class=gap)
    machine = SlotStateMachine.from_zones(zones, SlotStateConfig(dwell_s=DWELL))

    raised: list[SlotTransition] = []
    occluded_mid_shopper: dict[str, str] = {}
    for frame in truth["frames"]:
        rows = np.array(frame["boxes"], dtype=np.float64).reshape(-1, 5)
        detections = Detections(rows[:, 1:], np.ones(len(rows)), rows[:, 0].astype(int))
        raised += [tr for tr in machine.update(zones.measure(detections), frame["t"]) if tr.event is not None]
        if frame["t"] == 20.0:
            occluded_mid_shopper = machine.states()

    expected = truth["expected_alerts"]
    assert {(e["type"], e["slot"]) for e in expected} == {
        ("stockout", "R2S4"),
        ("restocked", "R2S4"),
        ("stockout", "R3S6"),
    }
    score = score_alerts(raised, expected, DWELL)
    assert (score.precision, score.recall) == (1.0, 1.0), score.summary()
    assert score.p95_delay is not None and score.p95_delay <= DWELL + 2.0
    assert all(occluded_mid_shopper[s] == "occluded" for s in ("R1S1", "R1S2", "R2S1", "R2S2"))
