"""Training-only queries that every method can take: denoising groups and query groups.

- Denoising (DN-DETR, Li et al., CVPR 2022, https://arxiv.org/abs/2203.01305; DINO's
  contrastive variant, Zhang et al., ICLR 2023, https://arxiv.org/abs/2203.03605): besides
  its matching queries the decoder gets, per denoising group, every ground-truth box with
  noise added and its label sometimes changed, and learns to reconstruct the box and label;
  these queries are paired with their own targets, no Hungarian matching. With
  ``contrastive``, each group also holds negatives, noised further, trained to "no object".
- Query groups (Group DETR, Chen et al., ICCV 2023, https://arxiv.org/abs/2207.13085): K
  groups of matching queries, each with its own query parameters, attend only within their
  group and are matched to the targets one to one, each group on its own; the loss averages
  the groups. Inference uses group 0 alone.

Both only shape what the decoder runs in training with targets: inference (eval mode, or no
targets) is the model as it was. The layout a decoder runs is ``[denoising | group 0 | group
1 | ...]``; the self-attention mask (:func:`self_attention_mask`) keeps matching queries from
seeing denoising queries, denoising groups and query groups from seeing each other, and every
query from seeing a denoising slot that only pads an image with fewer boxes than the batch's
most (so an image's outputs do not depend on the others in its batch). Denoising queries may
read group 0's matching queries, as in DN-DETR and DINO.

How a denoising query enters a decoder is the method's (its content: a learned embedding of
the noised label, :class:`LabelEmbedding`; its positional part: derived from the noised box
the way the method's own queries get theirs); this module makes the queries and the mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

NOISE = ("center", "corners")


@dataclass
class DNConfig:
    """Denoising training; off unless ``groups`` or ``queries`` is set."""
    groups: int = 0            # denoising groups (0: off), each holding every target box
    queries: int = 0           # or a budget: groups = queries // most boxes of an image in
                               # the batch, at least 1 (DINO's dynamic groups)
    label_noise: float = 0.2   # probability that a query's label is changed, to another class
    box_noise: float = 0.4     # lambda: how far boxes move (see ``noise``)
    contrastive: bool = False  # DINO: negatives, noised between lambda and 2 lambda
    noise: str = "center"      # "center" (DN-DETR): centre moved up to lambda w/2, h/2,
                               # width and height scaled by 1 +- lambda; "corners" (DINO):
                               # each corner moved up to lambda w/2, h/2

    @property
    def enabled(self) -> bool:
        return self.groups > 0 or self.queries > 0

    def check(self) -> None:
        if self.groups < 0 or self.queries < 0:
            raise ValueError(f"dn.groups and dn.queries must be >= 0, got {self.groups}, "
                             f"{self.queries}")
        if self.groups and self.queries:
            raise ValueError("set dn.groups (a fixed number) or dn.queries (DINO's budget), "
                             "not both")
        if self.noise not in NOISE:
            raise ValueError(f"dn.noise must be one of {NOISE}, got {self.noise!r}")
        if not 0 <= self.label_noise <= 1 or self.box_noise < 0:
            raise ValueError(f"dn.label_noise must be in [0, 1] and dn.box_noise >= 0, got "
                             f"{self.label_noise}, {self.box_noise}")


def check_query_groups(groups: int) -> None:
    if groups < 1:
        raise ValueError(f"query_groups must be at least 1 (1: off), got {groups}")


@dataclass
class Denoising:
    """The denoising queries of a batch, ``N = groups * size`` per image, group-major; each
    group holds ``size`` slots: the positives (one per target of the image), then with
    ``contrastive`` as many negatives, padded up to the batch's most targets."""
    labels: Tensor        # [B, N] int64 noised labels (0 on padding)
    boxes: Tensor         # [B, N, 4] noised boxes, normalized cx, cy, w, h
    target: Tensor        # [B, N] int64 the target each slot was made from (-1: padding)
    positive: Tensor      # [B, N] bool: trained to reconstruct its target's box and label
    valid: Tensor         # [B, N] bool: not padding (negatives are valid)
    groups: int
    size: int             # slots per group

    @property
    def count(self) -> int:
        return self.labels.shape[1]


def _flip_labels(labels: Tensor, p: float, num_classes: int) -> Tensor:
    """Each label changed with probability ``p`` to another class, uniformly (with few
    classes a uniform draw would often give the label back)."""
    if num_classes < 2 or p <= 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < p
    other = torch.randint(0, num_classes - 1, labels.shape, device=labels.device)
    other = other + (other >= labels).long()          # skips the label itself
    return torch.where(flip, other, labels)


