"""Dynamic DETR: End-to-End Object Detection with Dynamic Attention (Dai et al., ICCV 2021).
https://openaccess.thecvf.com/content/ICCV2021/html/
Dai_Dynamic_DETR_End-to-End_Object_Detection_With_Dynamic_Attention_ICCV_2021_paper.html
-- no official code; built from the paper as follows.

Design points and where they come from:
- Dynamic encoder (Sec. 3.2): self-attention over the pyramid approximated by convolutions
  with three kinds of attention, stacked in several blocks. Per level: spatial attention =
  a modulated deformable convolution (``qdet.ops.deform_conv``: 3x3, torchvision's semantics,
  sampled by Numba kernels) whose offsets are estimated from that (middle) level and
  applied to it and to its two neighbouring levels, resized to its size; scale attention =
  a squeeze-and-excitation style weight per level term; representation attention = a
  dynamic ReLU (its channel-wise coefficients generated from the pooled feature). The
  pyramid is an FPN (5 levels, P3-P7, as in the paper's headline results).
- Dynamic decoder (the section after 3.2): queries carry boxes (initialized to the whole
  image, as the paper describes); each layer keeps query self-attention, pools every
  query's box from the pyramid with RoIAlign, and replaces cross-attention by a dynamic
  interaction whose parameters the query generates -- Sparse R-CNN's dynamic instance
  interaction, from ``qdet.blocks.dynamic_head`` -- then refines the box. Boxes are detached
  between layers.
- Set loss with Hungarian matching, focal class cost (the shared switch), L1 and GIoU,
  supervision of every decoder layer.
- Training-only queries (``qdet.blocks.denoising``): a denoising query is a proposal whose
  box is the noised box and whose feature is the embedding of its noised label; query groups
  each have their own proposal boxes and features. The paper's headline schedule is 1x (12 epochs, lr
  drop at 11); its `paper` preset (``qdet.engine.presets``) follows it.

Where the paper is silent, the choice made here (following the Dynamic Head paper by the same
authors, which this encoder reuses, and Sparse R-CNN for the decoder):
- neighbours are resized to the middle level by bilinear interpolation before their
  deformable convolution, so one offset map serves all three; each result gets GroupNorm(16);
- scale attention: global average pool -> 1x1 conv to one channel -> ReLU -> hard sigmoid,
  a scalar per level term; the weighted terms are averaged;
- dynamic ReLU: max(a1 x + b1, a2 x + b2) with a, b per channel from pool -> FC -> ReLU ->
  FC -> hard sigmoid (reduction 4); 6 encoder blocks; no residual connections;
- decoder: 300 queries, 6 layers, RoIAlign 7x7 (aligned, detectron2's level rule), the
  dynamic interaction with two generated 1x1 convolutions (d -> 64 -> d), R-CNN box deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..blocks.backbone import Backbone
from ..blocks.base import Detector, LossConfig, MethodSpec, focal_loss_config
from ..blocks.denoising import DNConfig, check_query_groups, dn_modules, plan_queries
from ..blocks.dynamic_head import DynamicHead, decode_proposals, learned_proposals, pad_for_pyramid
from ..ops.deform_conv import DeformConv2d
from ..ops.modes import exporting


@dataclass
class Config:
    """Dynamic DETR-R50 (5-level FPN, 6 encoder blocks, 6 decoder layers, 300 queries)."""
    num_classes: int = 91
    backbone: str = "resnet50"
    frozen_bn: bool = True
    backbone_trainable: int = 3
    d_model: int = 256
    num_levels: int = 5            # P3-P5 from C3-C5, plus P6-P7 when 5
    enc_blocks: int = 6
    num_queries: int = 300
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dim_dynamic: int = 64
    num_cls: int = 1
    num_reg: int = 3
    pooler_resolution: int = 7
    dropout: float = 0.0
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)


class DyReLU(nn.Module):
    """Dynamic ReLU: max(a1 x + b1, a2 x + b2), coefficients per channel from the input."""

    def __init__(self, d: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, d // reduction),
                                nn.ReLU(), nn.Linear(d // reduction, 4 * d), nn.Hardsigmoid())

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x).view(x.shape[0], 4, x.shape[1], 1, 1) - 0.5       # in [-0.5, 0.5]
        a1, a2, b1, b2 = 2 * y[:, 0] + 1.0, 2 * y[:, 1], y[:, 2], y[:, 3]  # a1 starts at 1
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class EncoderBlock(nn.Module):
    """Spatial (deformable conv across neighbouring levels), scale (SE-style weight per level
    term) and representation (dynamic ReLU) attention over every pyramid level."""

    def __init__(self, d: int):
        super().__init__()
        self.offset = nn.Conv2d(d, 27, 3, padding=1)      # 2 x 9 offsets + 9 mask logits
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        # one deformable conv per role: finer neighbour, same level, coarser neighbour;
        # parameters named as torchvision's DeformConv2d (dcn.{i}.weight/bias)
        self.dcn = nn.ModuleList(DeformConv2d(d, d, 3, padding=1) for _ in range(3))
        self.norm = nn.ModuleList(nn.GroupNorm(16, d) for _ in range(3))
        for conv in self.dcn:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.scale_attn = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(d, 1, 1), nn.ReLU(),
                                        nn.Hardsigmoid())
        self.dyrelu = DyReLU(d)

    def deform(self, role: int, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """The deformable convolution of ``role``: qdet's op (NaN offsets from a diverged
        run sample zero), torchvision's while exporting to ONNX."""
        return self.dcn[role](x, offset, mask)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = []
        for lvl, x in enumerate(feats):
            om = self.offset(x)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            sources = [(1, x)]
            if lvl > 0:
                sources.append((0, feats[lvl - 1]))
            if lvl < len(feats) - 1:
                sources.append((2, feats[lvl + 1]))
            terms = []
            for role, src in sources:
                if exporting() or src.shape[-2:] != x.shape[-2:]:  # same size: identity
                    src = F.interpolate(src, size=x.shape[-2:], mode="bilinear",
                                        align_corners=False)
                t = self.norm[role](self.deform(role, src, offset, mask))
                terms.append(t * self.scale_attn(t))
            out.append(self.dyrelu(torch.stack(terms).mean(0)))
        return out


