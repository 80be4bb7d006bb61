"""MQTT payloads and topics of DESIGN section 6: typed builders, JSON Schema validation, QoS/retain per kind.

Every builder returns a plain ``dict`` that has already been validated against its shipped JSON Schema
(``shelf_agent/schemas/*.v1.json``), so nothing the agent sends can drift from the contract silently.
Times: the slot logic works in *frame timestamps* (seconds, whatever clock the capture uses, so a replayed
video is deterministic). ``time_origin`` is the epoch second that frame timestamp 0 corresponds to
(0.0 for a live camera whose timestamps are already epoch seconds, the replay start for a video);
payloads carry both the frame timestamp and the ISO-8601 UTC string derived from it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any, Literal

import numpy as np

from shelfsight.runtime.errors import ShelfSightError

AlertType = Literal["stockout", "low_stock", "restocked"]
SlotState = Literal["ok", "low", "empty", "occluded", "unknown"]
CameraState = Literal["starting", "streaming", "stalled", "reconnecting", "ended", "failed"]
MessageKind = Literal["alert", "state", "status", "metrics", "snapshot"]

ALERT_SCHEMA = "shelfsight.alert/1"
STATE_SCHEMA = "shelfsight.state/1"
STATUS_SCHEMA = "shelfsight.status/1"
METRICS_SCHEMA = "shelfsight.metrics/1"
SCHEMA_FILES = {
    ALERT_SCHEMA: "alert.v1.json",
    STATE_SCHEMA: "state.v1.json",
    STATUS_SCHEMA: "status.v1.json",
    METRICS_SCHEMA: "metrics.v1.json",
}

# DESIGN section 6 table: (qos, retained) per message kind.
DELIVERY: dict[str, tuple[int, bool]] = {
    "alert": (1, False),
    "state": (1, True),
    "status": (1, True),
    "metrics": (0, False),
    "snapshot": (1, False),
}

# Fixed namespace so alert ids are reproducible on every device and every replay.
ALERT_ID_NAMESPACE = uuid.UUID("5b1f0c8e-3d5a-4e0b-9a57-2f0e6c1d7a41")


class PayloadError(ShelfSightError):
    """A payload does not match its JSON Schema (a bug in the sender, reported in one line)."""


@dataclass(frozen=True)
class Topics:
    """Topic names of one camera: ``{root}/{store_id}/{camera_id}/...``."""

    root: str

    @property
    def alert(self) -> str:
        return f"{self.root}/alert"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics"

    def snapshot(self, alert_id: str) -> str:
        return f"{self.root}/snapshot/{alert_id}"


_TOPIC_LEVEL = re.compile(r"^[^/#+\x00]+$")


def topics(store_id: str, camera_id: str, prefix: str = "shelfsight") -> Topics:
    for what, value in (("prefix", prefix), ("store_id", store_id), ("camera_id", camera_id)):
        if not _TOPIC_LEVEL.match(value):
            raise PayloadError(f"{what} {value!r} cannot be an MQTT topic level (empty, '/', '#', '+' or NUL)")
    return Topics(f"{prefix}/{store_id}/{camera_id}")


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced an alert; ``sha256`` is the model artifact's hash from the manifest."""

    name: str
    sha256: str
    precision: Literal["fp32", "fp16", "int8"]

    @classmethod
    def from_manifest(cls, manifest: Any) -> ModelInfo:
        """Accepts a ``shelfsight.runtime.manifest.Manifest`` (typed as Any to keep this module light)."""
        return cls(name=manifest.name, sha256=manifest.artifact("model").sha256, precision=manifest.precision)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256, "precision": self.precision}


def iso_utc(epoch_s: float) -> str:
    """ISO-8601 UTC with millisecond precision and a ``Z`` suffix."""
    stamp = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def alert_id_for(store_id: str, camera_id: str, slot_id: str, alert_type: str, event_frame_ts: float) -> str:
    """Stable id: the same event (same slot, type and frame timestamp to the millisecond) always maps to it."""
    key = f"{store_id}/{camera_id}/{slot_id}/{alert_type}/{round(event_frame_ts * 1000)}"
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, key))


def normalize_bbox(xyxy_px: Sequence[float] | np.ndarray, frame_w: int, frame_h: int) -> list[float]:
    """Pixel box -> [x1, y1, x2, y2] in 0..1 of the frame size (clipped)."""
    box = np.asarray(xyxy_px, dtype=np.float64).reshape(4) / np.array([frame_w, frame_h, frame_w, frame_h])
    return [round(float(v), 6) for v in np.clip(box, 0.0, 1.0)]


