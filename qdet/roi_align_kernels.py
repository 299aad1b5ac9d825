"""The Numba CPU kernels of RoIAlign (``qdet.roi_align``'s ``numba`` backend), with
torchvision's ``roi_align`` semantics; tested against it in tests/test_roi_align.py.

Layouts (contiguous): feature map ``x [N, H, W, C]`` (channels last, so that every sample
reads whole channel vectors), boxes ``rois [K, 5]`` (image index, x1, y1, x2, y2), output
``[K, PH, PW, C]``.

Sampling rule (torchvision's): the box is scaled by ``scale`` (and shifted by -0.5 with
``aligned``; without it, boxes narrower than one cell count as one cell wide), split into
PH x PW bins, and each bin averages a ``ratio`` x ``ratio`` grid of bilinear samples
(``ratio <= 0``: ceil(box size / bins) per axis, for each box). A sample above -1 and below
the map's size is clamped onto the map; one further out, or NaN, contributes zero.

- Forward: a task per box, its bins' channel vectors accumulated sample by sample.
- Backward: a task per (image, block of channels) owns that slice of the input gradient
  and walks the image's boxes in order, so results are deterministic without atomics.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .deform_attn_kernels import _numba_threads


@njit(inline="always")
def _box(rois, k, scale, ph_, pw_, ratio, aligned):
    """Box k's start (y, x), bin size (h, w), samples per bin (h, w) and 1 / their count."""
    off = 0.5 if aligned else 0.0
    x1, y1 = rois[k, 1] * scale - off, rois[k, 2] * scale - off
    rw, rh = rois[k, 3] * scale - off - x1, rois[k, 4] * scale - off - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / ph_, rw / pw_
    # adaptive grids: none for a NaN or infinite box (its samples would be off the map)
    gh = ratio if ratio > 0 else (int(math.ceil(rh / ph_)) if abs(rh) < 1e9 else 0)
    gw = ratio if ratio > 0 else (int(math.ceil(rw / pw_)) if abs(rw) < 1e9 else 0)
    return y1, x1, bh, bw, gh, gw, 1.0 / max(gh * gw, 1)


@njit(inline="always")
def _corners(y, x, h, w):
    """torchvision's bilinear rule: (ok, y_low, x_low, y_high, x_high, ly, lx); not ok for
    a NaN position too (torchvision's kernel would read out of bounds there)."""
    if not (y >= -1.0 and y <= h and x >= -1.0 and x <= w):
        return False, 0, 0, 0, 0, 0.0, 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yl = yh = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xl = xh = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    return True, yl, xl, yh, xh, y - yl, x - xl


@njit(parallel=True, cache=True, fastmath={"contract"})
def _forward(x, rois, scale, ratio, aligned, out):
    _, h, w, c_ = x.shape
    k_, ph_, pw_, _ = out.shape
    for k in prange(k_):
        n = int(rois[k, 0])
        y1, x1, bh, bw, gh, gw, inv = _box(rois, k, scale, ph_, pw_, ratio, aligned)
        wt = np.empty(4, dtype=out.dtype)   # the weights in the data's dtype
        for ph in range(ph_):
            for pw in range(pw_):
                acc = out[k, ph, pw]
                acc[:] = 0
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                        ok, yl, xl, yh, xh, ly, lx = _corners(y, xx, h, w)
                        if not ok:
                            continue
                        hy, hx = 1.0 - ly, 1.0 - lx
                        wt[0], wt[1], wt[2], wt[3] = hy * hx, hy * lx, ly * hx, ly * lx
                        a, b, cc, d = x[n, yl, xl], x[n, yl, xh], x[n, yh, xl], x[n, yh, xh]
                        for c in range(c_):
                            acc[c] += wt[0] * a[c] + wt[1] * b[c] + wt[2] * cc[c] + wt[3] * d[c]
                wt[0] = inv
                for c in range(c_):
                    acc[c] *= wt[0]


@njit(parallel=True, cache=True, fastmath={"contract"})
def _backward(gout, rois, order, starts, scale, ratio, aligned, cblock, gx):
    n_, h, w, c_ = gx.shape
    _, ph_, pw_, _ = gout.shape
    nblk = c_ // cblock
    for task in prange(n_ * nblk):
        n, c0 = task // nblk, (task % nblk) * cblock
        wt = np.empty(4, dtype=gx.dtype)   # the weights in the data's dtype
        for j in range(starts[n], starts[n + 1]):
            k = order[j]
            y1, x1, bh, bw, gh, gw, inv = _box(rois, k, scale, ph_, pw_, ratio, aligned)
            for ph in range(ph_):
                for pw in range(pw_):
                    g = gout[k, ph, pw]
                    for iy in range(gh):
                        y = y1 + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                            ok, yl, xl, yh, xh, ly, lx = _corners(y, xx, h, w)
                            if not ok:
                                continue
                            hy, hx = 1.0 - ly, 1.0 - lx
                            wt[0], wt[1] = hy * hx * inv, hy * lx * inv
                            wt[2], wt[3] = ly * hx * inv, ly * lx * inv
                            # one corner at a time: clamped corners may be the same cell
                            a, b = gx[n, yl, xl], gx[n, yl, xh]
                            for c in range(c0, c0 + cblock):
                                a[c] += g[c] * wt[0]
                            for c in range(c0, c0 + cblock):
                                b[c] += g[c] * wt[1]
                            a, b = gx[n, yh, xl], gx[n, yh, xh]
                            for c in range(c0, c0 + cblock):
                                a[c] += g[c] * wt[2]
                            for c in range(c0, c0 + cblock):
                                b[c] += g[c] * wt[3]


def forward_cpu(x: Tensor, rois: Tensor, size: tuple[int, int], scale: float, ratio: int,
                aligned: bool) -> Tensor:
    """x ``[N, H, W, C]`` (contiguous), rois ``[K, 5]`` -> ``[K, PH, PW, C]``."""
    xv = x.detach().numpy()
    out = np.empty((rois.shape[0], size[0], size[1], xv.shape[-1]), dtype=xv.dtype)
    _numba_threads()
    _forward(xv, rois.detach().to(x.dtype).contiguous().numpy(), scale, ratio, aligned, out)
    return torch.from_numpy(out)


def backward_cpu(grad: Tensor, rois: Tensor, shape: list[int], scale: float, ratio: int,
                 aligned: bool) -> Tensor:
    """grad ``[K, PH, PW, C]`` (contiguous) -> the input gradient ``[N, H, W, C]``."""
    n, h, w, c = shape
    r = rois.detach().to(grad.dtype).contiguous()
    image = r[:, 0].long()
    order = torch.argsort(image, stable=True).numpy()
    starts = np.zeros(n + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(image.numpy(), minlength=n)[:n])
    threads = _numba_threads()
    # the widest channel block that still gives every thread two tasks
    blocks = [b for b in range(1, c + 1) if c % b == 0]
    cblock = max([b for b in blocks if n * (c // b) >= 2 * threads] or [1])
    g = grad.detach().numpy()
    gx = np.zeros((n, h, w, c), dtype=g.dtype)
    _backward(g, r.numpy(), order, starts, scale, ratio, aligned, cblock, gx)
    return torch.from_numpy(gx)