class DynamicEncoder(nn.Module):
    def __init__(self, d: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(d) for _ in range(num_blocks))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        for block in self.blocks:
            feats = block(feats)
        return feats


class DynamicDETR(Detector):
    arch = "dynamic"
    title = "Dynamic DETR"
    compiled_parts = ("encoder", "head")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.num_levels not in (3, 5):
            raise ValueError(f"num_levels must be 3 (P3-P5) or 5 (P3-P7), got {cfg.num_levels}")
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, (2, 3, 4), False, cfg.frozen_bn,
                                 cfg.backbone_trainable)
        self.fpn = FeaturePyramidNetwork(self.backbone.channels, d,
                                         LastLevelP6P7(d, d) if cfg.num_levels == 5 else None)
        self.encoder = DynamicEncoder(d, cfg.enc_blocks)
        check_query_groups(cfg.query_groups)
        check_query_groups(cfg.query_groups)
        # every query's box starts as the whole image
        self.init_proposal_features, self.init_proposal_boxes = learned_proposals(
            cfg.num_queries * cfg.query_groups, d)
        self.head = DynamicHead(
            cfg.dec_layers, num_classes=cfg.num_classes, d=d, nheads=cfg.nheads,
            ffn=cfg.dim_feedforward, dim_dynamic=cfg.dim_dynamic, num_cls=cfg.num_cls,
            num_reg=cfg.num_reg, resolution=cfg.pooler_resolution, dropout=cfg.dropout,
            first_level=3)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)

    def class_heads(self) -> dict[str, str]:
        return {f"head.head_series.{i}.class_logits": "classes"
                for i in range(len(self.head.head_series))}

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        x, mask, sizes = pad_for_pyramid(images)
        feats = self.backbone(x, mask)
        pyramid = list(self.fpn({str(i): f for i, (f, _) in enumerate(feats)}).values())
        plan = plan_queries(self, targets)
        k = cfg.num_queries * plan.groups
        prefix = None if plan.dn is None else (self.dn_label(plan.dn.labels), plan.dn.boxes)
        out = decode_proposals(self.head, self.init_proposal_features.weight[:k],
                               self.init_proposal_boxes.weight[:k], self.encoder(pyramid), sizes,
                               cfg.aux_loss, prefix, plan.mask)
        return plan.finish(out, self.dn_label)


SPEC = MethodSpec(Config, DynamicDETR)
