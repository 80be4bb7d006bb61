"""ShelfPipeline / AlertEmitter with real parts: the bundled ONNX model on frames decoded from a rendered scenario,
real SQLite outbox and journal.

The alert write-ahead (journal first, then outbox) is tested by leaving the journal in the state a crash or a full
disk between the two writes would leave it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from video_frames import video_frames

from shelfsight.runtime.model import Detector
from shelfsight.shelf_agent.agent import build_pipeline, open_detector
from shelfsight.shelf_agent.config import AgentConfig
from shelfsight.shelf_agent.events import ModelInfo, build_alert, validate_payload
from shelfsight.shelf_agent.journal import Journal
from shelfsight.shelf_agent.layout import ShelfLayout, load_layout
from shelfsight.shelf_agent.outbox import Outbox, OutboxError
from shelfsight.shelf_agent.pipeline import STAGES, STATE_KEY, AlertEmitter, ShelfPipeline
from shelfsight.shelf_agent.slot_state import SlotTransition

# The small scenario (conftest): these slots empty, R2S3 for good.
DEPLETED = {"R1S2", "R2S3"}
STAYS_EMPTY = "R2S3"  # empty from 7 s to the end
FRAME_SIZE = (640, 360)
DWELL_S = 2.0


@pytest.fixture(scope="module")
def frames(small_scenario: Path) -> list[tuple[float, np.ndarray]]:
    """Every second decoded frame (5 fps) with its timestamp in seconds."""
    out = [(index / 10.0, image) for index, image in video_frames(small_scenario / "video.mp4", step=2)]
    assert len(out) == 100 and out[0][1].shape == (360, 640, 3)
    return out


@pytest.fixture(scope="module")
def detector() -> Iterator[Detector]:
    detector = open_detector(AgentConfig())
    yield detector
    detector.close()


@pytest.fixture(scope="module")
def layout(small_scenario: Path) -> ShelfLayout:
    return load_layout(small_scenario / "layout.yaml")


CONFIG = AgentConfig(slots={"dwell_s": DWELL_S}, gaps={"dwell_s": DWELL_S})  # type: ignore[arg-type]


def make_pipeline(detector: Detector, layout: ShelfLayout | None, folder: Path, journal_path: Path | None = None
                  ) -> tuple[ShelfPipeline, Outbox, Journal]:
    """The agent's own wiring (build_pipeline) on an outbox and a journal in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(folder / "outbox.sqlite")
    journal = Journal(journal_path or folder / "journal.sqlite")
    return build_pipeline(CONFIG, detector, layout, FRAME_SIZE, outbox, journal, 1_700_000_000.0), outbox, journal


def outbox_rows(outbox: Outbox) -> list[Any]:
    return outbox.peek_batch(10_000)


# ------------------------------------------------------------------------------------------------ bad frames

GOOD = np.zeros((360, 640, 3), np.uint8)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(GOOD.astype(np.float32), id="float32"),
        pytest.param(np.zeros((0, 0, 3), np.uint8), id="zero-size"),
        pytest.param(np.zeros((360, 0, 3), np.uint8), id="zero-width"),
        pytest.param(np.zeros((360, 640), np.uint8), id="grayscale"),
        pytest.param(np.zeros((360, 640, 4), np.uint8), id="bgra"),
        pytest.param(np.zeros((100, 120, 3), np.uint8), id="other-size"),
        pytest.param(np.zeros(10, np.uint8), id="1-d"),
        pytest.param("not an image", id="not-an-array"),
    ],
)
@pytest.mark.parametrize("with_layout", [True, False], ids=["layout", "planogram-free"])
def test_corrupt_frame_is_skipped_and_counted(detector: Detector, layout: ShelfLayout, tmp_path: Path, bad: Any,
                                              with_layout: bool, caplog: pytest.LogCaptureFixture) -> None:
    pipeline, outbox, _ = make_pipeline(detector, layout if with_layout else None, tmp_path)
    result = pipeline.process(bad, 0.0)
    assert (pipeline.bad_frames, pipeline.frames) == (1, 0)
    assert len(result.detections) == 0 and result.alerts == [] and result.transitions == []
    assert any("skipped" in r.getMessage() for r in caplog.records)
    pipeline.process(GOOD, 0.5)  # and the next good frame runs normally
    assert (pipeline.bad_frames, pipeline.frames) == (1, 1)
    outbox.close()


# ------------------------------------------------------------------------------------------------ real video

