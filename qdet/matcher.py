"""Hungarian matching between predictions and targets (DETR, Sec. 3.1).

One switch covers the two families: softmax models use ``-p(class)`` as the class cost,
sigmoid focal models (Deformable DETR and later) the focal-style cost
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss


@dataclass
class LossConfig:
    """Matcher costs and loss weights; one instance per model config."""
    focal: bool = False           # sigmoid focal loss + focal class cost, else softmax CE
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1          # softmax: weight of the no-object class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # two-stage: encoder proposals are scored object-vs-background (every target label 0)
    enc_class_agnostic: bool = False


def focal_loss_config() -> LossConfig:
    """The sigmoid focal setting of Deformable DETR and its successors (class cost and loss
    weight 2; L1 5; GIoU 2)."""
    return LossConfig(focal=True, class_cost=2.0, class_weight=2.0)


def loss_from_args(args: dict, focal: bool, **extra) -> LossConfig:
    """The matcher and loss weights an official training script recorded in its ``args``
    (DETR-family flag names), defaulting to those repositories' defaults."""
    default_class = 2.0 if focal else 1.0
    return LossConfig(focal=focal,
                      class_cost=args.get("set_cost_class", default_class),
                      bbox_cost=args.get("set_cost_bbox", 5.0),
                      giou_cost=args.get("set_cost_giou", 2.0),
                      class_weight=args.get("cls_loss_coef", default_class),
                      bbox_weight=args.get("bbox_loss_coef", 5.0),
                      giou_weight=args.get("giou_loss_coef", 2.0),
                      eos_coef=args.get("eos_coef", 0.1),
                      focal_alpha=args.get("focal_alpha", 0.25), **extra)


@dataclass
class CostMatrix:
    """Weighted cost terms ``[B,Q,T]`` for a batch whose targets are padded to ``T``."""
    cls: Tensor
    bbox: Tensor
    giou: Tensor
    sizes: list[int]  # real number of targets per image

    @property
    def total(self) -> Tensor:
        return self.cls + self.bbox + self.giou


class HungarianMatcher:
    """Optimal one-to-one assignment of queries to targets, one scipy call per image."""

    def __init__(self, cfg: LossConfig):
        if not (cfg.class_cost or cfg.bbox_cost or cfg.giou_cost):
            raise ValueError("all matcher costs are zero")
        self.cfg = cfg

    @torch.no_grad()
    def costs(self, outputs: dict, targets: list[dict]) -> CostMatrix:
        """Batched cost terms.

        Args:
            outputs: ``pred_logits [B,Q,C(+1)]``, ``pred_boxes [B,Q,4]`` (cx,cy,w,h).
            targets: per image ``labels [T_i]`` and ``boxes [T_i,4]`` (normalized cx,cy,w,h).
        """
        cfg = self.cfg
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        b, q = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        tmax = max(sizes, default=0)
        labels = logits.new_zeros(b, tmax, dtype=torch.long)
        tboxes = logits.new_zeros(b, tmax, 4)
        tboxes[..., 2:] = 1.0  # padding: a valid box, so GIoU stays finite
        for i, t in enumerate(targets):
            labels[i, : sizes[i]] = t["labels"]
            tboxes[i, : sizes[i]] = t["boxes"]
        idx = labels[:, None, :].expand(b, q, tmax)
        if cfg.focal:
            p = logits.sigmoid()
            a, g = cfg.focal_alpha, cfg.focal_gamma
            neg = (1 - a) * p.pow(g) * -(1 - p + 1e-8).log()
            pos = a * (1 - p).pow(g) * -(p + 1e-8).log()
            cost_cls = torch.gather(pos - neg, 2, idx)
        else:
            cost_cls = -torch.gather(logits.softmax(-1), 2, idx)
        cost_bbox = torch.cdist(boxes, tboxes, p=1)
        pb = box_convert(boxes, "cxcywh", "xyxy")[:, :, None].expand(b, q, tmax, 4)
        tb = box_convert(tboxes, "cxcywh", "xyxy")[:, None].expand(b, q, tmax, 4)
        cost_giou = generalized_box_iou_loss(pb, tb) - 1  # = -GIoU
        return CostMatrix(cfg.class_cost * cost_cls, cfg.bbox_cost * cost_bbox,
                          cfg.giou_cost * cost_giou, sizes)

    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Returns per image ``(query_idx, target_idx)``, each ``[min(Q, T_i)]`` int64."""
        return solve(self.costs(outputs, targets))


def solve(costs: CostMatrix) -> list[tuple[Tensor, Tensor]]:
    """Run scipy's linear_sum_assignment on each image's ``[Q, T_i]`` block."""
    total = costs.total.cpu()
    out = []
    for i, n in enumerate(costs.sizes):
        rows, cols = linear_sum_assignment(total[i, :, :n].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64),
                    torch.as_tensor(cols, dtype=torch.int64)))
    return out