def polygon_bbox(polygon: Sequence[Sequence[float]] | np.ndarray, frame_w: int, frame_h: int) -> list[float]:
    """Normalized bounds of a slot polygon (image pixels)."""
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    return normalize_bbox([*pts.min(axis=0), *pts.max(axis=0)], frame_w, frame_h)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise PayloadError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def build_alert(
    *,
    seq: int,
    alert_type: AlertType,
    store_id: str,
    camera_id: str,
    slot_id: str,
    sku: str | None,
    event_frame_ts: float,
    raised_frame_ts: float,
    confidence: float,
    bbox: Sequence[float],
    model: ModelInfo,
    time_origin: float = 0.0,
    empty_for_s: float | None = None,
    with_snapshot: bool = True,
    topic_prefix: str = "shelfsight",
) -> dict[str, Any]:
    """An ``shelfsight.alert/1`` payload; ``empty_for_s`` defaults to raised minus event frame time."""
    alert_id = alert_id_for(store_id, camera_id, slot_id, alert_type, event_frame_ts)
    if empty_for_s is None:
        empty_for_s = max(0.0, raised_frame_ts - event_frame_ts)
    payload = {
        "schema": ALERT_SCHEMA,
        "alert_id": alert_id,
        "seq": int(seq),
        "type": alert_type,
        "store_id": store_id,
        "camera_id": camera_id,
        "slot_id": slot_id,
        "sku": sku,
        "event_time": iso_utc(time_origin + _finite("event_frame_ts", event_frame_ts)),
        "event_frame_ts": round(float(event_frame_ts), 6),
        "raised_time": iso_utc(time_origin + _finite("raised_frame_ts", raised_frame_ts)),
        "raised_frame_ts": round(float(raised_frame_ts), 6),
        "empty_for_s": round(_finite("empty_for_s", empty_for_s), 3),
        "confidence": round(_finite("confidence", confidence), 4),
        "bbox": [round(float(v), 6) for v in bbox],
        "model": model.as_dict(),
        "snapshot_topic": topics(store_id, camera_id, topic_prefix).snapshot(alert_id) if with_snapshot else None,
    }
    validate_payload(payload)
    return payload


@dataclass(frozen=True)
class SlotStatus:
    """One slot's entry in the state document; ``since_frame_ts`` is when it entered ``state``."""

    slot_id: str
    state: SlotState
    since_frame_ts: float
    sku: str | None = None
    fill: float | None = None


def build_state(
    *,
    store_id: str,
    camera_id: str,
    frame_ts: float,
    slots: Sequence[SlotStatus],
    time_origin: float = 0.0,
) -> dict[str, Any]:
    entries = []
    for slot in slots:
        entry: dict[str, Any] = {
            "slot_id": slot.slot_id,
            "sku": slot.sku,
            "state": slot.state,
            "since": iso_utc(time_origin + slot.since_frame_ts),
            "since_frame_ts": round(float(slot.since_frame_ts), 6),
        }
        if slot.fill is not None:
            entry["fill"] = round(float(slot.fill), 4)
        entries.append(entry)
    payload = {
        "schema": STATE_SCHEMA,
        "store_id": store_id,
        "camera_id": camera_id,
        "time": iso_utc(time_origin + frame_ts),
        "frame_ts": round(float(frame_ts), 6),
        "slots": entries,
    }
    validate_payload(payload)
    return payload


def build_status(
    *,
    store_id: str,
    camera_id: str,
    online: bool,
    reason: Literal["connected", "clean_stop", "connection_lost"],
    agent_version: str,
    started_at: float,
    now: float | None = None,
) -> dict[str, Any]:
    """``started_at``/``now`` are epoch seconds (wall clock: availability is about the real world)."""
    payload = {
        "schema": STATUS_SCHEMA,
        "store_id": store_id,
        "camera_id": camera_id,
        "state": "online" if online else "offline",
        "reason": reason,
        "agent_version": agent_version,
        "started_at": iso_utc(started_at),
        "time": iso_utc(time.time() if now is None else now),
    }
    validate_payload(payload)
    return payload


