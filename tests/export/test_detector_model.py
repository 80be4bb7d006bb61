from __future__ import annotations

import pytest
import torch

from shelfsight.export.model import (
    STRIDES,
    ModelConfig,
    build_model,
    count_parameters,
    decode_boxes,
    make_anchors,
)
from shelfsight.runtime.errors import ShelfSightError


def _anchor_count(height: int, width: int) -> int:
    return sum((height // s) * (width // s) for s in STRIDES)


@pytest.mark.parametrize(
    ("imgsz", "num_classes", "width"),
    [(320, 1, 0.125), (320, 2, 0.25), (320, 5, 0.125), (640, 2, 0.125), (640, 3, 0.125), (160, 80, 0.125)],
)
def test_eval_forward_is_shelfsight_format(imgsz: int, num_classes: int, width: float) -> None:
    model = build_model(ModelConfig(num_classes=num_classes, width=width, imgsz=imgsz)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, imgsz, imgsz))
    assert out.shape == (2, _anchor_count(imgsz, imgsz), 4 + num_classes)
    scores = out[..., 4:]
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    boxes = out[..., :4]
    assert bool((boxes[..., 2] > boxes[..., 0]).all()) and bool((boxes[..., 3] > boxes[..., 1]).all())


def test_train_forward_returns_logits_and_positive_distances() -> None:
    model = build_model(ModelConfig(num_classes=3, width=0.125, imgsz=128)).train()
    logits, distances = model(torch.rand(2, 3, 128, 96))
    assert logits.shape == (2, _anchor_count(128, 96), 3)
    assert distances.shape == (2, _anchor_count(128, 96), 4)
    assert bool((distances > 0).all())


def test_input_not_multiple_of_32_is_refused() -> None:
    model = build_model(ModelConfig(width=0.125, imgsz=128)).eval()
    with pytest.raises(ShelfSightError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 128))


def test_decode_known_ltrb_gives_expected_box() -> None:
    points, strides = make_anchors(64, 64)
    # The 3rd anchor of the stride-8 grid (row 0, column 2) sits at (20, 4).
    assert points[2].tolist() == [20.0, 4.0] and strides[2].item() == 8.0
    distances = torch.zeros(1, len(points), 4)
    distances[0, 2] = torch.tensor([5.0, 3.0, 7.0, 11.0])
    boxes = decode_boxes(points, distances)
    assert boxes[0, 2].tolist() == [15.0, 1.0, 27.0, 15.0]
    # The first stride-32 anchor is the last block: centre (16, 16).
    assert points[-4].tolist() == [16.0, 16.0] and strides[-4].item() == 32.0


def test_decode_inside_graph_matches_manual_decode() -> None:
    model = build_model(ModelConfig(num_classes=2, width=0.125, imgsz=128)).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        logits, distances = model.forward_raw(x)
        out = model(x)
    points, _ = make_anchors(128, 128)
    torch.testing.assert_close(out[..., :4], decode_boxes(points, distances))
    torch.testing.assert_close(out[..., 4:], logits.sigmoid())


def test_fused_model_matches_unfused_and_has_no_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.125, imgsz=128)).train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.rand(2, 3, 128, 128))
    model.eval()
    fused = model.fused()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(("width", "low", "high"), [(0.25, 0.3e6, 0.6e6), (0.5, 1.0e6, 1.6e6)])
def test_parameter_budget(width: float, low: float, high: float) -> None:
    assert low <= count_parameters(build_model(ModelConfig(width=width))) <= high


def test_config_round_trips_through_dict() -> None:
    cfg = ModelConfig(num_classes=4, width=0.375, depth=0.5, imgsz=640)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"imgsz": 300}, "multiple of 32"),
        ({"width": 0.0}, "width"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_config_is_refused(data: dict, message: str) -> None:
    with pytest.raises(ShelfSightError, match=message):
        ModelConfig.from_dict(data)
