"""The Numba kernels of the modulated deformable convolution (``qdet.ops.deform_conv``'s ``numba``
and ``cuda`` backends): bilinear sampling into columns and its backward, tested against
torchvision's ``deform_conv2d`` in tests/test_deform_conv.py.

Layouts (all contiguous): input ``x [N, C, H*W]``, offsets ``[N, G, K, 2, P]`` (G offset
groups, K = kh*kw kernel taps, (dy, dx), P = Hout*Wout output pixels), mask ``[N, G, K, P]``,
columns ``[N, C, K, P]``. Channel c reads the offsets of group ``c // (C / G)``.

Sampling rule (torchvision's): a tap at (y, x) is the bilinear mix of its four corners, a
corner outside the map counting as zero; a position with no corner on the map, or a NaN or
infinite one, contributes zero to the output and to every gradient.

- CPU: ``@njit(parallel=True)`` kernels whose tasks each own the outputs they write, so
  results are deterministic: forward and the offset/mask gradient by (n, group, tap, block
  of pixels), the input gradient by (n, block of channels).
- CUDA: one thread per column element (or per (n, group, tap, pixel) for the offset/mask
  gradient); atomics scatter the input gradient, so its float sums may differ run to run.
  They also run under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .backends import as_numpy, numba_threads

PBLOCK = 256   # output pixels per CPU task: its taps stay in L1 while channels stream by
CBLOCK = 16    # channels per input-gradient task


def geometry(kh, kw, stride, padding, dilation, wo) -> np.ndarray:
    """The ints every kernel takes: kh, kw, stride, padding, dilation (h, w each), Wout."""
    return np.array([kh, kw, *stride, *padding, *dilation, wo], dtype=np.int64)


# ------------------------------------------------------------------------------ CPU


@njit(inline="always")
def _tap(offset, n, g, k, p, geo, h, w, fh, fw, one):
    """Where tap k of output pixel p samples, in the dtype of ``one``.

    Returns (i00, i01, i10, i11, m00, m01, m10, m11, ly, lx): flat indices of the four
    corners in the map (clamped, so always safe to read), 1/0 masks of the corners on the
    map (all 0 when the position is off the map, NaN or infinite) and the fractional part.
    """
    zero = one - one
    kw, sh, sw, ph, pw, dh, dw, wo = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], \
        geo[8]
    oy, ox = p // wo, p % wo
    ky, kx = k // kw, k % kw
    y = (oy * sh - ph + ky * dh) + offset[n, g, k, 0, p]
    x = (ox * sw - pw + kx * dw) + offset[n, g, k, 1, p]
    # y = -1 stays in: its forward weight is 0, but torchvision's offset gradient is not
    if not (y >= -one and y < fh and x >= -one and x < fw):
        return 0, 0, 0, 0, zero, zero, zero, zero, zero, zero
    fy, fx = np.floor(y), np.floor(x)
    y0, x0 = int(fy), int(fx)
    my0 = one if y0 >= 0 else zero
    my1 = one if y0 + 1 < h else zero
    mx0 = one if x0 >= 0 else zero
    mx1 = one if x0 + 1 < w else zero
    r0, r1 = max(y0, 0) * w, min(y0 + 1, h - 1) * w
    c0, c1 = max(x0, 0), min(x0 + 1, w - 1)
    return (r0 + c0, r0 + c1, r1 + c0, r1 + c1, my0 * mx0, my0 * mx1, my1 * mx0, my1 * mx1,
            y - fy, x - fx)


@njit(inline="always")
def _block_taps(offset, mask, n, g, k, p0, m, geo, h, w, fh, fw, one, idx, wt):
    """The four corner indices ``idx[:, :m]`` and mask-weighted bilinear weights
    ``wt[:, :m]`` of tap ``k`` of offset group ``g`` at output pixels ``p0 .. p0+m-1``."""
    for j in range(m):
        i00, i01, i10, i11, m00, m01, m10, m11, ly, lx = _tap(
            offset, n, g, k, p0 + j, geo, h, w, fh, fw, one)
        a, hy, hx = mask[n, g, k, p0 + j], one - ly, one - lx
        idx[0, j], idx[1, j], idx[2, j], idx[3, j] = i00, i01, i10, i11
        wt[0, j], wt[1, j] = a * hy * hx * m00, a * hy * lx * m01
        wt[2, j], wt[3, j] = a * ly * hx * m10, a * ly * lx * m11


@njit(parallel=True, cache=True, fastmath={"contract"})
def _im2col_cpu(x, offset, mask, geo, h, w, cols, one):
    n_, c_, k_, p_ = cols.shape
    g_ = offset.shape[1]
    cg = c_ // g_
    fh, fw = one * h, one * w
    nb = (p_ + PBLOCK - 1) // PBLOCK
    for task in prange(n_ * g_ * k_ * nb):
        n, rest = task // (g_ * k_ * nb), task % (g_ * k_ * nb)
        g, rest = rest // (k_ * nb), rest % (k_ * nb)
        k, b = rest // nb, rest % nb
        p0 = b * PBLOCK
        m = min(PBLOCK, p_ - p0)
        idx = np.empty((4, m), dtype=np.int64)
        wt = np.empty((4, m), dtype=cols.dtype)
        _block_taps(offset, mask, n, g, k, p0, m, geo, h, w, fh, fw, one, idx, wt)
        for c in range(g * cg, (g + 1) * cg):
            xc, row = x[n, c], cols[n, c, k]
            for j in range(m):
                row[p0 + j] = (wt[0, j] * xc[idx[0, j]] + wt[1, j] * xc[idx[1, j]]
                               + wt[2, j] * xc[idx[2, j]] + wt[3, j] * xc[idx[3, j]])


@njit(parallel=True, cache=True, fastmath={"contract"})
def _grad_input_cpu(gcols, offset, mask, geo, h, w, cblock, gx, one):
    """Scatter the column gradient back onto the input: a task (n, block of ``cblock``
    channels of one offset group) owns ``gx[n, block]``."""
    n_, c_, k_, p_ = gcols.shape
    g_ = offset.shape[1]
    cg = c_ // g_
    fh, fw = one * h, one * w
    nblk = c_ // cblock
    for task in prange(n_ * nblk):
        n, cb = task // nblk, task % nblk
        c0 = cb * cblock
        g = c0 // cg
        idx = np.empty((4, PBLOCK), dtype=np.int64)
        wt = np.empty((4, PBLOCK), dtype=gx.dtype)
        for k in range(k_):
            for p0 in range(0, p_, PBLOCK):
                m = min(PBLOCK, p_ - p0)
                _block_taps(offset, mask, n, g, k, p0, m, geo, h, w, fh, fw, one, idx, wt)
                for c in range(c0, c0 + cblock):
                    gxc, grow = gx[n, c], gcols[n, c, k]
                    for j in range(m):
                        gv = grow[p0 + j]
                        # one corner at a time: clamped corners may share an element
                        gxc[idx[0, j]] += wt[0, j] * gv
                        gxc[idx[1, j]] += wt[1, j] * gv
                        gxc[idx[2, j]] += wt[2, j] * gv
                        gxc[idx[3, j]] += wt[3, j] * gv


@njit(parallel=True, cache=True, fastmath={"contract"})
def _grad_offset_mask_cpu(gcols, x, offset, mask, geo, h, w, goff, gmask, one):
    """Offset and mask gradients: a task (n, group, tap, block of pixels) sums over the
    group's channels and owns its slice of ``goff`` and ``gmask``."""
    n_, c_, k_, p_ = gcols.shape
    g_ = offset.shape[1]
    cg = c_ // g_
    fh, fw = one * h, one * w
    nb = (p_ + PBLOCK - 1) // PBLOCK
    for task in prange(n_ * g_ * k_ * nb):
        n, rest = task // (g_ * k_ * nb), task % (g_ * k_ * nb)
        g, rest = rest // (k_ * nb), rest % (k_ * nb)
        k, b = rest // nb, rest % nb
        p0 = b * PBLOCK
        m = min(PBLOCK, p_ - p0)
        idx = np.empty((4, m), dtype=np.int64)
        cm = np.empty((4, m), dtype=goff.dtype)   # corner masks
        frac = np.empty((2, m), dtype=goff.dtype)
        acc = np.zeros((3, m), dtype=goff.dtype)  # d/dy, d/dx, d/dmask
        for j in range(m):
            i00, i01, i10, i11, m00, m01, m10, m11, ly, lx = _tap(
                offset, n, g, k, p0 + j, geo, h, w, fh, fw, one)
            idx[0, j], idx[1, j], idx[2, j], idx[3, j] = i00, i01, i10, i11
            cm[0, j], cm[1, j], cm[2, j], cm[3, j] = m00, m01, m10, m11
            frac[0, j], frac[1, j] = ly, lx
        for c in range(g * cg, (g + 1) * cg):
            xc, grow = x[n, c], gcols[n, c, k]
            for j in range(m):
                gv = grow[p0 + j]
                v00, v01 = cm[0, j] * xc[idx[0, j]], cm[1, j] * xc[idx[1, j]]
                v10, v11 = cm[2, j] * xc[idx[2, j]], cm[3, j] * xc[idx[3, j]]
                ly, lx = frac[0, j], frac[1, j]
                hy, hx = one - ly, one - lx
                acc[0, j] += gv * (hx * (v10 - v00) + lx * (v11 - v01))
                acc[1, j] += gv * (hy * (v01 - v00) + ly * (v11 - v10))
                acc[2, j] += gv * (hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11))
        for j in range(m):
            a = mask[n, g, k, p0 + j]
            goff[n, g, k, 0, p0 + j] = acc[0, j] * a
            goff[n, g, k, 1, p0 + j] = acc[1, j] * a
            gmask[n, g, k, p0 + j] = acc[2, j]