def build_metrics(
    *,
    store_id: str,
    camera_id: str,
    interval_s: float,
    fps: float,
    latency_ms: Mapping[str, tuple[float, float]],
    frame_age_ms: float | None,
    dropped_frames: int,
    outbox: Mapping[str, int],
    camera_state: CameraState,
    camera_reconnects: int = 0,
    mqtt: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """``latency_ms`` maps stage name -> (p50, p95); ``outbox`` is ``Outbox.stats()`` (depth, bytes, dropped,
    dropped_alerts); ``mqtt`` is ``Publisher.stats().as_metrics()`` when a publisher runs."""
    payload: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "store_id": store_id,
        "camera_id": camera_id,
        "time": iso_utc(time.time() if now is None else now),
        "interval_s": round(float(interval_s), 3),
        "fps": round(_finite("fps", fps), 3),
        "latency_ms": {
            stage: {"p50": round(float(p50), 3), "p95": round(float(p95), 3)}
            for stage, (p50, p95) in latency_ms.items()
        },
        "frame_age_ms": None if frame_age_ms is None else round(float(frame_age_ms), 3),
        "dropped_frames": int(dropped_frames),
        "outbox": {key: int(outbox[key]) for key in ("depth", "bytes", "dropped", "dropped_alerts")},
        "camera": {"state": camera_state, "reconnects": int(camera_reconnects)},
    }
    if mqtt is not None:
        payload["mqtt"] = dict(mqtt)
    validate_payload(payload)
    return payload


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the wire format of every JSON topic."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- validation


@cache
def load_schema(schema_name: str) -> dict[str, Any]:
    """The shipped JSON Schema document for ``shelfsight.<kind>/<version>``."""
    try:
        filename = SCHEMA_FILES[schema_name]
    except KeyError:
        raise PayloadError(f"unknown payload schema {schema_name!r} (known: {', '.join(SCHEMA_FILES)})") from None
    text = resources.files("shelfsight.shelf_agent").joinpath("schemas", filename).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@cache
def _jsonschema_validator(schema_name: str) -> Any:
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema.Draft202012Validator(load_schema(schema_name))


def validate_payload(payload: Mapping[str, Any], *, use_jsonschema: bool = True) -> None:
    """Raise PayloadError unless ``payload`` matches the schema named by its ``schema`` field.

    Uses ``jsonschema`` when importable; otherwise (small device installs) a built-in check of the
    keywords our schemas use. ``use_jsonschema=False`` forces the built-in check (for tests).
    """
    name = payload.get("schema") if isinstance(payload, Mapping) else None
    if not isinstance(name, str):
        raise PayloadError("payload has no 'schema' field naming its JSON Schema")
    schema = load_schema(name)
    validator = _jsonschema_validator(name) if use_jsonschema else None
    if validator is not None:
        error = next(iter(sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "<payload>"
            raise PayloadError(f"{name} payload invalid at '{where}': {error.message}")
        return
    problem = _check(payload, schema, "")
    if problem is not None:
        where, message = problem
        raise PayloadError(f"{name} payload invalid at '{where or '<payload>'}': {message}")


_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list | tuple),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def _check(value: Any, schema: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """Fallback validator: const, enum, type, required, properties, additionalProperties, items,
    min/maxItems, minLength, pattern, minimum, maximum — exactly the keywords in our schema files."""
    if "const" in schema and value != schema["const"]:
        return path, f"{value!r} was expected to be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return path, f"{value!r} is not one of {schema['enum']!r}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPE_CHECKS[t](value) for t in types):
            return path, f"{value!r} is not of type {', '.join(repr(t) for t in types)}"
    if _TYPE_CHECKS["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            return path, f"{value!r} is less than the minimum of {schema['minimum']!r}"
        if "maximum" in schema and value > schema["maximum"]:
            return path, f"{value!r} is greater than the maximum of {schema['maximum']!r}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return path, f"{value!r} is too short"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return path, f"{value!r} does not match {schema['pattern']!r}"
    if isinstance(value, list | tuple):
        if len(value) < schema.get("minItems", 0):
            return path, f"{list(value)!r} is too short"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return path, f"{list(value)!r} is too long"
        if "items" in schema:
            for index, item in enumerate(value):
                problem = _check(item, schema["items"], f"{path}/{index}".lstrip("/"))
                if problem is not None:
                    return problem
    if isinstance(value, Mapping):
        for key in schema.get("required", []):
            if key not in value:
                return path, f"{key!r} is a required property"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            child = f"{path}/{key}".lstrip("/")
            if key in properties:
                problem = _check(item, properties[key], child)
            elif extra is False:
                return path, f"additional property {key!r} is not allowed"
            elif isinstance(extra, Mapping):
                problem = _check(item, extra, child)
            else:
                problem = None
            if problem is not None:
                return problem
    return None
