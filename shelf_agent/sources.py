"""Camera sources: turn the `--camera` string into a typed source and open it with the right OpenCV backend.

Accepted forms:
  `0`                      V4L2 device index (Linux), any backend elsewhere
  `/dev/video0`            V4L2 device path
  `shelf.mp4`, `file://…`  video file (FFMPEG backend); must exist
  `rtsp://…`, `rtsps://…`  network stream (FFMPEG backend, open/read timeouts)
  `http://…`, `https://…`  MJPEG over HTTP (FFMPEG backend, open/read timeouts)
  `csi://N`                Jetson CSI sensor N through nvarguscamerasrc (GStreamer backend)
  `gst:PIPELINE`           a raw GStreamer pipeline ending in appsink (GStreamer backend)
"""

from __future__ import annotations

import enum
import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shelfsight.runtime.errors import ShelfSightError

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
CSI_DEFAULT_SIZE = (1280, 720)
CSI_DEFAULT_FPS = 30


class CaptureError(ShelfSightError):
    """A camera source cannot be parsed, found or opened."""


class SourceKind(str, enum.Enum):
    INDEX = "index"
    DEVICE = "device"
    FILE = "file"
    RTSP = "rtsp"
    HTTP = "http"
    CSI = "csi"
    GSTREAMER = "gstreamer"


ApiName = Literal["auto", "any", "v4l2", "ffmpeg", "gstreamer"]
_API_CODES: dict[str, int] = {
    "any": cv2.CAP_ANY,
    "v4l2": cv2.CAP_V4L2,
    "ffmpeg": cv2.CAP_FFMPEG,
    "gstreamer": cv2.CAP_GSTREAMER,
}


class CameraOptions(BaseModel):
    """What the user may ask of a camera; the agent embeds this in its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)
    # MJPG lets USB cameras deliver full resolution at full rate over USB 2; only applied to V4L2 devices.
    fourcc: str | None = Field(default="MJPG", description="V4L2 pixel format; None keeps the driver default")
    api: ApiName = "auto"
    open_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("fourcc")
    @classmethod
    def _four_chars(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 4:
            raise ValueError(f"fourcc must be 4 characters, got '{value}'")
        return value


@dataclass(frozen=True)
class CameraSource:
    """A parsed camera: what to hand to cv2.VideoCapture and how."""

    kind: SourceKind
    spec: str
    target: int | str
    api_preference: int
    options: CameraOptions

    @property
    def is_live(self) -> bool:
        """Live sources have no timestamps of their own and can drop out; files end."""
        return self.kind is not SourceKind.FILE

    @property
    def is_network(self) -> bool:
        return self.kind in (SourceKind.RTSP, SourceKind.HTTP)

    @property
    def is_local(self) -> bool:
        """Local sources are opened synchronously at start so a missing file or device is reported at once; network
        sources (and raw gst: pipelines, which may be network) are opened by the capture thread with retries."""
        return self.kind in (SourceKind.FILE, SourceKind.INDEX, SourceKind.DEVICE, SourceKind.CSI)

    @property
    def is_device(self) -> bool:
        return self.kind in (SourceKind.INDEX, SourceKind.DEVICE)

    @property
    def uses_gstreamer(self) -> bool:
        return self.api_preference == cv2.CAP_GSTREAMER

    def describe(self) -> str:
        if self.kind is SourceKind.FILE:
            return f"video file '{self.target}'"
        return f"{self.kind.value} camera '{self.spec}'"

    def open_params(self) -> list[int]:
        """Properties passed at open time (cv2.VideoCapture(src, api, params)): timeouts must be in force while the
        FFMPEG backend connects, so they cannot be set afterwards."""
        if not self.is_network:
            return []
        return [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            round(self.options.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            round(self.options.read_timeout_s * 1000),
        ]


class VideoCaptureLike(Protocol):
    """The part of cv2.VideoCapture the capture thread uses (tests inject named fakes for camera devices)."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def get(self, prop_id: int) -> float: ...
    def set(self, prop_id: int, value: float) -> bool: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[int | str, int, Sequence[int]], VideoCaptureLike]


def default_capture_factory(target: int | str, api_preference: int, params: Sequence[int]) -> VideoCaptureLike:
    if api_preference == cv2.CAP_V4L2:
        # OpenCV only logs a warning for a missing node; name it so an unplugged camera is obvious.
        device = f"/dev/video{target}" if isinstance(target, int) else target
        if not Path(device).exists():
            raise CaptureError(f"camera device not found: {device}")
    return cv2.VideoCapture(target, api_preference, list(params))


