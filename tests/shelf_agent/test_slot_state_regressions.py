"""Regressions found by scoring the agent on the shipped scenarios (busy-afternoon, hard-occlusion).

Each table states a behaviour of the slot state machine that the real detector on real frames needed: a
detector that misses one product box here and there, neighbouring gap boxes that spill over a slot's edge, a
shopper who covers a quarter of the shelf, and a shopper who leaves again. Frames are synthetic and timed by
their timestamps only.
"""

from __future__ import annotations

import numpy as np
import pytest

from shelfsight.runtime.detections import Detections
from shelfsight.shelf_agent.layout import ShelfLayout
from shelfsight.shelf_agent.slot_state import SlotStateConfig, SlotStateMachine, SlotTransition
from shelfsight.shelf_agent.zones import SlotZones

FPS = 2  # the agent's default inference rate
DWELL = 10.0
SETTLE = 3.0
SLOT_W, SLOT_H = 150, 100


def shelf(rows: int, cols: int) -> ShelfLayout:
    slots = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * SLOT_W, r * SLOT_H
            polygon = [(x, y), (x + SLOT_W, y), (x + SLOT_W, y + SLOT_H), (x, y + SLOT_H)]
            slots.append({"id": f"R{r + 1}S{c + 1}", "polygon": polygon, "min_facings": 3})
    return ShelfLayout(
        store_id="s1", camera_id="c1", frame_size={"width": cols * SLOT_W, "height": rows * SLOT_H}, slots=slots
    )


def boxes_for(slot_id: str, look: str) -> list[tuple[float, float, float, float, float, int]]:
    """Detector output for one slot of three facings (50 px each):
    'ok' three products; 'missed' two products, the third missed by the detector, no gap box;
    'one gap' two products and a gap box over the third facing; 'empty' one gap box; 'none' nothing (hidden);
    'missed, neighbour gap' like 'missed' plus the right neighbour's gap box reaching 12 px into this slot."""
    r, c = (int(part) - 1 for part in slot_id[1:].split("S"))
    x, y = c * SLOT_W, r * SLOT_H
    facings = {"ok": 3, "missed": 2, "one gap": 2, "missed, neighbour gap": 2}.get(look, 0)
    boxes = [(x + 3 + k * 50, y + 5, x + 47 + k * 50, y + 95, 0.9, 0) for k in range(facings)]
    if look == "one gap":
        boxes.append((x + 103, y + 5, x + 147, y + 95, 0.8, 1))
    if look == "empty":
        boxes.append((x + 3, y + 5, x + 147, y + 95, 0.8, 1))
    if look == "missed, neighbour gap":
        boxes.append((x + SLOT_W - 12, y + 5, x + 2 * SLOT_W - 3, y + 95, 0.8, 1))
    return boxes


def machine_for(layout: ShelfLayout, **config: object) -> tuple[SlotStateMachine, SlotZones]:
    zones = SlotZones(layout)
    settings = {"dwell_s": DWELL, "occlusion": {"settle_s": SETTLE}, **config}
    return SlotStateMachine.from_zones(zones, SlotStateConfig.model_validate(settings)), zones


def play(
    machine: SlotStateMachine, zones: SlotZones, segments: list[tuple[tuple[str, ...], float, float, str]], end: float
) -> list[SlotTransition]:
    """Frames at FPS from 0 to ``end``; every slot looks 'ok' unless a (slots, t0, t1, look) segment says otherwise."""
    events = []
    for k in range(round(end * FPS) + 1):
        t = k / FPS
        look = dict.fromkeys(zones.slot_ids, "ok")
        for slots, t0, t1, appearance in segments:
            if t0 <= t < t1:
                look.update(dict.fromkeys(slots, appearance))
        rows = [box for slot_id, appearance in look.items() for box in boxes_for(slot_id, appearance)]
        array = np.array(rows, dtype=np.float64).reshape(-1, 6)
        detections = Detections(array[:, :4], array[:, 4], array[:, 5].astype(int))
        events += [tr for tr in machine.update(zones.measure(detections), t) if tr.event is not None]
    return events


NEIGHBOURS = ("R1S1", "R1S3", "R2S2")  # around R1S2 on a 3x3 shelf

MASS_CASES = [
    # id, what the neighbours of R1S2 show from 19.5 s for 1 s while R1S2 empties at 20 s, stockout event time
    ("the detector misses a product in each neighbour: no mass change", "missed", 20.0),
    ("a shopper fully hides the neighbours: R1S2 counts only once the settle time is over", "none", 20.0 + SETTLE),
]


@pytest.mark.parametrize(("neighbours", "since"), [c[1:] for c in MASS_CASES], ids=[c[0] for c in MASS_CASES])
def test_only_evidence_against_the_last_level_counts_towards_a_mass_change(neighbours, since):
    machine, zones = machine_for(shelf(3, 3))
    segments = [(NEIGHBOURS, 19.5, 20.5, neighbours), (("R1S2",), 20.0, 99.0, "empty")]
    events = play(machine, zones, segments, 40)
    assert [(tr.event, tr.slot_id, tr.event_time) for tr in events] == [("stockout", "R1S2", since)]
    assert events[0].raised_time == pytest.approx(since + DWELL, abs=1.0 / FPS + 1e-6)


SETTLE_CASES = [
    # id, segments after R1S2 empties at 20 s, stockout raised at (None: no stockout)
    (
        "a shopper brushes past R1S2 and two neighbours for one frame: the confirmation keeps running",
        [(("R1S1", "R1S2", "R1S3"), 24.0, 24.5, "none")],
        20.0 + DWELL + 0.5,  # only the hidden frame itself does not count
    ),
    (
        "a shopper stays 5 s: the hidden time does not count",
        [(("R1S1", "R1S2", "R1S3"), 24.0, 29.0, "none")],
        20.0 + DWELL + 5.0,
    ),
]


