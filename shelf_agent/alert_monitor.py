"""What the back-office makes of the MQTT stream (docs/mqtt.md): one message in, one ``Outcome`` out.

``Monitor`` validates every message against the shipped schema (after dropping fields this release does not
know: the compatibility policy's "consumers ignore unknown fields"), checks that topic and payload agree,
de-duplicates alerts by ``alert_id`` (in memory, and in the history database when one is given), notes ``seq``
gaps, and folds retained ``state``/``status`` and ``metrics`` into a per-camera view. ``render_text`` and
``render_json`` turn outcomes into the lines ``shelf-alerts`` prints. No MQTT here: easy to test, easy to reuse.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.alert_history import AlertHistory, iso_utc
from shelfsight.shelf_agent.events import SCHEMA_FILES, PayloadError, load_schema, validate_payload

_SCHEMA_NAME = re.compile(r"^shelfsight\.([a-z_]+)/([0-9]+)$")
_ALERT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SAFE_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")  # store/camera ids that may become folder names
_JPEG_MAGIC = b"\xff\xd8\xff"

Event = Literal["alert", "duplicate", "state", "status", "metrics", "snapshot", "cleared", "invalid", "unsupported"]


@dataclass
class CameraView:
    """What the back-office currently knows about one camera (from retained state/status and the stream)."""

    status: str | None = None  # online / offline
    status_reason: str | None = None
    camera_state: str | None = None  # from metrics: streaming / reconnecting / ...
    slots: dict[str, str] = field(default_factory=dict)
    last_seq: int | None = None


@dataclass(frozen=True)
class Outcome:
    event: Event
    topic: str
    camera: tuple[str, str] | None = None
    payload: dict[str, Any] | None = None
    detail: str | None = None  # why invalid/unsupported, or a note (sequence gap, camera state change)
    changes: tuple[tuple[str, str | None, str], ...] = ()  # state: (slot, old, new)
    snapshot_path: str | None = None
    first_view: bool = False  # state: the first document seen for this camera (print the whole shelf)


class Monitor:
    """Validates, de-duplicates and folds messages into per-camera views. Optional history and snapshot folder."""

    def __init__(self, prefix: str = "shelfsight", history: AlertHistory | None = None,
                 snapshots_dir: Path | None = None, dedup_memory: int = 100_000) -> None:
        self.prefix = prefix
        self.history = history
        self.snapshots_dir = snapshots_dir
        self.cameras: dict[tuple[str, str], CameraView] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_memory = dedup_memory
        self._unsupported_reported: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {}

    def handle(self, topic: str, payload: bytes, received_at: float | None = None) -> Outcome:
        received_at = time.time() if received_at is None else received_at
        outcome = self._classify(topic, bytes(payload), received_at)
        self.counts[outcome.event] = self.counts.get(outcome.event, 0) + 1
        if self.history is not None and outcome.event in ("invalid", "unsupported"):
            self.history.record_problem(topic, outcome.event, outcome.detail or "", payload, received_at)
        return outcome

    def _classify(self, topic: str, payload: bytes, received_at: float) -> Outcome:
        levels = topic.split("/")
        if len(levels) < 4 or levels[0] != self.prefix:
            return Outcome("invalid", topic, detail=f"not a {self.prefix}/<store>/<camera>/<kind> topic")
        camera = (levels[1], levels[2])
        rest = "/".join(levels[3:])
        if levels[3] == "snapshot":
            return self._snapshot(topic, camera, levels[4:], payload, received_at)
        if not payload:  # an empty retained message deletes the retained one: someone cleaned up a camera
            if rest in ("state", "status"):
                self.cameras.pop(camera, None)
                return Outcome("cleared", topic, camera)
            return Outcome("invalid", topic, camera, detail="empty payload")
        try:
            document = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return Outcome("invalid", topic, camera, detail=f"not UTF-8 JSON: {exc}")
        if not isinstance(document, dict):
            return Outcome("invalid", topic, camera, detail="JSON payload is not an object")
        name = document.get("schema")
        match = _SCHEMA_NAME.match(name) if isinstance(name, str) else None
        if match is None:
            return Outcome("invalid", topic, camera, document, detail=f"'schema' is missing or malformed: {name!r}")
        if name not in SCHEMA_FILES:
            key = (topic, str(name))
            first = key not in self._unsupported_reported
            self._unsupported_reported.add(key)
            note = f"schema {name} is not known to this shelf-alerts (knows {', '.join(SCHEMA_FILES)}); upgrade it"
            return Outcome("unsupported", topic, camera, document, detail=note if first else None)
        try:
            # Consumers ignore fields they do not know (docs/mqtt.md, compatibility): a newer agent may add some.
            validate_payload(known_fields(document, load_schema(name)))
        except PayloadError as exc:
            return Outcome("invalid", topic, camera, document, detail=str(exc))
        kind = match.group(1)
        if kind != rest:
            return Outcome("invalid", topic, camera, document, detail=f"a {name} payload does not belong on '{rest}'")
        if (document["store_id"], document["camera_id"]) != camera:
            return Outcome("invalid", topic, camera, document, detail=(
                f"payload names {document['store_id']}/{document['camera_id']} but arrived on the topic of "
                f"{camera[0]}/{camera[1]}"))
        view = self.cameras.setdefault(camera, CameraView())
        if kind == "alert":
            return self._alert(topic, camera, view, document, received_at)
        if kind == "state":
            first = not view.slots
            new = {slot["slot_id"]: slot["state"] for slot in document["slots"]}
            changes = tuple((slot, view.slots.get(slot), state) for slot, state in new.items()
                            if view.slots.get(slot) != state)
            view.slots = new
            return Outcome("state", topic, camera, document, changes=changes, first_view=first)
        if kind == "status":
            changed = (view.status, view.status_reason) != (document["state"], document["reason"])
            view.status, view.status_reason = document["state"], document["reason"]
            return Outcome("status", topic, camera, document, detail="changed" if changed else None)
        old_state: str | None = view.camera_state
        view.camera_state = str(document["camera"]["state"])
        news = f"camera {old_state or 'unknown'} -> {view.camera_state}" if old_state != view.camera_state else None
        return Outcome("metrics", topic, camera, document, detail=news)

    def _alert(self, topic: str, camera: tuple[str, str], view: CameraView, document: dict[str, Any],
               received_at: float) -> Outcome:
        alert_id = document["alert_id"]
        new = alert_id not in self._seen
        if new and self.history is not None:
            new = self.history.record_alert(document, received_at)
        self._seen[alert_id] = None
        self._seen.move_to_end(alert_id)
        while len(self._seen) > self._dedup_memory:
            self._seen.popitem(last=False)
        if not new:
            return Outcome("duplicate", topic, camera, document)
        seq, note = document["seq"], None
        if view.last_seq is not None and seq != view.last_seq + 1:
            note = (f"seq {view.last_seq} -> {seq}: {seq - view.last_seq - 1} not (yet) received"
                    if seq > view.last_seq else f"seq {seq} after {view.last_seq}: late delivery or agent reset")
        view.last_seq = seq if view.last_seq is None else max(seq, view.last_seq)
        return Outcome("alert", topic, camera, document, detail=note)

    def _snapshot(self, topic: str, camera: tuple[str, str], tail: list[str], payload: bytes,
                  received_at: float) -> Outcome:
        if len(tail) != 1 or not _ALERT_ID.match(tail[0]):
            return Outcome("invalid", topic, camera, detail="snapshot topic must end in snapshot/<alert_id>")
        if not payload.startswith(_JPEG_MAGIC):
            return Outcome("invalid", topic, camera, detail=f"snapshot is not a JPEG ({len(payload)} bytes)")
        path = None
        if self.snapshots_dir is not None:
            if not all(_SAFE_LEVEL.match(level) and level not in (".", "..") for level in camera):
                return Outcome("invalid", topic, camera, detail="store/camera id cannot be used as a folder name")
            target = self.snapshots_dir / camera[0] / camera[1] / f"{tail[0]}.jpg"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".part")
                partial.write_bytes(payload)
                partial.replace(target)  # a reader never sees half a JPEG
            except OSError as exc:
                raise ShelfSightError(f"--snapshots: cannot write {target}: {exc.strerror or exc}") from None
            path = str(target)
        if self.history is not None:
            self.history.record_snapshot(tail[0], path, len(payload), received_at)
        return Outcome("snapshot", topic, camera, {"alert_id": tail[0], "bytes": len(payload)}, snapshot_path=path)


def known_fields(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` without the object members ``schema`` does not define (recursively), so that an additive
    change by a newer agent validates against this release's strict schema."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        kept = {key: item for key, item in value.items() if key in properties or extra is not False}
        return {key: known_fields(item, properties.get(key, extra if isinstance(extra, dict) else {}))
                for key, item in kept.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [known_fields(item, schema["items"]) for item in value]
    return value


# ------------------------------------------------------------------------------------------------ output


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s).strftime("%H:%M:%S")


def render_json(outcome: Outcome, received_at: float) -> str | None:
    if outcome.event == "duplicate" or (outcome.event == "unsupported" and outcome.detail is None):
        return None
    record: dict[str, Any] = {"event": outcome.event, "topic": outcome.topic, "received_time": iso_utc(received_at)}
    if outcome.event in ("invalid", "unsupported"):
        record["error"] = outcome.detail
    elif outcome.detail is not None:
        record["note"] = outcome.detail
    if outcome.snapshot_path is not None:
        record["snapshot_path"] = outcome.snapshot_path
    if outcome.payload is not None:
        record["payload"] = outcome.payload
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def render_text(outcome: Outcome, received_at: float, view: CameraView | None) -> list[str]:
    """Human lines for one outcome (possibly none: metrics without news, duplicates)."""
    at = _clock(received_at)
    where = f"{outcome.camera[0]}/{outcome.camera[1]}" if outcome.camera else ""
    p = outcome.payload or {}
    if outcome.event == "alert":
        late = received_at - _epoch(p["raised_time"])
        lines = [f"{at}  {p['type'].upper():<11} {where}  {p['slot_id']}  sku={p['sku'] or '-'}  "
                 f"empty {p['empty_for_s']:.1f} s  conf {p['confidence']:.2f}  seq {p['seq']}"
                 + (f"  (raised {late / 60:.0f} min ago)" if late > 120 else "")]
        if outcome.detail:
            lines.append(f"{at}  {'NOTE':<11} {where}  {outcome.detail}")
        return lines
    if outcome.event == "state":
        if outcome.first_view and view is not None:
            return [f"{at}  {'SHELF':<11} {where}  {_shelf_summary(view)}"]
        return [f"{at}  {'STATE':<11} {where}  {slot} {old or '?'} -> {new}" for slot, old, new in outcome.changes]
    if outcome.event == "status" and outcome.detail:
        return [f"{at}  {p['state'].upper():<11} {where}  ({p['reason']}, agent {p['agent_version']})"]
    if outcome.event == "metrics" and outcome.detail:
        return [f"{at}  {'CAMERA':<11} {where}  {outcome.detail}"]
    if outcome.event == "snapshot":
        saved = f" -> {outcome.snapshot_path}" if outcome.snapshot_path else ""
        return [f"{at}  {'SNAPSHOT':<11} {where}  {p['alert_id']} ({p['bytes']} bytes){saved}"]
    if outcome.event == "cleared":
        return [f"{at}  {'CLEARED':<11} {where}  retained state/status removed"]
    if outcome.event in ("invalid", "unsupported") and outcome.detail:
        return [f"{at}  {outcome.event.upper():<11} {outcome.topic}: {outcome.detail}"]
    return []


def _shelf_summary(view: CameraView) -> str:
    by_state: dict[str, list[str]] = {}
    for slot, state in view.slots.items():
        by_state.setdefault(state, []).append(slot)
    counts = ", ".join(f"{len(slots)} {state}" for state, slots in sorted(by_state.items()))
    problems = "  ".join(f"{state}: {' '.join(by_state[state])}" for state in ("empty", "low", "occluded")
                         if state in by_state)
    status = view.status or "status unknown"
    return f"{status}; {len(view.slots)} slots: {counts}" + (f"  |  {problems}" if problems else "")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
