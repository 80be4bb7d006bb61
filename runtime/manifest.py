"""The model manifest (DESIGN section 2): everything a runtime needs to run a model file correctly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shelfsight.runtime.errors import ManifestError

MANIFEST_FORMAT_VERSION: Literal[1] = 1
MANIFEST_FILENAME = "manifest.json"

OutputFormat = Literal["shelfsight", "yolov8", "yolov5", "yolox"]
Precision = Literal["fp32", "fp16", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """How a BGR uint8 camera frame becomes the network input tensor."""

    name: str
    shape: list[int] = Field(description="[N, 3, H, W]")
    channel_order: Literal["RGB", "BGR"] = "RGB"
    pixel_scale: float = Field(1.0 / 255.0, gt=0, description="multiplies 0-255 pixel values")
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0], min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3)
    resize: Literal["letterbox", "resize"] = "letterbox"
    pad_value: int = Field(114, ge=0, le=255)
    letterbox_align: Literal["center", "top-left"] = "center"

    @field_validator("shape")
    @classmethod
    def _nchw(cls, shape: list[int]) -> list[int]:
        if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
            raise ValueError(f"input shape must be [N, 3, H, W] with positive sizes, got {shape}")
        return shape

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: list[float]) -> list[float]:
        if min(std) <= 0:
            raise ValueError("std values must be positive")
        return std

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]


class OutputSpec(_Strict):
    """``shelfsight``: one tensor [N, A, 4 + nc], boxes xyxy in input pixels, per-class scores in [0, 1]."""

    format: OutputFormat
    names: list[str] = Field(min_length=1)


class Artifact(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["model", "checkpoint", "engine", "calibration_cache", "other"] = "model"

    @field_validator("path")
    @classmethod
    def _inside_folder(cls, path: str) -> str:
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts or "\\" in path or not path.strip():
            raise ValueError(f"artifact path must be relative and stay inside the model folder: {path!r}")
        return path


class Provenance(_Strict):
    source_checkpoint_sha256: str | None = None
    pruning_ratio: float | None = None
    calibration_method: str | None = None
    calibration_image_count: int | None = None
    calibration_digest: str | None = None
    exporter: str | None = None
    command: str | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)


class Metrics(_Strict):
    map50: float | None = None
    map50_95: float | None = None
    parent_map50: float | None = None
    parent_map50_95: float | None = None
    per_class_ap50: dict[str, float] = Field(default_factory=dict)
    validation_set: str | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: Literal[1] = MANIFEST_FORMAT_VERSION
    name: str
    task: Literal["detect"] = "detect"
    classes: list[str] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    precision: Precision = "fp32"
    artifacts: list[Artifact] = Field(min_length=1)
    provenance: Provenance = Field(default_factory=Provenance)
    metrics: Metrics = Field(default_factory=Metrics)

    @model_validator(mode="after")
    def _one_model_artifact(self) -> Manifest:
        if sum(a.role == "model" for a in self.artifacts) != 1:
            raise ValueError("exactly one artifact must have role 'model'")
        return self

    def artifact(self, role: str = "model") -> Artifact:
        for art in self.artifacts:
            if art.role == role:
                return art
        raise ManifestError(f"manifest '{self.name}' has no artifact with role '{role}'")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    """Parse a manifest file (or a folder holding ``manifest.json``); errors are one line naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ManifestError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ManifestError(f"{path}: invalid JSON: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<document>"
        raise ManifestError(f"{path}: field '{field}': {first['msg']}") from None


def resolve_artifact(manifest_path: str | Path, artifact: Artifact) -> Path:
    """Return the artifact's path after checking it stays in the folder and matches its sha256."""
    manifest_path = Path(manifest_path)
    folder = (manifest_path if manifest_path.is_dir() else manifest_path.parent).resolve()
    target = (folder / artifact.path).resolve()
    if not target.is_relative_to(folder):
        raise ManifestError(f"{manifest_path}: artifact '{artifact.path}' resolves outside {folder}")
    if not target.is_file():
        raise ManifestError(f"{target}: artifact listed in the manifest is missing")
    actual = sha256_file(target)
    if actual != artifact.sha256:
        raise ManifestError(
            f"{target}: sha256 mismatch (manifest {artifact.sha256[:12]}..., file {actual[:12]}...); "
            "refusing to load a modified model"
        )
    return target


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_FILENAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def artifact_for(folder: str | Path, relative: str, role: str = "model") -> Artifact:
    """Describe a file inside ``folder`` with its hash, for a manifest being written."""
    return Artifact(path=relative, sha256=sha256_file(Path(folder) / relative), role=role)  # type: ignore[arg-type]
