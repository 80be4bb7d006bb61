"""One frame through the whole device pipeline: detect -> slot state -> alerts in the outbox.

The agent and ``shelf-bench`` both run frames through :class:`ShelfPipeline`, so the benchmark measures the code the
agent runs, stage by stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shelfsight.runtime.detections import Detections
from shelfsight.runtime.model import Detector
from shelfsight.shelf_agent.events import ModelInfo, build_alert, encode_payload, normalize_bbox, topics
from shelfsight.shelf_agent.gap_tracker import GapTracker
from shelfsight.shelf_agent.journal import Journal, JournalError
from shelfsight.shelf_agent.layout import ShelfLayout
from shelfsight.shelf_agent.outbox import Outbox, OutboxError
from shelfsight.shelf_agent.slot_state import SlotStateMachine, SlotTransition
from shelfsight.shelf_agent.snapshot import SnapshotError, render_snapshot
from shelfsight.shelf_agent.zones import GAP_CLASS_NAME, PRODUCT_CLASS_NAME, ClassRoles, SlotZones

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
        self.pending = 0  # alerts written ahead in the journal that the outbox has not taken yet

    def emit(
        self,
        transitions: list[SlotTransition],
        frame: np.ndarray | None,
        state: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts for the transitions that carry an event. With a journal, the alerts and ``state`` (the tracker
        snapshot that reported them) are written ahead in one transaction, then moved into the outbox; an outbox
        failure leaves them pending in the journal for the next call (see journal.py). Without a journal an
        OutboxError propagates."""
        prepared = [(self._build(tr, frame is not None), tr) for tr in transitions if tr.event is not None]
        payloads = [payload for payload, _ in prepared]
        fresh = {payload["alert_id"]: tr for payload, tr in prepared}
        if self.journal is not None:
            try:
                self.journal.record_alerts(payloads, state=None if state is None else (STATE_KEY, state))
            except JournalError as exc:
                log.error("%s; %d alert(s) go to the outbox without their journal record", exc, len(payloads))
            else:
                self.queue_pending(frame, fresh)
                return payloads
        for payload, tr in prepared:
            self._enqueue(payload, tr, frame)
        return payloads

    def queue_pending(self, frame: np.ndarray | None = None,
                      fresh: dict[str, SlotTransition] | None = None) -> int:
        """Move the journal's pending alerts into the outbox in seq order; returns how many are still pending.

        Alerts pending from an earlier call (full disk) or an earlier run (a crash between the two writes) go
        without their snapshot: the frame is gone."""
        if self.journal is None:
            return 0
        pending = self.journal.pending_alerts()
        moved = 0
        try:
            for payload in pending:
                stored = self._put_alert(payload)
                self.journal.mark_queued(payload["alert_id"])
                moved += 1
                if stored:
                    self._snapshot(payload, (fresh or {}).get(payload["alert_id"]), frame)
        except (OutboxError, JournalError) as exc:
            log.error("%s; %d alert(s) wait in the journal %s and are queued again on the next frame", exc,
                      len(pending) - moved, self.journal.path)
        self.pending = len(pending) - moved
        return self.pending

    def _build(self, tr: SlotTransition, with_frame: bool) -> dict[str, Any]:
        assert tr.event is not None
        width, height = self.frame_size
        return build_alert(
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
            with_snapshot=self.snapshots and with_frame,
            topic_prefix=self.topic_prefix,
        )

    def _enqueue(self, payload: dict[str, Any], tr: SlotTransition | None, frame: np.ndarray | None) -> None:
        if self._put_alert(payload):
            self._snapshot(payload, tr, frame)

    def _put_alert(self, payload: dict[str, Any]) -> bool:
        """False when the outbox already took this alert: a run that died before marking it queued put it."""
        alert_topic = topics(payload["store_id"], payload["camera_id"], self.topic_prefix).alert
        if self.outbox.put(alert_topic, encode_payload(payload), "alert", key=payload["alert_id"]) is None:
            return False
        log.info("alert %s seq=%d slot=%s type=%s event_t=%.1fs", payload["alert_id"][:8], payload["seq"],
                 payload["slot_id"], payload["type"], payload["event_frame_ts"])
        return True

    def _snapshot(self, payload: dict[str, Any], tr: SlotTransition | None, frame: np.ndarray | None) -> None:
        """Best effort: a snapshot that cannot be made or stored never holds back its alert."""
        if tr is None or frame is None or not payload["snapshot_topic"]:
            return
        polygon = self.slot_polygons.get(tr.slot_id)
        if polygon is None:  # planogram-free gap: draw the gap box itself
            x1, y1, x2, y2 = tr.bbox
            polygon = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
        try:
            jpeg = render_snapshot(frame, polygon, max_bytes=self.snapshot_max_bytes,
                                   label=f"{tr.event} {tr.slot_id}")
            self.outbox.put(payload["snapshot_topic"], jpeg, "snapshot")
        except (SnapshotError, OutboxError) as exc:
            log.warning("snapshot for %s skipped: %s", payload["alert_id"], exc)


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
        class_roles: tuple[Sequence[str], Sequence[str]] = ((PRODUCT_CLASS_NAME,), (GAP_CLASS_NAME,)),
    ) -> None:
        """``class_roles``: the model's class names that count as (product, gap); others are ignored."""
        self.detector = detector
        self.emitter = emitter
        self.journal = journal
        self.frame_size = frame_size
        self.roles = ClassRoles(detector.manifest.classes, *class_roles)
        product_class, gap_class = ClassRoles.PRODUCT, ClassRoles.GAP
        self.zones: SlotZones | None = None
        self.machine: SlotStateMachine | None = None
        self.gaps: GapTracker | None = None
        if layout is not None:
            self.zones = SlotZones(layout, frame_size, product_class=product_class, gap_class=gap_class)
            self.machine = slot_machine_factory(self.zones)
        else:
            self.gaps = gap_tracker_factory(product_class, gap_class)
        self._restore()
        if self.emitter is not None:
            self.emitter.queue_pending()  # left by a crash between the journal and the outbox write
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
        """Run one frame; a malformed frame (not uint8 BGR of the pipeline's frame size) is counted and skipped."""
        stage_ns: dict[str, int] = {}
        try:
            self._check_frame(image)
            detections = self.roles.apply(self.detector.detect(image))
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
        if self.emitter is not None and self.emitter.pending:
            self.emitter.queue_pending()
        if transitions:
            alerts = self._commit(transitions, image)
        stage_ns["event_outbox"] = time.perf_counter_ns() - start
        self.frames += 1
        return FrameResult(detections, transitions, alerts, stage_ns)

    def _check_frame(self, image: object) -> None:
        # The detector accepts any size, but slot geometry, bboxes and snapshots are tied to this frame size.
        width, height = self.frame_size
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.size:
            if image.shape[:2] != (height, width):
                raise ValueError(f"frame is {image.shape[1]}x{image.shape[0]}, expected {width}x{height}")
        elif isinstance(image, np.ndarray) and image.size:
            raise ValueError(f"frame must be BGR HxWx3, got shape {image.shape}")
        # anything else (empty, not an array): the detector says what is wrong

    def _commit(self, transitions: list[SlotTransition], image: np.ndarray) -> list[dict[str, Any]]:
        """Alerts plus the tracker state that reported them, durably: a restart must neither lose nor repeat one."""
        state = self.tracker.snapshot() if self.journal is not None else None
        if self.emitter is not None and self.emitter.journal is not None:
            return self.emitter.emit(transitions, image, state=state)
        alerts = self.emitter.emit(transitions, image) if self.emitter is not None else []
        if self.journal is not None and state is not None:
            try:
                self.journal.save_state(STATE_KEY, state)
            except JournalError as exc:
                log.error("%s: slot state not saved", exc)
        return alerts

    def slot_states(self) -> dict[str, str]:
        if self.machine is not None:
            return dict(self.machine.states())
        assert self.gaps is not None
        return {slot_id: "empty" for slot_id in self.gaps.reported_gaps()}