@pytest.fixture(scope="module")
def video_run(detector: Detector, layout: ShelfLayout, frames: list[tuple[float, np.ndarray]],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pipeline-run")
    pipeline, outbox, journal = make_pipeline(detector, layout, folder)
    alerts, stage_names = [], set()
    for t, image in frames:
        result = pipeline.process(image, t)
        alerts.extend(result.alerts)
        stage_names |= set(result.stage_ns)
    run = {
        "folder": folder,
        "alerts": alerts,
        "stages": stage_names,
        "rows": outbox_rows(outbox),
        "journal_alerts": journal.alerts(),
        "pending": journal.pending_alerts(),
        "state": journal.load_state(STATE_KEY),
        "states": pipeline.slot_states(),
    }
    outbox.close()
    journal.close()
    return run


def stockout_slots(alerts: list[dict[str, Any]]) -> set[str]:
    return {a["slot_id"] for a in alerts if a["type"] == "stockout"}


def test_video_alerts_are_valid_and_stored_in_order(video_run: dict[str, Any]) -> None:
    alerts = video_run["alerts"]
    assert stockout_slots(alerts) & DEPLETED, f"no stock-out for a depleted slot: {alerts}"
    for alert in alerts:
        validate_payload(alert)
    seqs = [a["seq"] for a in alerts]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    assert len({a["alert_id"] for a in alerts}) == len(alerts)
    assert set(STAGES) <= video_run["stages"]

    # Outbox: each alert row (exactly the payload) followed by its snapshot (a JPEG of the slot).
    rows = video_run["rows"]
    alert_rows = [r for r in rows if r.kind == "alert"]
    assert [json.loads(r.payload) for r in alert_rows] == alerts
    for alert in alerts:
        assert alert["snapshot_topic"] == f"shelfsight/demo-store/cam-1/snapshot/{alert['alert_id']}"
        snap = [r for r in rows if r.topic == alert["snapshot_topic"]]
        assert len(snap) == 1 and snap[0].kind == "snapshot" and snap[0].payload[:2] == b"\xff\xd8"
        assert rows.index(snap[0]) > rows.index(next(r for r in alert_rows if json.loads(r.payload) == alert))
        image = cv2.imdecode(np.frombuffer(snap[0].payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (360, 640)

    # Journal: the same history, nothing left pending, and the state that reported it.
    assert video_run["journal_alerts"] == alerts
    assert video_run["pending"] == []
    reported = {slot for slot, flags in video_run["state"]["reported"].items() if flags["reported_empty"]}
    assert reported == {s for s, state in video_run["states"].items() if state == "empty"}


def test_restored_state_does_not_raise_a_stockout_again(video_run: dict[str, Any], detector: Detector,
                                                        layout: ShelfLayout, frames: list[tuple[float, np.ndarray]],
                                                        tmp_path: Path) -> None:
    reported = {slot for slot, flags in video_run["state"]["reported"].items() if flags["reported_empty"]}
    if STAYS_EMPTY not in reported:
        pytest.skip(f"the bundled model did not report {STAYS_EMPTY} empty on this scenario: {video_run['alerts']}")
    tail = [(t, image) for t, image in frames if t >= 12.0]  # R2S3 empty in all of them

    # Control: without the saved state, these frames do raise the stock-out (the frames show an empty slot).
    fresh, fresh_outbox, _ = make_pipeline(detector, layout, tmp_path / "fresh")
    fresh_alerts = [a for t, image in tail for a in fresh.process(image, t).alerts]
    assert STAYS_EMPTY in stockout_slots(fresh_alerts)
    fresh_outbox.close()

    # Restarted on the first run's journal: state restored, so no second stock-out for a reported slot.
    restored, outbox, journal = make_pipeline(detector, layout, tmp_path / "restart",
                                              video_run["folder"] / "journal.sqlite")
    assert restored.tracker.snapshot()["reported"][STAYS_EMPTY]["reported_empty"]
    again = [a for t, image in tail for a in restored.process(image, t).alerts]
    assert not (stockout_slots(again) & reported), again
    outbox.close()
    journal.close()


# ------------------------------------------------------------------------------------------------ write-ahead

MODEL = ModelInfo(name="test-model", sha256="0" * 64, precision="fp32")


def emitter_for(outbox: Outbox, journal: Journal | None) -> AlertEmitter:
    polygon = np.array([[100, 50], [200, 50], [200, 150], [100, 150]], np.float32)
    return AlertEmitter(outbox, store_id="s1", camera_id="c1", model=MODEL, slot_polygons={"R1S1": polygon},
                        skus={"R1S1": "Tea"}, frame_size=FRAME_SIZE, time_origin=1_700_000_000.0, journal=journal)


def transition(slot: str = "R1S1", t: float = 12.0, event: str = "stockout") -> SlotTransition:
    return SlotTransition(slot, "ok", "empty", event, t - 2.0, t, 2.0, 0.8, (100.0, 50.0, 200.0, 150.0))  # type: ignore[arg-type]


def test_emitter_writes_journal_then_outbox(tmp_path: Path) -> None:
    outbox, journal = Outbox(tmp_path / "o.sqlite"), Journal(tmp_path / "j.sqlite")
    emitter = emitter_for(outbox, journal)
    state = {"version": 1, "reported": {"R1S1": {"reported_empty": True, "reported_low": False, "empty_since": 10}}}
    alerts = emitter.emit([transition(), transition(t=20.0, event="restocked"),
                           SlotTransition("R1S1", "ok", "occluded", None, 1, 1, 0, 0, (0, 0, 1, 1))], GOOD, state)
    assert [a["type"] for a in alerts] == ["stockout", "restocked"] and [a["seq"] for a in alerts] == [1, 2]
    assert alerts[0]["sku"] == "Tea" and alerts[0]["bbox"] == pytest.approx([100 / 640, 50 / 360, 200 / 640, 150 / 360])
    rows = outbox_rows(outbox)
    assert [r.kind for r in rows] == ["alert", "snapshot", "alert", "snapshot"]
    assert rows[0].topic == "shelfsight/s1/c1/alert" and json.loads(rows[0].payload) == alerts[0]
    assert journal.alerts() == alerts and journal.pending_alerts() == []
    assert journal.load_state(STATE_KEY) == state
    assert emitter.pending == 0


def test_alert_pending_in_journal_is_queued_at_startup(detector: Detector, layout: ShelfLayout,
                                                       tmp_path: Path) -> None:
    """A crash after the journal commit, before the outbox put: the next start puts the alert, once."""
    journal = Journal(tmp_path / "journal.sqlite")
    payload = build_alert(seq=7, alert_type="stockout", store_id="demo-store", camera_id="cam-1", slot_id="R1S2",
                          sku=None, event_frame_ts=3.0, raised_frame_ts=5.0, confidence=0.9, bbox=[0.1, 0.1, 0.2, 0.2],
                          model=MODEL)
    state = {"version": 1, "reported": {"R1S2": {"reported_empty": True, "reported_low": False, "empty_since": 3.0}}}
    journal.record_alerts([payload], state=(STATE_KEY, state))
    assert journal.pending_alerts() == [payload]
    journal.close()

    for _ in range(2):  # the second start finds nothing pending: no duplicate
        pipeline, outbox, journal2 = make_pipeline(detector, layout, tmp_path)
        assert pipeline.tracker.snapshot()["reported"]["R1S2"]["reported_empty"]  # from the same transaction
        assert journal2.pending_alerts() == []
        rows = outbox_rows(outbox)
        assert [json.loads(r.payload) for r in rows] == [payload]  # no snapshot: the frame died with the process
        outbox.close()
        journal2.close()


def test_kill_between_outbox_put_and_journal_mark_does_not_send_the_alert_twice(tmp_path: Path) -> None:
    """The other side of the two-file write: the outbox took the alert, the journal never heard it was queued."""
    outbox, journal = Outbox(tmp_path / "o.sqlite"), Journal(tmp_path / "j.sqlite")
    emitter = emitter_for(outbox, journal)
    alerts = emitter.emit([transition()], GOOD, {"version": 1, "reported": {}})
    with sqlite3.connect(tmp_path / "j.sqlite") as conn:  # as if killed before mark_queued committed
        conn.execute("UPDATE alerts SET queued = 0")
    assert journal.pending_alerts() == alerts

    assert emitter_for(outbox, journal).queue_pending() == 0  # the restart
    assert journal.pending_alerts() == []
    assert [json.loads(r.payload) for r in outbox_rows(outbox) if r.kind == "alert"] == alerts


def test_full_outbox_keeps_alert_pending_until_there_is_room(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (the outbox's hard file ceiling) must not lose a confirmed stock-out."""
    outbox = Outbox(tmp_path / "o.sqlite", max_file_bytes=64 * 1024)
    journal = Journal(tmp_path / "j.sqlite")
    filler: list[int] = []
    for size in (2000, 200, 20):  # fill every last page
        with pytest.raises(OutboxError):
            for _ in range(1000):
                filler.append(outbox.put("shelfsight/s1/c1/snapshot/x", b"x" * size, "snapshot"))
    outbox_seq = outbox.next_seq("c1")  # seq allocation still fits (counters row exists)
    emitter = emitter_for(outbox, journal)
    alerts = emitter.emit([transition()], GOOD, {"version": 1, "reported": {}})
    assert len(alerts) == 1 and alerts[0]["seq"] == outbox_seq + 1
    assert emitter.pending == 1 and journal.pending_alerts() == alerts
    assert any("wait in the journal" in r.getMessage() for r in caplog.records)

    outbox.ack_many(filler)  # room again
    assert emitter.queue_pending() == 0
    alert_rows = [r for r in outbox_rows(outbox) if r.kind == "alert"]
    assert [json.loads(r.payload) for r in alert_rows] == alerts
    assert journal.pending_alerts() == [] and journal.alerts() == alerts


def test_without_journal_outbox_errors_propagate(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite")
    emitter = emitter_for(outbox, None)
    assert len(emitter.emit([transition()], None)) == 1
    assert [r.kind for r in outbox_rows(outbox)] == ["alert"]  # no frame: no snapshot
    assert json.loads(outbox_rows(outbox)[0].payload)["snapshot_topic"] is None
    outbox.close()
    with pytest.raises(OutboxError):
        emitter.emit([transition(t=30.0)], None)
