"""Payload builders, the shipped JSON Schemas and both validators (jsonschema and the built-in fallback)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from shelfsight.shelf_agent.events import (
    DELIVERY,
    ModelInfo,
    PayloadError,
    SlotStatus,
    alert_id_for,
    build_alert,
    build_metrics,
    build_state,
    build_status,
    encode_payload,
    load_schema,
    polygon_bbox,
    topics,
    validate_payload,
)

MODEL = ModelInfo(name="shelf-det-s", sha256="ab" * 32, precision="int8")
VALIDATORS = [pytest.param(True, id="jsonschema"), pytest.param(False, id="fallback")]


def make_alert(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = dict(
        seq=7, alert_type="stockout", store_id="store-12", camera_id="cam-3", slot_id="R2S5", sku="4006381333931",
        event_frame_ts=1712.25, raised_frame_ts=1716.0, confidence=0.87, bbox=[0.1, 0.2, 0.3, 0.4], model=MODEL,
        time_origin=1_700_000_000.0,
    )
    arguments.update(overrides)
    return build_alert(**arguments)


def test_alert_payload_matches_contract() -> None:
    alert = make_alert()
    assert alert["schema"] == "shelfsight.alert/1"
    assert alert["event_time"] == "2023-11-14T22:41:52.250Z"
    assert alert["raised_time"] == "2023-11-14T22:41:56.000Z"
    assert alert["empty_for_s"] == pytest.approx(3.75)
    assert alert["snapshot_topic"] == f"shelfsight/store-12/cam-3/snapshot/{alert['alert_id']}"
    assert alert["model"] == {"name": "shelf-det-s", "sha256": "ab" * 32, "precision": "int8"}
    assert json.loads(encode_payload(alert)) == alert
    assert make_alert(with_snapshot=False)["snapshot_topic"] is None


def test_alert_id_is_stable_for_the_same_event_and_differs_otherwise() -> None:
    first = make_alert(seq=1, raised_frame_ts=1716.0)["alert_id"]
    replay = make_alert(seq=99, raised_frame_ts=1720.0, time_origin=0.0)["alert_id"]
    assert first == replay == alert_id_for("store-12", "cam-3", "R2S5", "stockout", 1712.25)
    others = {
        make_alert(slot_id="R2S6")["alert_id"],
        make_alert(alert_type="restocked")["alert_id"],
        make_alert(event_frame_ts=1712.5)["alert_id"],
        make_alert(camera_id="cam-4")["alert_id"],
    }
    assert first not in others and len(others) == 4


def _set(path: str, value: Any) -> Any:
    def mutate(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        elif value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()

BROKEN_ALERTS = [
    pytest.param(_set("alert_id", _DELETE), "alert_id", id="missing-alert_id"),
    pytest.param(_set("type", "sold_out"), "type", id="unknown-type"),
    pytest.param(_set("seq", "7"), "seq", id="seq-as-string"),
    pytest.param(_set("seq", True), "seq", id="seq-as-bool"),
    pytest.param(_set("bbox.2", 1.5), "bbox", id="bbox-outside-0-1"),
    pytest.param(_set("bbox", [0.1, 0.2, 0.3]), "bbox", id="bbox-three-values"),
    pytest.param(_set("confidence", -0.1), "confidence", id="negative-confidence"),
    pytest.param(_set("event_time", "2024-01-01 10:00:00"), "event_time", id="time-not-iso-utc"),
    pytest.param(_set("model.sha256", "xyz"), "model", id="bad-sha256"),
    pytest.param(_set("model.precision", "int4"), "model", id="bad-precision"),
    pytest.param(_set("schema", "shelfsight.alert/2"), "schema", id="unknown-version"),
    pytest.param(_set("colour", "red"), "colour", id="unexpected-field"),
]


@pytest.mark.parametrize("use_jsonschema", VALIDATORS)
@pytest.mark.parametrize(("break_it", "mentioned"), BROKEN_ALERTS)
def test_broken_alert_is_rejected(break_it: Any, mentioned: str, use_jsonschema: bool) -> None:
    payload = copy.deepcopy(make_alert())
    validate_payload(payload, use_jsonschema=use_jsonschema)
    break_it(payload)
    with pytest.raises(PayloadError) as info:
        validate_payload(payload, use_jsonschema=use_jsonschema)
    message = str(info.value)
    assert "\n" not in message
    assert mentioned in message


@pytest.mark.parametrize("use_jsonschema", VALIDATORS)
def test_every_builder_emits_a_valid_payload(use_jsonschema: bool) -> None:
    state = build_state(
        store_id="s", camera_id="c", frame_ts=100.0, time_origin=1_700_000_000.0,
        slots=[SlotStatus("R1S1", "ok", 0.0, sku="123", fill=0.9), SlotStatus("R1S2", "empty", 42.5)],
    )
    status = build_status(store_id="s", camera_id="c", online=True, reason="connected", agent_version="0.1.0",
                          started_at=1_700_000_000.0, now=1_700_000_060.0)
    metrics = build_metrics(
        store_id="s", camera_id="c", interval_s=10, fps=9.8, latency_ms={"infer": (21.0, 30.5), "total": (30, 44)},
        frame_age_ms=None, dropped_frames=3, outbox={"depth": 2, "bytes": 900, "dropped": 0, "dropped_alerts": 0},
        camera_state="streaming", mqtt={"connected": True, "published": 10, "failed": 1, "refused": 0},
    )
    for payload in (make_alert(), state, status, metrics):
        validate_payload(payload, use_jsonschema=use_jsonschema)
    assert state["slots"][1] == {"slot_id": "R1S2", "sku": None, "state": "empty",
                                 "since": "2023-11-14T22:14:02.500Z", "since_frame_ts": 42.5}
    assert status["started_at"] == "2023-11-14T22:13:20.000Z" and status["state"] == "online"
    assert metrics["latency_ms"]["total"] == {"p50": 30.0, "p95": 44.0}


@pytest.mark.parametrize("use_jsonschema", VALIDATORS)
@pytest.mark.parametrize(
    ("payload", "mentioned"),
    [
        ({"schema": "shelfsight.state/1", "store_id": "s", "camera_id": "c", "time": "2024-01-01T00:00:00Z",
          "frame_ts": 1.0, "slots": [{"slot_id": "R1S1", "sku": None, "state": "gone", "since": "2024-01-01T00:00:00Z",
                                      "since_frame_ts": 0}]}, "slots/0/state"),
        ({"schema": "shelfsight.metrics/1", "store_id": "s", "camera_id": "c", "time": "2024-01-01T00:00:00Z",
          "interval_s": 1, "fps": 1, "latency_ms": {"infer": {"p50": 1}}, "frame_age_ms": 3, "dropped_frames": 0,
          "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "dropped_alerts": 0}, "camera": {"state": "streaming"}},
         "p95"),
        ({"store_id": "s"}, "schema"),
        ({"schema": "shelfsight.nonsense/1"}, "nonsense"),
    ],
    ids=["bad-slot-state", "latency-without-p95", "no-schema-field", "unknown-schema"],
)
def test_other_broken_payloads_are_rejected(payload: dict[str, Any], mentioned: str, use_jsonschema: bool) -> None:
    with pytest.raises(PayloadError, match=mentioned):
        validate_payload(payload, use_jsonschema=use_jsonschema)


def test_builders_refuse_what_the_schema_forbids() -> None:
    with pytest.raises(PayloadError, match="confidence"):
        make_alert(confidence=1.5)
    with pytest.raises(PayloadError, match="finite"):
        make_alert(confidence=float("nan"))


def test_schemas_are_draft_2020_12_and_named_after_their_payload() -> None:
    for name in ("shelfsight.alert/1", "shelfsight.state/1", "shelfsight.status/1", "shelfsight.metrics/1"):
        schema = load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["properties"]["schema"] == {"const": name}
        pytest.importorskip("jsonschema").Draft202012Validator.check_schema(schema)


def test_topics_and_delivery_table_follow_the_contract() -> None:
    t = topics("store-12", "cam-3")
    assert (t.alert, t.state, t.status, t.metrics) == (
        "shelfsight/store-12/cam-3/alert", "shelfsight/store-12/cam-3/state",
        "shelfsight/store-12/cam-3/status", "shelfsight/store-12/cam-3/metrics",
    )
    assert t.snapshot("abc") == "shelfsight/store-12/cam-3/snapshot/abc"
    assert DELIVERY == {"alert": (1, False), "state": (1, True), "status": (1, True), "metrics": (0, False),
                        "snapshot": (1, False)}
    with pytest.raises(PayloadError, match="camera_id"):
        topics("store", "cam/+")


def test_polygon_bbox_is_normalized_and_clipped() -> None:
    assert polygon_bbox([(64, 36), (192, 36), (192, 108), (64, 108)], 1280, 720) == [0.05, 0.05, 0.15, 0.15]
    assert polygon_bbox([(-5, -5), (1300, 10), (20, 800)], 1280, 720) == [0.0, 0.0, 1.0, 1.0]
