"""The iterative dynamic head that Sparse R-CNN introduced and Dynamic DETR reuses as its
decoder: learned proposal boxes and features, RoIAlign from a feature pyramid, the dynamic
instance interaction, and R-CNN box deltas, stage by stage (Sun et al., CVPR 2021,
https://arxiv.org/abs/2011.12450, Sec. 3.3-3.4).

- Each stage pools every proposal's box from the pyramid with RoIAlign (7x7) and mixes it
  with the proposal's own feature by a dynamic instance interaction: the proposal feature
  generates the parameters of two 1x1 convolutions (d -> 64 -> d), applied to its own RoI
  features with bmm, LayerNorm and ReLU, then flattened and projected back to d
  (``DynamicConv``). Before that, self-attention among the proposals; after it, an FFN,
  then class and box-delta branches. Boxes are refined at every stage and detached between
  stages.
- RoIAlign is torchvision's ``roi_align`` (computed by ``qdet.ops.roi_align``'s Numba kernel on the
  CPU) with ``aligned=True`` and detectron2's level rule
  (floor(4 + log2(size / 224 + 1e-8)), clamped to the pyramid). torchvision's
  MultiScaleRoIAlign uses aligned=False and puts the epsilon outside the log, so it would not
  reproduce the official checkpoints.
- Inside the head boxes are absolute (x0,y0,x1,y1) pixels, as in the paper; ``decode``
  returns qdet's contract (normalized cx,cy,w,h).

Module names follow PeizeSun/SparseR-CNN (``head.head_series.N.*``,
``init_proposal_boxes``, ``init_proposal_features``), so its checkpoints load.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..ops.modes import exporting
from ..ops.roi_align import prepare_map, roi_align
from .base import batch_images, layer_outputs


def roi_levels(boxes: Tensor, first_level: int, num_levels: int) -> Tensor:
    """The pyramid level (log2 of its stride) each absolute xyxy box ``[K, 4]`` is pooled
    from: detectron2's floor(4 + log2(size / 224)), clamped to the pyramid. ``[K]``."""
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    last = first_level + num_levels - 1
    return torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(first_level, last).long()


def roi_pool(features: list[Tensor], boxes: list[Tensor] | Tensor, resolution: int,
             first_level: int = 2, backend: str | None = None) -> Tensor:
    """RoIAlign of absolute xyxy boxes (one ``[P_i,4]`` per image, or ``[N,P,4]``) from a
    pyramid whose first map has stride 2**first_level (P2..P5 here), each box from the level
    its size assigns (``roi_levels``); ``backend`` as :func:`qdet.ops.roi_align.roi_align`'s.
    Returns ``[sum(boxes), C, r, r]``."""
    if isinstance(boxes, Tensor):  # the image index of every box, without a loop over images
        n, p, _ = boxes.shape
        idx = torch.arange(n, dtype=boxes.dtype, device=boxes.device)[:, None, None]
        rois = torch.cat([idx.expand(n, p, 1), boxes], -1).flatten(0, 1)
    else:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1)
                          for i, b in enumerate(boxes)])
    level = roi_levels(rois[:, 1:], first_level, len(features))
    # channels last, as qdet's kernel returns it ([K, r, r, C] in memory)
    out = rois.new_zeros(rois.shape[0], resolution, resolution,
                         features[0].shape[1]).permute(0, 3, 1, 2)
    for i, feat in enumerate(features):
        lvl = first_level + i
        if exporting():
            # no shape that depends on the data (ONNX's scatter fails on an empty level):
            # every box pooled at every level, each keeping its own level's (the same values)
            pooled = _align(feat, rois, resolution, lvl, backend).to(out.dtype)
            out = torch.where((level == lvl)[:, None, None, None], pooled, out)
            continue
        idx = torch.nonzero(level == lvl).squeeze(1)
        if idx.numel():
            out[idx] = _align(feat, rois[idx], resolution, lvl, backend).to(out.dtype)
    return out


def _align(feat: Tensor, rois: Tensor, resolution: int, level: int,
           backend: str | None) -> Tensor:
    return roi_align(feat, rois, resolution, spatial_scale=1 / 2 ** level, sampling_ratio=2,
                     aligned=True, backend=backend)


