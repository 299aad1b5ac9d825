"""The set loss (DETR, Sec. 3.1) shared by every method.

Classification is softmax cross-entropy with a down-weighted no-object class, or sigmoid
focal loss (torchvision.ops.sigmoid_focal_loss) for focal-head models (``model.focal``);
boxes get L1 and GIoU on matched pairs. The same terms are applied to every ``aux_outputs`` entry (key
suffix ``_i``) and to ``enc_outputs`` (suffix ``_enc``); the number of target boxes is
averaged over workers, so every rank normalizes alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from ..blocks.base import LossConfig
from .matcher import HungarianMatcher


def num_boxes_across_workers(targets: list[dict], device) -> float:
    n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """``forward(outputs, targets)`` -> dict of unweighted losses; ``weighted`` sums them
    with the weights of ``weight_dict`` (every name ``forward`` returns is in it).

    ``focal`` is the model's head kind (sigmoid focal, else softmax with a no-object class).
    With ``cfg.enc_class_agnostic`` the encoder proposals of two-stage models are scored
    as object-vs-background (every target gets label 0), as in Deformable DETR.
    """

    def __init__(self, num_classes: int, cfg: LossConfig, focal: bool):
        super().__init__()
        self.num_classes = num_classes
        self.cfg, self.focal = cfg, focal
        self.matcher = HungarianMatcher(cfg, focal)
        # the weight of each term; forward adds the names with a layer suffix (_0, _enc)
        self.weight_dict = {"loss_ce": cfg.class_weight, "loss_bbox": cfg.bbox_weight,
                            "loss_giou": cfg.giou_weight}
        if not focal:
            w = torch.ones(num_classes + 1)
            w[-1] = cfg.eos_coef
            self.register_buffer("empty_weight", w)

    def weighted(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(self.weight_dict[k] * v for k, v in losses.items())

    def _suffixed(self, losses: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
        """``losses`` renamed ``loss_ce`` -> ``loss_ce{suffix}``, their weights recorded."""
        for k in losses:
            self.weight_dict.setdefault(k + suffix, self.weight_dict[k])
        return {k + suffix: v for k, v in losses.items()}

    def single(self, outputs: dict, targets: list[dict], num_boxes: float,
               indices=None, part: str = "the last decoder layer") -> dict[str, Tensor]:
        """Loss terms of one output dict (final layer, one aux layer, or the encoder)."""
        if indices is None:
            try:
                indices = self.matcher(outputs, targets)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} ({part})") from None
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        batch_idx, src_idx = batch_idx.to(logits.device), src_idx.to(logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        b, q, c = logits.shape
        if self.focal:
            onehot = torch.zeros(b, q, c + 1, dtype=logits.dtype, device=logits.device)
            onehot[batch_idx, src_idx, matched_labels] = 1
            loss_ce = sigmoid_focal_loss(logits, onehot[..., :c], alpha=self.cfg.focal_alpha,
                                         gamma=self.cfg.focal_gamma, reduction="sum") / num_boxes
        else:
            classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=logits.device)
            classes[batch_idx, src_idx] = matched_labels
            loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                             box_convert(tgt_boxes, "cxcywh", "xyxy"),
                                             reduction="sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        num_boxes = num_boxes_across_workers(targets, outputs["pred_logits"].device)
        losses = self.single(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._suffixed(self.single(aux, targets, num_boxes,
                                                     part=f"decoder layer {i + 1}"), f"_{i}"))
        if "enc_outputs" in outputs:
            enc_targets = targets
            if self.cfg.enc_class_agnostic:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self.single(outputs["enc_outputs"], enc_targets, num_boxes,
                              part="the encoder proposals")
            losses.update(self._suffixed(enc, "_enc"))
        return losses
