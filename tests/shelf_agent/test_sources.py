"""Parsing `--camera` values, backend choice, open-time properties and the fail-fast checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.sources import (
    CameraOptions,
    CaptureError,
    SourceKind,
    apply_device_properties,
    check_source,
    open_capture,
    opencv_has_gstreamer,
    parse_camera,
)

NO_GSTREAMER = pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")


class FakeVideoCapture:
    """Stands in for a V4L2 camera (no /dev/video0 on a build machine); records the order of property writes."""

    def __init__(self, target: int | str, api: int, params: list[int]) -> None:
        self.opened_with = (target, api, list(params))
        self.set_calls: list[tuple[int, float]] = []

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        return True, np.zeros((4, 4, 3), np.uint8)

    def get(self, prop_id: int) -> float:
        return 0.0

    def set(self, prop_id: int, value: float) -> bool:
        self.set_calls.append((prop_id, value))
        return True

    def release(self) -> None:
        pass


@pytest.fixture()
def video_file(tmp_path: Path) -> Path:
    path = tmp_path / "aisle 3.mp4"  # a space: paths are not split or quoted anywhere
    path.write_bytes(b"not decoded by the parser")
    return path


@pytest.mark.parametrize(
    ("spec", "kind", "target", "api"),
    [
        ("0", SourceKind.INDEX, 0, cv2.CAP_V4L2),
        ("2", SourceKind.INDEX, 2, cv2.CAP_V4L2),
        ("/dev/video0", SourceKind.DEVICE, "/dev/video0", cv2.CAP_V4L2),
        ("rtsp://10.0.0.7:554/stream1", SourceKind.RTSP, "rtsp://10.0.0.7:554/stream1", cv2.CAP_FFMPEG),
        ("RTSPS://nvr/cam", SourceKind.RTSP, "RTSPS://nvr/cam", cv2.CAP_FFMPEG),
        ("http://cam.local/video.mjpg", SourceKind.HTTP, "http://cam.local/video.mjpg", cv2.CAP_FFMPEG),
        ("https://cam.local/mjpg", SourceKind.HTTP, "https://cam.local/mjpg", cv2.CAP_FFMPEG),
        ("gst:videotestsrc ! videoconvert ! appsink", SourceKind.GSTREAMER, "videotestsrc ! videoconvert ! appsink",
         cv2.CAP_GSTREAMER),
    ],
)  # fmt: skip
def test_parse_table(spec: str, kind: SourceKind, target: int | str, api: int) -> None:
    source = parse_camera(spec)
    assert (source.kind, source.target, source.api_preference) == (kind, target, api)
    assert source.spec == spec


def test_parse_video_file_and_file_url(video_file: Path) -> None:
    for spec in (str(video_file), f"file://{video_file}"):
        source = parse_camera(spec)
        assert source.kind is SourceKind.FILE
        assert source.target == str(video_file)
        assert source.api_preference == cv2.CAP_FFMPEG
        assert not source.is_live and source.is_local


def test_csi_builds_the_jetson_pipeline() -> None:
    source = parse_camera("csi://1", CameraOptions(width=1920, height=1080, fps=60))
    assert source.kind is SourceKind.CSI and source.api_preference == cv2.CAP_GSTREAMER
    pipeline = str(source.target)
    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 ! ")
    assert "video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1" in pipeline
    assert "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR" in pipeline
    assert pipeline.endswith("appsink drop=true max-buffers=1")
    assert "sensor-id=0" in str(parse_camera("csi://0").target)


def test_api_override_is_honoured() -> None:
    assert parse_camera("rtsp://h/s", CameraOptions(api="gstreamer")).api_preference == cv2.CAP_GSTREAMER
    assert parse_camera("0", CameraOptions(api="any")).api_preference == cv2.CAP_ANY


@pytest.mark.parametrize(
    ("spec", "message_part"),
    [
        ("/nowhere/shelf.mp4", "video file not found: /nowhere/shelf.mp4"),
        ("missing.avi", "video file not found: missing.avi"),
        ("file:///nowhere/x.mp4", "video file not found: /nowhere/x.mp4"),
        ("csi://left", "csi:// needs a sensor number"),
        ("gst:videotestsrc ! fakesink", "must end in appsink"),
        ("ftp://cam/stream", "unsupported scheme 'ftp://'"),
        ("   ", "empty source"),
    ],
)
def test_parse_errors_are_one_line_and_name_the_input(spec: str, message_part: str) -> None:
    with pytest.raises(CaptureError) as info:
        parse_camera(spec)
    assert isinstance(info.value, ShelfSightError)
    assert message_part in str(info.value)
    assert "\n" not in str(info.value)


def test_network_sources_carry_open_and_read_timeouts_and_others_do_not(video_file: Path) -> None:
    options = CameraOptions(open_timeout_s=2.5, read_timeout_s=0.75)
    params = parse_camera("rtsp://h/s", options).open_params()
    assert dict(zip(params[::2], params[1::2], strict=True)) == {
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC: 2500,
        cv2.CAP_PROP_READ_TIMEOUT_MSEC: 750,
    }
    assert parse_camera("http://h/m.mjpg").open_params()[1::2] == [5000, 5000]
    assert parse_camera(str(video_file)).open_params() == []
    assert parse_camera("/dev/video0").open_params() == []


@NO_GSTREAMER
@pytest.mark.parametrize("spec", ["csi://0", "gst:videotestsrc ! videoconvert ! appsink"])
def test_gstreamer_sources_fail_clearly_without_gstreamer(spec: str) -> None:
    source = parse_camera(spec)
    for attempt in (check_source, open_capture):
        with pytest.raises(CaptureError, match="OpenCV here has no GStreamer support") as info:
            attempt(source)
        assert spec.split(":")[0] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(Path("/dev/video0").exists(), reason="a real camera is attached")
def test_missing_device_is_named() -> None:
    with pytest.raises(CaptureError, match="camera device not found: /dev/video0"):
        open_capture(parse_camera("/dev/video0"))
    with pytest.raises(CaptureError, match="camera device not found: /dev/video0"):
        open_capture(parse_camera("0"))


def test_unopenable_video_file_is_a_capture_error(video_file: Path) -> None:
    with pytest.raises(CaptureError, match=r"cannot open video file '.*aisle 3\.mp4'"):
        open_capture(parse_camera(str(video_file)))


def test_device_sets_mjpg_fourcc_before_size_and_fps() -> None:
    source = parse_camera("/dev/video0", CameraOptions(width=1280, height=720, fps=30))
    capture = open_capture(source, FakeVideoCapture)
    assert isinstance(capture, FakeVideoCapture)
    assert capture.opened_with == ("/dev/video0", cv2.CAP_V4L2, [])
    assert capture.set_calls == [
        (cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG")),
        (cv2.CAP_PROP_FRAME_WIDTH, 1280),
        (cv2.CAP_PROP_FRAME_HEIGHT, 720),
        (cv2.CAP_PROP_FPS, 30),
    ]


@pytest.mark.parametrize(
    ("spec", "options", "expected_props"),
    [
        ("0", CameraOptions(fourcc=None, width=640), [cv2.CAP_PROP_FRAME_WIDTH]),
        ("0", CameraOptions(), [cv2.CAP_PROP_FOURCC]),
        ("rtsp://h/s", CameraOptions(width=640, height=480), []),  # a network stream's size is the sender's
    ],
)
def test_which_properties_are_set(spec: str, options: CameraOptions, expected_props: list[int]) -> None:
    capture = FakeVideoCapture(0, 0, [])
    apply_device_properties(capture, parse_camera(spec, options))
    assert [prop for prop, _ in capture.set_calls] == expected_props


@pytest.mark.parametrize("bad", [{"fourcc": "MJPEG"}, {"width": 0}, {"fps": -1}, {"colour": "red"}])
def test_camera_options_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CameraOptions.model_validate(bad)