def _magnitude(shape, negative: bool, device) -> Tensor:
    """Signed noise factors: in (-1, 1) for positives, +-[1, 2) for negatives."""
    u = torch.rand(shape, device=device)
    if not negative:
        return 2 * u - 1
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return sign * (1 + u)


MIN_SIZE = 1e-3   # a noised box keeps at least this width and height (of the image)


def noise_boxes(boxes: Tensor, lam: float, mode: str, negative: bool) -> Tensor:
    """``boxes [..., 4]`` (normalized cx, cy, w, h) with noise, clipped to the image and at
    least ``MIN_SIZE`` wide and high."""
    if lam <= 0 and not negative:
        return boxes.clone()
    u = _magnitude(boxes.shape, negative, boxes.device) * lam
    if mode == "center":
        cx, cy, w, h = boxes.unbind(-1)
        noised = torch.stack([cx + u[..., 0] * w / 2, cy + u[..., 1] * h / 2,
                              w * (1 + u[..., 2]).clamp(min=0), h * (1 + u[..., 3]).clamp(min=0)],
                             -1)
        xyxy = box_convert(noised, "cxcywh", "xyxy")
    else:  # corners
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2     # (w, h, w, h) / 2
        xyxy = xyxy + u * half
        xyxy = torch.cat([torch.minimum(xyxy[..., :2], xyxy[..., 2:]),
                          torch.maximum(xyxy[..., :2], xyxy[..., 2:])], -1)
    xyxy = xyxy.clamp(0, 1)
    # at least MIN_SIZE, kept inside the image
    lo, hi = xyxy[..., :2], xyxy[..., 2:]
    mid = ((lo + hi) / 2).clamp(MIN_SIZE / 2, 1 - MIN_SIZE / 2)
    lo = torch.minimum(lo, mid - MIN_SIZE / 2)
    hi = torch.maximum(hi, mid + MIN_SIZE / 2)
    return box_convert(torch.cat([lo, hi], -1), "xyxy", "cxcywh")


