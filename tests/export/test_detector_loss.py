from __future__ import annotations

import torch

from shelfsight.export.loss import DetectionLoss, TaskAlignedAssigner, box_iou_pairs
from shelfsight.export.model import ModelConfig, build_model, make_anchors


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bright rectangles on dark noise; padded GT tensor with a mask (image 3 has no boxes at all)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 128, 128, generator=gen) * 0.2
    boxes = torch.tensor(
        [
            [[10, 10, 40, 50], [60, 60, 100, 90], [70, 8, 120, 30]],
            [[20, 20, 60, 44], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[30, 40, 110, 120], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    for b, j in mask.nonzero().tolist():
        x1, y1, x2, y2 = boxes[b, j].int().tolist()
        images[b, int(labels[b, j]), y1:y2, x1:x2] = 1.0
    return images, boxes, labels, mask


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2, width=0.125, imgsz=128)).train()
    images, boxes, labels, mask = _fixed_batch()
    criterion = DetectionLoss(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    points, strides = make_anchors(128, 128)
    history = []
    for _ in range(30):
        logits, distances = model(images)
        parts = criterion(logits, distances, points, strides, labels, boxes, mask)
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        history.append((parts.total.item(), parts.box.item(), parts.cls.item()))
    first, last = history[0], history[-1]
    assert last[0] < 0.6 * first[0], history
    assert last[1] < first[1] and last[2] < first[2]


def _assign(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_mask: torch.Tensor):
    points, strides = make_anchors(64, 64)
    scores = torch.full((gt_boxes.shape[0], len(points), 2), 0.5)
    return TaskAlignedAssigner(topk=5)(scores, pred_boxes, points, strides, gt_labels, gt_boxes, gt_mask), points


def test_assigner_picks_anchors_inside_each_box_and_ignores_padding() -> None:
    points, _ = make_anchors(64, 64)
    gt = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 64.0, 64.0]]])
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[True, True, False]])  # the third (image-sized) box is padding
    # Every anchor predicts a box around itself, so IoU decides which anchors align best.
    pred = torch.cat([points - 8, points + 8], dim=1)[None]
    result, points = _assign(pred, gt, labels, mask)
    fg = result.foreground[0]
    assert 2 <= int(fg.sum()) <= 10
    centres = points[fg]
    assigned = result.boxes[0, fg]
    inside = (centres[:, 0] > assigned[:, 0]) & (centres[:, 0] < assigned[:, 2])
    inside &= (centres[:, 1] > assigned[:, 1]) & (centres[:, 1] < assigned[:, 3])
    assert bool(inside.all())
    assert {tuple(b) for b in assigned.tolist()} == {(0.0, 0.0, 30.0, 30.0), (40.0, 40.0, 60.0, 60.0)}
    # Soft targets live only on the assigned class, in (0, 1].
    assert bool((result.scores[0, ~fg] == 0).all())
    fg_scores = result.scores[0, fg]
    assert bool((fg_scores.amax(-1) > 0).all()) and float(fg_scores.max()) <= 1.0
    assert bool((fg_scores.argmax(-1) == result.labels[0, fg]).all())


def test_tiny_box_without_anchor_centre_still_gets_one_anchor() -> None:
    gt = torch.tensor([[[9.0, 9.0, 11.0, 11.0]]])  # 2 px box between stride-8 anchor centres (4, 12, ...)
    points, _ = make_anchors(64, 64)
    pred = torch.cat([points - 4, points + 4], dim=1)[None]
    result, points = _assign(pred, gt, torch.tensor([[1]]), torch.tensor([[True]]))
    assert int(result.foreground.sum()) == 1
    assert result.labels[0, result.foreground[0]].item() == 1


def test_empty_ground_truth_gives_background_everywhere() -> None:
    points, _ = make_anchors(64, 64)
    pred = torch.cat([points - 4, points + 4], dim=1)[None].repeat(2, 1, 1)
    result, _ = _assign(
        pred, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool)
    )
    assert not bool(result.foreground.any()) and float(result.scores.sum()) == 0.0


def test_class_mask_removes_that_class_from_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2, width=0.125, imgsz=128)).train()
    images, boxes, labels, mask = _fixed_batch()
    logits, distances = model(images)
    points, strides = make_anchors(128, 128)
    criterion = DetectionLoss(2)
    ones = torch.ones(4, 2)
    only_gap = ones.clone()
    only_gap[:, 0] = 0.0  # e.g. real images labelled with gaps only: do not teach "no product here"
    full = criterion(logits, distances, points, strides, labels, boxes, mask, ones)
    masked = criterion(logits, distances, points, strides, labels, boxes, mask, only_gap)
    assert masked.cls < full.cls
    grad_full = torch.autograd.grad(full.total, logits, retain_graph=True)[0]
    grad_masked = torch.autograd.grad(masked.total, logits)[0]
    assert bool((grad_masked[..., 0] == 0).all()) and bool((grad_full[..., 0] != 0).any())
    torch.testing.assert_close(grad_masked[..., 1], grad_full[..., 1])


def test_ciou_is_one_for_identical_boxes_and_penalizes_offset() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    ciou = box_iou_pairs(a, b, ciou=True)
    iou = box_iou_pairs(a, b)
    assert abs(ciou[0].item() - 1.0) < 1e-6
    assert abs(iou[1].item() - 1 / 3) < 1e-6 and ciou[1] < iou[1]
