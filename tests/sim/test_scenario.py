"""Scenario files: line-numbered errors for hand-written mistakes, shipped scenarios, timeline semantics."""

from __future__ import annotations

from pathlib import Path

import pytest

from shelfsight.runtime.errors import ConfigError
from shelfsight.sim import bundled_scenario, bundled_scenario_names, scenarios_dir
from shelfsight.sim.scenario import EVENT_TYPES, load_scenario, parse_scenario_text
from shelfsight.sim.timeline import build_timeline

GOOD = """\
name: unit-test
seed: 3
duration_s: 60
fps: 10
camera: {width: 640, height: 360, noise: 0.02, jitter_px: 1.0}
shelf: {rows: 4, slots_per_row: 6, facings_per_slot: 3}
events:
  - {t: 10, type: deplete, slot: R2S5, duration_s: 6}
  - {t: 20, type: occlude, slots: [R1S1, R1S2], duration_s: 8}
  - {t: 30, type: restock, slot: R2S5, duration_s: 4}
  - {t: 40, type: lighting, factor: 0.6, duration_s: 10}
  - {t: 50, type: take, slot: R3S2, count: 1}
"""

# GOOD's lines: 5 camera, 6 shelf, 8..12 events[0..4].
# (case id, text to replace, replacement, line of the mistake, field named, words the message must contain)
BAD_CASES = [
    ("unknown-type", "type: lighting,", "type: teleport,", 11, "events[3].type", "unknown event type 'teleport'"),
    ("missing-type", "{t: 50, type: take,", "{t: 50,", 12, "events[4].type", "missing event type"),
    ("slot-row-out-of-range", "R2S5, duration_s: 6", "R9S1, duration_s: 6", 8, "events[0].slot", "outside the shelf"),
    ("slot-col-out-of-range", "slot: R3S2", "slot: R3S7", 12, "events[4].slot", "R1S1..R4S6"),
    ("occlude-slot-out-of-range", "[R1S1, R1S2]", "[R1S1, R5S2]", 9, "events[1].slots[1]", "outside the shelf"),
    ("malformed-slot-id", "slot: R3S2", "slot: B3", 12, "events[4].slot", "not a slot id"),
    ("negative-time", "{t: 10,", "{t: -2,", 8, "events[0].t", "greater than or equal to 0"),
    ("event-after-end", "{t: 50,", "{t: 75,", 12, "events[4].t", "after the end"),
    ("event-runs-past-end", "0.6, duration_s: 10", "0.6, duration_s: 30", 11, "events[3].duration_s", "after the end"),
    ("missing-duration", "R2S5, duration_s: 4}", "R2S5}", 10, "events[2].duration_s", "Field required"),
    ("zero-duration", "duration_s: 8", "duration_s: 0", 9, "events[1].duration_s", "greater than 0"),
    ("take-too-many", "count: 1}", "count: 4}", 12, "events[4].count", "cannot take 4"),
    ("unknown-event-field", "count: 1}", "count: 1, colour: red}", 12, "events[4].colour", "Extra inputs"),
    ("overlapping-stock-events", "{t: 30,", "{t: 14,", 10, "events[2].t", "overlaps events[0]"),
    ("missing-shelf-field", "slots_per_row: 6, ", "", 6, "shelf.slots_per_row", "Field required"),
    ("unknown-camera-field", "jitter_px: 1.0}", "jitter_px: 1.0, fov: 70}", 5, "camera.fov", "Extra inputs"),
    ("missing-top-level", "fps: 10\n", "", 1, "fps", "Field required"),
    ("bad-fps-type", "fps: 10", "fps: fast", 4, "fps", "valid number"),
]


@pytest.mark.parametrize(
    ("original", "replacement", "line", "field", "words"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_scenario_names_file_line_and_field(
    tmp_path: Path, original: str, replacement: str, line: int, field: str, words: str
):
    assert GOOD.count(original) == 1
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(original, replacement))
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: field '{field}': "), message
    assert words in message, message


def test_invalid_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        GOOD.replace("  - {t: 50, type: take, slot: R3S2, count: 1}", "  - {t: 50, type: take, slot: [R3S2")
    )
    with pytest.raises(ConfigError, match=rf"^{path}:1[23]: invalid YAML"):
        load_scenario(path)


def test_unreadable_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.yaml")


def test_good_scenario_parses_with_typed_events():
    scenario = parse_scenario_text(GOOD, "good.yaml")
    assert [event.type for event in scenario.events] == ["deplete", "occlude", "restock", "lighting", "take"]
    assert scenario.frame_count == 600
    assert len(scenario.slot_ids()) == 24


