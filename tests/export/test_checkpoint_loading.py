from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shelfsight.export.model import ModelConfig, build_model, load_checkpoint, make_checkpoint
from shelfsight.runtime.errors import ShelfSightError

NAMES = ["product", "gap"]


class PickledThing:
    """A custom class: torch.save pickles it, and weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "not a tensor"


def _good() -> dict[str, Any]:
    torch.manual_seed(0)
    return make_checkpoint(
        build_model(ModelConfig(width=0.125, imgsz=128)), NAMES, 128, epoch=3, metrics={"map50": 0.5}
    )


def _renamed_key() -> dict[str, Any]:
    ckpt = _good()
    state = ckpt["state_dict"]
    state["backbone.stem.conv2.weight"] = state.pop("backbone.stem.conv.weight")
    return ckpt


def _extra_key() -> dict[str, Any]:
    ckpt = _good()
    ckpt["state_dict"]["head.extra.weight"] = torch.zeros(1)
    return ckpt


def _wider_weights() -> dict[str, Any]:
    ckpt = _good()
    ckpt["state_dict"] = build_model(ModelConfig(width=0.25, imgsz=128)).state_dict()
    return ckpt


def _other_format() -> dict[str, Any]:
    return _good() | {"format": "yolo/8"}


def _names_mismatch() -> dict[str, Any]:
    return _good() | {"class_names": ["only-one"]}


CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("tensor", lambda: torch.zeros(3), "holds a Tensor, not a ShelfSight checkpoint dict"),
    ("list", lambda: [1, 2, 3], "holds a list, not a ShelfSight checkpoint dict"),
    ("bare state_dict", lambda: _good()["state_dict"], "is a bare state_dict"),
    ("no format", lambda: {k: v for k, v in _good().items() if k != "format"}, "missing 'format' key"),
    ("other format", _other_format, "unsupported checkpoint format 'yolo/8'"),
    ("missing key", _renamed_key, "missing key 'backbone.stem.conv.weight'"),
    ("unexpected key", _extra_key, "unexpected key 'head.extra.weight'"),
    (
        "shape mismatch",
        _wider_weights,
        r"'backbone\.stage2\.0\.conv\.weight' has shape \(16, 8, 3, 3\), expected \(8, 8, 3, 3\)",
    ),
    ("class count", _names_mismatch, "1 class names but model_config.num_classes=2"),
    (
        "pickled object",
        lambda: {"format": "shelfsight.checkpoint/1", "thing": PickledThing()},
        "pickled Python objects",
    ),
]


@pytest.mark.parametrize(("label", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoints_are_refused_in_one_line(
    tmp_path: Path, label: str, make: Callable[[], Any], message: str
) -> None:
    path = tmp_path / "bad.pt"
    torch.save(make(), path)
    with pytest.raises(ShelfSightError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not a"), (b"this is not a zip file at all", "not a"), (None, "checkpoint not found")],
)
def test_unreadable_files_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "junk.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ShelfSightError, match=message):
        load_checkpoint(path)


def test_good_checkpoint_round_trips(tmp_path: Path) -> None:
    ckpt = _good()
    path = tmp_path / "good.pt"
    torch.save(ckpt, path)
    model, meta = load_checkpoint(path)
    assert not model.training
    assert meta.class_names == NAMES and meta.imgsz == 128 and meta.epoch == 3 and meta.metrics == {"map50": 0.5}
    assert meta.model_config == ModelConfig(width=0.125, imgsz=128)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key
