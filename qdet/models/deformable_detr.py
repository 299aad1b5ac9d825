"""Deformable DETR: Deformable Transformers for End-to-End Object Detection (Zhu et al.,
ICLR 2021). https://arxiv.org/abs/2010.04159

What differs from DETR:
- Multi-scale features: backbone C3-C5 plus one extra stride-2 level (4 levels), each
  projected to the model width with GroupNorm; a learned level embedding is added to the
  sine position encoding (which here counts pixel centres: offset -0.5).
- Attention samples a few points around a reference point per head and level (multi-scale
  deformable attention, ``qdet.ops.deform_attn``), in the encoder (reference = each pixel's
  centre, corrected for padding by the valid ratios) and in the decoder's cross-attention
  (reference = sigmoid of a linear layer on the query's positional half). Decoder
  self-attention stays standard. Layers are post-norm; there is no final decoder norm.
- ``with_box_refine``: each decoder layer's own box head refines the reference box, detached
  between layers. ``two_stage``: the encoder scores every position as a proposal
  (object-vs-background, ``enc_outputs``), and the top-k proposals become the decoder's
  reference boxes and, through their sine embedding, its queries (needs box refinement,
  as in the official code).
- Sigmoid focal loss with the focal class cost, top-100 over queries x classes at inference.

Training-only queries (``qdet.blocks.denoising``): a denoising query's content is the
embedding of its noised label; its reference is the noised box (two-stage, where queries
are boxes) or its centre (otherwise, where learned reference points are points), and its
positional query comes from it the way the method's own do (two-stage: the proposals'
``pos_trans``; otherwise the sine embedding of the centre through a small MLP, ``dn_pos``).
Query groups: each has its own rows of ``query_embed``; in two-stage models, where queries
are the encoder's top-k proposals, group g takes the proposals ranked g*k to (g+1)*k-1, so
group 0 is what inference runs (as H-DETR's one-to-many branch takes more proposals).

The encoder and decoder layers, the multi-scale input and the two-stage proposals are in
``qdet.blocks.layers`` (Efficient DETR builds on them too). Module names follow the official
repository, so its checkpoints load after renaming the backbone prefix and dropping the
decoder's aliases of the shared heads (``qdet.weights.official``).
"""
from __future__ import annotations

