"""The set loss (DETR, Sec. 3.1) shared by every method.

Classification is softmax cross-entropy with a down-weighted no-object class, or sigmoid
focal loss (torchvision.ops.sigmoid_focal_loss) for focal-head models (``model.focal``), or
with ``loss.mal`` DEIM's matchability-aware loss (Huang et al., CVPR 2025: the target of a
matched query is its IoU with the target box to the power gamma, unmatched ones are weighted
by p^gamma); boxes get L1 and GIoU on matched pairs. The same terms are applied to every
``aux_outputs`` entry (key suffix ``_i``) and to ``enc_outputs`` (suffix ``_enc``); the
number of target boxes is averaged over workers, so every rank normalizes alike.

Training-only queries (``qdet.blocks.denoising``): with K query groups, each group of the
outputs is matched to the targets on its own, one to one, and the losses are divided by K
times the number of boxes (the groups' losses averaged, as Group DETR does); the denoising
queries under ``outputs["dn"]`` are paired with the targets they were made from, no
matching: positives learn their target's label and box, negatives "no object", padding
nothing (``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn``, per layer ``_dn_i``), divided
by the number of boxes times the denoising groups.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from ..blocks.base import LossConfig
from .matcher import HungarianMatcher

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes_across_workers(targets: list[dict], device) -> float:
    """The batch's number of target boxes, averaged over the torchrun workers, at least 1."""
    n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


def softmax_class_weight(targets: list[dict], queries: int, groups: int, eos: float) -> float:
    """The total class weight a softmax head's cross-entropy averages over for these
    targets: per image and query group, the matched queries (min(Q, targets)) weigh 1 and
    the rest ``eos`` (as ``F.cross_entropy`` with the no-object weight computes it); summed
    over micro-batches it is one large batch's."""
    total = 0.0
    for t in targets:
        matched = min(queries, len(t["labels"]))
        total += groups * (matched + (queries - matched) * eos)
    return total


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box of ``a [N,4]`` with the same row of ``b [N,4]`` (x0, y0, x1, y1)."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


