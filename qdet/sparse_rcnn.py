"""Sparse R-CNN: End-to-End Object Detection with Learnable Proposals (Sun et al., CVPR 2021).
https://arxiv.org/abs/2011.12450

What differs from DETR:
- No transformer encoder and no dense candidates: N learnable proposal boxes (normalized
  cx,cy,w,h, initialized to the whole image) and N learnable proposal features (d-dim) start
  a cascade of iterative heads on an FPN (torchvision.ops.FeaturePyramidNetwork over C2-C5).
- Each head pools every proposal's box from P2-P5 with RoIAlign (7x7) and mixes it with the
  proposal's own feature by a dynamic instance interaction: the proposal feature generates
  the parameters of two 1x1 convolutions (d -> 64 -> d), applied to its own RoI features with
  bmm, LayerNorm and ReLU, then flattened and projected back to d (``DynamicConv``, also used
  by Dynamic DETR). Before that, self-attention among the proposals; after it, an FFN, then
  class and box-delta branches. Boxes are refined at every head and detached between heads.
- Sigmoid focal loss with the focal class cost, L1 and GIoU, deep supervision of every head.

Choices to note:
- RoIAlign is torchvision.ops.roi_align with ``aligned=True`` and detectron2's level rule
  (floor(4 + log2(size / 224 + 1e-8)), clamped to P2-P5). torchvision's MultiScaleRoIAlign
  uses aligned=False and puts the epsilon outside the log, so it would not reproduce the
  official checkpoints.
- Inside the model boxes are absolute (x0,y0,x1,y1) pixels, as in the paper; the outputs
  follow qdet's contract (normalized cx,cy,w,h), so the shared criterion takes its L1 on
  those rather than on size-normalized corners as the official code does.
- Images are padded to a multiple of 32 (as detectron2 does), so FPN levels align exactly.

Official checkpoints (PeizeSun/SparseR-CNN, detectron2 layout ``backbone.bottom_up.*``,
``backbone.fpn_lateral*``, ``head.head_series.*``) load through ``official_config``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, box_convert, roi_align

from .backbone import FROM_SCRATCH, Backbone
from .base import Detector, batch_images, layer_outputs
from .detr import resnet_from_keys
from .engine import SHAPES_TRAIN
from .matcher import LossConfig, focal_loss_config


@dataclass
class Config:
    """Sparse R-CNN R50-FPN as in the paper (100 proposals, 6 heads); SHAPES overrides it."""
    num_classes: int = 80
    backbone: str = "resnet50"
    frozen_bn: bool = True
    backbone_trainable: int = 3
    d_model: int = 256
    num_proposals: int = 100
    num_heads: int = 6            # iterative stages
    nheads: int = 8               # attention heads
    dim_feedforward: int = 2048
    dim_dynamic: int = 64
    num_cls: int = 1              # layers of the class branch
    num_reg: int = 3              # layers of the box branch
    pooler_resolution: int = 7
    dropout: float = 0.0
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)

    @property
    def num_queries(self) -> int:
        return self.num_proposals


def roi_pool(features: list[Tensor], boxes: list[Tensor], resolution: int,
             first_level: int = 2) -> Tensor:
    """RoIAlign of absolute xyxy boxes from a pyramid whose first map has stride
    2**first_level (P2..P5 here), each box from the level its size assigns (detectron2's
    rule: floor(4 + log2(size / 224)), clamped to the pyramid). Returns
    ``[sum(boxes), C, r, r]``."""
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1)
                      for i, b in enumerate(boxes)])
    size = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    last = first_level + len(features) - 1
    level = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(first_level, last).long()
    out = rois.new_zeros(len(rois), features[0].shape[1], resolution, resolution)
    for i, feat in enumerate(features):
        idx = torch.nonzero(level == first_level + i).squeeze(1)
        if idx.numel():
            out[idx] = roi_align(feat, rois[idx], resolution,
                                 spatial_scale=1 / 2 ** (first_level + i), sampling_ratio=2,
                                 aligned=True).to(out.dtype)
    return out


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

    def __init__(self, cfg: Config, first_level: int = 2):
        super().__init__()
        d = cfg.d_model
        self.first_level = first_level
        self.self_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout,
                                               batch_first=True)
        self.inst_interact = DynamicConv(d, cfg.dim_dynamic, cfg.pooler_resolution)
        ffn = cfg.dim_feedforward
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (
            nn.Dropout(cfg.dropout) for _ in range(4))
        self.cls_module, self.reg_module = _branch(d, cfg.num_cls), _branch(d, cfg.num_reg)
        self.class_logits = nn.Linear(d, cfg.num_classes)
        self.bboxes_delta = nn.Linear(d, 4)
        self.resolution = cfg.pooler_resolution

    def forward(self, features, boxes: Tensor, query: Tensor):
        """boxes ``[N,P,4]`` absolute xyxy, query ``[N,P,d]`` -> logits, boxes, query."""
        n, p, d = query.shape
        roi = roi_pool(features, list(boxes), self.resolution, self.first_level)  # [N*P,d,r,r]
        roi = roi.flatten(2).transpose(1, 2)                                    # [N*P,r*r,d]
        query = self.norm1(query + self.dropout1(self.self_attn(query, query, query,
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

    def __init__(self, cfg, num_stages: int, first_level: int = 2):
        super().__init__()
        self.head_series = nn.ModuleList(RCNNHead(cfg, first_level) for _ in range(num_stages))
        prior = -math.log((1 - 0.01) / 0.01)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("class_logits.bias"):
                nn.init.constant_(p, prior)

    def forward(self, features, boxes, query):
        """Returns per-stage logits ``[L,N,P,C]`` and absolute xyxy boxes ``[L,N,P,4]``."""
        all_logits, all_boxes = [], []
        for head in self.head_series:
            logits, boxes, query = head(features, boxes, query)
            all_logits.append(logits)
            all_boxes.append(boxes)
            boxes = boxes.detach()
        return torch.stack(all_logits), torch.stack(all_boxes)


class SparseRCNN(Detector):
    arch = "sparse-rcnn"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, (1, 2, 3, 4), False, cfg.frozen_bn,
                                 cfg.backbone_trainable)
        self.fpn = FeaturePyramidNetwork(self.backbone.channels, d)
        self.init_proposal_features = nn.Embedding(cfg.num_proposals, d)
        self.init_proposal_boxes = nn.Embedding(cfg.num_proposals, 4)
        with torch.no_grad():  # every proposal starts as the whole image
            self.init_proposal_boxes.weight[:, :2] = 0.5
            self.init_proposal_boxes.weight[:, 2:] = 1.0
        self.head = DynamicHead(cfg, cfg.num_heads)

    def forward(self, images) -> dict:
        x, mask, sizes = pad_for_pyramid(images)
        feats = self.backbone(x, mask)
        pyramid = self.fpn({str(i): f for i, (f, _) in enumerate(feats)})
        return decode_proposals(self, list(pyramid.values()), sizes)            # P2..P5

    def compile_transformer(self) -> None:
        self.head.compile()


def pad_for_pyramid(images) -> tuple[Tensor, Tensor, Tensor]:
    """Images padded to a multiple of 32, their mask, and each image's (w, h, w, h)."""
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    sizes = torch.tensor([[im.shape[-1], im.shape[-2]] * 2 for im in images],
                         dtype=torch.float32, device=images[0].device)
    x, mask = batch_images(images, divisor=32)
    return x, mask, sizes


