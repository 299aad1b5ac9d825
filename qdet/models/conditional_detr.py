"""Conditional DETR for Fast Training Convergence (Meng et al., ICCV 2021).
https://arxiv.org/abs/2108.06152

What differs from DETR (same backbone and encoder):
- Each object query has a 2-d reference point s = sigmoid(MLP(query embedding)), shared by
  all decoder layers. Its sine embedding p_s (the keys' encoding) is scaled element-wise by
  lambda_q = FFN(decoder embedding) (1 in the first layer): the conditional spatial query.
- Cross-attention concatenates content and spatial parts per head instead of adding them,
  for queries [c_q ; p_q] and keys [c_k ; p_k], so a head's weight is c_q.c_k + p_q.p_k;
  values are the content keys. The first layer also adds the query's and key's positions to
  their content parts (the paper keeps DETR's first-layer behaviour).
- Boxes are offsets from the reference point in inverse-sigmoid space.
- Sigmoid focal loss and focal class cost, 300 queries, top-100 at inference.

Training-only queries (``qdet.blocks.denoising``): a denoising query's reference point is
its noised box's centre, its content the embedding of its noised label, and its positional
query the sine embedding of that centre through a small MLP (``dn_pos``); query groups each
have their own rows of ``query_embed``.

Module names follow the official repository (Atten4Vis/ConditionalDETR), so its
checkpoints load after renaming the backbone prefix (``qdet.weights.official``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.backbone import Backbone
from ..blocks.base import (
    MLP,
    Detector,
    LossConfig,
    MethodSpec,
    batch_images,
    box_from_reference,
    focal_loss_config,
    layer_outputs,
)
from ..blocks.denoising import DNConfig, QueryMask, check_query_groups, dn_modules, plan_queries
from ..blocks.layers import DETREncoder
from ..blocks.position_encoding import sine_embed_points, sine_position_embedding


@dataclass
class Config:
    """Conditional DETR-R50 as in the paper (``qdet.engine.presets`` holds the built-in data's
    preset)."""
    num_classes: int = 91
    backbone: str = "resnet50"
    backbone_layer: int = 4
    dilation: bool = False
    frozen_bn: bool = True
    backbone_trainable: int = 3
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 300
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)


class Attention(nn.Module):
    """Multi-head attention on already projected queries, keys and values (only the output
    projection has weights). Query/key and value head sizes may differ: the conditional
    cross-attention concatenates two halves per head for queries and keys only."""

    def __init__(self, v_dim: int, nheads: int, dropout: float):
        super().__init__()
        self.nheads, self.dropout = nheads, dropout
        self.out_proj = nn.Linear(v_dim, v_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None = None,
                blocked: Tensor | None = None) -> Tensor:
        """``pad [B,Lk]``: keys nobody attends to; ``blocked [B,Lq,Lk]``: pairs that may not
        attend (True)."""
        b, lq, _ = q.shape
        h = self.nheads
        q, k, v = (t.view(b, t.shape[1], h, t.shape[2] // h).transpose(1, 2) for t in (q, k, v))
        mask = None if pad is None else ~pad[:, None, None, :]       # True = attend
        if blocked is not None:
            mask = ~blocked[:, None] if mask is None else mask & ~blocked[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, first: bool):
        super().__init__()
        lin = lambda: nn.Linear(d, d)  # noqa: E731 - eleven identical projections
        self.sa_qcontent_proj, self.sa_qpos_proj = lin(), lin()
        self.sa_kcontent_proj, self.sa_kpos_proj, self.sa_v_proj = lin(), lin(), lin()
        self.self_attn = Attention(d, nheads, dropout)
        self.ca_qcontent_proj = lin()
        self.ca_qpos_proj = lin() if first else None
        self.ca_kcontent_proj, self.ca_kpos_proj, self.ca_v_proj = lin(), lin(), lin()
        self.ca_qpos_sine_proj = lin()
        self.cross_attn = Attention(d, nheads, dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.nheads = nheads

    def forward(self, tgt, memory, pos, query_pos, query_sine, pad,
                self_mask: QueryMask | None = None):
        # tgt, query_pos, query_sine: [B,Q,d]; memory, pos: [B,HW,d]; pad: [B,HW]
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        blocked = None if self_mask is None else self_mask.sdpa_blocked()
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt),
                                                            blocked=blocked)))

        q_content, k_content = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:  # first layer: DETR's added positions as well
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q = self._per_head_cat(q_content, self.ca_qpos_sine_proj(query_sine))     # [B,Q,2d]
        k = self._per_head_cat(k_content, k_pos)                                  # [B,HW,2d]
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(q, k, self.ca_v_proj(memory), pad)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))

    def _per_head_cat(self, content: Tensor, spatial: Tensor) -> Tensor:
        """[B,L,d] x 2 -> [B,L,2d] where head j gets [content_j ; spatial_j]."""
        b, n, d = content.shape
        h = self.nheads
        return torch.cat([content.view(b, n, h, d // h), spatial.view(b, n, h, d // h)],
                         -1).view(b, n, 2 * d)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(
            DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, first=i == 0)
            for i in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(d)
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(d, d, 2, 2)

    def forward(self, memory, pos, query_pos, pad, prefix=None, self_mask=None):
        """Returns every layer's normalized output ``[L,B,Q,d]`` and the reference points
        ``[B,Q,2]`` (x, y). ``prefix``: queries in front of the learned ones (denoising), as
        ``(content, positional query, reference point)``."""
        ref = self.ref_point_head(query_pos).sigmoid()
        tgt = torch.zeros_like(query_pos)
        if prefix is not None:
            tgt, query_pos, ref = (torch.cat([p.to(t.dtype), t], 1)
                                   for p, t in zip(prefix, (tgt, query_pos, ref)))
        sine = sine_embed_points(ref, query_pos.shape[-1] // 2)     # same space as the keys
        hs = []
        for i, layer in enumerate(self.layers):
            scale = 1.0 if i == 0 else self.query_scale(tgt)          # lambda_q
            tgt = layer(tgt, memory, pos, query_pos, sine * scale, pad, self_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs), ref


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        # DETR's encoder, post-norm as in the paper
        self.encoder = DETREncoder(cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                   cfg.enc_layers)
        self.decoder = Decoder(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query, pos, prefix=None, self_mask=None):
        b = src.shape[0]
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        pad = mask.flatten(1)
        memory = self.encoder(src, pos, pad)
        return self.decoder(memory, pos, query[None].expand(b, -1, -1), pad, prefix, self_mask)


class ConditionalDETR(Detector):
    arch = "conditional"
    title = "Conditional DETR"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, (cfg.backbone_layer,), cfg.dilation,
                                 cfg.frozen_bn, cfg.backbone_trainable)
        self.input_proj = nn.Conv2d(self.backbone.channels[-1], d, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries * cfg.query_groups, d)
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)
        self.dn_pos = MLP(d, d, d, 2) if self.dn_label is not None else None

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        x, mask = batch_images(images)
        (feat, mask), = self.backbone(x, mask)
        pos = sine_position_embedding(mask, cfg.d_model // 2).to(feat.dtype)
        plan = plan_queries(self, targets)
        prefix = None
        if plan.dn is not None:   # the noised centre is the reference point
            centre = plan.dn.boxes[..., :2]
            prefix = (self.dn_label(plan.dn.labels),
                      self.dn_pos(sine_embed_points(centre, cfg.d_model // 2)), centre)
        query = self.query_embed.weight[:cfg.num_queries * plan.groups]
        hs, ref = self.transformer(self.input_proj(feat), mask, query, pos, prefix, plan.mask)
        logits = self.class_embed(hs)
        boxes = box_from_reference(self.bbox_embed(hs), ref)   # one reference for all layers
        return plan.finish(layer_outputs(logits, boxes, cfg.aux_loss), self.dn_label,
                           self.dn_pos)


SPEC = MethodSpec(Config, ConditionalDETR)
