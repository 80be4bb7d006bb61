"""Background camera capture: one reader thread, a one-slot mailbox, camera state the agent can publish.

Live cameras and `realtime` file replay keep ONLY the newest frame (latest wins; overwritten frames are counted as
dropped), so a slow detector always sees the freshest image and memory never grows. `as_fast_as_possible` file
replay hands every frame over (the reader waits for the consumer), so a recording replays deterministically and
faster than real time. File frames carry the file's own timestamps; live frames carry wall-clock time.

A watchdog thread turns "no frame for max(min_stall_s, stall_frames / fps)" into `stalled` even while the reader is
stuck inside OpenCV; network sources also have OpenCV open/read timeouts, so the reader itself comes back, fails
the read and reconnects with capped exponential backoff and jitter.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shelfsight.shelf_agent.sources import (
    CameraSource,
    CaptureError,
    CaptureFactory,
    VideoCaptureLike,
    check_source,
    default_capture_factory,
    open_capture,
)

__all__ = [
    "CameraState",
    "CaptureError",
    "CaptureOptions",
    "CaptureStats",
    "CaptureThread",
    "Frame",
    "FrameSource",
    "ReplayMode",
    "backoff_delay",
    "frame_problem",
]

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 0.1
FPS_WINDOW_FRAMES = 30
FALLBACK_FILE_FPS = 30.0


class CameraState(str, enum.Enum):
    STARTING = "starting"
    STREAMING = "streaming"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"


_FINAL_STATES = (CameraState.ENDED, CameraState.FAILED)
_STALLABLE_STATES = (CameraState.STARTING, CameraState.STREAMING, CameraState.RECONNECTING)


class ReplayMode(str, enum.Enum):
    REALTIME = "realtime"
    AS_FAST_AS_POSSIBLE = "as_fast_as_possible"


class CaptureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    replay: ReplayMode = Field(
        default=ReplayMode.REALTIME, description="video files only; live sources are always realtime"
    )
    loop: bool = Field(default=False, description="video files only: start again at the end instead of ending")
    stall_frames: float = Field(
        default=10.0, gt=0, description="k in: stalled after no frame for max(min_stall_s, k / fps)"
    )
    min_stall_s: float = Field(default=1.0, gt=0)
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    reconnect_jitter: float = Field(default=0.25, ge=0, le=1, description="fraction of each delay taken off at random")
    max_reconnect_attempts: int | None = Field(
        default=None, ge=1, description="failed opens in a row before `failed`; None: retry forever"
    )
    max_read_failures: int = Field(
        default=3, ge=1, description="failed reads in a row before a live source is reopened"
    )
    stop_timeout_s: float = Field(
        default=3.0, gt=0, description="how long stop() waits for a reader stuck inside OpenCV"
    )


@dataclass(frozen=True, slots=True)
class Frame:
    image: np.ndarray
    index: int
    timestamp_s: float
    """Source time: seconds from the start of a video file (continuing across loops), wall-clock epoch for live."""
    captured_monotonic_s: float

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.captured_monotonic_s


@dataclass(frozen=True)
class CaptureStats:
    state: CameraState
    frames_read: int
    frames_delivered: int
    frames_dropped: int
    bad_frames: int
    reconnects: int
    open_failures: int
    fps_measured: float
    last_error: str | None
    last_outage_s: float | None


StateCallback = Callable[[CameraState, CameraState, str], None]
"""on_state_change(old, new, reason): called in order from the capture threads (and from stop() for the final
`ended`); keep it short and never call stop() from it."""


class FrameSource(Protocol):
    def start(self) -> None: ...
    def read(self, timeout: float | None = None) -> Frame | None: ...
    def stop(self, timeout: float | None = None) -> bool: ...
    @property
    def finished(self) -> bool: ...
    @property
    def state(self) -> CameraState: ...
    @property
    def stats(self) -> CaptureStats: ...


def backoff_delay(attempt: int, initial_s: float, max_s: float, jitter: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (0-based): doubling from initial_s, capped at max_s, with up to `jitter` of
    it taken off at random so many devices restarting together do not hammer a camera or NVR in lockstep."""
    base = min(max_s, initial_s * 2.0 ** min(attempt, 62))
    return base * (1.0 - jitter * rng.random())


