"""Hungarian matching between predictions and targets (DETR, Sec. 3.1).

One switch covers the two families: softmax models use ``-p(class)`` as the class cost,
sigmoid focal models (Deformable DETR and later) the focal-style cost
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``.

Costs are computed in float32 with autocast off, whatever precision the model ran in
(bf16/fp16 costs tie and overflow). A cost that is still NaN or inf means the model's
outputs (or the targets) are not finite: no assignment is meaningful, so the matcher stops
with a FloatingPointError naming the image and the term rather than skipping the step (a
skipped step would hide a diverged run; the training loop stops with the same advice as for
a NaN loss and keeps the last checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss

from ..blocks.base import LossConfig


@dataclass
class CostMatrix:
    """Weighted cost terms ``[B,Q,T]`` for a batch whose targets are padded to ``T``."""
    cls: Tensor
    bbox: Tensor
    giou: Tensor
    sizes: list[int]  # real number of targets per image
    image_ids: list | None = None  # the targets' image_id, for messages

    @property
    def total(self) -> Tensor:
        return self.cls + self.bbox + self.giou


class HungarianMatcher:
    """Optimal one-to-one assignment of queries to targets, one scipy call per image."""

    def __init__(self, cfg: LossConfig, focal: bool):
        if not (cfg.class_cost or cfg.bbox_cost or cfg.giou_cost):
            raise ValueError("all matcher costs are zero")
        self.cfg, self.focal = cfg, focal

    @torch.no_grad()
    def costs(self, outputs: dict, targets: list[dict]) -> CostMatrix:
        """Batched cost terms.

        Args:
            outputs: ``pred_logits [B,Q,C(+1)]``, ``pred_boxes [B,Q,4]`` (cx,cy,w,h).
            targets: per image ``labels [T_i]`` and ``boxes [T_i,4]`` (normalized cx,cy,w,h).
        """
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            return self._costs(outputs["pred_logits"].float(), outputs["pred_boxes"].float(),
                               targets)

    def _costs(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> CostMatrix:
        cfg = self.cfg
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
        if self.focal:
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
                          cfg.giou_cost * cost_giou, sizes, [t.get("image_id") for t in targets])

    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Returns per image ``(query_idx, target_idx)``, each ``[min(Q, T_i)]`` int64."""
        return solve(self.costs(outputs, targets))


def solve(costs: CostMatrix) -> list[tuple[Tensor, Tensor]]:
    """Run scipy's linear_sum_assignment on each image's ``[Q, T_i]`` block."""
    total = costs.total.cpu()
    out = []
    for i, n in enumerate(costs.sizes):
        block = total[i, :, :n].numpy()
        if not np.isfinite(block).all():
            raise FloatingPointError(not_finite(costs, i))
        rows, cols = linear_sum_assignment(block)
        out.append((torch.as_tensor(rows, dtype=torch.int64),
                    torch.as_tensor(cols, dtype=torch.int64)))
    return out


def not_finite(costs: CostMatrix, i: int) -> str:
    """Which cost terms of image ``i`` are NaN or inf, and what that says."""
    n = costs.sizes[i]
    terms = [name for name, t in (("class", costs.cls), ("L1 box", costs.bbox),
                                  ("GIoU", costs.giou)) if not torch.isfinite(t[i, :, :n]).all()]
    image = f"image {i} of the batch" + ("" if costs.image_ids is None or
                                         costs.image_ids[i] is None
                                         else f" (image_id {costs.image_ids[i]})")
    cause = ("the predicted class logits" if terms == ["class"] else
             "the predicted or target boxes" if "class" not in terms else
             "the model's outputs")
    named = " and ".join([", ".join(terms[:-1]), terms[-1]] if len(terms) > 1 else terms)
    return (f"the matcher's {named} cost{'s are' if len(terms) > 1 else ' is'} NaN or inf for "
            f"{image}: {cause} are not finite")
