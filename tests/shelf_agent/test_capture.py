"""CaptureThread against real OpenCV decoding (mp4 files written here) and a real in-process MJPEG HTTP server.

Fakes only stand in for a camera device (none on a build machine) and for an OpenCV call that never returns.
Figures worth reporting (reconnect time, hand-off overhead) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import functools
import gc
import itertools
import random
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from mjpeg_server import MjpegServer

from shelfsight.shelf_agent.capture import (
    CameraState,
    CaptureOptions,
    CaptureThread,
    Frame,
    ReplayMode,
    backoff_delay,
    frame_problem,
)
from shelfsight.shelf_agent.sources import CameraOptions, CaptureError, parse_camera

pytestmark = pytest.mark.timeout(60)

FRAME_W, FRAME_H, ID_BITS = 160, 120, 8


# ------------------------------------------------------------------------------------------------ frames and videos
def encode_frame(frame_id: int) -> np.ndarray:
    """The id as 8 black/white vertical stripes (MSB first): survives mp4v and JPEG compression."""
    bits = (frame_id >> np.arange(ID_BITS - 1, -1, -1)) & 1
    stripes = np.repeat(bits.astype(np.uint8) * 255, FRAME_W // ID_BITS)
    return np.ascontiguousarray(np.broadcast_to(stripes[None, :, None], (FRAME_H, FRAME_W, 3)))


def decode_frame_id(image: np.ndarray) -> int:
    stripe_w = image.shape[1] // ID_BITS
    centres = image[:, stripe_w // 2 :: stripe_w][:, :ID_BITS].mean(axis=(0, 2))
    return int(((centres > 127).astype(int) << np.arange(ID_BITS - 1, -1, -1)).sum())


def write_video(path: Path, frame_count: int, fps: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (FRAME_W, FRAME_H))
    assert writer.isOpened()
    for frame_id in range(frame_count):
        writer.write(encode_frame(frame_id))
    writer.release()
    return path


_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _mp4_boxes(data: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size == 1:
            size = struct.unpack_from(">Q", data, offset + 8)[0]
        elif size == 0:
            size = end - offset
        yield offset, size, kind
        offset += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, shift: int) -> None:
    for offset, size, kind in _mp4_boxes(moov, start, end):
        if kind in _MP4_CONTAINERS:
            _shift_chunk_offsets(moov, offset + 8, offset + size, shift)
        elif kind in (b"stco", b"co64"):
            fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
            (count,) = struct.unpack_from(">I", moov, offset + 12)
            for entry in range(count):
                at = offset + 16 + entry * width
                struct.pack_into(fmt, moov, at, struct.unpack_from(fmt, moov, at)[0] + shift)


def faststart(mp4: bytes) -> bytes:
    """Move the moov index in front of the media data, as streaming recorders do, so a cut file is still readable."""
    boxes = list(_mp4_boxes(mp4, 0, len(mp4)))
    (moov_at, moov_size, _) = next(box for box in boxes if box[2] == b"moov")
    (mdat_at, _, _) = next(box for box in boxes if box[2] == b"mdat")
    assert moov_at > mdat_at, "VideoWriter is expected to write moov last"
    moov = bytearray(mp4[moov_at : moov_at + moov_size])
    _shift_chunk_offsets(moov, 8, len(moov), moov_size)
    return mp4[:mdat_at] + bytes(moov) + mp4[mdat_at:moov_at] + mp4[moov_at + moov_size :]


def file_source(path: Path, **options: object) -> CaptureThread:
    return CaptureThread(parse_camera(str(path)), CaptureOptions.model_validate(options))


# ------------------------------------------------------------------------------------------------ state recording
class StateRecorder:
    """on_state_change callback that tests can wait on."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, CameraState, CameraState, str]] = []
        self._cond = threading.Condition()

    def __call__(self, old: CameraState, new: CameraState, reason: str) -> None:
        with self._cond:
            self.changes.append((time.monotonic(), old, new, reason))
            self._cond.notify_all()

    def wait_for(self, states: set[CameraState], timeout: float, after: float = 0.0) -> float | None:
        """Monotonic time of the first change into one of `states` after `after`, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, _old, new, _reason in self.changes:
                    if at >= after and new in states:
                        return at
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def states(self) -> list[CameraState]:
        with self._cond:
            return [new for _, _, new, _ in self.changes]


def capture_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("capture-") and thread.is_alive()]


# ------------------------------------------------------------------------------------------------ file replay
def test_as_fast_as_possible_delivers_every_frame_in_order_with_file_timestamps(tmp_path: Path) -> None:
    frame_count, fps = 48, 24.0
    video = write_video(tmp_path / "shelf.mp4", frame_count, fps)
    capture = file_source(video, replay=ReplayMode.AS_FAST_AS_POSSIBLE)
    started = time.monotonic()
    capture.start()
    frames = []
    for frame in capture.frames(timeout=5):
        if frame.index % 7 == 0:
            time.sleep(0.02)  # a consumer slower than the decoder now and then: nothing may be dropped for it
        frames.append(frame)
    elapsed = time.monotonic() - started
    assert [f.index for f in frames] == list(range(frame_count))
    assert [decode_frame_id(f.image) for f in frames] == list(range(frame_count))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / fps for i in range(frame_count)], abs=1e-6)
    stats = capture.stats
    assert (stats.frames_read, stats.frames_delivered, stats.frames_dropped, stats.bad_frames) == (48, 48, 0, 0)
    assert capture.state is CameraState.ENDED and capture.finished
    assert capture.read(timeout=0.1) is None
    assert capture.stop()
    print(f"\nas_fast_as_possible: {frame_count / fps:.1f} s of video replayed in {elapsed:.2f} s")


def test_loop_continues_timestamps_across_passes(tmp_path: Path) -> None:
    video = write_video(tmp_path / "loop.mp4", 10, 10.0)
    capture = file_source(video, replay=ReplayMode.AS_FAST_AS_POSSIBLE, loop=True)
    capture.start()
    try:
        frames = [capture.read(timeout=5) for _ in range(25)]
    finally:
        assert capture.stop()
    assert all(frame is not None for frame in frames)
    assert [decode_frame_id(f.image) for f in frames if f] == [i % 10 for i in range(25)]
    assert [f.timestamp_s for f in frames if f] == pytest.approx([i / 10 for i in range(25)], abs=1e-6)
    assert capture.state is CameraState.ENDED  # stopped by us


def test_realtime_replay_is_paced_to_the_file_fps(tmp_path: Path) -> None:
    frame_count, fps = 20, 20.0
    video = write_video(tmp_path / "paced.mp4", frame_count, fps)
    capture = file_source(video, replay=ReplayMode.REALTIME)
    capture.start()
    frames = list(capture.frames(timeout=5))
    span = frames[-1].captured_monotonic_s - frames[0].captured_monotonic_s
    video_span = (frame_count - 1) / fps
    assert span >= 0.8 * video_span
    assert frames[-1].timestamp_s == pytest.approx(video_span)
    print(f"\nrealtime: {video_span:.2f} s of video took {span:.2f} s")


def test_latest_frame_wins_with_a_slow_consumer(tmp_path: Path) -> None:
    video = write_video(tmp_path / "fast.mp4", 150, 100.0)
    capture = file_source(video, replay=ReplayMode.REALTIME)
    capture.start()
    received: list[tuple[int, int]] = []
    most_frames_alive = 0
    for frame in capture.frames(timeout=5):
        received.append((frame.index, decode_frame_id(frame.image)))
        if len(received) % 3 == 0:
            most_frames_alive = max(most_frames_alive, sum(isinstance(o, Frame) for o in gc.get_objects()))
        time.sleep(0.08)  # a detector at ~12 fps behind a 100 fps source
    indexes = [index for index, _ in received]
    assert all(later > earlier for earlier, later in itertools.pairwise(indexes))
    assert all(index == frame_id for index, frame_id in received)  # each image really is the frame it claims
    stats = capture.stats
    assert stats.frames_dropped > 0
    assert stats.frames_read == stats.frames_delivered + stats.frames_dropped == 150
    assert stats.frames_delivered == len(received)
    # the one being read, the one in the mailbox, the one in our hand: nothing queues up
    assert most_frames_alive <= 3
    del frame
    print(f"\nlatest-frame-wins: {len(received)} delivered, {stats.frames_dropped} dropped")


def test_truncated_mp4_ends_cleanly(tmp_path: Path) -> None:
    frame_count = 40
    whole = write_video(tmp_path / "whole.mp4", frame_count, 20.0).read_bytes()
    cut = tmp_path / "cut.mp4"
    streamable = faststart(whole)
    cut.write_bytes(streamable[: int(len(streamable) * 0.6)])
    recorder = StateRecorder()
    capture = CaptureThread(
        parse_camera(str(cut)), CaptureOptions(replay=ReplayMode.AS_FAST_AS_POSSIBLE), on_state_change=recorder
    )
    capture.start()
    frames = list(capture.frames(timeout=5))
    assert 0 < len(frames) < frame_count
    assert [decode_frame_id(f.image) for f in frames[:-1]] == list(range(len(frames) - 1))
    assert capture.state is CameraState.ENDED
    assert recorder.states() == [CameraState.STREAMING, CameraState.ENDED]
    assert "truncated" in (capture.stats.last_error or "")
    assert capture.stop()
    print(f"\ntruncated mp4: {len(frames)} of {frame_count} frames, then ended: {capture.stats.last_error}")


def test_mp4_cut_before_its_index_is_refused_at_start(tmp_path: Path) -> None:
    whole = write_video(tmp_path / "whole.mp4", 20, 20.0)
    cut = tmp_path / "cut before moov.mp4"
    shutil.copyfile(whole, cut)
    with cut.open("r+b") as handle:
        handle.truncate(cut.stat().st_size // 2)
    capture = CaptureThread(parse_camera(str(cut)))
    with pytest.raises(CaptureError, match=r"cannot open video file .*cut before moov\.mp4"):
        capture.start()
    assert capture_threads() == []


# ------------------------------------------------------------------------------------------------ MJPEG over HTTP
@functools.cache
def stripe_jpegs() -> list[bytes]:
    """Frames 0..255 as JPEGs of their id stripes, for the MJPEG server to loop."""
    return [cv2.imencode(".jpg", encode_frame(i))[1].tobytes() for i in range(256)]


def stalling_server(behaviour: str) -> MjpegServer:
    """'headers_only': 200 + headers, then nothing; 'frames_then_silence': three frames, then nothing (open)."""
    server = MjpegServer(stripe_jpegs())
    server.silent_after = {"headers_only": 0, "frames_then_silence": 3}[behaviour]
    return server


@pytest.fixture()
def servers() -> Iterator[list[MjpegServer]]:
    started: list[MjpegServer] = []
    yield started
    for server in started:
        server.kill()


def network_capture(url: str, recorder: StateRecorder, **options: object) -> CaptureThread:
    camera = CameraOptions(open_timeout_s=2.0, read_timeout_s=1.0)
    return CaptureThread(parse_camera(url, camera), CaptureOptions.model_validate(options), on_state_change=recorder)


def test_mjpeg_source_reconnects_after_the_server_restarts(servers: list[MjpegServer]) -> None:
    servers.append(MjpegServer(stripe_jpegs()).start())
    port = servers[0].port
    recorder = StateRecorder()
    capture = network_capture(servers[0].url, recorder, reconnect_initial_s=0.1, reconnect_max_s=0.4)
    capture.start()
    try:
        assert recorder.wait_for({CameraState.STREAMING}, timeout=10) is not None
        first = capture.read(timeout=5)
        assert first is not None and first.image.shape == (FRAME_H, FRAME_W, 3)

        killed_at = time.monotonic()
        servers[0].kill()
        lost_at = recorder.wait_for({CameraState.RECONNECTING, CameraState.STALLED}, timeout=10, after=killed_at)
        assert lost_at is not None
        time.sleep(0.6)  # let a few reopen attempts be refused
        assert capture.state in (CameraState.RECONNECTING, CameraState.STALLED)
        assert capture.stats.open_failures >= 1

        restarted_at = time.monotonic()
        servers.append(MjpegServer(stripe_jpegs(), port=port).start())
        back_at = recorder.wait_for({CameraState.STREAMING}, timeout=15, after=restarted_at)
        assert back_at is not None
        frame = capture.read(timeout=5)
        while frame is not None and frame.captured_monotonic_s < restarted_at:
            frame = capture.read(timeout=5)
        assert frame is not None and frame.index > first.index
        stats = capture.stats
        assert stats.reconnects == 1
        assert stats.last_outage_s is not None
        first_frame_s = frame.captured_monotonic_s - restarted_at
        print(
            f"\nMJPEG: loss noticed {lost_at - killed_at:.2f} s after the kill; streaming again "
            f"{back_at - restarted_at:.2f} s after the restart (first frame {first_frame_s:.2f} s); "
            f"outage {stats.last_outage_s:.2f} s; {stats.open_failures} refused opens"
        )
    finally:
        assert capture.stop()
    assert capture_threads() == []


@pytest.mark.parametrize("behaviour", ["headers_only", "frames_then_silence"])
def test_stalled_server_is_detected_and_stop_is_bounded(servers: list[MjpegServer], behaviour: str) -> None:
    servers.append(stalling_server(behaviour).start())
    recorder = StateRecorder()
    capture = network_capture(servers[0].url, recorder, min_stall_s=0.5, stop_timeout_s=3.0)
    started_at = time.monotonic()
    capture.start()
    stalled_at = recorder.wait_for({CameraState.STALLED}, timeout=10)
    assert stalled_at is not None
    if behaviour == "frames_then_silence":
        assert recorder.states()[0] is CameraState.STREAMING
        assert capture.stats.frames_read >= 3
    else:
        assert capture.stats.frames_read == 0
    stop_started = time.monotonic()
    assert capture.stop()  # the reader came back: OpenCV's open/read timeouts are shorter than stop's bound
    stop_s = time.monotonic() - stop_started
    assert capture_threads() == []
    assert capture.state is CameraState.ENDED
    print(f"\n{behaviour}: stalled {stalled_at - started_at:.2f} s after start; stop() took {stop_s:.2f} s")


# ------------------------------------------------------------------------------------------------ fakes for devices
class OpenFakeCapture:
    """The parts of a cv2.VideoCapture-like fake that never vary: always open, no properties; subclasses read()."""

    def isOpened(self) -> bool:
        return True

    def get(self, prop_id: int) -> float:
        return 0.0

    def set(self, prop_id: int, value: float) -> bool:
        return True

    def release(self) -> None:
        pass


class FakeCamera:
    """Stands in for a USB camera (no /dev/video0 here): each open plays one script of reads, then reads fail.
    Script items: an image, None (read ok but no image), 'fail' (read returns False), 'raise' (cv2.error)."""

    def __init__(self, scripts: list[list[object]]) -> None:
        self.scripts = scripts
        self.opens = 0

    def __call__(self, target: int | str, api: int, params: object) -> FakeCamera._Capture:
        if self.opens >= len(self.scripts):
            raise CaptureError("fake camera unplugged")
        self.opens += 1
        return FakeCamera._Capture(list(self.scripts[self.opens - 1]))

    class _Capture(OpenFakeCapture):
        def __init__(self, script: list[object]) -> None:
            self.script = script

        def read(self) -> tuple[bool, np.ndarray | None]:
            item = self.script.pop(0) if self.script else "fail"
            if isinstance(item, str) and item == "raise":
                raise cv2.error("fake decode error")
            if isinstance(item, str):
                return False, None
            return True, item  # type: ignore[return-value]


def test_bad_frames_are_skipped_and_a_lost_device_is_reopened() -> None:
    good = [encode_frame(i) for i in range(5)]
    camera = FakeCamera(
        [
            [good[0], None, np.zeros((0, 0, 3), np.uint8), np.zeros((FRAME_H, FRAME_W), np.uint8), good[1],
             good[1][:60, :80], good[1].astype(np.float32), good[2], "fail", "fail", "fail"],
            [good[3], "raise", good[4]],
        ]
    )  # fmt: skip
    recorder = StateRecorder()
    capture = CaptureThread(
        parse_camera("/dev/video0"),
        CaptureOptions(reconnect_initial_s=0.01, max_reconnect_attempts=2),
        on_state_change=recorder,
        capture_factory=camera,
        rng=random.Random(0),
    )
    capture.start()
    delivered = []
    for frame in capture.frames(timeout=5):
        delivered.append(decode_frame_id(frame.image))
        time.sleep(0.001)
    assert delivered == sorted(set(delivered)) and set(delivered) <= {0, 1, 2, 3, 4}
    stats = capture.stats
    assert (stats.frames_read, stats.bad_frames, stats.reconnects, camera.opens) == (5, 5, 1, 2)
    assert stats.frames_delivered + stats.frames_dropped == 5
    assert capture.state is CameraState.FAILED
    assert "fake camera unplugged" in (stats.last_error or "")
    assert CameraState.RECONNECTING in recorder.states()
    assert capture.stop()


def test_a_camera_that_opens_but_never_delivers_backs_off_and_fails() -> None:
    camera = FakeCamera([["fail"] * 3] * 5)  # e.g. a USB camera held by another process
    recorder = StateRecorder()
    capture = CaptureThread(
        parse_camera("0"),
        CaptureOptions(reconnect_initial_s=0.01, max_reconnect_attempts=3),
        on_state_change=recorder,
        capture_factory=camera,
    )
    capture.start()
    assert capture.read(timeout=5) is None
    assert capture.finished and capture.state is CameraState.FAILED
    assert camera.opens == 3
    assert recorder.states() == [CameraState.RECONNECTING, CameraState.FAILED]
    assert capture.stats.frames_read == 0 and capture.stats.reconnects == 0
    assert capture.stop()


class HangingFakeCapture(OpenFakeCapture):
    """An OpenCV read that never returns (what a network read without timeouts can do)."""

    def __init__(self) -> None:
        self.release_read = threading.Event()

    def __call__(self, target: int | str, api: int, params: object) -> HangingFakeCapture:
        return self

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.release_read.wait()
        return False, None


def test_stop_gives_up_on_a_read_that_never_returns() -> None:
    hanging = HangingFakeCapture()
    recorder = StateRecorder()
    capture = CaptureThread(
        parse_camera("rtsp://fake/hangs"), CaptureOptions(min_stall_s=0.2), on_state_change=recorder,
        capture_factory=hanging,
    )  # fmt: skip
    capture.start()
    assert recorder.wait_for({CameraState.STALLED}, timeout=5) is not None
    assert capture.read(timeout=0.05) is None
    assert not capture.stop(timeout=0.3)
    abandoned = capture_threads()
    assert [thread.daemon for thread in abandoned] == [True]
    assert "abandoned" in (capture.stats.last_error or "")
    hanging.release_read.set()  # the OpenCV call finally returns: the thread must then exit on its own
    abandoned[0].join(timeout=5)
    assert capture_threads() == []


def test_hand_off_overhead_and_index_fallback_timestamps(tmp_path: Path) -> None:
    """A fake source that decodes nothing, so only the hand-off is measured; its container has no timestamps
    (POS_MSEC stays 0), so timestamps fall back to index / fps."""
    frame_count = 3000
    image = encode_frame(1)

    class InstantFakeVideo(OpenFakeCapture):
        def __init__(self) -> None:
            self.left = frame_count

        def read(self) -> tuple[bool, np.ndarray | None]:
            self.left -= 1
            return (True, image) if self.left >= 0 else (False, None)

        def get(self, prop_id: int) -> float:
            return {cv2.CAP_PROP_FPS: 30.0, cv2.CAP_PROP_FRAME_COUNT: frame_count}.get(prop_id, 0.0)

        def set(self, prop_id: int, value: float) -> bool:
            return False

    placeholder = tmp_path / "instant.mp4"
    placeholder.write_bytes(b"")
    factory: Callable[..., InstantFakeVideo] = lambda *_: InstantFakeVideo()  # noqa: E731
    capture = CaptureThread(
        parse_camera(str(placeholder)), CaptureOptions(replay=ReplayMode.AS_FAST_AS_POSSIBLE), capture_factory=factory
    )
    capture.start()
    started = time.perf_counter()
    timestamps = [frame.timestamp_s for frame in capture.frames(timeout=5)]
    per_frame_us = (time.perf_counter() - started) / frame_count * 1e6
    assert len(timestamps) == frame_count
    assert timestamps[:3] == pytest.approx([0.0, 1 / 30, 2 / 30]) and timestamps[-1] == pytest.approx(2999 / 30)
    assert capture.stats.last_error is None
    print(f"\nblocking hand-off: {per_frame_us:.1f} µs per frame (reader + consumer thread, no decode)")


# ------------------------------------------------------------------------------------------------ pure helpers
@pytest.mark.parametrize(
    ("attempt", "expected"), [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (60, 30.0), (10_000, 30.0)]
)
def test_backoff_doubles_and_is_capped(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, 0.5, 30.0, 0.0, random.Random(0)) == pytest.approx(expected)


def test_backoff_jitter_only_shortens_and_varies() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(3, 0.5, 30.0, 0.25, rng) for _ in range(200)]
    assert all(3.0 <= delay <= 4.0 for delay in delays)
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    ("image", "expected_shape", "problem"),
    [
        (np.zeros((4, 4, 3), np.uint8), None, None),
        (np.zeros((4, 4, 3), np.uint8), (4, 4, 3), None),
        (None, None, "empty frame"),
        (np.zeros((0, 4, 3), np.uint8), None, "zero-size"),
        (np.zeros((4, 4), np.uint8), None, "expected HxWx3"),
        (np.zeros((4, 4, 4), np.uint8), None, "expected HxWx3"),
        (np.zeros((4, 4, 3), np.uint16), None, "expected uint8"),
        (np.zeros((4, 4, 3), np.uint8), (8, 8, 3), "differs from the stream's (8, 8, 3)"),
        ("not an image", None, "not an image"),
    ],
)
def test_frame_problem(image: object, expected_shape: tuple[int, ...] | None, problem: str | None) -> None:
    found = frame_problem(image, expected_shape)
    assert found == problem if problem is None else problem in (found or "")


@pytest.mark.parametrize(("camera_fps", "expected_s"), [(2.0, 5.0), (10.0, 1.0), (30.0, 1.0), (None, 1.0)])
def test_stall_window_follows_the_expected_frame_rate(camera_fps: float | None, expected_s: float) -> None:
    capture = CaptureThread(parse_camera("rtsp://cam/s", CameraOptions(fps=camera_fps)), CaptureOptions())
    assert capture.stall_after_s == pytest.approx(expected_s)
