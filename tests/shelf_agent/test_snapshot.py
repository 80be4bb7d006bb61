"""Alert snapshots: slot outline drawn, JPEG decodes, size cap honoured by quality then by downscaling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from shelfsight.shelf_agent.snapshot import SnapshotError, draw_slot, encode_capped, render_snapshot

SLOT = [(400, 200), (700, 200), (700, 420), (400, 420)]


@pytest.fixture(scope="module")
def shelf_frame() -> np.ndarray:
    """A textured 1280x720 frame (noise on gradients) that does not compress to nothing."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 255, 1280, dtype=np.float32)
    frame = np.stack([np.tile(ramp, (720, 1)), np.tile(ramp[::-1], (720, 1)), np.full((720, 1280), 90.0)], axis=2)
    frame += rng.normal(0, 25, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_slot_outline_is_drawn_on_a_copy(shelf_frame: np.ndarray) -> None:
    before = shelf_frame.copy()
    drawn = draw_slot(shelf_frame, SLOT, label="R2S5", color=(0, 0, 255))
    np.testing.assert_array_equal(shelf_frame, before)  # caller's frame untouched
    edge = drawn[300, 398:403].astype(int)  # the left edge of the polygon, x = 400
    assert (edge[:, 2] == 255).all() and (edge[:, :2] == 0).all()
    assert not np.array_equal(drawn[300, 550], [0, 0, 255])  # the inside is not filled


@pytest.mark.parametrize("max_bytes", [400_000, 120_000, 40_000, 8_000])
def test_snapshot_fits_the_cap_and_decodes(shelf_frame: np.ndarray, max_bytes: int) -> None:
    jpeg = render_snapshot(shelf_frame, SLOT, max_bytes=max_bytes, label="R2S5")
    assert len(jpeg) <= max_bytes
    image = decode(jpeg)
    full_quality = len(cv2.imencode(".jpg", shelf_frame, [cv2.IMWRITE_JPEG_QUALITY, 40])[1])
    if max_bytes >= full_quality:
        assert image.shape == shelf_frame.shape  # quality alone was enough: resolution kept
    else:
        assert image.shape[1] < 1280 and image.shape[1] / image.shape[0] == pytest.approx(16 / 9, rel=0.02)


def test_lowering_quality_comes_before_downscaling(shelf_frame: np.ndarray) -> None:
    q85 = len(cv2.imencode(".jpg", shelf_frame, [cv2.IMWRITE_JPEG_QUALITY, 85])[1])
    q40 = len(cv2.imencode(".jpg", shelf_frame, [cv2.IMWRITE_JPEG_QUALITY, 40])[1])
    jpeg = encode_capped(shelf_frame, max_bytes=(q85 + q40) // 2)
    assert decode(jpeg).shape == shelf_frame.shape and q40 <= len(jpeg) < q85


def test_impossible_cap_and_bad_frames_are_one_line_errors(shelf_frame: np.ndarray) -> None:
    with pytest.raises(SnapshotError, match="cannot fit in 200 bytes"):
        render_snapshot(shelf_frame, SLOT, max_bytes=200)
    with pytest.raises(SnapshotError, match="BGR uint8"):
        render_snapshot(shelf_frame[:, :, 0], SLOT)
