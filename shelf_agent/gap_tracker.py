"""Planogram-free stock-out tracking: follow ``gap`` detections by position instead of by slot.

Without a layout there are no slots, so a gap box that stays in place for ``dwell_s`` of frame time becomes a
stockout of a synthetic slot ``G{n}`` (numbered in the order they are reported, stable across restarts through
``snapshot``/``restore``). A reported gap is restocked only on POSITIVE evidence: products covering its box for
``restock_confirm_s``. When neither the gap nor products are seen there (a shopper in front), its clock is frozen,
as in the slot state machine. Transitions are ``SlotTransition``s so the agent treats both modes alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.slot_state import SlotTransition, as_box

_SNAPSHOT_VERSION = 1
_FIELDS = (
    "bbox",
    "first",
    "elapsed",
    "missing",
    "conf_sum",
    "frames",
    "reported",
    "number",
    "restock_first",
    "restock_elapsed",
    "restock_missing",
)


class GapTrackerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dwell_s: float = Field(default=10.0, ge=0, description="a gap must persist this long to be a stockout")
    iou_match: float = Field(default=0.3, gt=0, le=1, description="min IoU between a track and a detection to match")
    miss_tolerance_s: float = Field(default=1.0, ge=0, description="a track survives missing detections this long")
    restock_confirm_s: float = Field(default=5.0, ge=0, description="products must cover a reported gap this long")
    restock_product_coverage: float = Field(
        default=0.5, gt=0, le=1, description="share of the gap box products must cover"
    )
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    box_smoothing: float = Field(default=0.5, ge=0, lt=1, description="weight of the old box when a track is updated")
    max_frame_gap_s: float = Field(default=2.0, gt=0, description="a longer gap between frames counts only this much")
    max_tracks: int = Field(default=256, ge=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (rows, cols) by mutual best IoU, repeated on what is left; equals greedy-by-highest-IoU matching.

    Each round matches every pair that is the other's best choice at once, so the number of rounds is small
    (not the number of boxes) on shelf scenes.
    """
    score = np.where(iou >= threshold, iou, -1.0)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    while score.size and score.max() >= 0:
        best_col = score.argmax(axis=1)
        best_row = score.argmax(axis=0)
        r = np.flatnonzero((best_row[best_col] == np.arange(len(score))) & (score.max(axis=1) >= 0))
        c = best_col[r]
        rows.append(r)
        cols.append(c)
        score[r, :] = -1.0
        score[:, c] = -1.0
    if not rows:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.concatenate(rows), np.concatenate(cols)