class DynamicConv(nn.Module):
    """Dynamic instance interaction: each query's feature generates the weights of two 1x1
    convolutions (d -> dim_dynamic -> d) applied to its own pooled RoI features; the result is
    flattened (position-major) and projected back to d."""

    def __init__(self, d: int, dim_dynamic: int, resolution: int):
        super().__init__()
        self.d, self.dd = d, dim_dynamic
        self.dynamic_layer = nn.Linear(d, 2 * d * dim_dynamic)
        self.norm1, self.norm2 = nn.LayerNorm(dim_dynamic), nn.LayerNorm(d)
        self.out_layer = nn.Linear(d * resolution ** 2, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, query: Tensor, roi: Tensor) -> Tensor:
        """query ``[B, d]``, roi ``[B, S*S, d]`` -> ``[B, d]``."""
        params = self.dynamic_layer(query)
        w1 = params[:, :self.d * self.dd].view(-1, self.d, self.dd)
        w2 = params[:, self.d * self.dd:].view(-1, self.dd, self.d)
        x = F.relu(self.norm1(torch.bmm(roi, w1)))
        x = F.relu(self.norm2(torch.bmm(x, w2)))
        return F.relu(self.norm3(self.out_layer(x.flatten(1))))


def apply_deltas(deltas: Tensor, boxes: Tensor, weights=(2.0, 2.0, 1.0, 1.0),
                 clamp: float = math.log(100000.0 / 16)) -> Tensor:
    """R-CNN box deltas (dx, dy, dw, dh) / weights applied to absolute xyxy boxes."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = (deltas[:, 2] / weights[2]).clamp(max=clamp)
    dh = (deltas[:, 3] / weights[3]).clamp(max=clamp)
    cx, cy = dx * w + cx, dy * h + cy
    w, h = dw.exp() * w, dh.exp() * h
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], 1)


def _branch(d: int, n: int) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers += [nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU()]
    return nn.Sequential(*layers)


class RCNNHead(nn.Module):
    """One stage: self-attention among proposals, dynamic interaction with their RoIs, FFN,
    class and box-delta branches."""

    def __init__(self, num_classes: int, d: int, nheads: int, ffn: int, dim_dynamic: int,
                 num_cls: int, num_reg: int, resolution: int, dropout: float,
                 first_level: int = 2):
        super().__init__()
        self.first_level = first_level
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.inst_interact = DynamicConv(d, dim_dynamic, resolution)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (
            nn.Dropout(dropout) for _ in range(4))
        self.cls_module, self.reg_module = _branch(d, num_cls), _branch(d, num_reg)
        self.class_logits = nn.Linear(d, num_classes)
        self.bboxes_delta = nn.Linear(d, 4)
        self.resolution = resolution

    def forward(self, features, boxes: Tensor, query: Tensor, pool_backend: str | None = None,
                self_mask=None):
        """boxes ``[N,P,4]`` absolute xyxy, query ``[N,P,d]`` -> logits, boxes, query;
        ``pool_backend`` as :func:`qdet.ops.roi_align.roi_align`'s; ``self_mask``: a
        ``qdet.blocks.denoising.QueryMask`` between the proposals."""
        n, p, d = query.shape
        roi = roi_pool(features, boxes, self.resolution, self.first_level,
                       pool_backend)                                            # [N*P,d,r,r]
        roi = roi.flatten(2).transpose(1, 2)                                    # [N*P,r*r,d]
        blocked = None if self_mask is None else \
            self_mask.for_mha(self.self_attn.num_heads)[0]
        query = self.norm1(query + self.dropout1(self.self_attn(query, query, query,
                                                                attn_mask=blocked,
                                                                need_weights=False)[0]))
        inter = self.inst_interact(query.reshape(n * p, d), roi).view(n, p, d)
        query = self.norm2(query + self.dropout2(inter))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(query))))
        query = self.norm3(query + self.dropout3(ffn))
        flat = query.reshape(n * p, d)
        logits = self.class_logits(self.cls_module(flat)).view(n, p, -1)
        deltas = self.bboxes_delta(self.reg_module(flat))
        boxes = apply_deltas(deltas, boxes.reshape(-1, 4)).view(n, p, 4)
        return logits, boxes, query


class DynamicHead(nn.Module):
    """Iterative stages over a feature pyramid starting at stride 2**first_level; boxes are
    detached between stages. Also Dynamic DETR's decoder."""

    def __init__(self, num_stages: int, **stage):
        """``stage``: the keyword arguments of every :class:`RCNNHead`."""
        super().__init__()
        self.head_series = nn.ModuleList(RCNNHead(**stage) for _ in range(num_stages))
        self.pool_backend: str | None = None      # RoIAlign's: its default for the device
        prior = -math.log((1 - 0.01) / 0.01)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("class_logits.bias"):
                nn.init.constant_(p, prior)

    def forward(self, features, boxes, query, self_mask=None):
        """Returns per-stage logits ``[L,N,P,C]`` and absolute xyxy boxes ``[L,N,P,4]``."""
        # every stage pools the same maps: convert them once to what RoIAlign reads
        features = [prepare_map(f, self.pool_backend) for f in features]
        all_logits, all_boxes = [], []
        for head in self.head_series:
            logits, boxes, query = head(features, boxes, query, self.pool_backend, self_mask)
            all_logits.append(logits)
            all_boxes.append(boxes)
            boxes = boxes.detach()
        return torch.stack(all_logits), torch.stack(all_boxes)