def decode_proposals(model, features: list[Tensor], sizes: Tensor) -> dict:
    """Learned proposals (``model.init_proposal_boxes/features``) through ``model.head``;
    boxes are absolute inside and normalized (cx, cy, w, h) in the returned contract."""
    # torchvision's CPU roi_align makes its input contiguous on every call: do it once here
    # for all heads (the fast path runs the pyramid channels_last)
    features = [f.contiguous() for f in features]
    init = box_convert(model.init_proposal_boxes.weight, "cxcywh", "xyxy")
    boxes = init[None] * sizes[:, None]                                         # absolute
    query = model.init_proposal_features.weight[None].expand(len(sizes), -1, -1)
    logits, boxes = model.head(features, boxes, query)
    boxes = box_convert(boxes / sizes[None, :, None], "xyxy", "cxcywh")
    return layer_outputs(logits, boxes, model.config.aux_loss)


Model = SparseRCNN

# ---------------------------------------------------------------- official checkpoints


def is_official(sd: dict) -> bool:
    return "init_proposal_boxes.weight" in sd and "backbone.bottom_up.stem.conv1.weight" in sd


def _d2_to_torchvision(key: str) -> str:
    k = key.replace("backbone.bottom_up.stem.conv1.norm.", "backbone.body.bn1.")
    k = k.replace("backbone.bottom_up.stem.conv1.", "backbone.body.conv1.")
    k = re.sub(r"backbone\.bottom_up\.res(\d)\.",
               lambda m: f"backbone.body.layer{int(m.group(1)) - 1}.", k)
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    k = re.sub(r"backbone\.fpn_lateral(\d)\.",
               lambda m: f"fpn.inner_blocks.{int(m.group(1)) - 2}.0.", k)
    return re.sub(r"backbone\.fpn_output(\d)\.",
                  lambda m: f"fpn.layer_blocks.{int(m.group(1)) - 2}.0.", k)


