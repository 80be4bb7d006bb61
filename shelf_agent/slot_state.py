"""Slot state machine: turns per-frame ``SlotObservation``s into confirmed, typed slot transitions.

Each frame every slot gets one *observed level* (ok / low / empty) or is *held* (occluded: no usable evidence,
or part of a mass change that a shopper most likely caused). Low and empty need POSITIVE gap evidence, so an
occluder, which hides products and gaps alike, is held and never looks empty. A level different from the slot's
state must be observed for ``dwell_s`` of frame time before it is confirmed; short contrary blips
(``miss_tolerance_s``) do not restart the clock, held frames freeze it (partial evidence consistent with a
running confirmation keeps it going, but never starts one; so does a clear level seen while a mass change
settles). Only evidence against a slot's last level counts towards a mass change: a product box the detector
missed in a full slot does not. Events (stockout / low_stock / restocked) are
attached to confirmed transitions and never repeated for a slot that is already reported; ``snapshot`` and
``restore`` carry that across restarts. ``restocked`` closes a stock-out (the slot is full again after being
reported empty); a low slot refilled without a stock-out returns to ok on the state topic without an alert.
All timing comes from the frame timestamps passed to ``update``,
never from the wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.zones import SlotObservation, SlotZones

SlotStateName = Literal["unknown", "ok", "low", "empty", "occluded"]
EventType = Literal["stockout", "low_stock", "restocked"]

UNKNOWN, OK, LOW, EMPTY, OCCLUDED = 0, 1, 2, 3, 4
STATE_NAMES: tuple[SlotStateName, ...] = ("unknown", "ok", "low", "empty", "occluded")
# Columns of the per-level run arrays: the levels a slot can be confirmed into.
_LEVELS = np.array([OK, LOW, EMPTY])
_SNAPSHOT_VERSION = 1


class OcclusionConfig(BaseModel):
    """When to hold slots because something (a shopper) probably stands in front of them."""

    model_config = ConfigDict(extra="forbid")
    mass_window_s: float = Field(default=0.5, ge=0, description="changes this close in time count as 'at once'")
    mass_fraction: float = Field(
        default=0.25, gt=0, le=1, description="this share of all slots changing at once is a mass change"
    )
    mass_min_slots: int = Field(default=2, ge=1, description="floor for mass_fraction on small layouts")
    mass_adjacent: int = Field(
        default=3, ge=2, description="this many neighbouring slots changing at once is a mass change"
    )
    settle_s: float = Field(
        default=3.0, ge=0, description="how long slots of a mass change stay held after the last change"
    )
    occluded_after_s: float = Field(
        default=1.0, ge=0, description="held this long before the published state is 'occluded'"
    )
    release_s: float = Field(default=0.5, ge=0, description="evidence this long before 'occluded' is left again")
    color_change: float | None = Field(
        default=0.25,
        gt=0,
        description="relative slot colour jump (after global gain removal) that counts as a change; "
        "None ignores colour. Used only when measure() was given the frame",
    )
    color_reference_tau_s: float = Field(default=5.0, gt=0, description="time constant of the slot colour reference")


class SlotStateConfig(BaseModel):
    """Thresholds of the slot state machine. Coverages are fractions of the slot area in [0, 1]."""

    model_config = ConfigDict(extra="forbid")
    dwell_s: float = Field(default=10.0, ge=0, description="a new level must be observed this long to be confirmed")
    miss_tolerance_s: float = Field(
        default=1.0, ge=0, description="contrary frames shorter than this do not break a run"
    )
    max_frame_gap_s: float = Field(default=2.0, gt=0, description="a longer gap between frames counts only this much")
    present_coverage: float = Field(
        default=0.25, ge=0, le=1, description="products covering this much count as present even if no box is centred"
    )
    # A neighbour's gap box overlapping the slot's edge (box jitter) covers up to ~10 % of it: not evidence.
    # One missing facing of three covers ~30 %, and its own gap box is centred in the slot anyway.
    low_gap_coverage: float = Field(
        default=0.15, gt=0, le=1, description="gap evidence (besides a gap box centred in the slot) needed for 'low'"
    )
    empty_gap_coverage: float = Field(default=0.4, gt=0, le=1, description="gap evidence needed for 'empty'")
    low_coverage: float = Field(
        default=0.0, ge=0, le=1, description="optional: below this product coverage a multi-facing slot is low"
    )
    ok_coverage: float = Field(
        default=0.0, ge=0, le=1, description="optional: a low/empty slot must reach this coverage to be ok again"
    )
    occlusion: OcclusionConfig = Field(default_factory=lambda: OcclusionConfig())

    @model_validator(mode="after")
    def _ordered(self) -> SlotStateConfig:
        if self.low_coverage > self.ok_coverage:
            raise ValueError("low_coverage must not exceed ok_coverage (hysteresis)")
        return self


Box = tuple[float, float, float, float]


def as_box(values: Sequence[float] | np.ndarray) -> Box:
    """Four floats (x1, y1, x2, y2) as a plain tuple, for events that leave numpy behind."""
    return (float(values[0]), float(values[1]), float(values[2]), float(values[3]))


@dataclass(frozen=True)
class SlotTransition:
    """A change of a slot's published state; ``event`` is set when it is an alert."""

    slot_id: str
    from_state: SlotStateName
    to_state: SlotStateName
    event: EventType | None
    event_time: float  # frame time the new condition was first observed
    raised_time: float  # frame time it was confirmed
    empty_for_s: float  # stockout: raised - event time; restocked / low_stock after empty: how long it was empty
    confidence: float  # mean detector confidence of the confirming evidence
    bbox: Box  # frame pixels: the gap boxes for a stockout, else the slot


