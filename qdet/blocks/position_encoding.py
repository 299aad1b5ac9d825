"""Sinusoidal position encodings: for feature maps (DETR) and for points (Conditional DETR,
Anchor DETR, Deformable DETR's two-stage queries). No parameters, so plain functions."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _frequencies(num_feats: int, temperature: float, device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave(pos: Tensor) -> Tensor:
    """[..., F] -> sin on even, cos on odd frequencies, interleaved as the official code."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding(mask: Tensor, num_feats: int = 128, temperature: float = 10000,
                            normalize: bool = True, scale: float = 2 * math.pi,
                            offset: float = 0.0) -> Tensor:
    """DETR's 2-d sine encoding of a padded feature map.

    Args:
        mask: ``[B,H,W]``, True on padding. Coordinates count valid pixels only, so an
            image's encoding does not depend on how much it was padded.
        num_feats: features per axis; the result has ``2 * num_feats`` channels (y then x).
        offset: added to the coordinates before normalizing (Deformable DETR uses -0.5).
    Returns:
        ``[B, 2*num_feats, H, W]``.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        y = (y + offset) / (y[:, -1:, :] + eps) * scale
        x = (x + offset) / (x[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_feats, temperature, mask.device)
    pos_x = _interleave(x[..., None] / dim_t)
    pos_y = _interleave(y[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed_points(points: Tensor, num_feats: int = 128, temperature: float = 10000,
                      scale: float = 2 * math.pi, y_first: bool = True) -> Tensor:
    """Sine encoding of normalized points ``[..., 2]`` (x, y) or boxes ``[..., 4]``.

    Returns ``[..., num_feats * points.shape[-1]]``, ordered (y, x[, w, h]) as in Conditional
    DETR's ``gen_sineembed_for_position`` so that point queries live in the keys' encoding
    space, or in input order with ``y_first=False`` (Deformable DETR's two-stage queries).
    """
    dim_t = _frequencies(num_feats, temperature, points.device)
    emb = [_interleave(points[..., i, None] * scale / dim_t) for i in range(points.shape[-1])]
    if y_first:
        emb[0], emb[1] = emb[1], emb[0]  # (x, y, ...) -> (y, x, ...)
    return torch.cat(emb, dim=-1)
