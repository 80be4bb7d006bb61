"""Structured channel pruning of the project's detector with torch-pruning's dependency graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shelfsight.export.model import CSPBlock, Detector, ModelConfig, build_model, load_checkpoint, read_checkpoint
from shelfsight.export.prune import (
    PRUNING_KEY,
    PruneError,
    PruneOptions,
    PruneResult,
    _SplitFreeCSP,
    conv_widths,
    head_output_convs,
    prune_detector,
    save_pruned_checkpoint,
)

IMGSZ = 128


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2, width=0.25, depth=0.33, imgsz=IMGSZ))
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics, so magnitudes differ between channels
        for _ in range(2):
            model(torch.rand(2, 3, IMGSZ, IMGSZ))
    return model.eval()


@pytest.fixture(scope="module")
def pruned_half(detector: Detector) -> PruneResult:
    return prune_detector(detector, PruneOptions(ratio=0.5, imgsz=IMGSZ))


def test_split_free_rewrite_is_exact(detector: nn.Module) -> None:
    block = next(m for m in detector.modules() if isinstance(m, CSPBlock))
    x = torch.rand(1, block.cv1.conv.in_channels, 16, 16)
    with torch.no_grad():
        rewritten = _SplitFreeCSP(block).eval()
        torch.testing.assert_close(rewritten(x), block(x))
        torch.testing.assert_close(rewritten.merged()(x), block(x))


def test_half_pruning_shrinks_the_model_and_keeps_the_contract(detector: nn.Module, pruned_half: PruneResult) -> None:
    before, after = pruned_half.before, pruned_half.after
    assert after.params < 0.5 * before.params
    assert after.macs < 0.5 * before.macs
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert pruned_half.model(x).shape == detector(x).shape
    # The input model is untouched.
    assert sum(p.numel() for p in detector.parameters()) == before.params


def test_channel_counts_are_multiples_of_8_and_head_outputs_kept(pruned_half: PruneResult) -> None:
    model = pruned_half.model
    protected = {id(m) for m in head_output_convs(model)}
    widths = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prunable = [w for name, w in widths.items() if id(dict(model.named_modules())[name]) not in protected]
    assert prunable and all(w % 8 == 0 for w in prunable)
    original = conv_widths(build_model(ModelConfig(num_classes=2, width=0.25, depth=0.33, imgsz=IMGSZ)))
    assert sum(prunable) < sum(w for n, w in original.items() if n in widths) * 0.75
    assert [m.out_channels for m in head_output_convs(model)] == [2, 2, 2, 4, 4, 4]


def test_pruned_model_still_trains(pruned_half: PruneResult) -> None:
    """Fine-tuning needs the training-mode forward (logits, distances) and gradients everywhere."""
    model = pruned_half.model
    model.train()
    try:
        logits, distances = model(torch.rand(2, 3, IMGSZ, IMGSZ))
        assert logits.shape[-1] == 2 and distances.shape[-1] == 4
        (logits.mean() + distances.mean()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_pruned_checkpoint_saves_and_reloads(pruned_half: PruneResult, tmp_path: Path) -> None:
    path = save_pruned_checkpoint(
        pruned_half, pruned_half.model, ["product", "gap"], IMGSZ, tmp_path / "pruned.pt", extra_record={"k": "v"}
    )
    raw = read_checkpoint(path)  # torch.load(weights_only=True) inside
    assert raw[PRUNING_KEY]["ratio"] == 0.5 and raw[PRUNING_KEY]["k"] == "v"
    assert raw[PRUNING_KEY]["params_after"] == pruned_half.after.params
    loaded, meta = load_checkpoint(path)
    assert meta.class_names == ["product", "gap"] and meta.imgsz == IMGSZ
    assert conv_widths(loaded) == conv_widths(pruned_half.model)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned_half.model(x))
        # The exported form (BN folded) computes the same.
        torch.testing.assert_close(loaded.fused()(x), pruned_half.model(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_other_ratios_round_to_8(detector: nn.Module, ratio: float) -> None:
    result = prune_detector(detector, PruneOptions(ratio=ratio, imgsz=IMGSZ))
    protected = {id(m) for m in head_output_convs(result.model)}
    assert all(
        m.out_channels % 8 == 0 for m in result.model.modules() if isinstance(m, nn.Conv2d) and id(m) not in protected
    )
    assert result.after.params < result.before.params


def test_fused_model_is_refused(detector: Detector) -> None:
    with pytest.raises(PruneError, match="not a fused"):
        prune_detector(detector.fused(), PruneOptions(ratio=0.5, imgsz=IMGSZ))


@pytest.mark.parametrize("bad", [{"ratio": 0.0}, {"ratio": 1.0}, {"ratio": 0.5, "imgsz": 100}, {"ratio": 0.5, "x": 1}])
def test_prune_options_are_strict(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PruneOptions(**bad)
