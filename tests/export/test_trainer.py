from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shelfsight.export.model import CHECKPOINT_FORMAT, ModelConfig, build_model, load_checkpoint
from shelfsight.export.train import TrainConfig, TrainResult, init_from_checkpoint, lr_at, train
from shelfsight.runtime.errors import ShelfSightError


def test_training_writes_loadable_last_and_best(trained_run: TrainResult) -> None:
    assert trained_run.epochs_run == 2 and trained_run.best is not None
    for path in (trained_run.last, trained_run.best):
        raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types and tensors only
        assert raw["format"] == CHECKPOINT_FORMAT
        _model, meta = load_checkpoint(path)
        assert meta.class_names == ["product", "gap"] and meta.imgsz == 128
        assert {"map50", "map50_95", "per_class_ap50"} <= set(meta.metrics)
    last = torch.load(trained_run.last, map_location="cpu", weights_only=True)
    best = torch.load(trained_run.best, map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    assert "train_state" in last and "train_state" not in best  # best.pt carries EMA weights only
    assert {"model", "optimizer", "scheduler", "ema_updates", "seed"} <= set(last["train_state"])


def test_resume_continues_where_the_run_stopped(
    tiny_data: Path, tmp_path: Path, trained_run: TrainResult, make_train_config: Callable[..., TrainConfig]
) -> None:
    """1 epoch + resume to 2 gives the same weights as 2 epochs straight, even with a data-loader worker."""
    out = tmp_path / "resumed"
    seen: list[int] = []
    train(make_train_config(tiny_data, out, epochs=1, workers=1), on_epoch_end=lambda epoch, _: seen.append(epoch))
    first = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 0
    result = train(make_train_config(tiny_data, out, resume=True), on_epoch_end=lambda epoch, _: seen.append(epoch))
    assert seen == [0, 1] and result.epochs_run == 1
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    straight = torch.load(trained_run.last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1
    assert resumed["train_state"]["scheduler"]["step"] == straight["train_state"]["scheduler"]["step"]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_resume_without_last_checkpoint_is_refused(
    tiny_data: Path, tmp_path: Path, make_train_config: Callable[..., TrainConfig]
) -> None:
    with pytest.raises(ShelfSightError, match="nothing to resume"):
        train(make_train_config(tiny_data, tmp_path / "empty", resume=True))


def test_init_copies_every_matching_tensor(trained_run: TrainResult) -> None:
    assert trained_run.best is not None
    source, _ = load_checkpoint(trained_run.best)
    same = build_model(source.cfg)
    assert init_from_checkpoint(same, trained_run.best) == len(same.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    # Another class count: everything but the class predictors carries over (fine-tuning to new classes).
    other = build_model(ModelConfig.from_dict(source.cfg.to_dict() | {"num_classes": 3}))
    copied = init_from_checkpoint(other, trained_run.best)
    skipped = {k for k, v in other.state_dict().items() if v.shape != source.state_dict()[k].shape}
    assert skipped and all(k.startswith("head.cls_branches.") for k in skipped)
    assert copied == len(other.state_dict()) - len(skipped)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_init_batchnorm_statistics(
    freeze_bn: bool, tiny_data: Path, tmp_path: Path, trained_run: TrainResult,
    make_train_config: Callable[..., TrainConfig],
) -> None:
    """Fine-tuning with --freeze-bn leaves every BN running mean/var at the --init values; without it they move."""
    assert trained_run.best is not None
    result = train(make_train_config(tiny_data, tmp_path / "ft", epochs=1, init=trained_run.best,
                                     freeze_bn=freeze_bn))
    before = torch.load(trained_run.best, map_location="cpu", weights_only=True)["state_dict"]
    # The raw model, not the EMA copy in "state_dict" (an average of equal values is equal only to rounding).
    after = torch.load(result.last, map_location="cpu", weights_only=True)["train_state"]["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k.endswith("conv.weight")]
    assert stats and weights
    assert all(torch.equal(after[k], before[k]) for k in stats) is freeze_bn
    assert not all(torch.equal(after[k], before[k]) for k in weights)  # the weights still learn


def test_freeze_bn_without_init_weights_is_refused(tiny_data: Path, tmp_path: Path,
                                                   make_train_config: Callable[..., TrainConfig]) -> None:
    with pytest.raises(ValueError, match="freeze_bn keeps the BatchNorm statistics of --init"):
        make_train_config(tiny_data, tmp_path / "scratch", freeze_bn=True)


def test_learning_rate_schedule_warms_up_then_decays() -> None:
    rates = [lr_at(step, 100, 10, 1.0, 0.05) for step in range(101)]
    assert rates[0] == pytest.approx(0.1) and rates[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(rates[:11]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(0.05)