def _views(x, offset, mask, k):
    """Kernel views of torch tensors: x [N,C,H*W], offset [N,G,K,2,P], mask [N,G,K,P]."""
    n, c, h, w = x.shape
    g = mask.shape[1] // k
    p = mask.shape[2] * mask.shape[3]
    xv = as_numpy(x).reshape(n, c, h * w)
    return xv, as_numpy(offset).reshape(n, g, k, 2, p), as_numpy(mask).reshape(n, g, k, p), h, w


def im2col_cpu(x: Tensor, offset: Tensor, mask: Tensor, geo: np.ndarray) -> Tensor:
    """Columns ``[N, C*K, P]`` (mask folded in) in the dtype of ``x``."""
    k = int(geo[0] * geo[1])
    xv, ov, mv, h, w = _views(x, offset, mask, k)
    n, c, p = xv.shape[0], xv.shape[1], mv.shape[-1]
    cols = np.empty((n, c, k, p), dtype=xv.dtype)
    numba_threads()
    _im2col_cpu(xv, ov, mv, geo, h, w, cols, xv.dtype.type(1))
    return torch.from_numpy(cols).view(n, c * k, p)


def im2col_backward_cpu(gcols: Tensor, x: Tensor, offset: Tensor, mask: Tensor,
                        geo: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, offset and mask from the columns' gradient ``[N, C*K, P]``."""
    k = int(geo[0] * geo[1])
    xv, ov, mv, h, w = _views(x, offset, mask, k)
    n, c, p = xv.shape[0], xv.shape[1], mv.shape[-1]
    one = xv.dtype.type(1)
    g = as_numpy(gcols.to(x.dtype)).reshape(n, c, k, p)
    threads = numba_threads()
    goff, gmask = np.empty_like(ov), np.empty_like(mv)
    _grad_offset_mask_cpu(g, xv, ov, mv, geo, h, w, goff, gmask, one)
    cg = c // ov.shape[1]
    # the widest channel block (at most CBLOCK, inside one group) that still gives every
    # thread a task
    blocks = [b for b in range(1, min(CBLOCK, cg) + 1) if cg % b == 0]
    cblock = max([b for b in blocks if n * (c // b) >= threads] or [1])
    gx = np.zeros_like(xv)
    _grad_input_cpu(g, ov, mv, geo, h, w, cblock, gx, one)
    return (torch.from_numpy(gx).view(x.shape), torch.from_numpy(goff).view(offset.shape),
            torch.from_numpy(gmask).view(mask.shape))


# ----------------------------------------------------------------------------- CUDA

_cuda_kernels = None
cuda = None  # numba.cuda, imported on first use


def _build_kernels():
    """Compile-on-first-use CUDA kernels (also under NUMBA_ENABLE_CUDASIM=1); they reach
    ``cuda`` as a module global, which is what the simulator swaps for its own."""
    global cuda
    from numba import cuda as numba_cuda

    cuda = numba_cuda

    @cuda.jit(device=True, inline=True)
    def position(offset, n, g, k, p, geo, h, w):
        """(ok, y0, x0, ly, lx) of tap k of pixel p; ok False off the map and for NaN."""
        kw, wo = geo[1], geo[8]
        oy, ox, ky, kx = p // wo, p % wo, k // kw, k % kw
        y = (oy * geo[2] - geo[4] + ky * geo[6]) + offset[n, g, k, 0, p]
        x = (ox * geo[3] - geo[5] + kx * geo[7]) + offset[n, g, k, 1, p]
        if not (y >= -1.0 and y < h and x >= -1.0 and x < w):
            return False, 0, 0, 0.0, 0.0
        fy, fx = math.floor(y), math.floor(x)
        return True, int(fy), int(fx), y - fy, x - fx

    @cuda.jit
    def im2col(x, offset, mask, geo, h, w, cols):
        # one thread per column element (n, c, k, p)
        i = cuda.grid(1)
        n_, c_, k_, p_ = cols.shape
        if i >= n_ * c_ * k_ * p_:
            return
        n, c, k, p = i // (c_ * k_ * p_), (i // (k_ * p_)) % c_, (i // p_) % k_, i % p_
        g = c // (c_ // offset.shape[1])
        ok, y0, x0, ly, lx = position(offset, n, g, k, p, geo, h, w)
        acc = 0.0
        if ok:
            for cy in range(2):
                yy = y0 + cy
                if yy < 0 or yy >= h:
                    continue
                wy = ly if cy else 1.0 - ly
                for cx in range(2):
                    xx = x0 + cx
                    if 0 <= xx < w:
                        acc += wy * (lx if cx else 1.0 - lx) * x[n, c, yy * w + xx]
        cols[n, c, k, p] = acc * mask[n, g, k, p]

    @cuda.jit
    def grad_input(gcols, offset, mask, geo, h, w, gx):
        # one thread per column element; atomics scatter onto the input
        i = cuda.grid(1)
        n_, c_, k_, p_ = gcols.shape
        if i >= n_ * c_ * k_ * p_:
            return
        n, c, k, p = i // (c_ * k_ * p_), (i // (k_ * p_)) % c_, (i // p_) % k_, i % p_
        g = c // (c_ // offset.shape[1])
        ok, y0, x0, ly, lx = position(offset, n, g, k, p, geo, h, w)
        if not ok:
            return
        gv = gcols[n, c, k, p] * mask[n, g, k, p]
        for cy in range(2):
            yy = y0 + cy
            if yy < 0 or yy >= h:
                continue
            wy = ly if cy else 1.0 - ly
            for cx in range(2):
                xx = x0 + cx
                if 0 <= xx < w:
                    cuda.atomic.add(gx, (n, c, yy * w + xx), wy * (lx if cx else 1.0 - lx) * gv)

    @cuda.jit
    def grad_offset_mask(gcols, x, offset, mask, geo, h, w, goff, gmask):
        # one thread per (n, g, k, p), summing over the group's channels: no atomics
        i = cuda.grid(1)
        n_, g_, k_, p_ = mask.shape
        if i >= n_ * g_ * k_ * p_:
            return
        n, g, k, p = i // (g_ * k_ * p_), (i // (k_ * p_)) % g_, (i // p_) % k_, i % p_
        ok, y0, x0, ly, lx = position(offset, n, g, k, p, geo, h, w)
        gy = 0.0
        gxx = 0.0
        gm = 0.0
        if ok:
            cg = x.shape[1] // g_
            in_y0, in_y1 = 0 <= y0 < h, 0 <= y0 + 1 < h
            in_x0, in_x1 = 0 <= x0 < w, 0 <= x0 + 1 < w
            for c in range(g * cg, (g + 1) * cg):
                v00 = x[n, c, y0 * w + x0] if in_y0 and in_x0 else 0.0
                v01 = x[n, c, y0 * w + x0 + 1] if in_y0 and in_x1 else 0.0
                v10 = x[n, c, (y0 + 1) * w + x0] if in_y1 and in_x0 else 0.0
                v11 = x[n, c, (y0 + 1) * w + x0 + 1] if in_y1 and in_x1 else 0.0
                gv = gcols[n, c, k, p]
                gy += gv * ((1.0 - lx) * (v10 - v00) + lx * (v11 - v01))
                gxx += gv * ((1.0 - ly) * (v01 - v00) + ly * (v11 - v10))
                gm += gv * ((1.0 - ly) * ((1.0 - lx) * v00 + lx * v01)
                            + ly * ((1.0 - lx) * v10 + lx * v11))
        a = mask[n, g, k, p]
        goff[n, g, k, 0, p] = gy * a
        goff[n, g, k, 1, p] = gxx * a
        gmask[n, g, k, p] = gm

    return im2col, grad_input, grad_offset_mask


def kernels():
    global _cuda_kernels
    if _cuda_kernels is None:
        _cuda_kernels = _build_kernels()
    return _cuda_kernels


def _grid(total):
    return (total + 255) // 256, 256


def launch_im2col(x, offset, mask, geo, h, w, cols, stream=0):
    """The CUDA forward on device arrays (``__cuda_array_interface__`` objects) in the
    layouts of the module docstring."""
    total = int(np.prod(cols.shape))
    if total:
        blocks, threads = _grid(total)
        kernels()[0][blocks, threads, stream](x, offset, mask, geo, h, w, cols)


def launch_backward(gcols, x, offset, mask, geo, h, w, gx, goff, gmask, stream=0):
    """The CUDA backward; ``gx`` must start at zero."""
    _, grad_input, grad_offset_mask = kernels()
    total = int(np.prod(gcols.shape))
    if total:
        blocks, threads = _grid(total)
        grad_input[blocks, threads, stream](gcols, offset, mask, geo, h, w, gx)
    total = int(np.prod(mask.shape))
    if total:
        blocks, threads = _grid(total)
        grad_offset_mask[blocks, threads, stream](gcols, x, offset, mask, geo, h, w, goff,
                                                  gmask)


def _cuda_args(x, offset, mask, geo):
    from numba import cuda

    n, c, h, w = x.shape
    k = int(geo[0] * geo[1])
    g = mask.shape[1] // k
    p = mask.shape[2] * mask.shape[3]
    geo_t = torch.as_tensor(geo, device=x.device)
    stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
    arr = cuda.as_cuda_array
    views = (x.detach().contiguous().view(n, c, h * w),
             offset.detach().contiguous().view(n, g, k, 2, p),
             mask.detach().contiguous().view(n, g, k, p))
    return [arr(t) for t in views] + [arr(geo_t)], (h, w, n, c, k, p), stream, (views, geo_t)


def im2col_cuda(x, offset, mask, geo):
    from numba import cuda

    (xv, ov, mv, gv), (h, w, n, c, k, p), stream, _keep = _cuda_args(x, offset, mask, geo)
    cols = x.new_empty(n, c, k, p)
    launch_im2col(xv, ov, mv, gv, h, w, cuda.as_cuda_array(cols), stream)
    return cols.view(n, c * k, p)


def im2col_backward_cuda(gcols, x, offset, mask, geo):
    from numba import cuda

    (xv, ov, mv, gv), (h, w, n, c, k, p), stream, _keep = _cuda_args(x, offset, mask, geo)
    gx = torch.zeros_like(x)
    goff, gmask = torch.empty_like(offset), torch.empty_like(mask)
    arr = cuda.as_cuda_array
    g = gcols.to(x.dtype).contiguous().view(n, c, k, p)
    launch_backward(arr(g), xv, ov, mv, gv, h, w, arr(gx.view(n, c, h * w)),
                    arr(goff.view(ov.shape)), arr(gmask.view(mv.shape)), stream)
    return gx, goff, gmask