def frame_problem(image: object, expected_shape: tuple[int, ...] | None) -> str | None:
    """Why a frame from OpenCV is unusable, or None if it is a BGR uint8 image of the stream's shape."""
    if image is None:
        return "empty frame"
    if not isinstance(image, np.ndarray):
        return f"not an image ({type(image).__name__})"
    if image.size == 0:
        return "zero-size frame"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"shape {image.shape}, expected HxWx3"
    if image.dtype != np.uint8:
        return f"dtype {image.dtype}, expected uint8"
    if expected_shape is not None and image.shape != expected_shape:
        return f"shape {image.shape} differs from the stream's {expected_shape}"
    return None


class CaptureThread:
    """Reads a CameraSource on a daemon thread; read() returns the newest frame (every frame when replaying a file
    as_fast_as_possible). Implements FrameSource."""

    def __init__(
        self,
        source: CameraSource,
        options: CaptureOptions | None = None,
        *,
        on_state_change: StateCallback | None = None,
        capture_factory: CaptureFactory = default_capture_factory,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.options = options or CaptureOptions()
        self._on_state_change = on_state_change
        self._factory = capture_factory
        self._rng = rng or random.Random()
        replaying_file = not source.is_live
        self._hand_over_every_frame = replaying_file and self.options.replay is ReplayMode.AS_FAST_AS_POSSIBLE
        self._pace_to_file = replaying_file and self.options.replay is ReplayMode.REALTIME

        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._reader_done = False
        self._stop = threading.Event()
        self._state = CameraState.STARTING
        self._state_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._capture: VideoCaptureLike | None = None

        # Written by the reader only; read elsewhere without locks (single attribute reads are atomic).
        self._frames_read = 0
        self._frames_delivered = 0
        self._frames_dropped = 0
        self._bad_frames = 0
        self._reconnects = 0
        self._open_failures = 0
        self._last_error: str | None = None
        self._last_outage_s: float | None = None
        self._file_fps: float | None = None
        self._recent_captures: deque[float] = deque(maxlen=FPS_WINDOW_FRAMES)
        # Stall clock: the last moment the source delivered or was newly asked; `_pausing` marks the reader waiting
        # on purpose (backoff, pacing, a slow consumer), which is not the camera's fault.
        self._progress_mono = time.monotonic()
        self._pausing = False

    # ----------------------------------------------------------------------------------------------- public API
    def start(self) -> None:
        if self._reader is not None or self._stop.is_set():
            raise RuntimeError("a CaptureThread starts once; create a new one")
        check_source(self.source)
        if self.source.is_local:
            # A missing file or camera at start is a user error: say so now rather than as a state change later.
            self._capture = open_capture(self.source, self._factory)
        if not self.source.is_live:
            assert self._capture is not None
            self._file_fps = _file_fps(self._capture, self.source.options.fps)
        self._progress_mono = time.monotonic()
        name = f"capture-{self.source.kind.value}"
        self._reader = threading.Thread(target=self._run, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._reader.start()
        self._watchdog.start()

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None after `timeout` seconds, once the source has ended/failed, or after stop()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                if self._reader_done or self._stop.is_set():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            self._frames_delivered += 1
            self._cond.notify_all()
            return frame

    def frames(self, timeout: float = 1.0) -> Iterator[Frame]:
        """Every frame read() returns, until the source ends or fails or stop() is called."""
        while True:
            frame = self.read(timeout)
            if frame is not None:
                yield frame
            elif self.finished:
                return

    def stop(self, timeout: float | None = None) -> bool:
        """Stop and join the threads; True if the reader exited. A reader stuck inside an OpenCV call is abandoned
        after `timeout` (it is a daemon and releases its capture if the call ever returns)."""
        timeout = self.options.stop_timeout_s if timeout is None else timeout
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in (self._reader, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._reader is None and self._capture is not None:
            self._release()
        stopped = self._reader is None or not self._reader.is_alive()
        if not stopped:
            self._last_error = f"capture thread still inside OpenCV after {timeout:.1f} s; abandoned (daemon)"
            log.warning("%s: %s", self.source.describe(), self._last_error)
        self._set_state(CameraState.ENDED, "stopped")
        return stopped

    def __enter__(self) -> CaptureThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state(self) -> CameraState:
        return self._state

    @property
    def finished(self) -> bool:
        """No frame will ever come again: the reader is gone (or stopping) and the mailbox is empty."""
        return (self._reader_done or self._stop.is_set()) and self._slot is None

    @property
    def stall_after_s(self) -> float:
        fps = self.source.options.fps or self._file_fps or self._measured_fps()
        if not fps:
            return self.options.min_stall_s
        return max(self.options.min_stall_s, self.options.stall_frames / fps)

    @property
    def stats(self) -> CaptureStats:
        with self._cond:
            delivered, dropped = self._frames_delivered, self._frames_dropped
        fps = self._measured_fps()
        if self._recent_captures and time.monotonic() - self._recent_captures[-1] > self.stall_after_s:
            fps = 0.0
        return CaptureStats(
            state=self._state,
            frames_read=self._frames_read,
            frames_delivered=delivered,
            frames_dropped=dropped,
            bad_frames=self._bad_frames,
            reconnects=self._reconnects,
            open_failures=self._open_failures,
            fps_measured=fps,
            last_error=self._last_error,
            last_outage_s=self._last_outage_s,
        )

    # ------------------------------------------------------------------------------------------------ internals
    def _set_state(self, new: CameraState, reason: str = "") -> None:
        with self._state_lock:
            old = self._state
            if old is new or old in _FINAL_STATES:
                return
            self._state = new
            log.info("%s: %s -> %s%s", self.source.describe(), old.value, new.value, f" ({reason})" if reason else "")
            if self._on_state_change is not None:
                try:
                    self._on_state_change(old, new, reason)
                except Exception:  # the agent's callback must not kill capture
                    log.exception("on_state_change callback failed")

    def _measured_fps(self) -> float:
        times = self._recent_captures
        if len(times) < 5:
            return 0.0
        span = times[-1] - times[0]
        return (len(times) - 1) / span if span > 0 else 0.0

    def _pause(self, seconds: float) -> bool:
        """Wait on purpose (not the camera's fault); False if stop() was called meanwhile."""
        self._pausing = True
        try:
            return not self._stop.wait(seconds)
        finally:
            self._progress_mono = time.monotonic()
            self._pausing = False

    def _open(self) -> VideoCaptureLike:
        self._progress_mono = time.monotonic()  # a new attempt gets the full stall window
        return open_capture(self.source, self._factory)

    def _read_source(self, capture: VideoCaptureLike) -> tuple[bool, np.ndarray | None]:
        try:
            return capture.read()
        except cv2.error as exc:
            self._last_error = f"read error: {str(exc).strip().splitlines()[-1]}"
            return False, None

    def _release(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            with contextlib.suppress(Exception):
                capture.release()

    def _watch(self) -> None:
        while not self._stop.wait(WATCHDOG_INTERVAL_S) and not self._reader_done:
            if self._pausing or self._state not in _STALLABLE_STATES:
                continue
            idle = time.monotonic() - self._progress_mono
            if idle > self.stall_after_s:
                self._set_state(CameraState.STALLED, f"no frame for {idle:.1f} s")

    def _run(self) -> None:
        try:
            if self.source.is_live:
                self._run_live()
            else:
                self._run_file()
        except Exception as exc:  # a surprise must surface as a state the agent publishes, not a silent dead thread
            log.exception("%s: capture thread crashed", self.source.describe())
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._set_state(CameraState.FAILED, self._last_error)
        finally:
            self._release()
            with self._cond:
                self._reader_done = True
                self._cond.notify_all()

    def _accept(self, image: np.ndarray | None, expected_shape: tuple[int, ...] | None) -> bool:
        problem = frame_problem(image, expected_shape)
        if problem is not None:
            self._bad_frames += 1
            self._last_error = f"bad frame skipped: {problem}"
        return problem is None

    def _deliver(self, image: np.ndarray, timestamp_s: float, captured_mono: float) -> bool:
        """Hand a frame to the consumer; False if stop() interrupted a blocking hand-off."""
        frame = Frame(image, self._frames_read, timestamp_s, captured_mono)
        self._frames_read += 1
        self._progress_mono = captured_mono
        self._recent_captures.append(captured_mono)
        if self._state is not CameraState.STREAMING:
            self._set_state(CameraState.STREAMING)
        with self._cond:
            if self._hand_over_every_frame:
                self._pausing = True
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait()
                self._progress_mono = time.monotonic()
                self._pausing = False
                if self._stop.is_set():
                    return False
            elif self._slot is not None:
                self._frames_dropped += 1
            self._slot = frame
            self._cond.notify_all()
        return True

    def _run_live(self) -> None:
        options = self.options
        # An attempt fails when the open fails or when the opened stream dies before a single good frame (a camera
        # busy in another process opens fine and then never delivers): both back off, so neither spins.
        failed_attempts = 0
        frames_since_open = 0
        lost_at: float | None = None
        read_failures = 0
        expected_shape: tuple[int, ...] | None = None
        while not self._stop.is_set():
            if self._capture is None:
                try:
                    self._capture = self._open()
                except CaptureError as exc:
                    self._open_failures += 1
                    self._last_error = str(exc)
                    failed_attempts += 1
                    if not self._back_off(failed_attempts, str(exc)):
                        return
                    continue
                frames_since_open = read_failures = 0
                expected_shape = None
            ok, image = self._read_source(self._capture)
            if self._stop.is_set():
                return
            if not ok:
                read_failures += 1
                if read_failures >= options.max_read_failures:
                    self._release()
                    lost_at = lost_at or time.monotonic()
                    self._last_error = f"stream lost: {read_failures} failed reads in a row"
                    if frames_since_open == 0:
                        failed_attempts += 1
                        if not self._back_off(failed_attempts, self._last_error):
                            return
                    else:
                        self._set_state(CameraState.RECONNECTING, f"{self._last_error}; reopening")
                continue
            read_failures = 0
            if not self._accept(image, expected_shape):
                continue
            assert image is not None
            expected_shape = image.shape
            failed_attempts = 0
            frames_since_open += 1
            now = time.monotonic()
            if lost_at is not None:
                self._reconnects += 1
                self._last_outage_s, lost_at = now - lost_at, None
            self._deliver(image, time.time(), now)

    def _back_off(self, failed_attempts: int, reason: str) -> bool:
        """Wait before the next attempt; False when giving up (failed) or stopped meanwhile."""
        options = self.options
        if options.max_reconnect_attempts is not None and failed_attempts >= options.max_reconnect_attempts:
            self._set_state(CameraState.FAILED, f"{failed_attempts} failed attempts in a row; {reason}")
            return False
        delay = backoff_delay(
            failed_attempts - 1,
            options.reconnect_initial_s,
            options.reconnect_max_s,
            options.reconnect_jitter,
            self._rng,
        )
        self._set_state(CameraState.RECONNECTING, f"{reason}; retry in {delay:.1f} s")
        return self._pause(delay)

    def _run_file(self) -> None:
        capture = self._capture
        assert capture is not None and self._file_fps is not None
        fps = self._file_fps
        loop_offset_s = 0.0
        frames_in_pass = 0
        last_ts_in_file: float | None = None
        expected_shape: tuple[int, ...] | None = None
        pace_origin: tuple[float, float] | None = None  # (monotonic, source time) of the first paced frame
        while not self._stop.is_set():
            ok, image = self._read_source(capture)
            if not ok:
                self._note_early_end(capture, frames_in_pass)
                if not self.options.loop or frames_in_pass == 0 or last_ts_in_file is None:
                    self._set_state(CameraState.ENDED, "end of video file")
                    return
                loop_offset_s += last_ts_in_file + 1.0 / fps
                self._release()
                self._capture = capture = self._open()
                frames_in_pass, last_ts_in_file = 0, None
                continue
            ts_in_file = _file_timestamp(capture.get(cv2.CAP_PROP_POS_MSEC), frames_in_pass, fps, last_ts_in_file)
            frames_in_pass += 1
            last_ts_in_file = ts_in_file
            if not self._accept(image, expected_shape):
                continue
            assert image is not None
            expected_shape = image.shape
            timestamp_s = loop_offset_s + ts_in_file
            if self._pace_to_file:
                if pace_origin is None:
                    pace_origin = (time.monotonic(), timestamp_s)
                wait_s = pace_origin[0] + (timestamp_s - pace_origin[1]) - time.monotonic()
                if wait_s > 0 and not self._pause(wait_s):
                    return
            if not self._deliver(image, timestamp_s, time.monotonic()):
                return

    def _note_early_end(self, capture: VideoCaptureLike, frames_in_pass: int) -> None:
        declared = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        if declared > 0 and frames_in_pass < declared - 1:  # container frame counts can be off by one
            self._last_error = (
                f"{self.source.describe()} ended after {frames_in_pass} of {int(declared)} frames: truncated or corrupt"
            )
            log.warning(self._last_error)


def _file_fps(capture: VideoCaptureLike, configured_fps: float | None) -> float:
    reported = capture.get(cv2.CAP_PROP_FPS)
    if 0 < reported < 1000:
        return float(reported)
    return configured_fps or FALLBACK_FILE_FPS


def _file_timestamp(pos_msec: float, frame_index: int, fps: float, previous_s: float | None) -> float:
    """The container's timestamp when it moves forward, else frame_index / fps; never goes backwards."""
    ts = pos_msec / 1000.0
    if not (ts >= 0 and (previous_s is None or ts > previous_s)):
        ts = frame_index / fps
    if previous_s is not None and ts <= previous_s:
        ts = previous_s + 1.0 / fps
    return ts
