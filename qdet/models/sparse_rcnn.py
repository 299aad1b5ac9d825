"""Sparse R-CNN: End-to-End Object Detection with Learnable Proposals (Sun et al., CVPR 2021).
https://arxiv.org/abs/2011.12450

What differs from DETR:
- No transformer encoder and no dense candidates: N learnable proposal boxes (normalized
  cx,cy,w,h, initialized to the whole image) and N learnable proposal features (d-dim) start
  a cascade of iterative heads on an FPN (torchvision.ops.FeaturePyramidNetwork over C2-C5).
- Each head pools every proposal's box from P2-P5 with RoIAlign and mixes it with the
  proposal's own feature by a dynamic instance interaction, then refines the box
  (``qdet.blocks.dynamic_head``, shared with Dynamic DETR, where the details and the RoIAlign
  alignment are noted).
- Sigmoid focal loss with the focal class cost, L1 and GIoU, deep supervision of every head.
- The outputs follow qdet's contract (normalized cx,cy,w,h), so the shared criterion takes its
  L1 on those rather than on size-normalized corners as the official code does.
- Images are padded to a multiple of 32 (as detectron2 does), so FPN levels align exactly.
- Training-only queries (``qdet.blocks.denoising``): a denoising query is a proposal whose box
  is the noised box and whose feature is the embedding of its noised label; query groups
  each have their own proposal boxes and features.

Official checkpoints (PeizeSun/SparseR-CNN, detectron2 layout ``backbone.bottom_up.*``,
``backbone.fpn_lateral*``, ``head.head_series.*``) load through ``qdet.weights.official``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torchvision.ops import FeaturePyramidNetwork

from ..blocks.backbone import Backbone
from ..blocks.base import Detector, LossConfig, MethodSpec, focal_loss_config
from ..blocks.denoising import DNConfig, check_query_groups, dn_modules, plan_queries
from ..blocks.dynamic_head import DynamicHead, decode_proposals, learned_proposals, pad_for_pyramid


@dataclass
class Config:
    """Sparse R-CNN R50-FPN as in the paper (100 proposals, 6 heads)."""
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
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)

    @property
    def num_queries(self) -> int:
        return self.num_proposals


class SparseRCNN(Detector):
    arch = "sparse-rcnn"
    title = "Sparse R-CNN"
    compiled_parts = ("head",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, (1, 2, 3, 4), False, cfg.frozen_bn,
                                 cfg.backbone_trainable)
        self.fpn = FeaturePyramidNetwork(self.backbone.channels, d)
        check_query_groups(cfg.query_groups)
        check_query_groups(cfg.query_groups)
        self.init_proposal_features, self.init_proposal_boxes = learned_proposals(
            cfg.num_proposals * cfg.query_groups, d)
        self.head = DynamicHead(
            cfg.num_heads, num_classes=cfg.num_classes, d=d, nheads=cfg.nheads,
            ffn=cfg.dim_feedforward, dim_dynamic=cfg.dim_dynamic, num_cls=cfg.num_cls,
            num_reg=cfg.num_reg, resolution=cfg.pooler_resolution, dropout=cfg.dropout)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)

    def class_heads(self) -> dict[str, str]:
        return {f"head.head_series.{i}.class_logits": "classes"
                for i in range(len(self.head.head_series))}

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        x, mask, sizes = pad_for_pyramid(images)
        feats = self.backbone(x, mask)
        pyramid = self.fpn({str(i): f for i, (f, _) in enumerate(feats)})
        plan = plan_queries(self, targets)
        k = cfg.num_proposals * plan.groups
        prefix = None if plan.dn is None else (self.dn_label(plan.dn.labels), plan.dn.boxes)
        out = decode_proposals(self.head, self.init_proposal_features.weight[:k],
                               self.init_proposal_boxes.weight[:k], list(pyramid.values()),
                               sizes, cfg.aux_loss, prefix, plan.mask)            # P2..P5
        return plan.finish(out, self.dn_label)


SPEC = MethodSpec(Config, SparseRCNN)
