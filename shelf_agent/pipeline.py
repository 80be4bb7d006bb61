"""One frame through the whole device pipeline: detect -> slot state -> alerts in the outbox.

The agent and ``shelf-bench`` both run frames through :class:`ShelfPipeline`, so the benchmark measures the code the
agent runs, stage by stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.model import Detector
from shelfsight.shelf_agent.events import ModelInfo, build_alert, encode_payload, normalize_bbox, topics
from shelfsight.shelf_agent.gap_tracker import GapTracker
from shelfsight.shelf_agent.journal import Journal
from shelfsight.shelf_agent.layout import ShelfLayout
from shelfsight.shelf_agent.outbox import Outbox
from shelfsight.shelf_agent.slot_state import SlotStateMachine, SlotTransition
from shelfsight.shelf_agent.snapshot import SnapshotError, render_snapshot
from shelfsight.shelf_agent.zones import SlotZones, product_gap_class_ids

log = logging.getLogger(__name__)

STAGES = ("preprocess", "infer", "postprocess", "slot_update", "event_outbox")
STATE_KEY = "slot_state"


@dataclass
class FrameResult:
    detections: Detections
    transitions: list[SlotTransition]
    alerts: list[dict[str, Any]]
    stage_ns: dict[str, int] = field(default_factory=dict)


class AlertEmitter:
    """Turns confirmed transitions into schema-valid alerts, stored durably before anything else happens to them."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        store_id: str,
        camera_id: str,
        model: ModelInfo,
        slot_polygons: dict[str, np.ndarray],
        skus: dict[str, str | None],
        frame_size: tuple[int, int],
        time_origin: float,
        journal: Journal | None = None,
        snapshots: bool = True,
        snapshot_max_bytes: int = 200_000,
        topic_prefix: str = "shelfsight",
    ) -> None:
        self.outbox = outbox
        self.store_id, self.camera_id = store_id, camera_id
        self.model = model
        self.slot_polygons, self.skus = slot_polygons, skus
        self.frame_size = frame_size
        self.time_origin = time_origin
        self.journal = journal
        self.snapshots = snapshots
        self.snapshot_max_bytes = snapshot_max_bytes
        self.topics = topics(store_id, camera_id, topic_prefix)
        self.topic_prefix = topic_prefix

    def emit(self, transitions: list[SlotTransition], frame: np.ndarray | None) -> list[dict[str, Any]]:
        alerts = []
        for tr in transitions:
            if tr.event is None:
                continue
            width, height = self.frame_size
            payload = build_alert(
                seq=self.outbox.next_seq(self.camera_id),
                alert_type=tr.event,
                store_id=self.store_id,
                camera_id=self.camera_id,
                slot_id=tr.slot_id,
                sku=self.skus.get(tr.slot_id),
                event_frame_ts=tr.event_time,
                raised_frame_ts=tr.raised_time,
                confidence=min(max(tr.confidence, 0.0), 1.0),
                bbox=np.clip(normalize_bbox(tr.bbox, width, height), 0.0, 1.0),
                model=self.model,
                time_origin=self.time_origin,
                empty_for_s=tr.empty_for_s,
                with_snapshot=self.snapshots and frame is not None,
                topic_prefix=self.topic_prefix,
            )
            self.outbox.put(self.topics.alert, encode_payload(payload), "alert")
            if payload["snapshot_topic"] and frame is not None:
                self._snapshot(payload, tr, frame)
            if self.journal is not None:
                self.journal.record_alert(payload)
            log.info("alert %s seq=%d slot=%s type=%s event_t=%.1fs", payload["alert_id"][:8], payload["seq"],
                     tr.slot_id, tr.event, tr.event_time)
            alerts.append(payload)
        return alerts

    def _snapshot(self, payload: dict[str, Any], tr: SlotTransition, frame: np.ndarray) -> None:
        polygon = self.slot_polygons.get(tr.slot_id)
        if polygon is None:  # planogram-free gap: draw the gap box itself
            x1, y1, x2, y2 = tr.bbox
            polygon = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
        try:
            jpeg = render_snapshot(frame, polygon, max_bytes=self.snapshot_max_bytes,
                                   label=f"{tr.event} {tr.slot_id}")
        except SnapshotError as exc:
            log.warning("snapshot for %s skipped: %s", payload["alert_id"], exc)
            return
        self.outbox.put(payload["snapshot_topic"], jpeg, "snapshot")


class ShelfPipeline:
    """Detector + (layout slots | planogram-free gap tracker) + alert emitter, one ``process`` call per frame."""

    def __init__(
        self,
        detector: Detector,
        emitter: AlertEmitter | None,
        *,
        layout: ShelfLayout | None,
        frame_size: tuple[int, int],
        slot_machine_factory: Callable[[SlotZones], SlotStateMachine],
        gap_tracker_factory: Callable[[int, int], GapTracker],
        journal: Journal | None = None,
    ) -> None:
        self.detector = detector
        self.emitter = emitter
        self.journal = journal
        product_class, gap_class = product_gap_class_ids(detector.manifest.classes)
        self.zones: SlotZones | None = None
        self.machine: SlotStateMachine | None = None
        self.gaps: GapTracker | None = None
        if layout is not None:
            self.zones = SlotZones(layout, frame_size, product_class=product_class, gap_class=gap_class)
            self.machine = slot_machine_factory(self.zones)
        else:
            self.gaps = gap_tracker_factory(product_class, gap_class)
        self._restore()
        self.frames = 0
        self.bad_frames = 0

    @property
    def tracker(self) -> SlotStateMachine | GapTracker:
        tracker = self.machine if self.machine is not None else self.gaps
        assert tracker is not None
        return tracker

    def _restore(self) -> None:
        if self.journal is None:
            return
        saved = self.journal.load_state(STATE_KEY)
        if saved is None:
            return
        try:
            self.tracker.restore(saved)
            log.info("restored slot state from %s: reported stock-outs are not raised again", self.journal.path)
        except Exception as exc:  # a layout change makes the old state meaningless: start fresh, loudly
            log.warning("ignoring saved slot state in %s: %s", self.journal.path, exc)

    def process(self, image: np.ndarray, frame_time_s: float) -> FrameResult:
        """Run one frame; a frame the detector rejects (wrong shape/dtype) is counted and skipped."""
        stage_ns: dict[str, int] = {}
        try:
            detections = self.detector.detect(image)
        except ValueError as exc:
            self.bad_frames += 1
            log.warning("frame at t=%.3fs skipped: %s", frame_time_s, exc)
            return FrameResult(Detections.empty(), [], [], stage_ns)
        stage_ns.update(self.detector.stage_ns)

        start = time.perf_counter_ns()
        if self.machine is not None and self.zones is not None:
            observation = self.zones.measure(detections, image)
            transitions = self.machine.update(observation, frame_time_s)
        else:
            assert self.gaps is not None
            transitions = self.gaps.update(detections, frame_time_s)
        stage_ns["slot_update"] = time.perf_counter_ns() - start

        start = time.perf_counter_ns()
        alerts: list[dict[str, Any]] = []
        if transitions and self.emitter is not None:
            alerts = self.emitter.emit(transitions, image)
        if transitions and self.journal is not None:
            self.journal.save_state(STATE_KEY, self.tracker.snapshot())
        stage_ns["event_outbox"] = time.perf_counter_ns() - start
        self.frames += 1
        return FrameResult(detections, transitions, alerts, stage_ns)

    def slot_states(self) -> dict[str, str]:
        if self.machine is not None:
            return dict(self.machine.states())
        assert self.gaps is not None
        return {slot_id: "empty" for slot_id in self.gaps.reported_gaps()}
