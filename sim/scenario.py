"""Scenario files (DESIGN section 4): the hand-written YAML that `shelf-sim render` turns into a video with truth.

Schema errors and the cross-field checks done here (slot out of range, events after the end, overlapping stock
changes on one slot) all read "FILE:LINE: field 'events[3].slot': ..." so a person can fix the file at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shelfsight.runtime.yamlio import compose_yaml, config_error_at, read_text_file

SLOT_ID = re.compile(r"^R([1-9]\d*)S([1-9]\d*)$")
EVENT_TYPES = ("deplete", "occlude", "restock", "lighting", "take")


def _check_slot_id(value: str) -> str:
    if not SLOT_ID.match(value):
        raise ValueError(f"'{value}' is not a slot id; expected R{{row}}S{{slot}}, 1-based, e.g. R2S5")
    return value


SlotId = Annotated[str, AfterValidator(_check_slot_id)]


def parse_slot_id(slot_id: str) -> tuple[int, int]:
    """'R2S5' -> (row, slot), both 1-based."""
    match = SLOT_ID.match(slot_id)
    if match is None:
        raise ValueError(f"'{slot_id}' is not a slot id")
    return int(match.group(1)), int(match.group(2))


def slot_id(row: int, slot: int) -> str:
    return f"R{row}S{slot}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CameraSpec(_Strict):
    width: int = Field(ge=64, le=3840)
    height: int = Field(ge=64, le=2160)
    noise: float = Field(0.02, ge=0, le=0.3, description="sensor noise sigma as a fraction of full scale")
    jitter_px: float = Field(1.0, ge=0, le=20, description="camera shake amplitude in pixels")


class ShelfSpec(_Strict):
    rows: int = Field(ge=1, le=12)
    slots_per_row: int = Field(ge=1, le=30)
    facings_per_slot: int = Field(ge=1, le=8)


class _Event(_Strict):
    t: float = Field(ge=0, description="seconds from the start of the scenario")


class DepleteEvent(_Event):
    """Facings taken one by one, evenly over duration_s, until the slot is empty."""

    type: Literal["deplete"]
    slot: SlotId
    duration_s: float = Field(gt=0)


class RestockEvent(_Event):
    """Facings put back one by one, evenly over duration_s, until the slot is full."""

    type: Literal["restock"]
    slot: SlotId
    duration_s: float = Field(gt=0)


class TakeEvent(_Event):
    """`count` facings taken at once at t."""

    type: Literal["take"]
    slot: SlotId
    count: int = Field(1, ge=1)


class OccludeEvent(_Event):
    """A shopper stands in front of the listed slots for duration_s."""

    type: Literal["occlude"]
    slots: list[SlotId] = Field(min_length=1)
    duration_s: float = Field(gt=0)


class LightingEvent(_Event):
    """Brightness ramps down to `factor`, holds, and ramps back up within duration_s."""

    type: Literal["lighting"]
    factor: float = Field(gt=0, le=3)
    duration_s: float = Field(gt=0)


Event = Annotated[
    Union[DepleteEvent, OccludeEvent, RestockEvent, LightingEvent, TakeEvent],  # noqa: UP007 - discriminated union
    Field(discriminator="type"),
]
StockEvent = Union[DepleteEvent, RestockEvent, TakeEvent]  # noqa: UP007
STOCK_EVENTS = (DepleteEvent, RestockEvent, TakeEvent)


class Scenario(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    duration_s: float = Field(gt=0, le=3600)
    fps: float = Field(gt=0, le=60)
    camera: CameraSpec
    shelf: ShelfSpec
    events: list[Event] = Field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return round(self.duration_s * self.fps)

    def slot_ids(self) -> list[str]:
        return [
            slot_id(row, slot)
            for row in range(1, self.shelf.rows + 1)
            for slot in range(1, self.shelf.slots_per_row + 1)
        ]


def event_end(event: Any) -> float:
    return float(event.t + getattr(event, "duration_s", 0.0))


def _schema_loc(error: Any) -> tuple[tuple[Any, ...], str]:
    """Rewrite pydantic's location for the event union so it names YAML keys, not union tags."""
    loc = tuple(error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    expected = ", ".join(EVENT_TYPES)
    if len(loc) >= 2 and loc[0] == "events":
        if error["type"] == "union_tag_invalid":
            tag = (error.get("ctx") or {}).get("tag", "?")
            return (*loc[:2], "type"), f"unknown event type '{tag}' (expected one of: {expected})"
        if error["type"] == "union_tag_not_found":
            return (*loc[:2], "type"), f"missing event type (expected one of: {expected})"
        if len(loc) >= 3 and loc[2] in EVENT_TYPES:
            loc = (*loc[:2], *loc[3:])
    return loc, msg


def _cross_field_problem(scenario: Scenario) -> tuple[tuple[Any, ...], str] | None:
    """First semantic problem pydantic cannot see on its own, as (location, message)."""
    rows, per_row = scenario.shelf.rows, scenario.shelf.slots_per_row
    facings = scenario.shelf.facings_per_slot

    def slot_problem(value: str) -> str | None:
        row, slot = parse_slot_id(value)
        if row > rows or slot > per_row:
            return f"slot {value} is outside the shelf ({rows} rows x {per_row} slots: R1S1..R{rows}S{per_row})"
        return None

    for index, event in enumerate(scenario.events):
        if event.t >= scenario.duration_s:
            return (
                "events",
                index,
                "t",
            ), f"event at {event.t:g} s is after the end of the scenario ({scenario.duration_s:g} s)"
        if event_end(event) > scenario.duration_s + 1e-9:
            return (
                ("events", index, "duration_s"),
                f"event ends at {event_end(event):g} s, after the end of the scenario ({scenario.duration_s:g} s)",
            )
        if isinstance(event, OccludeEvent):
            for slot_index, value in enumerate(event.slots):
                if (problem := slot_problem(value)) is not None:
                    return ("events", index, "slots", slot_index), problem
        elif isinstance(event, STOCK_EVENTS):
            if (problem := slot_problem(event.slot)) is not None:
                return ("events", index, "slot"), problem
        if isinstance(event, TakeEvent) and event.count > facings:
            return ("events", index, "count"), f"cannot take {event.count} facings from a slot of {facings}"

    # Two stock changes on one slot at the same time have no single meaning: refuse them.
    busy_until: dict[str, tuple[float, int]] = {}
    order = sorted(range(len(scenario.events)), key=lambda i: (scenario.events[i].t, i))
    for index in order:
        event = scenario.events[index]
        if not isinstance(event, STOCK_EVENTS):
            continue
        previous = busy_until.get(event.slot)
        if previous is not None and event.t < previous[0] - 1e-9:
            return (
                ("events", index, "t"),
                f"overlaps events[{previous[1]}] on slot {event.slot}, which runs until {previous[0]:g} s",
            )
        busy_until[event.slot] = (max(event_end(event), previous[0] if previous else 0.0), index)
    return None


def parse_scenario_text(text: str, source: str) -> Scenario:
    data, root = compose_yaml(text, source)
    try:
        scenario = Scenario.model_validate({} if data is None else data)
    except ValidationError as exc:
        loc, msg = _schema_loc(exc.errors()[0])
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise config_error_at(source, root, loc, msg + more) from None
    problem = _cross_field_problem(scenario)
    if problem is not None:
        raise config_error_at(source, root, *problem)
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    return parse_scenario_text(read_text_file(path, "scenario"), str(path))