class SlotStateMachine:
    """Per-slot state in numpy arrays; ``update`` once per frame, in timestamp order."""

    def __init__(
        self,
        slot_ids: Sequence[str],
        config: SlotStateConfig | None = None,
        *,
        min_facings: Sequence[int] | np.ndarray | None = None,
        adjacency: np.ndarray | None = None,
    ) -> None:
        self.slot_ids = tuple(slot_ids)
        self.config = config if config is not None else SlotStateConfig()
        n = len(self.slot_ids)
        if n == 0 or len(set(self.slot_ids)) != n:
            raise ConfigError("slot ids must be a non-empty list of unique names")
        facings = np.ones(n, np.int32) if min_facings is None else np.asarray(min_facings, np.int32)
        self.adjacency = np.zeros((n, n), bool) if adjacency is None else np.asarray(adjacency, bool)
        if facings.shape != (n,) or self.adjacency.shape != (n, n):
            raise ConfigError(f"min_facings / adjacency do not match the {n} slots")
        self._need = np.maximum(facings, 1)
        self._multi = facings > 1  # only these slots have a 'low' level and low_stock alerts
        self._index = {slot_id: i for i, slot_id in enumerate(self.slot_ids)}

        self.state = np.full(n, UNKNOWN, np.int8)  # confirmed level
        self.shown = np.full(n, UNKNOWN, np.int8)  # published: the level, or OCCLUDED
        self.reported_empty = np.zeros(n, bool)
        self.reported_low = np.zeros(n, bool)
        # A stock-out stays open until the slot is full again (through any partial refill): only that closes
        # with 'restocked'. A low slot refilled without ever being empty changes state without an alert.
        self.stockout_open = np.zeros(n, bool)
        self.empty_since = np.full(n, np.nan)
        # One run per (slot, level in _LEVELS): evidence time accumulated while the level keeps being observed.
        self._run_active = np.zeros((n, 3), bool)
        self._run_first = np.zeros((n, 3))
        self._run_elapsed = np.zeros((n, 3))
        self._run_missing = np.zeros((n, 3))
        self._run_conf_sum = np.zeros((n, 3))
        self._run_frames = np.zeros((n, 3))
        self._prev_observed = np.full(n, -1, np.int8)
        self._changed_at = np.full(n, -np.inf)
        self._hold_until = np.full(n, -np.inf)
        self._held = np.zeros(n, bool)
        self._held_for = np.zeros(n)
        self._unheld_for = np.zeros(n)
        self._held_since = np.zeros(n)
        self._color_ref: np.ndarray | None = None
        self._color_over = np.zeros(n, bool)
        self._last_time: float | None = None

    @classmethod
    def from_zones(cls, zones: SlotZones, config: SlotStateConfig | None = None) -> SlotStateMachine:
        return cls(zones.slot_ids, config, min_facings=zones.min_facings, adjacency=zones.adjacency)

    # -- queries -------------------------------------------------------------------------------------------

    def states(self) -> dict[str, SlotStateName]:
        """Published state of every slot."""
        return {slot_id: STATE_NAMES[code] for slot_id, code in zip(self.slot_ids, self.shown, strict=True)}

    @property
    def held(self) -> np.ndarray:
        """Slots whose timers were frozen in the last frame (no evidence, or settling after a mass change)."""
        return self._held.copy()

    # -- per frame -----------------------------------------------------------------------------------------

    def _observe(self, obs: SlotObservation) -> tuple[np.ndarray, np.ndarray]:
        """One level per slot, OCCLUDED meaning 'no usable evidence'; thresholds depend on the current state.

        Also returns, for OCCLUDED slots, the level their partial evidence is consistent with (-1 if none):
        products but no gap visible is consistent with ok, a gap but no products with empty. That evidence
        keeps an already running confirmation going while part of the slot is hidden, but never starts one.

        Every downgrade needs POSITIVE gap evidence: fewer products without a visible gap is what a shopper
        standing in front looks like, so it is held, never called low or empty. Going back up needs the slot
        clearly refilled (enough facings and, for multi-facing slots, no gap left); in between a downgraded
        slot stays downgraded (hysteresis).
        """
        cfg = self.config
        count, cov, multi = obs.product_count, obs.product_coverage, self._multi
        present = (count >= 1) | (cov >= cfg.present_coverage)
        gap_seen = (obs.gap_count >= 1) | (obs.gap_coverage >= cfg.low_gap_coverage)
        sufficient = np.where(multi, (count >= self._need) & (cov >= cfg.low_coverage), present)
        clearly_full = sufficient & (count >= 1) & (cov >= cfg.ok_coverage) & ~(multi & gap_seen)
        downgraded = (self.state == LOW) | (self.state == EMPTY)
        is_ok = present & np.where(downgraded, clearly_full, sufficient)
        is_low = present & multi & ~is_ok & np.where(sufficient, downgraded, gap_seen)
        is_empty = ~present & (obs.gap_coverage >= cfg.empty_gap_coverage)
        observed = np.full(len(self.slot_ids), OCCLUDED, np.int8)
        observed[is_ok] = OK
        observed[is_low] = LOW
        observed[is_empty] = EMPTY
        hidden = observed == OCCLUDED
        partial = np.full(len(self.slot_ids), -1, np.int8)
        partial[hidden & present & ~gap_seen] = OK
        partial[hidden & ~present & gap_seen] = EMPTY
        return observed, partial

    def _color_jump(self, obs: SlotObservation, dt: float) -> np.ndarray:
        """Slots whose mean colour just left their reference, after removing the global lighting gain."""
        occ = self.config.occlusion
        n = len(self.slot_ids)
        if obs.mean_color is None or occ.color_change is None:
            return np.zeros(n, bool)
        color = obs.mean_color.astype(np.float64) + 1.0
        if self._color_ref is None:
            self._color_ref = color.copy()
        # Gain per channel = median over slots of colour / reference: lighting changes every slot alike, and a
        # shopper in front of even a third of the slots cannot move a median of ratios much (a median of the
        # colours themselves shifts with every slot the shopper covers and made the whole shelf 'jump').
        gain = np.median(color / self._color_ref, axis=0, keepdims=True)
        expected = self._color_ref * gain
        scale = np.median(expected, axis=0, keepdims=True)
        over = (np.abs(color - expected) / scale).max(axis=1) > occ.color_change
        jump = over & ~self._color_over
        self._color_over = over
        # A held slot keeps its reference: when the shopper in front of it leaves, its colour comes back to the
        # reference instead of 'jumping' to it again, so a departure is never taken for a new occluder.
        alpha = (1.0 - math.exp(-dt / occ.color_reference_tau_s)) * ~self._held
        self._color_ref += (color / gain - self._color_ref) * alpha[:, None]
        return jump

    def _mass_change(self, t: float) -> np.ndarray:
        """Slots that changed together with many others within the mass window."""
        occ = self.config.occlusion
        recent = self._changed_at >= t - occ.mass_window_s
        n_recent = int(recent.sum())
        if n_recent < min(occ.mass_adjacent, occ.mass_min_slots):
            return np.zeros(len(self.slot_ids), bool)
        if n_recent >= max(occ.mass_min_slots, math.ceil(occ.mass_fraction * len(self.slot_ids))):
            return recent
        if n_recent < occ.mass_adjacent:
            return np.zeros(len(self.slot_ids), bool)
        # Connected components of the recently changed slots: propagate the smallest index to a fixed point.
        linked = self.adjacency & recent[:, None] & recent[None, :]
        label = np.where(recent, np.arange(len(recent)), len(recent))
        while True:
            spread = np.where(linked, label[None, :], len(recent)).min(axis=1)
            new_label = np.where(recent, np.minimum(label, spread), len(recent))
            if np.array_equal(new_label, label):
                break
            label = new_label
        sizes = np.bincount(label, minlength=len(recent) + 1)
        return recent & (sizes[label] >= occ.mass_adjacent)

    def update(self, observation: SlotObservation, frame_time_s: float) -> list[SlotTransition]:
        """Advance all slots by one frame; returns the published-state changes (with alerts) of this frame."""
        if observation.slot_ids is not self.slot_ids and observation.slot_ids != self.slot_ids:
            raise ValueError("observation slots differ from the state machine's slots")
        cfg, occ = self.config, self.config.occlusion
        t = float(frame_time_s)
        # Out-of-order timestamps (camera clock reset) count as no elapsed time rather than negative time.
        dt = 0.0 if self._last_time is None else min(max(t - self._last_time, 0.0), cfg.max_frame_gap_s)
        self._last_time = t if self._last_time is None else max(t, self._last_time)

        observed, partial = self._observe(observation)
        # Only changes for the worse count towards a mass change (levels are ordered ok < low < empty <
        # occluded): a shopper arriving is suspicious, a shopper leaving is not. A partly hidden slot counts at
        # the level its visible evidence is consistent with: a product box the detector missed in a full slot
        # (no gap seen) is no change at all, and such misses in many slots at once are not a mass change.
        level = np.where((observed == OCCLUDED) & (partial >= 0), partial, observed).astype(np.int8)
        prev = self._prev_observed
        flipped = (prev >= 0) & (prev != OCCLUDED) & (level > prev)
        flipped |= self._color_jump(observation, dt)
        self._prev_observed = level
        self._changed_at[flipped] = t
        mass = self._mass_change(t)
        self._hold_until[mass] = np.maximum(self._hold_until[mass], t + occ.settle_s)
        settling = self._hold_until > t
        held = (observed == OCCLUDED) | settling
        # A settling slot that still shows a clear level is partial evidence like a partly hidden one: it keeps a
        # confirmation that was already running (a shopper elsewhere must not push a real alert past its
        # dwell), but never starts one.
        partial = np.where(settling & (observed != OCCLUDED), observed, partial).astype(np.int8)
        confirmed = self._advance_runs(observation, observed, partial, ~held, dt, t)

        # Published occlusion is debounced so a slot on the edge of a shopper does not flap.
        self._held_since[held & ~self._held] = t
        self._held = held
        self._held_for = np.where(held, self._held_for + dt, 0.0)
        self._unheld_for = np.where(held, 0.0, self._unheld_for + dt)
        was_occluded = self.shown == OCCLUDED
        now_occluded = np.where(
            was_occluded, self._unheld_for < occ.release_s, held & (self._held_for >= occ.occluded_after_s)
        )
        now_occluded &= confirmed < 0  # a confirmation always shows its new level

        previous_shown = self.shown.copy()
        previous_state = self.state.copy()
        self.state = np.where(confirmed >= 0, confirmed, self.state).astype(np.int8)
        self.shown = np.where(now_occluded, OCCLUDED, self.state).astype(np.int8)
        changed = np.flatnonzero(self.shown != previous_shown)
        return [
            self._transition(int(i), int(previous_shown[i]), int(previous_state[i]), observation, t) for i in changed
        ]

    def _advance_runs(
        self,
        obs: SlotObservation,
        observed: np.ndarray,
        partial: np.ndarray,
        active: np.ndarray,
        dt: float,
        t: float,
    ) -> np.ndarray:
        """Update the (slot, level) runs; held slots stay frozen except for runs their partial evidence
        supports. Returns the confirmed level per slot or -1."""
        cfg = self.config
        # The slot's own level needs no run: only a different level can be confirmed.
        other = _LEVELS[None, :] != self.state[:, None]
        seen = (observed[:, None] == _LEVELS[None, :]) & active[:, None] & other
        extended = (partial[:, None] == _LEVELS[None, :]) & self._run_active & other
        running = self._run_active & (active[:, None] | extended)
        seen |= extended
        self._run_elapsed[running] += dt
        self._run_missing[running & ~seen] += dt
        self._run_missing[seen] = 0.0
        self._run_active &= ~(running & (self._run_missing > cfg.miss_tolerance_s))
        start = seen & ~self._run_active & ~extended
        self._run_active |= start
        self._run_first[start] = t
        self._run_elapsed[start] = 0.0
        self._run_conf_sum[start] = 0.0
        self._run_frames[start] = 0.0
        evidence = np.stack([obs.product_confidence, obs.product_confidence, obs.gap_confidence], axis=1)
        self._run_conf_sum[seen] += evidence[seen]
        self._run_frames[seen] += 1.0
        ready = seen & (self._run_elapsed >= cfg.dwell_s)
        return np.where(ready.any(axis=1), _LEVELS[ready.argmax(axis=1)], -1)

    def _transition(self, i: int, from_shown: int, from_state: int, obs: SlotObservation, t: float) -> SlotTransition:
        to_state = int(self.state[i])
        slot_box = as_box(obs.slot_bbox[i])
        if self.shown[i] == OCCLUDED or to_state == from_state:
            # Entering or leaving 'occluded' only: no alert, timers were frozen meanwhile.
            since = float(self._held_since[i]) if self.shown[i] == OCCLUDED else t
            return SlotTransition(
                self.slot_ids[i],
                STATE_NAMES[from_shown],
                STATE_NAMES[self.shown[i]],
                None,
                since,
                t,
                0.0,
                0.0,
                slot_box,
            )
        column = int(np.flatnonzero(_LEVELS == to_state)[0])
        first = float(self._run_first[i, column])
        confidence = float(self._run_conf_sum[i, column] / max(self._run_frames[i, column], 1.0))
        self._run_active[i, column] = False  # the level is now the state: its run is spent
        event: EventType | None = None
        # Leaving empty: how long it was empty until the refill was first seen.
        empty_for = 0.0 if math.isnan(self.empty_since[i]) else max(first - float(self.empty_since[i]), 0.0)
        bbox = slot_box
        if to_state == EMPTY:
            if not (self.reported_empty[i] and not math.isnan(self.empty_since[i])):
                self.empty_since[i] = first  # else: still the empty spell reported before a restart
            empty_for = t - float(self.empty_since[i])
            if not np.isnan(obs.gap_bbox[i, 0]):
                bbox = as_box(obs.gap_bbox[i])
            if not self.reported_empty[i]:
                event = "stockout"
            self.reported_empty[i] = True
            self.stockout_open[i] = True
        elif to_state == LOW:
            if self._multi[i] and not self.reported_low[i]:
                event = "low_stock"
            self.reported_low[i] = True
            self.reported_empty[i] = False
            self.empty_since[i] = np.nan
        else:  # OK
            if self.stockout_open[i]:
                event = "restocked"
            self.reported_empty[i] = self.reported_low[i] = self.stockout_open[i] = False
            self.empty_since[i] = np.nan
        return SlotTransition(
            self.slot_ids[i],
            STATE_NAMES[from_shown],
            STATE_NAMES[to_state],
            event,
            first,
            t,
            float(empty_for),
            confidence,
            bbox,
        )

    # -- persistence ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What must survive a restart so no alert is raised twice: plain JSON-able types only."""
        slots = {}
        for i, slot_id in enumerate(self.slot_ids):
            if self.reported_empty[i] or self.reported_low[i] or self.stockout_open[i]:
                since = None if math.isnan(self.empty_since[i]) else float(self.empty_since[i])
                slots[slot_id] = {
                    "reported_empty": bool(self.reported_empty[i]),
                    "reported_low": bool(self.reported_low[i]),
                    "stockout_open": bool(self.stockout_open[i]),
                    "empty_since": since,
                }
        return {"version": _SNAPSHOT_VERSION, "reported": slots}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Take back ``snapshot()``'s reported flags; slots no longer in the layout are ignored."""
        if not isinstance(snapshot, Mapping) or snapshot.get("version") != _SNAPSHOT_VERSION:
            raise ConfigError(f"slot state snapshot: expected version {_SNAPSHOT_VERSION} mapping")
        reported = snapshot.get("reported", {})
        if not isinstance(reported, Mapping):
            raise ConfigError("slot state snapshot: 'reported' must be a mapping of slot id to flags")
        parsed: list[tuple[int, bool, bool, bool, float]] = []
        for slot_id, flags in reported.items():
            i = self._index.get(slot_id)
            if i is None:
                continue
            try:
                since = flags.get("empty_since")
                parsed.append(
                    (
                        i,
                        bool(flags["reported_empty"]),
                        bool(flags["reported_low"]),
                        bool(flags.get("stockout_open", flags["reported_empty"])),
                        math.nan if since is None else float(since),
                    )
                )
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"slot state snapshot: slot '{slot_id}': bad flags ({exc!r})") from None
        # Applied only once everything parsed: a bad snapshot leaves the machine untouched.
        for i, reported_empty, reported_low, stockout_open, since in parsed:
            self.reported_empty[i] = reported_empty
            self.reported_low[i] = reported_low
            self.stockout_open[i] = stockout_open
            self.empty_since[i] = since
