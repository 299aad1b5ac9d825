"""The Numba CPU kernels of RoIAlign (``qdet.ops.roi_align``'s ``numba`` backend), with
torchvision's ``roi_align`` semantics; tested against it in tests/test_roi_align.py.

Layouts (contiguous): feature map ``x [N, H*W, C]`` (channels last, so that every sample
reads whole channel vectors), boxes ``rois [K, 5]`` (image index, x1, y1, x2, y2), output
``[K, PH*PW, C]``.

Sampling rule (torchvision's): the box is scaled by ``scale`` (and shifted by -0.5 with
``aligned``; without it, boxes narrower than one cell count as one cell wide), split into
PH x PW bins, and each bin averages a ``ratio`` x ``ratio`` grid of bilinear samples
(``ratio <= 0``: ceil(box size / bins) per axis, for each box). A sample from -1 to the
map's size inclusive is clamped onto the map; one further out, or NaN, contributes zero.
The box geometry is computed in float64 (torchvision: in the data's dtype), so float32
results can differ from torchvision's in the last bits, and with ``ratio <= 0`` a box whose
size is within float32 rounding of a multiple of the bin count may get one sample row more
or less than torchvision gives it.

- Both directions list a box's samples first (corner cells and weights, ``_samples``).
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

from .backends import numba_threads


@njit(inline="always")
def _box(rois, k, scale, ph_, pw_, ratio, aligned):
    """Box k's start (y, x), bin size (h, w), samples per bin (h, w) and 1 / their count."""
    off = 0.5 if aligned else 0.0
    x1, y1 = rois[k, 1] * scale - off, rois[k, 2] * scale - off
    rw, rh = rois[k, 3] * scale - off - x1, rois[k, 4] * scale - off - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / ph_, rw / pw_
    # adaptive grids: none for an inverted, NaN or infinite box (torchvision's loops run no
    # sample there either), yet the average still divides by at least one
    gh = ratio if ratio > 0 else (int(math.ceil(rh / ph_)) if 0 < rh < 1e9 else 0)
    gw = ratio if ratio > 0 else (int(math.ceil(rw / pw_)) if 0 < rw < 1e9 else 0)
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


@njit(cache=True)
def _samples(rois, k, scale, ph_, pw_, ratio, aligned, h, w, proto):
    """Box k's bilinear samples on the map, bin by bin (bins row-major): the four corner
    cells (flat y*W+x) and weights of each, already divided by the bin's sample count, in
    the dtype of ``proto``, and where each bin's samples start (``[PH*PW + 1]``). Samples
    off the map are left out."""
    y1, x1, bh, bw, gh, gw, inv = _box(rois, k, scale, ph_, pw_, ratio, aligned)
    cells = np.empty((ph_ * pw_ * gh * gw, 4), dtype=np.int64)
    wts = np.empty((ph_ * pw_ * gh * gw, 4), dtype=proto.dtype)
    start = np.empty(ph_ * pw_ + 1, dtype=np.int64)
    m = 0
    for b in range(ph_ * pw_):
        start[b] = m
        ph, pw = b // pw_, b % pw_
        for iy in range(gh):
            y = y1 + ph * bh + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = x1 + pw * bw + (ix + 0.5) * bw / gw
                ok, yl, xl, yh, xh, ly, lx = _corners(y, x, h, w)
                if ok:
                    cells[m, 0], cells[m, 1] = yl * w + xl, yl * w + xh
                    cells[m, 2], cells[m, 3] = yh * w + xl, yh * w + xh
                    wts[m, 0], wts[m, 1] = (1 - ly) * (1 - lx) * inv, (1 - ly) * lx * inv
                    wts[m, 2], wts[m, 3] = ly * (1 - lx) * inv, ly * lx * inv
                    m += 1
    start[ph_ * pw_] = m
    return cells, wts, start


