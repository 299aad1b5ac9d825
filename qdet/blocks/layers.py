"""Transformer blocks that more than one method builds on, with explicit constructor
arguments (no method's config):

- DETR's encoder (DETR, Conditional DETR);
- Deformable DETR's multi-scale input, its level flattening, its deformable encoder and
  decoder, and the per-position proposals of its two-stage variant (Deformable DETR,
  Efficient DETR).

Module and parameter names follow the official repositories, so their checkpoints load.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.deform_attn import MSDeformAttn
from ..ops.modes import exporting
from .backbone import Backbone
from .base import batch_images, box_from_reference, resize_mask
from .position_encoding import sine_position_embedding

# ------------------------------------------------------------------- DETR's encoder


class DETREncoderLayer(nn.Module):
    """Self-attention + FFN; the position encoding is added to queries and keys only."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        # src, pos: [B,HW,d]; pad: [B,HW] True on padding
        x = self.norm1(src) if self.pre_norm else src
        q = x + pos
        src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask=pad,
                                                 need_weights=False)[0])
        if self.pre_norm:
            return src + self.dropout2(self.ffn(self.norm2(src)))
        src = self.norm1(src)
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DETREncoder(nn.Module):
    """``num_layers`` encoder layers, post-norm (the paper) or pre-norm with a final norm."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, num_layers: int,
                 pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(DETREncoderLayer(d, nheads, ffn, dropout, pre_norm)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d) if pre_norm else None

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, pad)
        return self.norm(src) if self.norm is not None else src


# ------------------------------------------------------ Deformable DETR's multi-scale input


def multiscale_input(backbone: str, dilation: bool, frozen_bn: bool, trainable: int, d: int,
                     levels: int, backbone_levels: int | None = None
                     ) -> tuple[Backbone, nn.ModuleList]:
    """The multi-scale backbone (its last ``backbone_levels`` stages, default up to three:
    C5 alone, C4-C5 or C3-C5; DINO's 5-scale model takes C2-C5) and the per-level
    projections to width ``d`` with GroupNorm; levels beyond the backbone's are stride-2 3x3
    convs, the first on the last stage's own map."""
    stages = (1, 2, 3, 4)[-(backbone_levels or min(levels, 3)):]
    net = Backbone(backbone, stages, dilation, frozen_bn, trainable)
    chans = net.channels
    proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
    for i in range(levels - len(chans)):
        proj.append(nn.Sequential(nn.Conv2d(chans[-1] if i == 0 else d, d, 3, 2, 1),
                                  nn.GroupNorm(32, d)))
    for p in proj:
        nn.init.xavier_uniform_(p[0].weight, gain=1)
        nn.init.zeros_(p[0].bias)
    return net, nn.ModuleList(proj)


def multiscale_features(backbone: Backbone, input_proj: nn.ModuleList, images, d: int,
                        temperature: float = 10000, offset: float = -0.5
                        ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Projected maps ``[B,d,H_l,W_l]``, their padding masks ``[B,H_l,W_l]`` and sine
    position encodings of every level (Deformable DETR's count pixel centres: offset -0.5;
    DINO's use temperature 20 and no offset)."""
    x, mask = batch_images(images)
    feats = backbone(x, mask)
    srcs = [proj(f) for proj, (f, _) in zip(input_proj, feats)]
    masks = [m for _, m in feats]
    for i in range(len(feats), len(input_proj)):
        srcs.append(input_proj[i](feats[-1][0] if i == len(feats) else srcs[-1]))
        masks.append(resize_mask(mask, srcs[-1].shape[-2:]))
    pos = [sine_position_embedding(m, d // 2, temperature, offset=offset).to(s.dtype)
           for s, m in zip(srcs, masks)]
    return srcs, masks, pos


def valid_ratio(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpadded fraction of a level's width and height, ``[B, 2]`` (w, h): float32, or
    float64 for a float64 model (never a half type)."""
    _, h, w = mask.shape
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                   level_embed: Tensor):
    """Concatenate the levels into one sequence: ``(src [B,S,d], pad [B,S], pos [B,S,d]`` with
    each level's embedding added``, shapes [(H_l, W_l)], valid ratios [B,L,2])``."""
    shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]   # traced sizes while exporting
    if not exporting():  # Python ints, on which torch.compile specializes
        shapes = [(int(h), int(w)) for h, w in shapes]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[i] for i, p in enumerate(pos)], 1)
    ratios = torch.stack([valid_ratio(m, src.dtype) for m in masks], 1)
    return src, pad, pos, shapes, ratios


def encoder_proposals(memory: Tensor, pad: Tensor, shapes) -> tuple[Tensor, Tensor]:
    """One box per encoder position, centred on it with side 0.05 * 2^level, in logit space
    (+inf where padded or too close to the border), and the memory with those positions
    zeroed (Deformable DETR's two-stage proposals; Efficient DETR's dense anchors)."""
    n = memory.shape[0]
    props, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = pad[:, start:start + h * w].view(n, h, w)
        valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
        kw = dict(dtype=memory.dtype, device=memory.device)
        ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, **kw),
                                torch.linspace(0, w - 1, w, **kw), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None].expand(n, -1, -1, -1)
        grid = (grid + 0.5) / torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
        props.append(torch.cat([grid, wh], -1).view(n, -1, 4))
        start += h * w
    props = torch.cat(props, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    invalid = pad[..., None] | ~valid
    return props.masked_fill(invalid, float("inf")), memory.masked_fill(invalid, 0.0)


# ------------------------------------------------- Deformable DETR's encoder and decoder


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, src, pos, ref, shapes, pad):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, ref, src, shapes, pad)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention, FFN (post-norm; the official names
    norm2/norm1/norm3 follow that order)."""

    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout1, self.dropout2, self.dropout3, self.dropout4 = (
            nn.Dropout(dropout) for _ in range(4))

    def forward(self, tgt, query_pos, ref, memory, shapes, pad, self_mask=None):
        """``self_mask``: a ``qdet.blocks.denoising.QueryMask`` between the queries."""
        q = tgt + query_pos
        blocked = None if self_mask is None else \
            self_mask.for_mha(self.self_attn.num_heads)[0]
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, attn_mask=blocked,
                                                            need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout1(
            self.cross_attn(tgt + query_pos, ref, memory, shapes, pad)))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int,
                 num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(d, ffn, dropout, levels, heads, points)
                                    for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalized by the valid (unpadded) extent of their
        level, then expressed in every level's frame: ``[B, S, L, 2]`` (x, y)."""
        refs = []
        dev, dt = valid_ratios.device, valid_ratios.dtype
        for lvl, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dt, device=dev),
                                    torch.linspace(0.5, w - 0.5, w, dtype=dt, device=dev),
                                    indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, shapes, valid_ratios, pad):
        ref = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, pad)
        return src


class DeformableDecoder(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int,
                 num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(d, ffn, dropout, levels, heads, points)
                                    for _ in range(num_layers))

    def forward(self, tgt, query_pos, ref, memory, shapes, valid_ratios, pad, bbox_embed=None,
                self_mask=None):
        """Returns every layer's output ``[L,B,Q,d]`` and the reference after each layer
        ``[L,B,Q,2|4]`` (refined by ``bbox_embed[i]`` when given, detached between layers);
        ``self_mask`` separates query groups and denoising queries."""
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            if ref.shape[-1] == 4:
                ref_in = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = ref[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, ref_in, memory, shapes, pad, self_mask)
            if bbox_embed is not None:
                ref = box_from_reference(bbox_embed[i](tgt), ref).detach()
            hs.append(tgt)
            refs.append(ref)
        return torch.stack(hs), torch.stack(refs)