class SetCriterion(nn.Module):
    """``forward(outputs, targets)`` -> dict of unweighted losses; ``weighted`` sums them
    with the weights of ``weight_dict`` (every name ``forward`` returns is in it).

    ``focal`` is the model's head kind (sigmoid focal, else softmax with a no-object class).
    With ``cfg.enc_class_agnostic`` the encoder proposals of two-stage models are scored
    as object-vs-background (every target gets label 0), as in Deformable DETR. Outputs
    that hold K groups of queries say so (``outputs["query_groups"]``).
    """

    def __init__(self, num_classes: int, cfg: LossConfig, focal: bool):
        super().__init__()
        if cfg.mal and not focal:
            raise ValueError("loss.mal (DEIM's matchability-aware loss) replaces the sigmoid "
                             "focal loss; this model's head is softmax")
        self.num_classes = num_classes
        self.cfg, self.focal = cfg, focal
        self.matcher = HungarianMatcher(cfg, focal)
        # the weight of each term; forward adds the names with a layer suffix (_0, _enc, _dn)
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

    def match(self, outputs: dict, targets: list[dict], groups: int,
              part: str) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(query indices, target indices)``: each of ``groups`` groups of
        queries matched on its own, its indices offset to its place in the outputs."""
        q = outputs["pred_logits"].shape[1] // groups
        found: list[list[tuple[Tensor, Tensor]]] = []
        for g in range(groups):
            chunk = {k: outputs[k][:, g * q:(g + 1) * q] for k in ("pred_logits", "pred_boxes")}
            try:
                found.append(self.matcher(chunk, targets))
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} ({part})") from None
        return [(torch.cat([found[g][i][0] + g * q for g in range(groups)]),
                 torch.cat([found[g][i][1] for g in range(groups)]))
                for i in range(len(targets))]

    def class_loss(self, logits: Tensor, batch_idx: Tensor, src_idx: Tensor, labels: Tensor,
                   num_boxes: float, ignore: Tensor | None = None,
                   quality: Tensor | None = None, class_weight: float | None = None) -> Tensor:
        """Classification of every query: the assigned ones ``(batch_idx, src_idx)`` as
        ``labels``, the rest as "no object"; queries where ``ignore [B,Q]`` is True take no
        part. ``quality``: the assigned queries' IoU with their boxes (MAL's targets).
        ``class_weight``: a softmax head's normalizer when it spans more than this batch
        (:func:`softmax_class_weight`); default this batch's weights, as DETR's mean."""
        b, q, c = logits.shape
        if not self.focal:
            classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=logits.device)
            classes[batch_idx, src_idx] = labels
            if ignore is not None:
                classes = classes.masked_fill(ignore, -100)
            loss = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight,
                                   ignore_index=-100, reduction="sum")
            if class_weight is None:
                class_weight = self.empty_weight[classes[classes != -100]].sum()
            return loss / class_weight
        onehot = torch.zeros(b, q, c + 1, dtype=logits.dtype, device=logits.device)
        onehot[batch_idx, src_idx, labels] = 1
        onehot = onehot[..., :c]
        keep = None if ignore is None else (~ignore)[..., None].to(logits.dtype)
        if self.cfg.mal:
            gamma = self.cfg.mal_gamma
            target = torch.zeros_like(onehot)
            target[batch_idx, src_idx, labels] = quality.detach().to(target.dtype) ** gamma
            p = logits.detach().sigmoid()
            weight = p ** gamma * (1 - onehot) + onehot
            if keep is not None:
                weight = weight * keep
            loss = F.binary_cross_entropy_with_logits(logits, target, weight, reduction="sum")
            return loss / num_boxes
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.cfg.focal_alpha,
                                  gamma=self.cfg.focal_gamma, reduction="none")
        if keep is not None:
            loss = loss * keep
        return loss.sum() / num_boxes

    def pair_losses(self, outputs: dict, targets: list[dict],
                    indices: list[tuple[Tensor, Tensor]], num_boxes: float,
                    ignore: Tensor | None = None,
                    class_weight: float | None = None) -> dict[str, Tensor]:
        """The three terms of one output dict for given query-target pairs."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        batch_idx, src_idx = batch_idx.to(device), src_idx.to(device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        src_xyxy = box_convert(src_boxes, "cxcywh", "xyxy")
        tgt_xyxy = box_convert(tgt_boxes, "cxcywh", "xyxy")
        quality = paired_iou(src_xyxy, tgt_xyxy) if self.cfg.mal else None
        return {"loss_ce": self.class_loss(logits, batch_idx, src_idx, labels, num_boxes,
                                           ignore, quality, class_weight),
                "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
                "loss_giou": generalized_box_iou_loss(src_xyxy, tgt_xyxy,
                                                      reduction="sum") / num_boxes}

    def single(self, outputs: dict, targets: list[dict], num_boxes: float, indices=None,
               part: str = "the last decoder layer", groups: int = 1,
               class_weight: float | None = None) -> dict[str, Tensor]:
        """Loss terms of one output dict (final layer, one aux layer, or the encoder)."""
        if indices is None:
            indices = self.match(outputs, targets, groups, part)
        return self.pair_losses(outputs, targets, indices, num_boxes * groups,
                                class_weight=class_weight)

    def denoising(self, dn: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """The denoising terms of every layer (``loss_ce_dn``, ``loss_bbox_dn_0``, ...)."""
        b = dn["target"].shape[0]
        indices = []
        for i in range(b):
            pos = torch.nonzero(dn["positive"][i]).squeeze(1)
            indices.append((pos, dn["target"][i, pos]))
        ignore = ~dn["valid"]
        norm = num_boxes * dn["groups"]
        losses = self._suffixed(self.pair_losses(dn, targets, indices, norm, ignore), "_dn")
        for i, aux in enumerate(dn.get("aux_outputs", [])):
            losses.update(self._suffixed(self.pair_losses(aux, targets, indices, norm, ignore),
                                         f"_dn_{i}"))
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None,
                class_weight: float | None = None) -> dict[str, Tensor]:
        """``num_boxes`` (and a softmax head's ``class_weight``): the normalizers, when they
        must span more than these outputs (the micro-batches of one optimizer step; see
        :func:`softmax_class_weight`); default: this batch's."""
        if num_boxes is None:
            num_boxes = num_boxes_across_workers(targets, outputs["pred_logits"].device)
        groups = outputs.get("query_groups", 1)     # training with targets: K groups
        losses = self.single(outputs, targets, num_boxes, groups=groups,
                             class_weight=class_weight)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._suffixed(self.single(aux, targets, num_boxes,
                                                     part=f"decoder layer {i + 1}",
                                                     groups=groups, class_weight=class_weight),
                                         f"_{i}"))
        if "enc_outputs" in outputs:
            enc_targets = targets
            if self.cfg.enc_class_agnostic:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self.single(outputs["enc_outputs"], enc_targets, num_boxes,
                              part="the encoder proposals")
            losses.update(self._suffixed(enc, "_enc"))
        if "dn" in outputs:
            losses.update(self.denoising(outputs["dn"], targets, num_boxes))
        return losses