def make_denoising(cfg: DNConfig, targets: list[dict], num_classes: int) -> Denoising | None:
    """The denoising queries of a batch (``targets``: per image ``labels [T_i]`` and
    ``boxes [T_i, 4]`` normalized cx, cy, w, h); None when no image has a box."""
    most = max((len(t["labels"]) for t in targets), default=0)
    if most == 0 or not cfg.enabled:
        return None
    groups = cfg.groups or max(1, cfg.queries // most)
    kinds = (False, True) if cfg.contrastive else (False,)
    size = most * len(kinds)
    b = len(targets)
    device = targets[0]["boxes"].device
    labels = torch.zeros(b, groups, size, dtype=torch.long, device=device)
    boxes = torch.zeros(b, groups, size, 4, device=device)
    boxes[..., 2:] = 0.5                                  # padding: a harmless valid box
    target = torch.full((b, groups, size), -1, dtype=torch.long, device=device)
    positive = torch.zeros(b, groups, size, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            continue
        gt_labels = t["labels"].expand(groups, n)
        gt_boxes = t["boxes"].float().expand(groups, n, 4)
        for k, negative in enumerate(kinds):
            sl = slice(k * most, k * most + n)
            labels[i, :, sl] = _flip_labels(gt_labels, cfg.label_noise, num_classes)
            boxes[i, :, sl] = noise_boxes(gt_boxes, cfg.box_noise, cfg.noise, negative)
            target[i, :, sl] = torch.arange(n, device=device)
            positive[i, :, sl] = not negative
    flat = lambda x: x.flatten(1, 2)  # noqa: E731 - [B, G, S, ...] -> [B, G*S, ...]
    return Denoising(flat(labels), flat(boxes), flat(target), flat(positive),
                     flat(target) >= 0, groups, size)


# -------------------------------------------------------------------- attention masks


@dataclass
class QueryMask:
    """Who may attend to whom among a decoder's queries: ``blocked [L, L]`` (True: row may
    not attend to column) and ``padding [B, L]`` (True: nobody attends to that query)."""
    blocked: Tensor
    padding: Tensor | None = None

    def for_mha(self, nheads: int) -> tuple[Tensor, None]:
        """``attn_mask`` for ``nn.MultiheadAttention`` (``[L, L]``, or ``[B*heads, L, L]``
        with padding; True: blocked); its key_padding_mask stays None (padding folded in)."""
        if self.padding is None:
            return self.blocked, None
        return self.sdpa_blocked().repeat_interleave(nheads, 0), None

    def sdpa_blocked(self) -> Tensor:
        """``[B, L, L]`` (``[1, L, L]`` without padding) True where blocked."""
        blocked = self.blocked[None]
        if self.padding is not None:
            blocked = blocked | self.padding[:, None, :]
        return blocked


def self_attention_mask(dn: Denoising | None, num_queries: int, query_groups: int,
                        device) -> QueryMask | None:
    """The mask of ``[denoising | K groups of num_queries]``; None when there is nothing to
    separate (no denoising queries and one group)."""
    n_dn = dn.count if dn is not None else 0
    if n_dn == 0 and query_groups == 1:
        return None
    length = n_dn + query_groups * num_queries
    group = torch.empty(length, dtype=torch.long, device=device)
    first = 0
    if n_dn:
        group[:n_dn] = torch.arange(n_dn, device=device) // dn.size
        first = dn.groups
    group[n_dn:] = first + torch.arange(query_groups * num_queries, device=device) // num_queries
    blocked = group[:, None] != group[None, :]
    if n_dn:
        blocked[:n_dn, n_dn:n_dn + num_queries] = False     # denoising reads group 0
    padding = None
    if n_dn:
        padding = torch.zeros(dn.labels.shape[0], length, dtype=torch.bool, device=device)
        padding[:, :n_dn] = ~dn.valid
    return QueryMask(blocked, padding)


# ------------------------------------------------------------------- shared modules


class LabelEmbedding(nn.Embedding):
    """A denoising query's content: one learned vector per class (a class head in
    fine-tuning's sense: rows are copied by class name)."""


def dn_modules(cfg: DNConfig, num_classes: int, d: int) -> LabelEmbedding | None:
    """The label embedding a method with denoising needs (None without)."""
    cfg.check()
    return LabelEmbedding(num_classes, d) if cfg.enabled else None


@dataclass
class QueryPlan:
    """What one forward runs: ``groups`` groups of matching queries (1 unless training with
    targets), the denoising queries ``dn`` in front of them, and the self-attention
    ``mask`` between them (None: nothing to separate)."""
    active: bool = False
    groups: int = 1
    dn: Denoising | None = None
    mask: QueryMask | None = None

    @property
    def n_dn(self) -> int:
        return self.dn.count if self.dn is not None else 0

    def finish(self, out: dict, *dn_params: nn.Module | None) -> dict:
        """The decoder's outputs over the planned queries -> the output contract (see
        :func:`split_outputs`); ``dn_params``: the modules only denoising queries use."""
        if not self.active:
            return out
        anchor = zero_anchor(*dn_params) if self.dn is None else None
        out = split_outputs(out, self.dn, anchor)
        if self.groups > 1:
            out["query_groups"] = self.groups
        return out


def plan_queries(model: nn.Module, targets: list[dict] | None) -> QueryPlan:
    """The plan of a forward: training mode with targets and denoising or several query
    groups configured runs them; anything else runs the model's ``num_queries`` alone."""
    cfg = model.config
    if not (model.training and targets is not None
            and (cfg.dn.enabled or cfg.query_groups > 1)):
        return QueryPlan()
    dn = make_denoising(cfg.dn, targets, cfg.num_classes)
    device = next(model.parameters()).device
    mask = self_attention_mask(dn, cfg.num_queries, cfg.query_groups, device)
    return QueryPlan(True, cfg.query_groups, dn, mask)


def split_outputs(out: dict, dn: Denoising | None, anchor: Tensor | None = None) -> dict:
    """A decoder's output dict over ``[denoising | matching]`` queries -> the matching part
    as the output contract, and the denoising part (with what the criterion needs to pair
    it with its targets) under ``out["dn"]``. ``anchor``: a zero-valued term that keeps the
    denoising parameters in the graph when a batch has no box (DDP needs every parameter to
    get a gradient)."""
    n = dn.count if dn is not None else 0

    def part(d: dict, sl: slice) -> dict:
        return {k: (v[:, sl] if k in ("pred_logits", "pred_boxes") else
                    [part(a, sl) for a in v] if k == "aux_outputs" else v)
                for k, v in d.items() if k != "enc_outputs"}

    matching = part(out, slice(n, None))
    if "enc_outputs" in out:
        matching["enc_outputs"] = out["enc_outputs"]
    if anchor is not None:
        matching["pred_logits"] = matching["pred_logits"] + anchor
    if n:
        matching["dn"] = {**part(out, slice(0, n)), "target": dn.target,
                          "positive": dn.positive, "valid": dn.valid, "groups": dn.groups,
                          "noised_labels": dn.labels, "noised_boxes": dn.boxes}
    return matching


def zero_anchor(*modules: nn.Module | None) -> Tensor | None:
    """``0 * sum`` of the parameters of ``modules`` (see :func:`split_outputs`)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    if not params:
        return None
    return sum(p.sum() for p in params) * 0.0