class GapTracker:
    """Tracks of gap boxes held in parallel numpy arrays; ``update`` once per frame in timestamp order."""

    def __init__(self, config: GapTrackerConfig | None = None, *, product_class: int = 0, gap_class: int = 1) -> None:
        self.config = config if config is not None else GapTrackerConfig()
        self.product_class = product_class
        self.gap_class = gap_class
        self._next_number = 1
        self._last_time: float | None = None
        self._tracks = self._empty_tracks(0)

    @staticmethod
    def _empty_tracks(n: int) -> dict[str, np.ndarray]:
        tracks = {name: np.zeros(n) for name in _FIELDS}
        tracks["bbox"] = np.zeros((n, 4))
        tracks["reported"] = np.zeros(n, bool)
        tracks["number"] = np.zeros(n, np.int64)  # 0 until reported
        tracks["restock_first"] = np.full(n, np.nan)
        return tracks

    def __len__(self) -> int:
        return len(self._tracks["first"])

    def reported_gaps(self) -> dict[str, tuple[float, float, float, float]]:
        """Synthetic slot id -> box (frame pixels) of every gap currently reported as a stockout."""
        tr = self._tracks
        reported = tr["reported"]
        return {
            f"G{number}": as_box(box) for number, box in zip(tr["number"][reported], tr["bbox"][reported], strict=True)
        }

    def update(self, detections: Detections, frame_time_s: float) -> list[SlotTransition]:
        cfg = self.config
        t = float(frame_time_s)
        dt = 0.0 if self._last_time is None else min(max(t - self._last_time, 0.0), cfg.max_frame_gap_s)
        self._last_time = t if self._last_time is None else max(t, self._last_time)

        is_gap = (detections.class_id == self.gap_class) & (detections.confidence >= cfg.min_confidence)
        gaps = detections.xyxy[is_gap].astype(np.float64)
        gap_conf = detections.confidence[is_gap].astype(np.float64)
        products = detections.xyxy[detections.class_id == self.product_class].astype(np.float64)

        tr = self._tracks
        rows, cols = greedy_match(iou_matrix(tr["bbox"], gaps), cfg.iou_match)
        matched = np.zeros(len(self), bool)
        matched[rows] = True
        product_seen = ~matched & (self._product_coverage(tr["bbox"], products) >= cfg.restock_product_coverage)
        # Seen = the gap or the products are visible; otherwise something hides the spot and the clock stops.
        seen = matched | product_seen
        pending = ~tr["reported"]

        # Candidate tracks: a run of gap evidence that survives short misses.
        tr["elapsed"][pending & (matched | (tr["missing"] + dt <= cfg.miss_tolerance_s))] += dt
        tr["missing"] = np.where(matched, 0.0, tr["missing"] + np.where(pending | seen, dt, 0.0))
        smooth = cfg.box_smoothing
        tr["bbox"][rows] = smooth * tr["bbox"][rows] + (1.0 - smooth) * gaps[cols]
        tr["conf_sum"][rows] += gap_conf[cols]
        tr["frames"][rows] += 1.0

        # Reported tracks: a run of product evidence; the gap coming back cancels it.
        restocking = tr["reported"] & ~np.isnan(tr["restock_first"])
        start = tr["reported"] & product_seen & ~restocking
        tr["restock_first"][start] = t
        tr["restock_elapsed"][start] = 0.0
        tr["restock_missing"][start] = 0.0
        going = restocking & seen
        tr["restock_elapsed"][going] += dt
        tr["restock_missing"][going] = np.where(product_seen[going], 0.0, tr["restock_missing"][going] + dt)
        cancel = tr["reported"] & (tr["restock_missing"] > cfg.miss_tolerance_s)
        tr["restock_first"][cancel] = np.nan
        tr["restock_missing"][cancel] = 0.0

        transitions: list[SlotTransition] = []
        raise_now = np.flatnonzero(pending & matched & (tr["elapsed"] >= cfg.dwell_s))
        for i in raise_now:
            tr["reported"][i] = True
            tr["number"][i] = self._next_number
            self._next_number += 1
            transitions.append(self._transition(int(i), "stockout", float(tr["first"][i]), t))
        restocked = np.flatnonzero(
            tr["reported"] & (tr["restock_elapsed"] >= cfg.restock_confirm_s) & ~np.isnan(tr["restock_first"])
        )
        for i in restocked:
            transitions.append(self._transition(int(i), "restocked", float(tr["restock_first"][i]), t))

        expired = pending & (tr["missing"] > cfg.miss_tolerance_s)
        drop = expired.copy()
        drop[restocked] = True
        self._keep(~drop)
        self._add(gaps, gap_conf, np.setdiff1d(np.arange(len(gaps)), cols), t)
        return transitions

    @staticmethod
    def _product_coverage(boxes: np.ndarray, products: np.ndarray) -> np.ndarray:
        """Share of each box covered by products (sum of overlaps, capped at 1: shelf products rarely overlap)."""
        if len(boxes) == 0 or len(products) == 0:
            return np.zeros(len(boxes))
        lo = np.maximum(boxes[:, None, :2], products[None, :, :2])
        hi = np.minimum(boxes[:, None, 2:], products[None, :, 2:])
        inter = np.clip(hi - lo, 0, None).prod(axis=2).sum(axis=1)
        area = np.clip(boxes[:, 2:] - boxes[:, :2], 1e-9, None).prod(axis=1)
        return np.minimum(inter / area, 1.0)

    def _transition(self, i: int, event: str, event_time: float, t: float) -> SlotTransition:
        tr = self._tracks
        confidence = float(tr["conf_sum"][i] / max(tr["frames"][i], 1.0))
        box = as_box(tr["bbox"][i])
        if event == "stockout":
            return SlotTransition(
                f"G{tr['number'][i]}", "ok", "empty", "stockout", event_time, t, t - event_time, confidence, box
            )
        return SlotTransition(
            f"G{tr['number'][i]}",
            "empty",
            "ok",
            "restocked",
            event_time,
            t,
            max(event_time - float(tr["first"][i]), 0.0),
            confidence,
            box,
        )

    def _keep(self, keep: np.ndarray) -> None:
        self._tracks = {name: values[keep] for name, values in self._tracks.items()}

    def _add(self, boxes: np.ndarray, conf: np.ndarray, new: np.ndarray, t: float) -> None:
        if len(new) == 0:
            return
        fresh = self._empty_tracks(len(new))
        fresh["bbox"] = boxes[new]
        fresh["first"][:] = t
        fresh["conf_sum"] = conf[new].copy()
        fresh["frames"][:] = 1.0
        self._tracks = {name: np.concatenate([self._tracks[name], fresh[name]]) for name in _FIELDS}
        overflow = len(self) - self.config.max_tracks
        if overflow > 0:
            # Forget the newest candidates first: reported gaps and long-running candidates matter more.
            candidates = np.flatnonzero(~self._tracks["reported"])
            keep = np.ones(len(self), bool)
            keep[candidates[-overflow:]] = False
            self._keep(keep)

    def snapshot(self) -> dict[str, Any]:
        """Reported gaps and the id counter, as plain types, so a restart neither re-raises nor reuses ids."""
        tr = self._tracks
        gaps = [
            {"id": f"G{n}", "bbox": [float(v) for v in box], "event_time": float(first)}
            for n, box, first in zip(
                tr["number"][tr["reported"]], tr["bbox"][tr["reported"]], tr["first"][tr["reported"]], strict=True
            )
        ]
        return {"version": _SNAPSHOT_VERSION, "next_number": self._next_number, "reported": gaps}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        if not isinstance(snapshot, Mapping) or snapshot.get("version") != _SNAPSHOT_VERSION:
            raise ConfigError(f"gap tracker snapshot: expected version {_SNAPSHOT_VERSION} mapping")
        try:
            gaps = list(snapshot["reported"])
            numbers = np.array([int(str(g["id"]).removeprefix("G")) for g in gaps], np.int64)
            boxes = np.array([[float(v) for v in g["bbox"]] for g in gaps], np.float64).reshape(-1, 4)
            firsts = np.array([float(g["event_time"]) for g in gaps])
            next_number = max(int(snapshot["next_number"]), int(numbers.max(initial=0)) + 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"gap tracker snapshot: malformed ({exc})") from None
        tracks = self._empty_tracks(len(gaps))
        tracks["bbox"] = boxes
        tracks["first"] = firsts
        tracks["reported"][:] = True
        tracks["number"] = numbers
        self._tracks = tracks
        self._next_number = next_number