@pytest.mark.parametrize(("segments", "raised"), [c[1:] for c in SETTLE_CASES], ids=[c[0] for c in SETTLE_CASES])
def test_a_mass_change_freezes_but_does_not_restart_a_running_confirmation(segments, raised):
    machine, zones = machine_for(shelf(2, 3))
    events = play(machine, zones, [(("R1S2",), 20.0, 99.0, "empty"), *segments], 45)
    assert [(tr.event, tr.slot_id, tr.event_time) for tr in events] == [("stockout", "R1S2", 20.0)]
    assert events[0].raised_time == pytest.approx(raised, abs=1.0 / FPS + 1e-6)


def test_a_mass_change_never_starts_a_confirmation():
    # R1S2 looks empty only while its neighbours are hidden (a shopper's dark coat) and for settle - 1 s after.
    machine, zones = machine_for(shelf(2, 3), dwell_s=2.0)
    segments = [(("R1S1", "R1S3", "R2S2"), 20.0, 21.0, "none"), (("R1S2",), 20.0, 20.0 + SETTLE - 0.5, "empty")]
    assert play(machine, zones, segments, 40) == []


GAP_EVIDENCE_CASES = [
    # id, look of R1S1 (a full slot of three) for 30 s, expected events
    ("a missed product and a neighbour's gap box over the edge is not low stock", "missed, neighbour gap", []),
    ("a missed product alone is not low stock", "missed", []),
    ("a gap box over one facing is low stock", "one gap", [("low_stock", "R1S1")]),
]


@pytest.mark.parametrize(
    ("look", "expected"), [c[1:] for c in GAP_EVIDENCE_CASES], ids=[c[0] for c in GAP_EVIDENCE_CASES]
)
def test_low_needs_gap_evidence_of_the_slot_itself(look, expected):
    machine, zones = machine_for(shelf(1, 3))
    events = play(machine, zones, [(("R1S1",), 20.0, 99.0, look), (("R1S2",), 0.0, 99.0, "empty")], 50)
    assert [(tr.event, tr.slot_id) for tr in events if tr.slot_id == "R1S1"] == expected


# -- colour cue ---------------------------------------------------------------------------------------------

ROWS, COLS = 4, 5
COAT = (30, 40, 160)


def detections_without(zones: SlotZones, hidden: tuple[str, ...]) -> Detections:
    """All slots stocked; the ``hidden`` ones (behind a coat) show nothing."""
    rows = np.array([b for s in zones.slot_ids if s not in hidden for b in boxes_for(s, "ok")], dtype=np.float64)
    return Detections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int))


def colour_frames() -> tuple[SlotZones, SlotStateMachine, np.ndarray]:
    """A 4x5 shelf of differently coloured products (one colour per slot, plus pixel noise), all stocked."""
    layout = shelf(ROWS, COLS)
    zones = SlotZones(layout)
    machine = SlotStateMachine.from_zones(zones, SlotStateConfig(dwell_s=DWELL))
    rng = np.random.default_rng(5)
    colours = rng.integers(40, 220, (ROWS, COLS, 3)).astype(np.float32)
    base = np.repeat(np.repeat(colours, SLOT_H, axis=0), SLOT_W, axis=1)
    base += rng.normal(0, 8, base.shape).astype(np.float32)
    return zones, machine, base


def with_coat(frame: np.ndarray, slots: tuple[str, ...]) -> np.ndarray:
    frame = frame.copy()
    for slot_id in slots:
        r, c = (int(part) - 1 for part in slot_id[1:].split("S"))
        frame[r * SLOT_H : (r + 1) * SLOT_H, c * SLOT_W : (c + 1) * SLOT_W] = COAT
    return frame


COAT_SLOTS = ("R1S1", "R1S2", "R2S1", "R2S2", "R3S1", "R3S2")  # 30 % of the shelf, a tall shopper
COLOUR_CASES = [
    # id, frames from 10 s on as (t0, gain, coat slots), slots expected held at the probe time
    ("the lights dim: nothing is held", [(10.0, 0.55, ())], 10.0, ()),
    ("the sun comes out: nothing is held", [(10.0, 1.2, ())], 10.0, ()),
    ("a coat over 30 % of the shelf holds exactly those slots", [(10.0, 1.0, COAT_SLOTS)], 10.0, COAT_SLOTS),
    ("the same coat while the lights are dimmed", [(10.0, 0.6, ()), (20.0, 0.6, COAT_SLOTS)], 20.0, COAT_SLOTS),
    (
        "a shopper who stayed 12 s and leaves is not taken for a new one",
        [(10.0, 1.0, COAT_SLOTS), (22.0, 1.0, ())],
        22.0,
        (),
    ),
]


@pytest.mark.parametrize(("script", "probe", "held"), [c[1:] for c in COLOUR_CASES], ids=[c[0] for c in COLOUR_CASES])
def test_colour_jumps_follow_the_covered_slots_not_the_shelf_median(script, probe, held):
    zones, machine, base = colour_frames()
    steps = [(0.0, 1.0, ()), *script]
    held_at_probe = None
    for k in range(round((probe + 1.0) * FPS) + 1):
        t = k / FPS
        _, gain, coat = [step for step in steps if step[0] <= t][-1]
        frame = with_coat(base * gain, coat).clip(0, 255).astype(np.uint8)
        machine.update(zones.measure(detections_without(zones, coat), frame), t)
        if abs(t - probe) < 1e-9:
            held_at_probe = machine.held
    assert held_at_probe is not None
    held_slots = [s for s, h in zip(zones.slot_ids, held_at_probe, strict=True) if h]
    assert held_slots == sorted(held, key=zones.slot_ids.index)
