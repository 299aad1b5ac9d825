"""DETR: End-to-End Object Detection with Transformers (Carion et al., ECCV 2020).
https://arxiv.org/abs/2005.12872

A CNN feature map (one level) goes through a transformer encoder; a decoder turns a fixed
set of learned object queries into one prediction each, trained with a set loss over a
Hungarian matching. Sine positional encodings are added to queries and keys in every
attention layer (paper Fig. 10); the decoder starts from zeros; layers are post-norm; every
decoder layer is supervised (auxiliary losses). The first decoder layer's self-attention
only sees zeros and may be skipped (paper appendix, ``skip_first_self_attn``).

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
from ..blocks.layers import DETREncoder
from ..blocks.position_encoding import sine_position_embedding


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
                pad: Tensor | None) -> Tensor:
        # tgt, query_pos: [B,Q,d]; memory, pos: [B,HW,d]
        if self.self_attn is not None:
            x = self.norm1(tgt) if self.pre_norm else tgt
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
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

    def forward(self, tgt, memory, pos, query_pos, pad) -> Tensor:
        """Returns the normalized output of every layer, ``[L,B,Q,d]``."""
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, pad)
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

    def forward(self, src: Tensor, mask: Tensor, query: Tensor, pos: Tensor) -> Tensor:
        # src, pos: [B,d,H,W] -> [B,HW,d]; mask: [B,H,W]; query: [Q,d]
        b = src.shape[0]
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        pad = mask.flatten(1)
        memory = self.encoder(src, pos, pad)
        query = query[None].expand(b, -1, -1)
        return self.decoder(torch.zeros_like(query), memory, pos, query, pad)


class DETR(Detector):
    arch = "detr"
    focal = False       # softmax over C classes + "no object"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.backbone = Backbone(cfg.backbone, (cfg.backbone_layer,), cfg.dilation,
                                 cfg.frozen_bn, cfg.backbone_trainable)
        self.input_proj = nn.Conv2d(self.backbone.channels[-1], cfg.d_model, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.class_embed = nn.Linear(cfg.d_model, cfg.num_classes + 1)
        self.bbox_embed = MLP(cfg.d_model, cfg.d_model, 4, 3)

    def forward(self, images) -> dict:
        x, mask = batch_images(images)
        (feat, mask), = self.backbone(x, mask)
        pos = sine_position_embedding(mask, self.config.d_model // 2).to(feat.dtype)
        hs = self.transformer(self.input_proj(feat), mask, self.query_embed.weight, pos)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()  # [L,B,Q,*]
        return layer_outputs(logits, boxes, self.config.aux_loss)


SPEC = MethodSpec(Config, DETR)
