"""Anchor DETR: Query Design for Transformer-Based Detector (Wang et al., AAAI 2022).
https://arxiv.org/abs/2109.07107

What differs from DETR:
- Object queries come from anchor points: 2-d points (learned, initialized uniformly, or a
  fixed grid) encoded with the features' sine function and an MLP (Q_p = g(Pos_q)). Several
  pattern embeddings per point are the queries' initial content, so each point can predict
  several objects: queries = patterns x points (paper: 3 x 300), pattern-major. Boxes are
  offsets from the anchor point in inverse-sigmoid space; anchors are not refined.
- Row-Column Decoupled Attention (RCDA) in the encoder and the decoder's cross-attention:
  1-d attention over the width (keys averaged over the height) and over the height (keys
  averaged over the width), with 1-d sine position encodings per axis; the value map is
  summed over one axis with one set of weights and then over the other (the shorter axis
  last, which keeps the intermediate at Nq x min(H, W) x C). ``attention='standard'`` keeps
  ordinary attention with 2-d encodings, as in the paper's comparison.
- One C5 level (optionally dilated: DC5), GroupNorm after the input projection; focal loss;
  paper defaults: 6+6 layers, FFN 1024, dropout 0.

Training-only queries (``qdet.blocks.denoising``): a denoising query's anchor point is its
noised box's centre (encoded as the anchors are) and its content the embedding of its noised
label; query groups each have their own anchor points and pattern embeddings (a fixed grid
is shared).

Module names follow the official repository (megvii-research/AnchorDETR), whose checkpoints
load without renaming (``qdet.weights.official``). Its training script dilates by default: C5 and DC5
checkpoints have identical keys, so say which one you load (``args.dilation`` in the file, or
"dc5" in its name).
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
from ..blocks.position_encoding import sine_embed_points


@dataclass
class Config:
    """Anchor DETR (R50-C5, RCDA) as in the paper (``qdet.engine.presets`` holds the built-in data's
    preset)."""
    num_classes: int = 91
    backbone: str = "resnet50"
    backbone_layer: int = 4          # stage feeding the transformer (3 = stride 16)
    dilation: bool = False           # True: DC5 (the official training script's default)
    frozen_bn: bool = True
    backbone_trainable: int = 3
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    num_anchors: int = 300
    num_patterns: int = 3
    spatial_prior: str = "learned"   # or "grid": a fixed sqrt(num_anchors)^2 grid
    attention: str = "rcda"          # or "standard"
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)
    dn: DNConfig = field(default_factory=DNConfig)           # denoising training
    query_groups: int = 1                                      # Group DETR (1: off)

    @property
    def num_queries(self) -> int:
        return self.num_patterns * self.num_anchors


def axis_positions(mask: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cell centres along each axis, normalized by the valid length: ``(y [B,H], x [B,W])``
    from the first column and row of the padding mask (padded cells continue the count);
    float32, or float64 for a float64 model (never a half type: it counts cells)."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    not_mask = ~mask
    y = not_mask[:, :, 0].cumsum(1, dtype=dtype)
    x = not_mask[:, 0, :].cumsum(1, dtype=dtype)
    return (y - 0.5) / y[:, -1:], (x - 0.5) / x[:, -1:]


def sine_1d(coord: Tensor, num_feats: int) -> Tensor:
    return sine_embed_points(coord[..., None], num_feats, y_first=False)


class RCDA(nn.Module):
    """Row-column decoupled attention. ``in_proj_weight`` stacks five d x d projections:
    row (x) query, column (y) query, row key, column key, value (the official layout)."""

    def __init__(self, d: int, nheads: int, dropout: float):
        super().__init__()
        self.nheads, self.dropout = nheads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(5 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q_row, q_col, k_row, k_col, value, pad):
        """q_*: [B,L,d]; k_*, value: [B,H,W,d]; pad: [B,H,W] -> [B,L,d]."""
        b, lq, d = q_row.shape
        _, h, w, _ = value.shape
        m = self.nheads
        dh = d // m
        wq_r, wq_c, wk_r, wk_c, wv = self.in_proj_weight.chunk(5)
        bq_r, bq_c, bk_r, bk_c, bv = self.in_proj_bias.chunk(5)
        heads = lambda t: t.view(b, t.shape[1], m, dh).transpose(1, 2)  # noqa: E731
        qx = heads(F.linear(q_row, wq_r, bq_r) * dh ** -0.5)                  # [B,m,L,dh]
        qy = heads(F.linear(q_col, wq_c, bq_c) * dh ** -0.5)
        kx = heads(F.linear(k_row, wk_r, bk_r).mean(1))                       # [B,m,W,dh]
        ky = heads(F.linear(k_col, wk_c, bk_c).mean(2))                       # [B,m,H,dh]
        v = F.linear(value, wv, bv).view(b, h, w, m, dh).permute(0, 3, 1, 2, 4)  # [B,m,H,W,dh]
        ax = (qx @ kx.transpose(-1, -2)).masked_fill(pad[:, None, None, 0, :], float("-inf"))
        ay = (qy @ ky.transpose(-1, -2)).masked_fill(pad[:, None, None, :, 0], float("-inf"))
        ax = F.dropout(ax.softmax(-1), self.dropout, self.training)            # [B,m,L,W]
        ay = F.dropout(ay.softmax(-1), self.dropout, self.training)            # [B,m,L,H]
        if h < w:  # sum over W first, then over the shorter H
            z = (ax @ v.transpose(2, 3).reshape(b, m, w, h * dh)).view(b, m, lq, h, dh)
            out = (ay[..., None, :] @ z).squeeze(-2)
        else:      # sum over H first, then over the shorter W
            z = (ay @ v.reshape(b, m, h, w * dh)).view(b, m, lq, w, dh)
            out = (ax[..., None, :] @ z).squeeze(-2)                            # [B,m,L,dh]
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class FFN(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm2(x + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(x))))))


def attention(cfg: Config) -> nn.Module:
    """The layer attention to the feature map: RCDA, or standard attention (the paper's
    comparison)."""
    if cfg.attention == "rcda":
        return RCDA(cfg.d_model, cfg.nheads, cfg.dropout)
    return nn.MultiheadAttention(cfg.d_model, cfg.nheads, dropout=cfg.dropout, batch_first=True)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.rcda = cfg.attention == "rcda"
        self.self_attn = attention(cfg)
        self.dropout1, self.norm1 = nn.Dropout(cfg.dropout), nn.LayerNorm(d)
        self.ffn = FFN(d, cfg.dim_feedforward, cfg.dropout)

    def forward(self, src, pad, pos_row, pos_col, pos_2d):
        # src: [B,H,W,d]; pos_row [B,1,W,d], pos_col [B,H,1,d]; pos_2d [B,H,W,d]
        b, h, w, d = src.shape
        if self.rcda:
            kr, kc = src + pos_row, src + pos_col
            out = self.self_attn(kr.reshape(b, h * w, d), kc.reshape(b, h * w, d), kr, kc, src, pad)
        else:
            q = (src + pos_2d).reshape(b, h * w, d)
            out = self.self_attn(q, q, src.reshape(b, h * w, d), key_padding_mask=pad.flatten(1),
                                 need_weights=False)[0]
        return self.ffn(self.norm1(src + self.dropout1(out.view(b, h, w, d))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.rcda = cfg.attention == "rcda"
        self.cross_attn = attention(cfg)
        self.dropout1, self.norm1 = nn.Dropout(cfg.dropout), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(cfg.dropout), nn.LayerNorm(d)
        self.ffn = FFN(d, cfg.dim_feedforward, cfg.dropout)

    def forward(self, tgt, qpos, qpos_x, qpos_y, mem, pad, pos_row, pos_col, pos_2d,
                self_mask: QueryMask | None = None):
        q = tgt + qpos
        blocked = None if self_mask is None else \
            self_mask.for_mha(self.self_attn.num_heads)[0]
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, attn_mask=blocked,
                                                            need_weights=False)[0]))
        if self.rcda:
            out = self.cross_attn(tgt + qpos_x, tgt + qpos_y, mem + pos_row, mem + pos_col, mem,
                                  pad)
        else:
            b, h, w, d = mem.shape
            out = self.cross_attn(tgt + qpos, (mem + pos_2d).reshape(b, h * w, d),
                                  mem.reshape(b, h * w, d), key_padding_mask=pad.flatten(1),
                                  need_weights=False)[0]
        return self.ffn(self.norm1(tgt + self.dropout1(out)))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.pattern = nn.Embedding(cfg.num_patterns * cfg.query_groups, d)
        if cfg.spatial_prior == "learned":
            self.position = nn.Embedding(cfg.num_anchors * cfg.query_groups, 2)
            nn.init.uniform_(self.position.weight, 0, 1)
        elif cfg.spatial_prior != "grid":
            raise ValueError("spatial_prior must be 'learned' or 'grid', got "
                             f"{cfg.spatial_prior!r}")
        self.adapt_pos2d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        class_head, box_head = nn.Linear(d, cfg.num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        with torch.no_grad():
            box_head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, -2.0, -2.0]))
        # one head shared by every decoder layer (the official layout repeats it)
        self.class_embed = nn.ModuleList([class_head] * cfg.dec_layers)
        self.bbox_embed = nn.ModuleList([box_head] * cfg.dec_layers)

    def anchors(self, device, group: int = 0) -> Tensor:
        """Anchor points ``[A, 2]`` (x, y) in [0, 1] of query group ``group``."""
        if self.cfg.spatial_prior == "learned":
            a = self.cfg.num_anchors
            return self.position.weight[group * a:(group + 1) * a]
        n = round(math.sqrt(self.cfg.num_anchors))
        c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        gx, gy = torch.meshgrid(c, c, indexing="ij")  # x varies slowest, as the official grid
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)

    def queries(self, device, groups: int) -> tuple[Tensor, Tensor]:
        """Reference points ``[K*Q, 2]`` and content ``[K*Q, d]`` of ``groups`` query groups,
        each pattern-major (patterns x anchors)."""
        refs, tgts = [], []
        p = self.cfg.num_patterns
        for g in range(groups):
            anchors = self.anchors(device, g)
            refs.append(anchors.repeat(p, 1))
            tgts.append(self.pattern.weight[g * p:(g + 1) * p].repeat_interleave(
                anchors.shape[0], 0))
        return torch.cat(refs), torch.cat(tgts)

    def forward(self, src: Tensor, mask: Tensor, groups: int = 1, prefix=None,
                self_mask: QueryMask | None = None):
        """src [B,d,H,W], mask [B,H,W] -> per-layer logits and boxes ``[L,B,Q,*]``;
        ``groups`` query groups, after ``prefix`` (content, anchor point) queries."""
        cfg, d = self.cfg, self.cfg.d_model
        b = src.shape[0]
        y, x = axis_positions(mask, src.dtype)
        pos_row = pos_col = pos_2d = None
        if cfg.attention == "rcda":
            pos_row = self.adapt_pos1d(sine_1d(x, d))[:, None]                # [B,1,W,d]
            pos_col = self.adapt_pos1d(sine_1d(y, d))[:, :, None]             # [B,H,1,d]
        else:
            h, w = mask.shape[1:]
            xy = torch.stack([x[:, None, :].expand(b, h, w), y[:, :, None].expand(b, h, w)], -1)
            pos_2d = self.adapt_pos2d(sine_embed_points(xy, d // 2))           # [B,H,W,d]
        mem = src.permute(0, 2, 3, 1)
        for layer in self.encoder_layers:
            mem = layer(mem, mask, pos_row, pos_col, pos_2d)
        ref, tgt = self.queries(src.device, groups)
        ref, tgt = ref[None].expand(b, -1, -1), tgt[None].expand(b, -1, -1)
        if prefix is not None:
            tgt, ref = (torch.cat([p.to(t.dtype), t], 1) for p, t in zip(prefix, (tgt, ref)))
        qpos = self.adapt_pos2d(sine_embed_points(ref, d // 2))
        qpos_x = self.adapt_pos1d(sine_1d(ref[..., 0], d))
        qpos_y = self.adapt_pos1d(sine_1d(ref[..., 1], d))
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            tgt = layer(tgt, qpos, qpos_x, qpos_y, mem, mask, pos_row, pos_col, pos_2d,
                        self_mask)
            logits.append(self.class_embed[i](tgt))
            boxes.append(box_from_reference(self.bbox_embed[i](tgt), ref))
        return torch.stack(logits), torch.stack(boxes)


class AnchorDETR(Detector):
    arch = "anchor"
    title = "Anchor DETR"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        self.transformer = Transformer(cfg)
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)
        self.backbone = Backbone(cfg.backbone, (cfg.backbone_layer,), cfg.dilation,
                                 cfg.frozen_bn, cfg.backbone_trainable)
        conv = nn.Conv2d(self.backbone.channels[-1], d, kernel_size=1)
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)
        self.input_proj = nn.ModuleList([nn.Sequential(conv, nn.GroupNorm(32, d))])

    def class_heads(self) -> dict[str, str]:
        return {f"transformer.class_embed.{i}": "classes"
                for i in range(len(self.transformer.class_embed))}

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        x, mask = batch_images(images)
        (feat, mask), = self.backbone(x, mask)
        plan = plan_queries(self, targets)
        prefix = None
        if plan.dn is not None:   # the noised centre is the anchor point
            prefix = (self.dn_label(plan.dn.labels), plan.dn.boxes[..., :2])
        logits, boxes = self.transformer(self.input_proj[0](feat), mask, plan.groups, prefix,
                                         plan.mask)
        return plan.finish(layer_outputs(logits, boxes, self.config.aux_loss), self.dn_label)


SPEC = MethodSpec(Config, AnchorDETR)
