"""What happens when: facing counts per slot, expected alerts, occlusions and lighting, from a scenario's events.

Pure functions of the scenario; the renderer and truth.json both read from one Timeline so they cannot disagree.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

from shelfsight.sim.scenario import (
    DepleteEvent,
    LightingEvent,
    OccludeEvent,
    RestockEvent,
    Scenario,
    TakeEvent,
)

# Lighting ramps take this share of an event's duration at each end (dim, hold, recover).
LIGHTING_RAMP_SHARE = 0.25


@dataclass(frozen=True)
class FacingChange:
    t: float
    slot: str
    facings: int


@dataclass(frozen=True)
class ExpectedAlert:
    type: str  # "stockout" | "restocked"
    slot: str
    t: float


@dataclass(frozen=True)
class Occlusion:
    slots: tuple[str, ...]
    t_start: float
    t_end: float


@dataclass(frozen=True)
class LightingChange:
    t_start: float
    t_end: float
    factor: float

    def weight(self, t: float) -> float:
        """0 outside the event, 1 while fully dimmed, linear ramps in between."""
        if t <= self.t_start or t >= self.t_end:
            return 0.0
        ramp = LIGHTING_RAMP_SHARE * (self.t_end - self.t_start)
        return min(1.0, (t - self.t_start) / ramp, (self.t_end - t) / ramp)


def slot_state(facings: int, full: int) -> str:
    if facings >= full:
        return "ok"
    return "empty" if facings == 0 else "low"


@dataclass(frozen=True)
class Timeline:
    slots: tuple[str, ...]
    facings_per_slot: int
    changes: tuple[FacingChange, ...]  # sorted by time
    alerts: tuple[ExpectedAlert, ...]
    occlusions: tuple[Occlusion, ...]
    lighting: tuple[LightingChange, ...]

    @cached_property
    def _change_times(self) -> list[float]:
        return [change.t for change in self.changes]

    def changes_until(self, start: int, t: float) -> tuple[list[FacingChange], int]:
        """Changes with index >= start and time <= t, and the next index; for streaming through frames."""
        stop = bisect.bisect_right(self._change_times, t + 1e-9, lo=start)
        return list(self.changes[start:stop]), stop

    def facings_at(self, slot: str, t: float) -> int:
        count = self.facings_per_slot
        for change in self.changes:
            if change.t > t + 1e-9:
                break
            if change.slot == slot:
                count = change.facings
        return count

    def lighting_factor(self, t: float) -> float:
        factor = 1.0
        for change in self.lighting:
            factor *= 1.0 - (1.0 - change.factor) * change.weight(t)
        return factor

    def active_occlusions(self, t: float) -> list[int]:
        return [i for i, occ in enumerate(self.occlusions) if occ.t_start <= t + 1e-9 and t < occ.t_end - 1e-9]

    def slot_history(self) -> dict[str, list[dict[str, object]]]:
        """truth.json 'slots': per slot a change list of {t, facings, state}, the first entry at t=0."""
        full = self.facings_per_slot
        history: dict[str, list[dict[str, object]]] = {
            slot: [{"t": 0.0, "facings": full, "state": "ok"}] for slot in self.slots
        }
        for change in self.changes:
            history[change.slot].append(
                {"t": round(change.t, 3), "facings": change.facings, "state": slot_state(change.facings, full)}
            )
        return history


def _stock_steps(event: object, count: int, full: int) -> list[tuple[float, int]]:
    """(time, facings after) for each facing that leaves or arrives during one stock event."""
    if isinstance(event, DepleteEvent):
        step = event.duration_s / count if count else 0.0
        return [(event.t + k * step, count - k) for k in range(1, count + 1)]
    if isinstance(event, RestockEvent):
        missing = full - count
        step = event.duration_s / missing if missing else 0.0
        return [(event.t + k * step, count + k) for k in range(1, missing + 1)]
    if isinstance(event, TakeEvent):
        return [(event.t, max(0, count - event.count))] if count else []
    return []


def build_timeline(scenario: Scenario) -> Timeline:
    full = scenario.shelf.facings_per_slot
    slots = tuple(scenario.slot_ids())
    changes: list[FacingChange] = []
    alerts: list[ExpectedAlert] = []
    # Stock events on one slot never overlap (the loader refuses it), so each starts from the count the
    # previous one left behind.
    count = dict.fromkeys(slots, full)
    stocked_out = dict.fromkeys(slots, False)
    ordered = sorted(enumerate(scenario.events), key=lambda item: (item[1].t, item[0]))
    for _, event in ordered:
        if not isinstance(event, (DepleteEvent, RestockEvent, TakeEvent)):
            continue
        for t, facings in _stock_steps(event, count[event.slot], full):
            before = count[event.slot]
            count[event.slot] = facings
            changes.append(FacingChange(t=t, slot=event.slot, facings=facings))
            if facings == 0 and before > 0:
                alerts.append(ExpectedAlert("stockout", event.slot, round(t, 3)))
                stocked_out[event.slot] = True
            elif facings == full and before < full and stocked_out[event.slot]:
                # "restocked" answers a stock-out; refilling after a partial take is not an alert.
                alerts.append(ExpectedAlert("restocked", event.slot, round(t, 3)))
                stocked_out[event.slot] = False
    changes.sort(key=lambda change: change.t)
    alerts.sort(key=lambda alert: (alert.t, alert.slot))
    occlusions = tuple(
        Occlusion(tuple(event.slots), event.t, event.t + event.duration_s)
        for event in scenario.events
        if isinstance(event, OccludeEvent)
    )
    lighting = tuple(
        LightingChange(event.t, event.t + event.duration_s, event.factor)
        for event in scenario.events
        if isinstance(event, LightingEvent)
    )
    return Timeline(slots, full, tuple(changes), tuple(alerts), occlusions, lighting)
