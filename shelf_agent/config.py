"""The agent's typed configuration: YAML file, then environment, then CLI flags (last wins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shelfsight.runtime.errors import ConfigError
from shelfsight.runtime.yamlio import parse_yaml_text, read_text_file
from shelfsight.shelf_agent.capture import CaptureOptions
from shelfsight.shelf_agent.gap_tracker import GapTrackerConfig
from shelfsight.shelf_agent.mqtt_client import MqttConfig
from shelfsight.shelf_agent.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES
from shelfsight.shelf_agent.slot_state import SlotStateConfig
from shelfsight.shelf_agent.sources import CameraOptions

ENV_PREFIX = "SHELFSIGHT__"


class _Strict(BaseModel):
    # coerce_numbers_to_str: `source: 0` (a camera index), `camera_id: 12` or SHELFSIGHT__CAMERA__SOURCE=0 are
    # natural to write and parse as YAML numbers.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class CameraConfig(_Strict):
    source: str = Field(default="0",
                        description="index, /dev/videoN, video file, rtsp://, http(s)://, csi://N or gst:PIPELINE")
    options: CameraOptions = Field(default_factory=CameraOptions)
    capture: CaptureOptions = Field(default_factory=CaptureOptions)


class ModelConfig(_Strict):
    manifest: Path | None = Field(default=None,
                                  description="manifest.json or its folder; None = the bundled demo model")
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    providers: list[str] | None = Field(default=None, description="ORT execution providers in order of preference")
    threads: int | None = Field(default=None, ge=1, description="ORT intra-op threads")
    product_classes: list[str] = Field(default=["product"], min_length=1,
                                       description="the model's class names that count as product (a foreign model's "
                                                   "'object', 'sku', or every SKU)")
    gap_classes: list[str] = Field(default=["gap"], min_length=1,
                                   description="the model's class names that count as an empty facing")
    conf_threshold: float = Field(default=0.35, gt=0, lt=1)
    iou_threshold: float = Field(default=0.5, gt=0, le=1)


class OutboxConfig(_Strict):
    path: Path = Field(default=Path("shelfsight-outbox.sqlite"),
                       description="SQLite file; on a Jetson: the StateDirectory")
    max_messages: int = Field(default=DEFAULT_MAX_MESSAGES, ge=1)
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)


class PublishConfig(_Strict):
    state_interval_s: float = Field(default=30.0, gt=0,
                                    description="the retained state is republished at least this often")
    metrics_interval_s: float = Field(default=10.0, gt=0)
    snapshots: bool = True
    snapshot_max_bytes: int = Field(default=200_000, ge=10_000)


class HttpConfig(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=1, le=65535)


class AgentConfig(_Strict):
    store_id: str = Field(default="demo-store", pattern=r"^[A-Za-z0-9_.-]+$")
    camera_id: str = Field(default="cam-1", pattern=r"^[A-Za-z0-9_.-]+$")
    camera: CameraConfig = Field(default_factory=CameraConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    layout: Path | None = Field(default=None, description="layout.yaml; None = planogram-free gap mode")
    fps: float = Field(default=2.0, gt=0, le=120, description="inference rate cap (frames per second of source time)")
    slots: SlotStateConfig = Field(default_factory=SlotStateConfig)
    gaps: GapTrackerConfig = Field(default_factory=GapTrackerConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    journal: Path = Field(default=Path("shelfsight-journal.sqlite"),
                          description="local alert journal + persisted slot state")
    publish: PublishConfig = Field(default_factory=PublishConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _dwell_fits_gap_mode(self) -> AgentConfig:
        if self.layout is None and self.gaps.dwell_s <= 0:
            raise ValueError("gaps.dwell_s must be positive in planogram-free mode")
        return self


def _set_path(data: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = data
    for key in dotted[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[dotted[-1]] = value


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``SHELFSIGHT__MQTT__HOST=broker`` -> {"mqtt": {"host": "broker"}}; values are parsed as YAML scalars."""
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        dotted = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except (yaml.YAMLError, RecursionError, ValueError):  # not a YAML scalar: the text as given
            value = raw
        # Secrets stay strings even when they look like numbers.
        if dotted[-1] in {"password", "username"}:
            value = raw
        _set_path(data, dotted, value)
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_agent_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> AgentConfig:
    """File (errors name file:line:field), then ``SHELFSIGHT__*`` environment, then CLI ``overrides``."""
    base: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = read_text_file(path, "agent config")
        base = parse_yaml_text(text, AgentConfig, str(path)).model_dump(exclude_unset=True, mode="python")
    merged = deep_merge(deep_merge(base, env_overrides(environ)), overrides or {})
    try:
        return AgentConfig.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<document>"
        origin = "environment/command line" if path is None else f"{path} + environment/command line"
        raise ConfigError(f"{origin}: field '{field}': {first['msg']}") from None