def learned_proposals(num: int, d: int) -> tuple[nn.Embedding, nn.Embedding]:
    """Learned proposal features ``[num, d]`` and boxes ``[num, 4]`` (normalized cx, cy, w,
    h), every box starting as the whole image."""
    features, boxes = nn.Embedding(num, d), nn.Embedding(num, 4)
    with torch.no_grad():
        boxes.weight[:, :2] = 0.5
        boxes.weight[:, 2:] = 1.0
    return features, boxes


def pad_for_pyramid(images) -> tuple[Tensor, Tensor, Tensor]:
    """Images padded to a multiple of 32 (as detectron2 does, so pyramid levels align
    exactly), their mask, and each image's (w, h, w, h)."""
    if isinstance(images, Tensor) and images.dim() == 4:
        # one size for the batch, from its (possibly traced) shape: no loop over images
        b, _, h, w = images.shape
        wh = torch.stack([torch.as_tensor(w), torch.as_tensor(h)]).to(images.device,
                                                                       torch.float32)
        sizes = wh.repeat(2)[None].expand(b, 4)
    else:
        sizes = torch.tensor([[im.shape[-1], im.shape[-2]] * 2 for im in images],
                             dtype=torch.float32, device=images[0].device)
    x, mask = batch_images(images, divisor=32)
    return x, mask, sizes


def decode_proposals(head: DynamicHead, proposal_features: Tensor, proposal_boxes: Tensor,
                     features: list[Tensor], sizes: Tensor, aux: bool, prefix=None,
                     self_mask=None) -> dict:
    """Run the learned proposals (``[P, d]`` features, ``[P, 4]`` normalized cx,cy,w,h
    boxes) through ``head`` over the pyramid ``features`` of images of ``sizes`` ``[N, 4]``
    (w, h, w, h); returns the output contract (normalized cx, cy, w, h boxes). ``prefix``:
    per-image proposals in front of the learned ones (denoising), ``(features [N,M,d],
    normalized cx,cy,w,h boxes [N,M,4])``; ``self_mask`` separates them and query groups."""
    init = box_convert(proposal_boxes, "cxcywh", "xyxy")
    boxes = init[None] * sizes[:, None]                                         # absolute
    query = proposal_features[None].expand(sizes.shape[0], -1, -1)
    if prefix is not None:
        dn_query, dn_boxes = prefix
        dn_boxes = box_convert(dn_boxes, "cxcywh", "xyxy") * sizes[:, None]
        query = torch.cat([dn_query.to(query.dtype), query], 1)
        boxes = torch.cat([dn_boxes.to(boxes.dtype), boxes.expand(sizes.shape[0], -1, -1)], 1)
    logits, boxes = head(features, boxes, query, self_mask)
    boxes = box_convert(boxes / sizes[None, :, None], "xyxy", "cxcywh")
    return layer_outputs(logits, boxes, aux)
