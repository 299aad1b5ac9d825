"""Efficient DETR: Improving End-to-End Object Detector with Dense Prior (Yao et al., 2021).
https://arxiv.org/abs/2104.01318 -- no official code; built from the paper as follows.

Design points and where they come from (the paper's tables and figures; its method text was
not available when this was written, so section numbers are not given):
- Structure (abstract, Fig. 5): a dense part (backbone + multi-scale deformable encoder, 3
  layers) and a sparse part (deformable decoder, 1 layer; a cascade of 6 as an option,
  Table 2). The layers are Deformable DETR's (``qdet.blocks.layers``).
- Dense prediction (Fig. 3, Fig. 5): one detection head (class + box) runs over every encoder
  position of every level. The same head serves the sparse part ("the same final detection
  head", Fig. 5). Boxes are relative to each position's anchor.
- Dense prior ("object containers", Fig. 3(c), Table 4): the top-k positions by class
  score (k = number of queries, 300 as in Tables 5 and 8) give the decoder its 4-d reference
  boxes (the dense boxes) and its object queries' content (the encoder features at those
  positions).
- Set loss on both parts with one-to-one Hungarian matching and the focal class cost shared
  with the other methods; the dense part's loss is reported separately (``loss_*_enc``).
- Ablation switches (Table 4): ``ref_init`` = "box" (4-d, the default), "point" (2-d
  centres of the dense boxes) or "learned" (Deformable DETR's reference points from learned
  query embeddings); ``query_init`` = "dense" (encoder features, the default) or "learned".

Where the paper is silent, the choice made here:
- Levels: Deformable DETR's 4 (C3-C5 plus a stride-2 level), no FPN.
- Anchors: one per position, centred on it with side 0.05 * 2^level; a box is
  sigmoid(anchor logit + head delta), positions near the border or in padding are invalid
  (Deformable DETR's two-stage proposals).
- Top-k score: the maximum class logit of a position; no NMS.
- Query position: sine embedding of the reference box, through a linear layer and LayerNorm.
- Gradients: the selected boxes are detached; the gathered features too by default
  (``detach_query``), an option since re-implementations differ here.
- The dense head reads the encoder memory directly (no extra projection); the training recipe
  follows Deformable DETR (AdamW 2e-4, backbone 2e-5) over the paper's 36 epochs.

Training-only queries (``qdet.blocks.denoising``): a denoising query's reference is its
noised box (its centre with ``ref_init`` "point" or "learned"), its positional query the
dense boxes' ``pos_trans`` of that box, its content the embedding of its noised label. Query
groups: group g takes the positions ranked g*k to (g+1)*k-1 (group 0 is what inference
runs), and its own rows of ``query_embed`` where queries are learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks.base import (
    MLP,
    Detector,
    LossConfig,
    MethodSpec,
    box_from_reference,
    focal_loss_config,
    layer_outputs,
)
from ..blocks.denoising import DNConfig, check_query_groups, dn_modules, plan_queries
from ..blocks.layers import (
    DeformableDecoder,
    DeformableEncoder,
    encoder_proposals,
    flatten_levels,
    multiscale_features,
    multiscale_input,
)
from ..blocks.position_encoding import sine_embed_points
from ..ops.deform_attn import MSDeformAttn


@dataclass
class Config:
    """Efficient DETR-R50 (3 encoder layers, 1 decoder layer, 300 queries)."""
    num_classes: int = 91
    backbone: str = "resnet50"
    dilation: bool = False
    frozen_bn: bool = True
    backbone_trainable: int = 3
    num_feature_levels: int = 4
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 3
    dec_layers: int = 1
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    ref_init: str = "box"           # "box" | "point" | "learned"  (Table 4)
    query_init: str = "dense"       # "dense" | "learned"
    detach_query: bool = True
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)


class EfficientDETR(Detector):
    arch = "efficient"
    title = "Efficient DETR"
    compiled_parts = ("encoder", "decoder")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.ref_init not in ("box", "point", "learned"):
            raise ValueError(f"ref_init must be 'box', 'point' or 'learned', got {cfg.ref_init!r}")
        if cfg.query_init not in ("dense", "learned"):
            raise ValueError(f"query_init must be 'dense' or 'learned', got {cfg.query_init!r}")
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        # backbone, input projections and position encodings exactly as Deformable DETR's
        self.backbone, self.input_proj = multiscale_input(
            cfg.backbone, cfg.dilation, cfg.frozen_bn, cfg.backbone_trainable, d,
            cfg.num_feature_levels)
        layer = (d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nheads)
        self.encoder = DeformableEncoder(*layer, cfg.enc_n_points, cfg.enc_layers)
        self.decoder = DeformableDecoder(*layer, cfg.dec_n_points, cfg.dec_layers)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.pos_trans, self.pos_trans_norm = nn.Linear(d, d), nn.LayerNorm(d)
        if cfg.ref_init == "learned" or cfg.query_init == "learned":
            self.query_embed = nn.Embedding(cfg.num_queries * cfg.query_groups, 2 * d)
            self.reference_points = nn.Linear(d, 2)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        # one detection head for the dense and the sparse part
        self.class_embed, self.bbox_embed = nn.Linear(d, cfg.num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg, d = self.config, self.config.d_model
        srcs, masks, pos = multiscale_features(self.backbone, self.input_proj, images, d)
        src, pad, pos, shapes, ratios = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(src, pos, shapes, ratios, pad)
        b = memory.shape[0]
        plan = plan_queries(self, targets)
        k = cfg.num_queries * plan.groups

        # dense part: the shared head at every position, boxes from per-position anchors
        anchors, dense_mem = encoder_proposals(memory, pad, shapes)
        dense_logits = self.class_embed(dense_mem)
        dense_coords = self.bbox_embed(dense_mem) + anchors                     # logit space
        dense = {"pred_logits": dense_logits, "pred_boxes": dense_coords.sigmoid()}

        # dense prior: the top-k positions initialise the sparse part
        score = dense_logits.max(-1).values.masked_fill(torch.isinf(anchors[..., 0]), -1e4)
        top = score.topk(k, dim=1).indices
        boxes = torch.gather(dense_coords, 1, top[..., None].expand(-1, -1, 4)).detach().sigmoid()
        if cfg.query_init == "dense":
            tgt = torch.gather(memory, 1, top[..., None].expand(-1, -1, d))
            if cfg.detach_query:
                tgt = tgt.detach()
        else:
            tgt = self.query_embed.weight[None, :k, d:].expand(b, -1, -1)
        if cfg.ref_init == "learned":
            query_pos = self.query_embed.weight[None, :k, :d].expand(b, -1, -1)
            ref = self.reference_points(query_pos).sigmoid()
        else:
            ref = boxes if cfg.ref_init == "box" else boxes[..., :2]
            query_pos = self.pos_trans_norm(self.pos_trans(
                sine_embed_points(boxes, d // 4, y_first=False)))

        if plan.dn is not None:  # [denoising | matching], placed as the dense boxes are
            dn_boxes = plan.dn.boxes
            dn_pos = self.pos_trans_norm(self.pos_trans(
                sine_embed_points(dn_boxes, d // 4, y_first=False)))
            dn_ref = dn_boxes if cfg.ref_init == "box" else dn_boxes[..., :2]
            tgt, query_pos, ref = (torch.cat([p.to(t.dtype), t], 1) for p, t in zip(
                (self.dn_label(plan.dn.labels), dn_pos, dn_ref), (tgt, query_pos, ref)))

        # sparse part: deformable decoder refining the references with the shared head
        refine = [self.bbox_embed] * cfg.dec_layers
        hs, refs = self.decoder(tgt, query_pos, ref, memory, shapes, ratios, pad, refine,
                                plan.mask)
        logits = torch.stack([self.class_embed(h) for h in hs])
        boxes = torch.stack([box_from_reference(self.bbox_embed(h), r)
                             for h, r in zip(hs, [ref, *refs[:-1]])])
        return plan.finish({**layer_outputs(logits, boxes, cfg.aux_loss), "enc_outputs": dense},
                           self.dn_label)


SPEC = MethodSpec(Config, EfficientDETR)
