"""Detection loss: a task-aligned assigner (TOOD / YOLOv8 style), IoU-aware BCE class targets and a CIoU box loss.

Everything is vectorized over (batch, ground truths, anchors): ground truth comes as a padded tensor [B, M, 4] with a
validity mask [B, M], so an image with 0 boxes and one with 150 boxes share one code path and no Python loop runs
per box. The candidate set is "anchor centre inside the GT box" (plus, for boxes too small to contain any anchor
centre, the anchor nearest to the box centre on the finest level), which keeps dense small shelf items assigned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from shelfsight.export.model import decode_boxes

EPS = 1e-9


def box_iou_pairs(a: Tensor, b: Tensor, ciou: bool = False) -> Tensor:
    """IoU (or CIoU) of matching rows of xyxy boxes ``a`` and ``b`` [..., 4] -> [...]."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    aw, ah = (ax2 - ax1).clamp(min=0), (ay2 - ay1).clamp(min=0)
    bw, bh = (bx2 - bx1).clamp(min=0), (by2 - by1).clamp(min=0)
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(min=0)
    union = aw * ah + bw * bh - inter + EPS
    iou = inter / union
    if not ciou:
        return iou
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    diag2 = cw.pow(2) + ch.pow(2) + EPS
    centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(bw / (bh + EPS)) - torch.atan(aw / (ah + EPS))).pow(2)
    with torch.no_grad():
        # Clamped: for identical boxes both v and (1 - iou) are 0, and 1 + EPS rounds to 1 in float32 (0/0 = NaN).
        alpha = v / (v - iou + 1).clamp(min=1e-7)
    return iou - (centre2 / diag2 + v * alpha)


@dataclass(frozen=True)
class Assignment:
    """Per-anchor targets: ``labels`` [B, A] long, ``boxes`` [B, A, 4], ``scores`` [B, A, nc], ``foreground`` [B, A]."""

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    foreground: Tensor