def official_config(sd: dict, args: dict) -> tuple[Config, dict]:
    """PeizeSun/SparseR-CNN (detectron2) checkpoint -> (Config, qdet state dict)."""
    state = {_d2_to_torchvision(k): v for k, v in sd.items()
             if not k.startswith(("pixel_mean", "pixel_std"))}
    head = "head.head_series.0."
    d = sd["init_proposal_features.weight"].shape[1]
    cfg = Config(
        num_classes=sd[head + "class_logits.weight"].shape[0],
        backbone=resnet_from_keys(state, "backbone.body."),
        d_model=d, num_proposals=sd["init_proposal_boxes.weight"].shape[0],
        num_heads=1 + max(int(m.group(1)) for k in sd
                          if (m := re.match(r"head\.head_series\.(\d+)\.", k))),
        dim_feedforward=sd[head + "linear1.weight"].shape[0],
        dim_dynamic=sd[head + "inst_interact.norm1.weight"].shape[0],
        num_cls=sum(1 for k in sd if re.match(re.escape(head) + r"cls_module\.\d+\.weight$", k)
                    and sd[k].dim() == 2),
        num_reg=sum(1 for k in sd if re.match(re.escape(head) + r"reg_module\.\d+\.weight$", k)
                    and sd[k].dim() == 2),
        pooler_resolution=round(math.sqrt(sd[head + "inst_interact.out_layer.weight"].shape[1]
                                          / d)),
        nheads=int(args.get("nheads", 8)))
    return cfg, state


# ------------------------------------------------------------------------- presets

# Paper recipe (3x schedule): AdamW 2.5e-5, batch 16, 36 epochs with drops at 27 and 33.
PAPER = dict(train=dict(lr=2.5e-5, lr_backbone=2.5e-5, weight_decay=1e-4, batch_size=2,
                        epochs=36, lr_drops=(27, 33), clip_max_norm=1.0, warmup_steps=1000))

SHAPES = dict(
    model=dict(**FROM_SCRATCH, d_model=128, num_proposals=20, num_heads=3, nheads=8,
               dim_feedforward=512, dim_dynamic=32),
    train=dict(SHAPES_TRAIN, clip_max_norm=1.0),
)
