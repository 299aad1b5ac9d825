"""DETR: End-to-End Object Detection with Transformers (Carion et al., ECCV 2020).
https://arxiv.org/abs/2005.12872

A CNN feature map (one level) goes through a transformer encoder; a decoder turns a fixed
set of learned object queries into one prediction each, trained with a set loss over a
Hungarian matching. Sine positional encodings are added to queries and keys in every
attention layer (paper Fig. 10); the decoder starts from zeros; layers are post-norm; every
decoder layer is supervised (auxiliary losses). The first decoder layer's self-attention
only sees zeros and may be skipped (paper appendix, ``skip_first_self_attn``).

Training-only queries (``qdet.blocks.denoising``): a denoising query's content is the
embedding of its noised label and its positional query the sine embedding of its noised box
through a small MLP (``dn_pos``), in place of a learned query embedding; query groups each
have their own rows of ``query_embed``.

The module and parameter names follow the official repository, so its checkpoints load by
renaming the backbone prefix alone (``qdet.weights.official``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.backbone import Backbone
from ..blocks.base import MLP, Detector, LossConfig, MethodSpec, batch_images, layer_outputs
from ..blocks.denoising import DNConfig, QueryMask, check_query_groups, dn_modules, plan_queries
from ..blocks.layers import DETREncoder
from ..blocks.position_encoding import sine_embed_points, sine_position_embedding


@dataclass
class Config:
    """DETR-R50 as in the paper (``qdet.engine.presets`` holds the built-in data's preset)."""
    num_classes: int = 91            # COCO's ids run to 90; label = category id for COCO
    backbone: str = "resnet50"
    backbone_layer: int = 4          # stage feeding the transformer (3 = stride 16)
    dilation: bool = False           # DC5: dilate the last stage instead of striding
    frozen_bn: bool = True
    backbone_trainable: int = 3      # stages from layer4 down that are trained
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    aux_loss: bool = True
    skip_first_self_attn: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, pre_norm: bool,
                 self_attn: bool = True):
        super().__init__()
        self.self_attn = (nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
                          if self_attn else None)
        self.multihead_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                pad: Tensor | None, self_mask: QueryMask | None = None) -> Tensor:
        # tgt, query_pos: [B,Q,d]; memory, pos: [B,HW,d]
        if self.self_attn is not None:
            x = self.norm1(tgt) if self.pre_norm else tgt
            q = x + query_pos
            blocked = None if self_mask is None else \
                self_mask.for_mha(self.self_attn.num_heads)[0]
            tgt = tgt + self.dropout1(self.self_attn(q, q, x, attn_mask=blocked,
                                                     need_weights=False)[0])
            if not self.pre_norm:
                tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(
            x + query_pos, memory + pos, memory, key_padding_mask=pad, need_weights=False)[0])
        if not self.pre_norm:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.pre_norm else self.norm3(tgt)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm,
                         self_attn=not (i == 0 and cfg.skip_first_self_attn))
            for i in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tgt, memory, pos, query_pos, pad, self_mask=None) -> Tensor:
        """Returns the normalized output of every layer, ``[L,B,Q,d]``."""
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, pad, self_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs)


class Transformer(nn.Module):
    """DETR's encoder-decoder; the part that ``--compile`` compiles."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = DETREncoder(cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                   cfg.enc_layers, cfg.pre_norm)
        self.decoder = Decoder(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query: Tensor, pos: Tensor,
                tgt: Tensor | None = None, self_mask: QueryMask | None = None) -> Tensor:
        # src, pos: [B,d,H,W] -> [B,HW,d]; mask: [B,H,W]; query: [Q,d] or [B,Q,d]; tgt: the
        # queries' content, zeros unless given
        b = src.shape[0]
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        pad = mask.flatten(1)
        memory = self.encoder(src, pos, pad)
        if query.dim() == 2:
            query = query[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query) if tgt is None else tgt
        return self.decoder(tgt, memory, pos, query, pad, self_mask)


class DETR(Detector):
    arch = "detr"
    title = "DETR"
    focal = False       # softmax over C classes + "no object"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, (cfg.backbone_layer,), cfg.dilation,
                                 cfg.frozen_bn, cfg.backbone_trainable)
        self.input_proj = nn.Conv2d(self.backbone.channels[-1], d, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries * cfg.query_groups, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)
        self.dn_pos = MLP(2 * d, d, d, 2) if self.dn_label is not None else None

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        x, mask = batch_images(images)
        (feat, mask), = self.backbone(x, mask)
        pos = sine_position_embedding(mask, cfg.d_model // 2).to(feat.dtype)
        plan = plan_queries(self, targets)
        query = self.query_embed.weight[:cfg.num_queries * plan.groups]
        tgt = None
        if plan.dn is not None:   # [denoising | matching]: content and positional parts
            query = query[None].expand(x.shape[0], -1, -1)
            dn_query = self.dn_pos(sine_embed_points(plan.dn.boxes, cfg.d_model // 2))
            query = torch.cat([dn_query.to(query.dtype), query], 1)
            tgt = torch.cat([self.dn_label(plan.dn.labels),
                             query.new_zeros(query.shape[0], query.shape[1] - plan.n_dn,
                                             query.shape[2])], 1)
        hs = self.transformer(self.input_proj(feat), mask, query, pos, tgt, plan.mask)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()  # [L,B,Q,*]
        return plan.finish(layer_outputs(logits, boxes, cfg.aux_loss), self.dn_label,
                           self.dn_pos)


SPEC = MethodSpec(Config, DETR)