@pytest.mark.parametrize("name", ["demo", "aisle-3-morning", "busy-afternoon", "hard-occlusion"])
def test_every_shipped_scenario_parses(name: str):
    scenario = load_scenario(bundled_scenario(name))
    assert scenario.name == name
    assert scenario.events


def test_shipped_scenarios_cover_every_event_type_and_meet_their_briefs():
    names = bundled_scenario_names()
    assert {"demo", "aisle-3-morning", "busy-afternoon", "hard-occlusion"} <= set(names)
    scenarios = {name: load_scenario(scenarios_dir() / f"{name}.yaml") for name in names}
    assert {event.type for s in scenarios.values() for event in s.events} == set(EVENT_TYPES)
    demo = scenarios["demo"]
    assert (demo.duration_s, demo.camera.width, demo.camera.height, demo.fps) == (60, 1280, 720, 10)
    assert scenarios["busy-afternoon"].duration_s == 300
    hard = scenarios["hard-occlusion"]
    assert any(e.type == "occlude" and e.duration_s > 10 for e in hard.events)
    assert any(e.type == "lighting" for e in hard.events)
    # The DESIGN section 4 example, value for value.
    aisle = scenarios["aisle-3-morning"]
    assert (aisle.seed, aisle.duration_s, aisle.fps) == (7, 90, 10)
    assert aisle.camera.model_dump() == {"width": 1280, "height": 720, "noise": 0.02, "jitter_px": 1.5}
    assert aisle.shelf.model_dump() == {"rows": 4, "slots_per_row": 8, "facings_per_slot": 3}
    assert [e.model_dump() for e in aisle.events] == [
        {"t": 10, "type": "deplete", "slot": "R2S5", "duration_s": 6},
        {"t": 30, "type": "occlude", "slots": ["R1S1", "R1S2", "R2S1", "R2S2"], "duration_s": 8},
        {"t": 45, "type": "restock", "slot": "R2S5", "duration_s": 4},
        {"t": 50, "type": "lighting", "factor": 0.6, "duration_s": 10},
        {"t": 60, "type": "take", "slot": "R3S2", "count": 1},
    ]


def test_bundled_scenario_unknown_name():
    with pytest.raises(ConfigError, match="no bundled scenario 'nope'"):
        bundled_scenario("nope")


def test_timeline_alerts_follow_the_events():
    timeline = build_timeline(parse_scenario_text(GOOD, "good.yaml"))
    alerts = [(a.type, a.slot, a.t) for a in timeline.alerts]
    # stockout when the last facing leaves (deplete end), restocked when full again (restock end);
    # the single take leaves the slot low and raises nothing.
    assert alerts == [("stockout", "R2S5", 16.0), ("restocked", "R2S5", 34.0)]
    history = timeline.slot_history()
    assert history["R2S5"] == [
        {"t": 0.0, "facings": 3, "state": "ok"},
        {"t": 12.0, "facings": 2, "state": "low"},
        {"t": 14.0, "facings": 1, "state": "low"},
        {"t": 16.0, "facings": 0, "state": "empty"},
        {"t": 31.333, "facings": 1, "state": "low"},
        {"t": 32.667, "facings": 2, "state": "low"},
        {"t": 34.0, "facings": 3, "state": "ok"},
    ]
    assert history["R3S2"] == [{"t": 0.0, "facings": 3, "state": "ok"}, {"t": 50.0, "facings": 2, "state": "low"}]
    assert timeline.lighting_factor(45.0) == pytest.approx(0.6)
    assert timeline.lighting_factor(40.0) == 1.0 and timeline.lighting_factor(50.0) == 1.0
    assert 0.6 < timeline.lighting_factor(41.0) < 1.0
    assert timeline.active_occlusions(21.0) == [0] and timeline.active_occlusions(28.0) == []


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # a take that empties the slot is a stock-out at once
        (["{t: 5, type: take, slot: R1S1, count: 3}"], [("stockout", "R1S1", 5.0)]),
        # refilling after a partial take is not a "restocked" alert: there was no stock-out
        (["{t: 5, type: take, slot: R1S1, count: 2}", "{t: 9, type: restock, slot: R1S1, duration_s: 2}"], []),
        # deplete from a partly taken slot empties it at the deplete end
        (
            ["{t: 5, type: take, slot: R1S1, count: 1}", "{t: 9, type: deplete, slot: R1S1, duration_s: 4}"],
            [("stockout", "R1S1", 13.0)],
        ),
    ],
)
def test_timeline_alert_table(events: list[str], expected: list[tuple[str, str, float]]):
    text = GOOD.split("events:")[0] + "events:\n" + "".join(f"  - {e}\n" for e in events)
    timeline = build_timeline(parse_scenario_text(text, "t.yaml"))
    assert [(a.type, a.slot, a.t) for a in timeline.alerts] == expected