class TaskAlignedAssigner:
    """Top-k anchors per GT by ``score^alpha * IoU^beta`` among candidate anchors; IoU-aware soft class targets."""

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0) -> None:
        self.topk = topk
        self.alpha = alpha
        self.beta = beta

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        anchor_points: Tensor,
        anchor_strides: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        gt_mask: Tensor,
    ) -> Assignment:
        """pred_scores [B,A,nc] in [0,1], pred_boxes [B,A,4] xyxy; gt_labels [B,M], gt_boxes [B,M,4], gt_mask [B,M]."""
        batch, num_anchors, num_classes = pred_scores.shape
        max_boxes = gt_boxes.shape[1]
        device = pred_scores.device
        if max_boxes == 0 or not bool(gt_mask.any()):
            return Assignment(
                labels=torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
                boxes=torch.zeros(batch, num_anchors, 4, device=device),
                scores=torch.zeros(batch, num_anchors, num_classes, device=device),
                foreground=torch.zeros(batch, num_anchors, dtype=torch.bool, device=device),
            )
        valid = gt_mask.bool()[..., None]
        candidates, fallback = self._candidates(anchor_points, anchor_strides, gt_boxes)
        candidates, fallback = candidates & valid, fallback & valid  # [B, M, A]

        # Alignment metric only where an anchor is a candidate for a GT; elsewhere 0 so top-k never picks it.
        overlaps = torch.zeros(batch, max_boxes, num_anchors, device=device)
        gt_expanded = gt_boxes[:, :, None, :].expand(-1, -1, num_anchors, -1)[candidates]
        pred_expanded = pred_boxes[:, None, :, :].expand(-1, max_boxes, -1, -1)[candidates]
        overlaps[candidates] = box_iou_pairs(gt_expanded, pred_expanded).clamp(min=0).to(overlaps.dtype)
        label_index = gt_labels.clamp(min=0).long()[..., None].expand(-1, -1, num_anchors)  # [B, M, A]
        class_scores = pred_scores.transpose(1, 2).gather(1, label_index)  # [B, M, A]
        align = class_scores.pow(self.alpha) * overlaps.pow(self.beta) * candidates

        topk = min(self.topk, num_anchors)
        top_values, top_index = align.topk(topk, dim=-1)
        in_topk = torch.zeros_like(align, dtype=torch.bool).scatter_(-1, top_index, top_values > 0)
        # The nearest-anchor fallback must survive even when its prediction has zero IoU yet (early training).
        positive = (in_topk | fallback) & candidates

        # An anchor claimed by several GTs keeps the one it overlaps most.
        claims = positive.sum(1)  # [B, A]
        if bool((claims > 1).any()):
            best_gt = ((overlaps + EPS) * positive).argmax(1)  # [B, A], among the claimants only
            one_hot = F.one_hot(best_gt, max_boxes).transpose(1, 2).bool()  # [B, M, A]
            positive = torch.where((claims > 1)[:, None, :], one_hot & candidates, positive)
        foreground = positive.any(1)  # [B, A]
        assigned_gt = positive.float().argmax(1)  # [B, A]

        labels = gt_labels.long().gather(1, assigned_gt).clamp(min=0)
        boxes = gt_boxes.gather(1, assigned_gt[..., None].expand(-1, -1, 4))
        # IoU-aware soft targets: alignment normalized per GT so its best anchor targets that anchor's IoU.
        align = align * positive
        max_align = align.amax(-1, keepdim=True)
        max_overlap = (overlaps * positive).amax(-1, keepdim=True)
        quality = (align * max_overlap / (max_align + EPS)).amax(1)  # [B, A]
        # Fallback anchors with no overlap yet still get a small positive target so their scores rise.
        quality = torch.where(foreground, quality.clamp(min=0.05), quality)
        scores = F.one_hot(labels, num_classes).float() * (quality * foreground)[..., None]
        return Assignment(labels=labels, boxes=boxes, scores=scores, foreground=foreground)

    @staticmethod
    def _candidates(points: Tensor, strides: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """-> (candidates, fallback) [B, M, A]: anchor centre strictly inside the GT, or for a GT that contains no
        anchor centre at all, the finest-level anchor nearest to its centre (the fallback)."""
        x, y = points[:, 0], points[:, 1]
        x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))
        inside = (x > x1 + EPS) & (x < x2 - EPS) & (y > y1 + EPS) & (y < y2 - EPS)
        finest = strides[:, 0] == strides.min()
        centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
        distance = (x - centre_x).abs() + (y - centre_y).abs() + (~finest).float() * 1e6
        nearest = F.one_hot(distance.argmin(-1), points.shape[0]).bool()
        fallback = nearest & ~inside.any(-1, keepdim=True)
        return inside | fallback, fallback


@dataclass(frozen=True)
class LossParts:
    total: Tensor
    box: Tensor
    cls: Tensor
    num_foreground: int


class DetectionLoss:
    """``loss(logits, distances, batch)`` -> LossParts; ``total`` is scaled by the batch size like YOLOv8."""

    def __init__(
        self,
        num_classes: int,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        assigner: TaskAlignedAssigner | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.box_gain = box_gain
        self.cls_gain = cls_gain
        self.assigner = assigner or TaskAlignedAssigner()

    def __call__(
        self,
        logits: Tensor,
        distances: Tensor,
        anchor_points: Tensor,
        anchor_strides: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        class_mask: Tensor | None = None,
    ) -> LossParts:
        """``class_mask`` [B, nc] (1 = learn this class on this image, 0 = ignore its classification loss)."""
        batch = logits.shape[0]
        pred_boxes = decode_boxes(anchor_points, distances)
        target = self.assigner(
            logits.detach().sigmoid(),
            pred_boxes.detach(),
            anchor_points,
            anchor_strides,
            gt_labels,
            gt_boxes,
            gt_mask,
        )
        score_sum = target.scores.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(logits, target.scores.to(logits.dtype), reduction="none")
        if class_mask is not None:
            bce = bce * class_mask[:, None, :].to(bce.dtype)
        cls_loss = bce.sum() / score_sum

        fg = target.foreground
        if bool(fg.any()):
            weight = target.scores.sum(-1)[fg]
            ciou = box_iou_pairs(pred_boxes[fg], target.boxes[fg], ciou=True)
            box_loss = ((1.0 - ciou) * weight).sum() / score_sum
        else:
            box_loss = distances.sum() * 0.0
        total = (self.box_gain * box_loss + self.cls_gain * cls_loss) * batch
        return LossParts(total=total, box=box_loss.detach(), cls=cls_loss.detach(), num_foreground=int(fg.sum()))