import copy
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
    """Deformable DETR (R50, 4 levels) as in the paper (``qdet.engine.presets`` holds the built-in
    data's preset)."""
    num_classes: int = 91
    backbone: str = "resnet50"
    dilation: bool = False
    frozen_bn: bool = True
    backbone_trainable: int = 3
    num_feature_levels: int = 4
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        layer = (d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nheads)
        self.encoder = DeformableEncoder(*layer, cfg.enc_n_points, cfg.enc_layers)
        self.decoder = DeformableDecoder(*layer, cfg.dec_n_points, cfg.dec_layers)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        if cfg.two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.reference_points = nn.Linear(d, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not cfg.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        # denoising queries' positional query from their reference point (two-stage models
        # derive theirs from their boxes with pos_trans, as their proposals)
        self.dn_pos = MLP(d, d, d, 2) if cfg.dn.enabled and not cfg.two_stage else None

    def dn_queries(self, content, boxes):
        """``(content, positional query, reference)`` of denoising queries."""
        d = self.cfg.d_model
        if self.cfg.two_stage:
            emb = sine_embed_points(boxes, d // 2, y_first=False)
            return content, self.pos_trans_norm(self.pos_trans(emb))[..., :d], boxes
        centre = boxes[..., :2]
        return content, self.dn_pos(sine_embed_points(centre, d // 2)), centre

    def forward(self, srcs, masks, pos, query_embed, class_embed, bbox_embed, groups=1,
                prefix=None, self_mask=None):
        """Returns (hs [L,B,Q,d], initial reference, references after each layer,
        encoder outputs or None). ``groups`` query groups of ``num_queries``, after
        ``prefix`` (content, noised boxes) denoising queries."""
        src, pad, pos, shapes, ratios = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(src, pos, shapes, ratios, pad)
        b, d = memory.shape[0], memory.shape[2]
        enc = None
        if self.cfg.two_stage:
            props, out_mem = encoder_proposals(memory, pad, shapes)
            out_mem = self.enc_output_norm(self.enc_output(out_mem))
            enc_logits = class_embed[self.cfg.dec_layers](out_mem)
            enc_coords = bbox_embed[self.cfg.dec_layers](out_mem) + props         # logit space
            enc = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
            top = enc_logits[..., 0].topk(self.cfg.num_queries * groups, dim=1)[1]
            coords = torch.gather(enc_coords, 1, top[..., None].expand(-1, -1, 4)).detach()
            ref = coords.sigmoid()
            emb = sine_embed_points(ref, d // 2, y_first=False)
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(emb)).split(d, dim=-1)
        else:
            query_pos, tgt = query_embed.split(d, dim=-1)
            query_pos = query_pos[None].expand(b, -1, -1)
            tgt = tgt[None].expand(b, -1, -1)
            ref = self.reference_points(query_pos).sigmoid()
        if prefix is not None:
            tgt, query_pos, ref = (torch.cat([p.to(t.dtype), t], 1) for p, t in
                                   zip(self.dn_queries(*prefix), (tgt, query_pos, ref)))
        refiner = bbox_embed if self.cfg.with_box_refine else None
        hs, refs = self.decoder(tgt, query_pos, ref, memory, shapes, ratios, pad, refiner,
                                self_mask)
        return hs, ref, refs, enc


# -------------------------------------------------------------------------- model


class DeformableDETR(Detector):
    arch = "deformable"
    title = "Deformable DETR"

    @classmethod
    def title_for(cls, config: dict) -> str:
        if config.get("two_stage"):
            return f"{cls.title} (two-stage)"
        return cls.title + (" (box refinement)" if config.get("with_box_refine") else "")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.two_stage and not cfg.with_box_refine:
            raise ValueError("two_stage needs with_box_refine (as in the official code): "
                             "set both")
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        self.backbone, self.input_proj = multiscale_input(
            cfg.backbone, cfg.dilation, cfg.frozen_bn, cfg.backbone_trainable, d,
            cfg.num_feature_levels)
        self.transformer = Transformer(cfg)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries * cfg.query_groups, 2 * d)
        class_head, box_head = nn.Linear(d, cfg.num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        n_pred = cfg.dec_layers + (1 if cfg.two_stage else 0)
        if cfg.with_box_refine:  # one head per layer (as the official code's init)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(n_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(n_pred))
            for j, head in enumerate(self.bbox_embed):
                if j > 0 or cfg.two_stage:
                    nn.init.zeros_(head.layers[-1].bias[2:])
        else:  # one head shared by every layer
            self.class_embed = nn.ModuleList([class_head] * n_pred)
            self.bbox_embed = nn.ModuleList([box_head] * n_pred)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)

    def class_heads(self) -> dict[str, str]:
        """One head per prediction (shared by all without box refinement); the two-stage
        encoder's, last, scores objectness when trained class-agnostic (as the official)."""
        cfg = self.config
        return {f"class_embed.{i}": "object" if (cfg.two_stage and i == cfg.dec_layers
                                                 and cfg.loss.enc_class_agnostic) else "classes"
                for i in range(len(self.class_embed))}

    def features(self, images):
        """Projected multi-scale maps, their padding masks and position encodings."""
        return multiscale_features(self.backbone, self.input_proj, images, self.config.d_model)

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        srcs, masks, pos = self.features(images)
        plan = plan_queries(self, targets)
        query = None if cfg.two_stage else self.query_embed.weight[:cfg.num_queries * plan.groups]
        prefix = None
        if plan.dn is not None:
            prefix = (self.dn_label(plan.dn.labels), plan.dn.boxes)
        hs, ref0, refs, enc = self.transformer(srcs, masks, pos, query, self.class_embed,
                                               self.bbox_embed, plan.groups, prefix, plan.mask)
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            ref = ref0 if lvl == 0 else refs[lvl - 1]
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(box_from_reference(self.bbox_embed[lvl](hs[lvl]), ref))
        logits, boxes = torch.stack(logits), torch.stack(boxes)
        out = layer_outputs(logits, boxes, cfg.aux_loss)
        if enc is not None:
            out["enc_outputs"] = enc
        return plan.finish(out, self.dn_label, self.transformer.dn_pos)


SPEC = MethodSpec(Config, DeformableDETR)