@njit(parallel=True, cache=True, fastmath={"contract"})
def _forward(x, rois, scale, ratio, aligned, h, w, ph_, pw_, out):
    """x ``[N, H*W, C]`` -> out ``[K, PH*PW, C]``."""
    k_, bins, c_ = out.shape
    for k in prange(k_):
        n = int(rois[k, 0])
        cells, wts, start = _samples(rois, k, scale, ph_, pw_, ratio, aligned, h, w, out)
        for b in range(bins):
            acc = out[k, b]
            acc[:] = 0
            for j in range(start[b], start[b + 1]):
                a, bb = x[n, cells[j, 0]], x[n, cells[j, 1]]
                cc, d = x[n, cells[j, 2]], x[n, cells[j, 3]]
                w0, w1, w2, w3 = wts[j, 0], wts[j, 1], wts[j, 2], wts[j, 3]
                for c in range(c_):
                    acc[c] += w0 * a[c] + w1 * bb[c] + w2 * cc[c] + w3 * d[c]


@njit(parallel=True, cache=True, fastmath={"contract"})
def _backward(gout, rois, order, starts, scale, ratio, aligned, h, w, ph_, pw_, cblock, gx):
    """gout ``[K, PH*PW, C]`` -> gx ``[N, H*W, C]`` (zeros on entry)."""
    n_, _, c_ = gx.shape
    bins = gout.shape[1]
    nblk = c_ // cblock
    for task in prange(n_ * nblk):
        n, c0 = task // nblk, (task % nblk) * cblock
        for i in range(starts[n], starts[n + 1]):
            k = order[i]
            cells, wts, start = _samples(rois, k, scale, ph_, pw_, ratio, aligned, h, w, gx)
            for b in range(bins):
                g = gout[k, b]
                for j in range(start[b], start[b + 1]):
                    # one corner at a time: clamped corners may be the same cell
                    for corner in range(4):
                        row, wt = gx[n, cells[j, corner]], wts[j, corner]
                        for c in range(c0, c0 + cblock):
                            row[c] += g[c] * wt


def forward_cpu(x: Tensor, rois: Tensor, size: tuple[int, int], scale: float, ratio: int,
                aligned: bool) -> Tensor:
    """x ``[N, H, W, C]`` (contiguous), rois ``[K, 5]`` (in x's dtype) -> ``[K, PH, PW, C]``."""
    xv = x.detach().numpy()
    n, h, w, c = xv.shape
    out = np.empty((rois.shape[0], size[0] * size[1], c), dtype=xv.dtype)
    numba_threads()
    _forward(xv.reshape(n, h * w, c), rois.detach().contiguous().numpy(), scale, ratio,
             aligned, h, w, size[0], size[1], out)
    return torch.from_numpy(out).view(-1, size[0], size[1], c)


def backward_cpu(grad: Tensor, rois: Tensor, shape: list[int], scale: float, ratio: int,
                 aligned: bool) -> Tensor:
    """grad ``[K, PH, PW, C]`` (contiguous) -> the input gradient ``[N, H, W, C]``."""
    n, h, w, c = shape
    k, ph, pw = grad.shape[:3]
    r = rois.detach().to(grad.dtype).contiguous()
    image = r[:, 0].long()
    order = torch.argsort(image, stable=True).numpy()
    starts = np.zeros(n + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(image.numpy(), minlength=n)[:n])
    threads = numba_threads()
    # the widest channel block that still gives every thread two tasks
    blocks = [b for b in range(1, c + 1) if c % b == 0]
    cblock = max([b for b in blocks if n * (c // b) >= 2 * threads] or [1])
    g = grad.detach().numpy().reshape(k, ph * pw, c)
    gx = np.zeros((n, h * w, c), dtype=g.dtype)
    _backward(g, r.numpy(), order, starts, scale, ratio, aligned, h, w, ph, pw, cblock, gx)
    return torch.from_numpy(gx).view(n, h, w, c)