@functools.lru_cache(maxsize=1)
def opencv_has_gstreamer() -> bool:
    return re.search(r"^\s*GStreamer:\s*YES", cv2.getBuildInformation(), re.MULTILINE) is not None


def csi_pipeline(sensor_id: int, width: int, height: int, fps: float) -> str:
    """The documented Jetson pipeline: NVMM buffers from the ISP, converted to BGR for OpenCV, newest frame only."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={width},height={height},framerate={round(fps)}/1 ! "
        "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1"
    )


def _api(options: CameraOptions, default: int) -> int:
    return default if options.api == "auto" else _API_CODES[options.api]


def _device_api() -> int:
    return cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY


def parse_camera(spec: str | int, options: CameraOptions | None = None) -> CameraSource:
    """Parse a `--camera` value. Only a video file is checked for existence here: devices and network cameras may
    appear later, so they are checked when opened."""
    options = options or CameraOptions()
    text = str(spec).strip()
    if not text:
        raise CaptureError("camera: empty source")
    if text.isdigit():
        return CameraSource(SourceKind.INDEX, text, int(text), _api(options, _device_api()), options)
    if text.startswith("/dev/"):
        return CameraSource(SourceKind.DEVICE, text, text, _api(options, _device_api()), options)
    if text.startswith("gst:"):
        pipeline = text[len("gst:") :].strip()
        if "appsink" not in pipeline:
            raise CaptureError(f"camera '{text}': a gst: pipeline must end in appsink so OpenCV can pull frames")
        return CameraSource(SourceKind.GSTREAMER, text, pipeline, _api(options, cv2.CAP_GSTREAMER), options)
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "csi":
            if not rest.isdigit():
                raise CaptureError(f"camera '{text}': csi:// needs a sensor number, e.g. csi://0")
            width = options.width or CSI_DEFAULT_SIZE[0]
            height = options.height or CSI_DEFAULT_SIZE[1]
            pipeline = csi_pipeline(int(rest), width, height, options.fps or CSI_DEFAULT_FPS)
            return CameraSource(SourceKind.CSI, text, pipeline, _api(options, cv2.CAP_GSTREAMER), options)
        if scheme in ("rtsp", "rtsps"):
            return CameraSource(SourceKind.RTSP, text, text, _api(options, cv2.CAP_FFMPEG), options)
        if scheme in ("http", "https"):
            return CameraSource(SourceKind.HTTP, text, text, _api(options, cv2.CAP_FFMPEG), options)
        if scheme == "file":
            text = rest
        else:
            raise CaptureError(
                f"camera '{text}': unsupported scheme '{scheme}://' (use an index, /dev/videoN, a video file, "
                "rtsp://, http(s)://, csi://N or gst:PIPELINE)"
            )
    path = Path(text).expanduser()
    if not path.is_file():
        raise CaptureError(f"camera: video file not found: {path}")
    return CameraSource(SourceKind.FILE, str(spec), str(path), _api(options, cv2.CAP_FFMPEG), options)


def check_source(source: CameraSource) -> None:
    """Fail fast, with a one-line reason, on what no amount of retrying will fix."""
    if source.uses_gstreamer and not opencv_has_gstreamer():
        raise CaptureError(
            f"{source.describe()}: OpenCV here has no GStreamer support; {source.kind.value} sources need an OpenCV "
            "built with GStreamer (on Jetson: the JetPack python3-opencv, not opencv-python from PyPI)"
        )
    if source.kind is SourceKind.FILE and not Path(str(source.target)).is_file():
        raise CaptureError(f"camera: video file not found: {source.target}")


def apply_device_properties(capture: VideoCaptureLike, source: CameraSource) -> None:
    """V4L2 negotiates the size within the current pixel format, so the fourcc has to be set first or a USB camera
    stays in YUYV and silently falls back to a small size or a low frame rate."""
    options = source.options
    if source.is_device and options.fourcc:
        capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*options.fourcc))
    if source.is_device:
        if options.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, options.width)
        if options.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, options.height)
        if options.fps:
            capture.set(cv2.CAP_PROP_FPS, options.fps)


def open_capture(source: CameraSource, factory: CaptureFactory = default_capture_factory) -> VideoCaptureLike:
    """Open a source once, or raise CaptureError. Network sources cannot block longer than their open timeout."""
    check_source(source)
    try:
        capture = factory(source.target, source.api_preference, source.open_params())
    except CaptureError as exc:
        raise CaptureError(f"{source.describe()}: {exc}") from exc
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise CaptureError(f"{source.describe()}: OpenCV failed to open it: {reason}") from exc
    if not capture.isOpened():
        capture.release()
        raise CaptureError(f"cannot open {source.describe()}")
    apply_device_properties(capture, source)
    return capture
