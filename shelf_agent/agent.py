"""The long-running device agent: camera -> ShelfPipeline -> outbox -> MQTT, with state, metrics and a clean stop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shelfsight.runtime.model import Detector, load_model
from shelfsight.shelf_agent.capture import CameraState, CaptureThread, Frame
from shelfsight.shelf_agent.config import AgentConfig
from shelfsight.shelf_agent.events import (
    ModelInfo,
    SlotStatus,
    build_metrics,
    build_state,
    encode_payload,
    topics,
)
from shelfsight.shelf_agent.gap_tracker import GapTracker
from shelfsight.shelf_agent.journal import Journal
from shelfsight.shelf_agent.layout import ShelfLayout, load_layout
from shelfsight.shelf_agent.mqtt_client import Publisher
from shelfsight.shelf_agent.outbox import Outbox, OutboxError
from shelfsight.shelf_agent.pipeline import STAGES, AlertEmitter, ShelfPipeline
from shelfsight.shelf_agent.slot_state import SlotStateMachine
from shelfsight.shelf_agent.sources import parse_camera

log = logging.getLogger(__name__)

LATENCY_WINDOW = 256


def bundled_model_dir() -> Path:
    """The demo model shipped in the wheel (INT8 when present, else FP32)."""
    models = Path(__file__).resolve().parent.parent / "runtime" / "models"
    for name in ("shelfsight-demo-int8", "shelfsight-demo"):
        if (models / name / "manifest.json").is_file():
            return models / name
    return models / "shelfsight-demo"


def open_detector(config: AgentConfig) -> Detector:
    manifest = config.model.manifest or bundled_model_dir()
    return load_model(
        manifest,
        backend=config.model.backend,
        providers=config.model.providers,
        threads=config.model.threads,
        conf_threshold=config.model.conf_threshold,
        iou_threshold=config.model.iou_threshold,
    )


def build_pipeline(
    config: AgentConfig,
    detector: Detector,
    layout: ShelfLayout | None,
    frame_size: tuple[int, int],
    outbox: Outbox | None,
    journal: Journal | None,
    time_origin: float,
) -> ShelfPipeline:
    emitter = None
    if outbox is not None:
        polygons = {s.id: np.asarray(s.polygon, np.float32) for s in layout.slots} if layout else {}
        if layout is not None and (layout.frame_size.width, layout.frame_size.height) != frame_size:
            sx, sy = frame_size[0] / layout.frame_size.width, frame_size[1] / layout.frame_size.height
            polygons = {k: v * np.array([sx, sy], np.float32) for k, v in polygons.items()}
        emitter = AlertEmitter(
            outbox,
            store_id=config.store_id,
            camera_id=config.camera_id,
            model=ModelInfo.from_manifest(detector.manifest),
            slot_polygons=polygons,
            skus={s.id: s.sku for s in layout.slots} if layout else {},
            frame_size=frame_size,
            time_origin=time_origin,
            journal=journal,
            snapshots=config.publish.snapshots,
            snapshot_max_bytes=config.publish.snapshot_max_bytes,
            topic_prefix=config.mqtt.topic_prefix,
        )
    return ShelfPipeline(
        detector,
        emitter,
        layout=layout,
        frame_size=frame_size,
        slot_machine_factory=lambda zones: SlotStateMachine.from_zones(zones, config.slots),
        gap_tracker_factory=lambda product, gap: GapTracker(config.gaps, product_class=product, gap_class=gap),
        journal=journal,
        class_roles=(config.model.product_classes, config.model.gap_classes),
    )


@dataclass
class RunSummary:
    frames_seen: int
    frames_processed: int
    bad_frames: int
    alerts: list[dict[str, Any]]
    """every alert raised, when the agent keeps them (``keep_alerts``); else empty"""
    wall_s: float
    source_s: float
    alerts_raised: int = 0

    @property
    def fps(self) -> float:
        return self.frames_processed / self.wall_s if self.wall_s > 0 else 0.0


class Agent:
    """Owns the threads; ``run()`` blocks until the source ends or ``stop()`` (SIGTERM/SIGINT) is called."""

    def __init__(self, config: AgentConfig, *, publish: bool = True, keep_alerts: bool = True) -> None:
        """``keep_alerts``: return every alert in ``RunSummary.alerts`` (evaluation, tests). A long-running agent
        passes False and keeps only the count: they are in the journal and the outbox, and a list in memory would
        grow with every alert for as long as it runs (~3 KB each)."""
        self.config = config
        self.publish = publish
        self.keep_alerts = keep_alerts
        self._stop = threading.Event()
        self.layout = load_layout(config.layout) if config.layout is not None else None
        self.detector = open_detector(config)
        self.source = parse_camera(config.camera.source, config.camera.options)
        self.outbox = Outbox(config.outbox.path, max_messages=config.outbox.max_messages,
                             max_bytes=config.outbox.max_bytes)
        self.journal = Journal(config.journal)
        self.topics = topics(config.store_id, config.camera_id, config.mqtt.topic_prefix)
        self.publisher: Publisher | None = None
        self.capture = CaptureThread(self.source, config.camera.capture, on_state_change=self._camera_changed)
        self.pipeline: ShelfPipeline | None = None
        self._latency: dict[str, deque[float]] = {
            stage: deque(maxlen=LATENCY_WINDOW) for stage in (*STAGES, "end_to_end")
        }
        self._frame_ages: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._camera_state = CameraState.STARTING
        self._camera_changed_flag = threading.Event()
        self._published_states: dict[str, str] = {}

    # ---------------------------------------------------------------- control

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _camera_changed(self, old: CameraState, new: CameraState, reason: str) -> None:
        self._camera_state = new
        self._camera_changed_flag.set()
        level = logging.INFO if new in (CameraState.STREAMING, CameraState.STARTING) else logging.WARNING
        log.log(level, "camera %s: %s -> %s (%s)", self.source.describe(), old.value, new.value, reason)

    # ---------------------------------------------------------------- main loop

    def run(self) -> RunSummary:
        started = time.monotonic()
        if self.publish:
            self.publisher = Publisher(self.config.mqtt, self.outbox, store_id=self.config.store_id,
                                       camera_id=self.config.camera_id).start()
        self.capture.start()
        min_interval = 1.0 / self.config.fps
        last_processed: float | None = None
        seen = processed = raised = 0
        first_ts: float | None = None
        last_ts = 0.0
        alerts: list[dict[str, Any]] = []
        next_metrics = time.monotonic() + self.config.publish.metrics_interval_s
        last_metrics = time.monotonic()
        next_state = 0.0
        try:
            while not self._stop.is_set():
                frame = self.capture.read(timeout=0.25)
                now = time.monotonic()
                if frame is not None:
                    seen += 1
                    first_ts = frame.timestamp_s if first_ts is None else first_ts
                    last_ts = frame.timestamp_s
                    # The cap runs on source time, so a replay at any speed processes the same frames.
                    if last_processed is None or frame.timestamp_s - last_processed >= min_interval - 1e-6:
                        last_processed = frame.timestamp_s
                        new_alerts = self._process(frame)
                        raised += len(new_alerts)
                        if self.keep_alerts:
                            alerts.extend(new_alerts)
                        processed += 1
                        if self._states_changed():
                            next_state = 0.0
                elif self.capture.finished:
                    break
                if now >= next_state and self.pipeline is not None:
                    self._put_state(last_ts)
                    next_state = now + self.config.publish.state_interval_s
                if now >= next_metrics or self._camera_changed_flag.is_set():
                    self._camera_changed_flag.clear()
                    self._put_metrics(now - last_metrics)
                    last_metrics, next_metrics = now, now + self.config.publish.metrics_interval_s
        finally:
            self._shutdown(last_ts, time.monotonic() - last_metrics)
        bad = self.pipeline.bad_frames if self.pipeline else 0
        return RunSummary(seen, processed, bad, alerts, time.monotonic() - started,
                          (last_ts - first_ts) if first_ts is not None else 0.0, raised)

    def _process(self, frame: Frame) -> list[dict[str, Any]]:
        if self.pipeline is None:
            height, width = frame.image.shape[:2]
            origin = 0.0 if self.source.is_live else time.time() - frame.timestamp_s
            self.pipeline = build_pipeline(self.config, self.detector, self.layout, (width, height), self.outbox,
                                           self.journal, origin)
        start = time.perf_counter_ns()
        try:
            result = self.pipeline.process(frame.image, frame.timestamp_s)
        except OutboxError as exc:
            # Disk full or read-only: keep watching the shelf; the alert is retried when the condition repeats.
            log.error("%s", exc)
            return []
        total = time.perf_counter_ns() - start
        for stage, ns in result.stage_ns.items():
            self._latency[stage].append(ns / 1e6)
        self._latency["end_to_end"].append(total / 1e6)
        self._frame_ages.append(frame.age_s * 1000.0)
        if result.alerts and self.publisher is not None:
            self.publisher.notify()
        return result.alerts

    def _states_changed(self) -> bool:
        assert self.pipeline is not None
        return self.pipeline.slot_states() != self._published_states

    # ---------------------------------------------------------------- periodic messages

    def _put_state(self, frame_ts: float) -> None:
        assert self.pipeline is not None
        states = self.pipeline.slot_states()
        self._published_states = states
        skus = {s.id: s.sku for s in self.layout.slots} if self.layout else {}
        slots = [SlotStatus(slot_id, state, frame_ts, skus.get(slot_id)) for slot_id, state in states.items()]
        origin = self.pipeline.emitter.time_origin if self.pipeline.emitter else 0.0
        payload = build_state(store_id=self.config.store_id, camera_id=self.config.camera_id, frame_ts=frame_ts,
                              slots=slots, time_origin=origin)
        self._put(self.topics.state, payload, "state")

    def _put_metrics(self, interval_s: float) -> None:
        latency = {
            stage: (float(np.percentile(values, 50)), float(np.percentile(values, 95)))
            for stage, values in self._latency.items()
            if values
        }
        stats = self.capture.stats
        processed = len(self._latency["end_to_end"])
        payload = build_metrics(
            store_id=self.config.store_id,
            camera_id=self.config.camera_id,
            interval_s=interval_s,
            fps=min(stats.fps_measured, self.config.fps) if processed else 0.0,
            latency_ms=latency,
            frame_age_ms=float(np.median(self._frame_ages)) if self._frame_ages else None,
            dropped_frames=stats.frames_dropped,
            outbox=self.outbox.stats(),
            camera_state=self._camera_state.value,
            camera_reconnects=stats.reconnects,
            mqtt=self.publisher.stats().as_metrics() if self.publisher else None,
        )
        self._put(self.topics.metrics, payload, "metrics")

    def _put(self, topic: str, payload: dict[str, Any], kind: str) -> None:
        try:
            self.outbox.put(topic, encode_payload(payload), kind)
        except OutboxError as exc:
            log.error("%s", exc)
            return
        if self.publisher is not None:
            self.publisher.notify()

    def _shutdown(self, last_ts: float, since_metrics_s: float) -> None:
        self.capture.stop()
        if self._camera_changed_flag.is_set():
            # The final camera state (ended, failed) is published too: the loop leaves as soon as the source is
            # finished, before its metrics check, and stop() ends the camera only now.
            self._camera_changed_flag.clear()
            self._put_metrics(since_metrics_s)
        if self.pipeline is not None:
            self._put_state(last_ts)
        if self.publisher is not None:
            self.publisher.stop(timeout=10.0, drain=True)
        self.detector.close()
        self.journal.close()
        self.outbox.close()
