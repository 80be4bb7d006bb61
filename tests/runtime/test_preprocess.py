"""Preprocessing: the fast buffered path equals a slow obvious reference, and boxes map back exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from shelfsight.runtime.manifest import InputSpec
from shelfsight.runtime.preprocess import LetterboxTransform, Preprocessor, letterbox_geometry, preprocess_frame

RNG = np.random.default_rng(0)


def _spec(h: int = 64, w: int = 64, **changes: object) -> InputSpec:
    return InputSpec(name="images", shape=[1, 3, h, w], **changes)


def reference_preprocess(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The straightforward version: allocate everything, one step at a time."""
    if frame.ndim == 2:
        frame = np.stack([frame] * 3, axis=-1)
    elif frame.shape[2] == 1:
        frame = np.concatenate([frame] * 3, axis=-1)
    h, w = frame.shape[:2]
    if spec.resize == "resize":
        image = cv2.resize(frame, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    else:
        ratio = min(spec.width / w, spec.height / h)
        new_w, new_h = round(w * ratio), round(h * ratio)
        resized = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        image = np.full((spec.height, spec.width, 3), spec.pad_value, np.uint8)
        x0 = (spec.width - new_w) // 2 if spec.letterbox_align == "center" else 0
        y0 = (spec.height - new_h) // 2 if spec.letterbox_align == "center" else 0
        image[y0 : y0 + new_h, x0 : x0 + new_w] = resized
    if spec.channel_order == "RGB":
        image = image[:, :, ::-1]
    values = image.astype(np.float64) * spec.pixel_scale
    values = (values - np.array(spec.mean)) / np.array(spec.std)
    return values.transpose(2, 0, 1).astype(np.float32)


SPECS = {
    "ours": _spec(),
    "wide-input": _spec(48, 80),
    "top-left": _spec(letterbox_align="top-left"),
    "plain-resize": _spec(40, 72, resize="resize"),
    "bgr-imagenet": _spec(channel_order="BGR", mean=[0.406, 0.456, 0.485], std=[0.225, 0.224, 0.229], pad_value=0),
    "raw-0-255": _spec(pixel_scale=1.0, mean=[10.0, 20.0, 30.0]),
}
FRAME_SHAPES = [(720, 1280, 3), (480, 640, 3), (100, 30, 3), (64, 64, 3), (33, 200), (50, 70, 1)]


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("frame_shape", FRAME_SHAPES, ids=str)
def test_matches_the_reference(spec_name: str, frame_shape: tuple[int, ...]) -> None:
    spec = SPECS[spec_name]
    frame = RNG.integers(0, 256, frame_shape, dtype=np.uint8)
    tensor, transform = preprocess_frame(frame, spec)
    assert tensor.shape == (3, spec.height, spec.width) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, reference_preprocess(frame, spec), atol=1e-5)
    assert (transform.frame_w, transform.frame_h) == (frame_shape[1], frame_shape[0])


def test_reused_buffers_repaint_the_border_when_the_frame_size_changes() -> None:
    spec = SPECS["ours"]
    prep = Preprocessor(spec)
    frames = [RNG.integers(0, 256, shape, dtype=np.uint8) for shape in [(720, 1280, 3), (1280, 720, 3), (720, 1280, 3)]]
    first_buffer = None
    for frame in frames:
        tensor, _ = prep(frame)
        first_buffer = tensor if first_buffer is None else first_buffer
        assert tensor is first_buffer  # the documented reuse
        np.testing.assert_allclose(tensor[0], reference_preprocess(frame, spec), atol=1e-5)


def test_batch_equals_one_by_one() -> None:
    spec = SPECS["ours"]
    frames = [RNG.integers(0, 256, shape, dtype=np.uint8) for shape in [(720, 1280, 3), (64, 32, 3), (90, 90)]]
    batch, transforms = Preprocessor(spec).batch(frames)
    assert batch.shape == (3, 3, 64, 64)
    for row, frame, transform in zip(batch, frames, transforms, strict=True):
        single, single_transform = preprocess_frame(frame, spec)
        np.testing.assert_array_equal(row, single)
        assert transform == single_transform


def test_views_and_flipped_frames_are_read_correctly() -> None:
    spec = SPECS["ours"]
    big = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for frame in (big[10:250, 30:390], big[:, ::-1], big[:, :, ::-1]):
        np.testing.assert_allclose(preprocess_frame(frame, spec)[0], reference_preprocess(frame, spec), atol=1e-5)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 4), np.uint8), "shape"),
        (np.zeros((2, 10, 10, 3), np.uint8), "shape"),
        ([[1, 2], [3, 4]], "numpy array"),
        (None, "numpy array"),
    ],
    ids=["float", "empty", "four-channels", "4d", "list", "none"],
)
def test_bad_frames_are_refused(frame: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessor(SPECS["ours"])(frame)


GEOMETRY_CASES = [
    ((1280, 720), _spec(320, 320)),
    ((1280, 720), _spec(640, 640, letterbox_align="top-left")),
    ((720, 1280), _spec(384, 640)),
    ((641, 479), _spec(320, 320)),
    ((333, 777), _spec(256, 320, resize="resize")),
    ((64, 64), _spec(64, 64)),
]


@pytest.mark.parametrize(("frame_wh", "spec"), GEOMETRY_CASES, ids=lambda c: str(c) if isinstance(c, tuple) else "")
def test_to_input_then_to_frame_is_identity(frame_wh: tuple[int, int], spec: InputSpec) -> None:
    frame_w, frame_h = frame_wh
    transform, _, _ = letterbox_geometry(frame_w, frame_h, spec)
    corners = np.sort(RNG.uniform(0, 1, (50, 2, 2)), axis=1) * [frame_w, frame_h]
    boxes = corners.reshape(50, 4).astype(np.float32)
    back = transform.to_frame(transform.to_input(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    assert transform.to_input(np.array([[0, 0, frame_w, frame_h]])).max() <= max(spec.width, spec.height) + 1e-3


@pytest.mark.parametrize(("frame_wh", "spec"), GEOMETRY_CASES, ids=lambda c: str(c) if isinstance(c, tuple) else "")
def test_transform_agrees_with_the_pixels(frame_wh: tuple[int, int], spec: InputSpec) -> None:
    """A white rectangle drawn in the frame lands where to_input says, to within a pixel."""
    frame_w, frame_h = frame_wh
    box = np.array([frame_w * 0.3, frame_h * 0.2, frame_w * 0.7, frame_h * 0.9]).round()
    frame = np.zeros((frame_h, frame_w, 3), np.uint8)
    frame[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 255
    tensor, transform = preprocess_frame(frame, spec.model_copy(update={"pad_value": 0}))
    ys, xs = np.nonzero(tensor[0] > 0.5)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(found, transform.to_input(box)[0], atol=1.0)


def test_to_frame_clips_to_the_frame() -> None:
    transform = LetterboxTransform(0.5, 0.5, 0.0, 80.0, frame_w=1280, frame_h=720)
    np.testing.assert_array_equal(transform.to_frame(np.array([[-10, 0, 700, 500]])), [[0, 0, 1280, 720]])
