"""The Numba kernels of multi-scale deformable attention (``qdet.ops.deform_attn``'s ``numba`` and
``cuda`` backends), tested against the grid_sample reference there.

- CPU: fused kernels (``@njit(parallel=True)``), forward and backward, that never
  materialize the ``[N,M,D,Lq,L,P]`` samples. Each parallel task owns the outputs it writes,
  so results are deterministic.
- CUDA: kernels launched on torch's current stream, reading torch tensors in place. Atomics
  scatter the value gradient, so its float sums may differ run to run. They also run under
  Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how CI tests them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .backends import as_numpy, numba_threads

# ------------------------------------------------------------------------------ CPU
# value [N,S,M,D], shapes [L,2] int64 (H, W), sizes [L,2] the same as floats of the input
# dtype, starts [L] int64, loc [N,Lq,M,L,P,2], attn [N,Lq,M,L,P]. Arithmetic stays in the
# input dtype (``one`` carries it: a float64 literal would promote float32 to float64).


@njit(inline="always")
def _bilinear(loc_x, loc_y, shapes, sizes, starts, lvl, one):
    """grid_sample's bilinear taps of a normalized point on level ``lvl``.

    Returns (ok, r00, r01, r10, r11, w00, w01, w10, w11, lx, ly, m00, m01, m10, m11): the
    value rows of the four corners (clamped into the level, so always safe to read), their
    weights, the fractional position, and 1/0 masks of the corners that are on the map (an
    off-map corner gets weight 0). ``ok`` is False when no corner is on the map, and for
    NaN. Arithmetic stays in the dtype of ``one``.
    """
    zero = one - one
    h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
    x = loc_x * sizes[lvl, 1] - one / (one + one)
    y = loc_y * sizes[lvl, 0] - one / (one + one)
    if not (x >= -one and y >= -one and x <= sizes[lvl, 1] and y <= sizes[lvl, 0]):
        return (False, 0, 0, 0, 0, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    fx, fy = np.floor(x), np.floor(y)
    x0, y0 = int(fx), int(fy)
    lx, ly = x - fx, y - fy
    mx0 = one if 0 <= x0 < w else zero
    mx1 = one if 0 <= x0 + 1 < w else zero
    my0 = one if 0 <= y0 < h else zero
    my1 = one if 0 <= y0 + 1 < h else zero
    cx0, cx1 = min(max(x0, 0), w - 1), min(max(x0 + 1, 0), w - 1)
    row0, row1 = s0 + min(max(y0, 0), h - 1) * w, s0 + min(max(y0 + 1, 0), h - 1) * w
    m00, m01, m10, m11 = my0 * mx0, my0 * mx1, my1 * mx0, my1 * mx1
    hx, hy = one - lx, one - ly
    return (True, row0 + cx0, row0 + cx1, row1 + cx0, row1 + cx1,
            hy * hx * m00, hy * lx * m01, ly * hx * m10, ly * lx * m11, lx, ly,
            m00, m01, m10, m11)


# Tasks are (batch, head, block of queries), and each owns the outputs it writes, so no two
# threads touch the same element and results are deterministic. Value maps are flat arrays
# with explicit strides (batch, head, row; channels contiguous), so one kernel reads either
# the caller's [N,S,M,D] layout or a head-major copy [N,M,S,D], whose one-head block of a
# few MB stays in cache when every value row is sampled many times (the encoder).
QBLOCK = 256


@njit(parallel=True, cache=True, fastmath={"contract"})
def _forward_cpu(vflat, vstr, shapes, sizes, starts, loc, attn, out, one):
    n_, lq, m_, d_ = out.shape
    nl, np_ = loc.shape[3], loc.shape[4]
    nb = (lq + QBLOCK - 1) // QBLOCK
    for task in prange(n_ * m_ * nb):
        n, rest = task // (m_ * nb), task % (m_ * nb)
        m, b = rest // nb, rest % nb
        base, rs = n * vstr[0] + m * vstr[1], vstr[2]
        du = np.uint64(d_)  # unsigned offsets: no negative-index check, so loops vectorize
        acc = np.empty(d_, dtype=out.dtype)  # a private buffer: no aliasing, so it vectorizes
        for q in range(b * QBLOCK, min(lq, (b + 1) * QBLOCK)):
            acc[:] = 0
            for lvl in range(nl):
                for p in range(np_):
                    ok, r00, r01, r10, r11, w00, w01, w10, w11, _, _, _, _, _, _ = _bilinear(
                        loc[n, q, m, lvl, p, 0], loc[n, q, m, lvl, p, 1], shapes, sizes,
                        starts, lvl, one)
                    if not ok:
                        continue
                    a = attn[n, q, m, lvl, p]
                    w00, w01, w10, w11 = a * w00, a * w01, a * w10, a * w11
                    o00, o01 = np.uint64(base + r00 * rs), np.uint64(base + r01 * rs)
                    o10, o11 = np.uint64(base + r10 * rs), np.uint64(base + r11 * rs)
                    for d in range(du):  # all four taps in one pass over the channels
                        acc[d] += (w00 * vflat[o00 + d] + w01 * vflat[o01 + d]
                                   + w10 * vflat[o10 + d] + w11 * vflat[o11 + d])
            out[n, q, m, :] = acc


# reassoc lets the per-tap dot products vectorize (a fixed order, still deterministic)
@njit(parallel=True, cache=True, fastmath={"contract", "reassoc"})
def _backward_loc_attn_cpu(vflat, vstr, shapes, sizes, starts, loc, attn, grad, grad_loc,
                           grad_attn, one):
    n_, lq, m_, d_ = grad.shape
    nl, np_ = loc.shape[3], loc.shape[4]
    zero = one - one
    nb = (lq + QBLOCK - 1) // QBLOCK
    for task in prange(n_ * m_ * nb):  # owns grad_loc and grad_attn of its (n, m, queries)
        n, rest = task // (m_ * nb), task % (m_ * nb)
        m, b = rest // nb, rest % nb
        base, rs = n * vstr[0] + m * vstr[1], vstr[2]
        du = np.uint64(d_)
        for q in range(b * QBLOCK, min(lq, (b + 1) * QBLOCK)):
            g = grad[n, q, m]
            for lvl in range(nl):
                for p in range(np_):
                    (ok, r00, r01, r10, r11, w00, w01, w10, w11, lx, ly,
                     m00, m01, m10, m11) = _bilinear(loc[n, q, m, lvl, p, 0],
                                                     loc[n, q, m, lvl, p, 1], shapes, sizes,
                                                     starts, lvl, one)
                    if not ok:
                        continue
                    o00, o01 = np.uint64(base + r00 * rs), np.uint64(base + r01 * rs)
                    o10, o11 = np.uint64(base + r10 * rs), np.uint64(base + r11 * rs)
                    d00, d01, d10, d11 = zero, zero, zero, zero
                    for d in range(du):  # g . v for the four taps in one pass
                        d00 += g[d] * vflat[o00 + d]
                        d01 += g[d] * vflat[o01 + d]
                        d10 += g[d] * vflat[o10 + d]
                        d11 += g[d] * vflat[o11 + d]
                    d00, d01, d10, d11 = d00 * m00, d01 * m01, d10 * m10, d11 * m11
                    a = attn[n, q, m, lvl, p]
                    hx, hy = one - lx, one - ly
                    grad_attn[n, q, m, lvl, p] = w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11
                    # d/dx of the bilinear weights, then dx/dloc = W (and H for y)
                    grad_loc[n, q, m, lvl, p, 0] = (hy * (d01 - d00) + ly * (d11 - d10)) * a \
                        * sizes[lvl, 1]
                    grad_loc[n, q, m, lvl, p, 1] = (hx * (d10 - d00) + lx * (d11 - d01)) * a \
                        * sizes[lvl, 0]


@njit(parallel=True, cache=True, fastmath={"contract"})
def _backward_value_cpu(shapes, sizes, starts, loc, attn, grad, gflat, gstr, chunks, one):
    """The value gradient, split into ``chunks`` channel chunks of width D/chunks: a task
    (batch, head, chunk) owns its slice, whose start is ``gstr`` (batch, head, chunk, row)
    away. More chunks keep all cores busy when they outnumber batch x heads."""
    n_, lq, m_, d_ = grad.shape
    nl, np_ = loc.shape[3], loc.shape[4]
    cw = d_ // chunks
    for task in prange(n_ * m_ * chunks):
        n, rest = task // (m_ * chunks), task % (m_ * chunks)
        m, c = rest // chunks, rest % chunks
        base, rs = n * gstr[0] + m * gstr[1] + c * gstr[2], gstr[3]
        cu = np.uint64(cw)
        g = np.empty(cw, dtype=grad.dtype)  # private copy: no aliasing with gflat
        for q in range(lq):
            g[:] = grad[n, q, m, c * cw:(c + 1) * cw]
            for lvl in range(nl):
                for p in range(np_):
                    (ok, r00, r01, r10, r11, w00, w01, w10, w11, _, _,
                     m00, m01, m10, m11) = _bilinear(loc[n, q, m, lvl, p, 0],
                                                     loc[n, q, m, lvl, p, 1], shapes, sizes,
                                                     starts, lvl, one)
                    if not ok:
                        continue
                    a = attn[n, q, m, lvl, p]
                    # one pass per on-map tap: clamped taps may share a row, and each pass is
                    # a read-modify-write
                    if m00:
                        c00, o = a * w00, np.uint64(base + r00 * rs)
                        for d in range(cu):
                            gflat[o + d] += c00 * g[d]
                    if m01:
                        c01, o = a * w01, np.uint64(base + r01 * rs)
                        for d in range(cu):
                            gflat[o + d] += c01 * g[d]
                    if m10:
                        c10, o = a * w10, np.uint64(base + r10 * rs)
                        for d in range(cu):
                            gflat[o + d] += c10 * g[d]
                    if m11:
                        c11, o = a * w11, np.uint64(base + r11 * rs)
                        for d in range(cu):
                            gflat[o + d] += c11 * g[d]


def level_tables(shapes: list[int]):
    s = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(s[:, 0] * s[:, 1])[:-1]]).astype(np.int64)
    return s, starts


def _head_major(value: Tensor, loc: Tensor) -> bool:
    """Copy values head-major when each row is sampled many times (encoder), else read the
    caller's layout in place (decoder: a few hundred queries over a large map)."""
    return loc.shape[1] * loc.shape[3] * loc.shape[4] >= value.shape[1]


def _cpu_args(value, shapes, loc, attn):
    """Kernel arguments: flat value map and its (batch, head, row) strides, level tables."""
    n, s_, m, d = value.shape
    if _head_major(value, loc):
        v = value.detach().permute(0, 2, 1, 3).contiguous().numpy()
        strides = (m * s_ * d, s_ * d, d)
    else:
        v = as_numpy(value)
        strides = (s_ * m * d, d, m * d)
    s, starts = level_tables(shapes)
    return (v.reshape(-1), np.asarray(strides, dtype=np.int64), s, s.astype(v.dtype), starts,
            as_numpy(loc), as_numpy(attn), v.dtype.type(1))


def forward_cpu(value, shapes, loc, attn):
    n, _, m, d = value.shape
    vflat, vstr, s, sizes, starts, lo, at, one = _cpu_args(value, shapes, loc, attn)
    out = np.zeros((n, loc.shape[1], m, d), dtype=vflat.dtype)
    numba_threads()
    _forward_cpu(vflat, vstr, s, sizes, starts, lo, at, out, one)
    return torch.from_numpy(out).view(n, loc.shape[1], m * d)


def backward_cpu(grad, value, shapes, loc, attn):
    n, s_, m, d = value.shape
    vflat, vstr, s, sizes, starts, lo, at, one = _cpu_args(value, shapes, loc, attn)
    g = as_numpy(grad).reshape(n, loc.shape[1], m, d)
    threads = numba_threads()
    grad_loc = np.zeros_like(lo)
    grad_attn = np.zeros_like(at)
    _backward_loc_attn_cpu(vflat, vstr, s, sizes, starts, lo, at, g, grad_loc, grad_attn, one)
    want = -(-threads // max(n * m, 1))  # chunks needed for one task per thread
    chunks = min(c for c in range(1, d + 1) if d % c == 0 and (c >= want or c == d))
    cw = d // chunks
    if _head_major(value, loc):  # [N, M, chunks, S, cw], rearranged afterwards
        gv = np.zeros((n, m, chunks, s_, cw), dtype=vflat.dtype)
        gstr = (m * chunks * s_ * cw, chunks * s_ * cw, s_ * cw, cw)
    else:                         # the caller's [N, S, M, D] directly
        gv = np.zeros((n, s_, m, d), dtype=vflat.dtype)
        gstr = (s_ * m * d, d, cw, m * d)
    _backward_value_cpu(s, sizes, starts, lo, at, g, gv.reshape(-1),
                        np.asarray(gstr, dtype=np.int64), chunks, one)
    grad_value = torch.from_numpy(gv)
    if gv.ndim == 5:
        grad_value = grad_value.permute(0, 3, 1, 2, 4).reshape(n, s_, m, d)
    return grad_value, torch.from_numpy(grad_loc), torch.from_numpy(grad_attn)


# ----------------------------------------------------------------------------- CUDA

_cuda_kernels = None
cuda = None  # numba.cuda, imported on first use (importing it costs a second)


def _build_kernels():
    """Compile-on-first-use CUDA kernels (also under NUMBA_ENABLE_CUDASIM=1). The kernels
    reach ``cuda`` as a module global, which is what the simulator swaps for its own."""
    global cuda
    from numba import cuda as numba_cuda

    cuda = numba_cuda

    @cuda.jit(device=True, inline=True)
    def bilinear_setup(loc, n, q, m, lvl, p, h, w):
        """The top-left tap and fractional offsets of a sampling point in pixels of an h x w
        level (grid_sample, align_corners=False); False when no tap is on the map."""
        x = loc[n, q, m, lvl, p, 0] * w - 0.5
        y = loc[n, q, m, lvl, p, 1] * h - 0.5
        if not (x >= -1.0 and y >= -1.0 and x <= w and y <= h):
            return False, 0, 0, 0.0, 0.0
        x0 = math.floor(x)
        y0 = math.floor(y)
        return True, int(x0), int(y0), x - x0, y - y0

    @cuda.jit(device=True, inline=True)
    def unravel(i, lq, m_, d_):
        """(n, q, m, d) of the flat index of an [N, Lq, M, D] element."""
        return i // (d_ * m_ * lq), (i // (d_ * m_)) % lq, (i // d_) % m_, i % d_

    @cuda.jit
    def forward(value, shapes, starts, loc, attn, out):
        # one thread per output element (n, q, m, d)
        i = cuda.grid(1)
        n_, lq, m_, d_ = out.shape
        if i >= n_ * lq * m_ * d_:
            return
        n, q, m, d = unravel(i, lq, m_, d_)
        acc = 0.0
        for lvl in range(loc.shape[3]):
            h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
            for p in range(loc.shape[4]):
                ok, x0, y0, lx, ly = bilinear_setup(loc, n, q, m, lvl, p, h, w)
                if not ok:
                    continue
                a = attn[n, q, m, lvl, p]
                for cy in range(2):
                    yy = y0 + cy
                    if yy < 0 or yy >= h:
                        continue
                    wy = ly if cy else 1.0 - ly
                    for cx in range(2):
                        xx = x0 + cx
                        if xx < 0 or xx >= w:
                            continue
                        acc += a * wy * (lx if cx else 1.0 - lx) * value[n, s0 + yy * w + xx, m, d]
        out[n, q, m, d] = acc

    @cuda.jit
    def backward(value, shapes, starts, loc, attn, grad, grad_value, grad_loc, grad_attn):
        # one thread per (n, q, m, d); scattered sums use atomics
        i = cuda.grid(1)
        n_, lq, m_, d_ = grad.shape
        if i >= n_ * lq * m_ * d_:
            return
        n, q, m, d = unravel(i, lq, m_, d_)
        g = grad[n, q, m, d]
        for lvl in range(loc.shape[3]):
            h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
            for p in range(loc.shape[4]):
                ok, x0, y0, lx, ly = bilinear_setup(loc, n, q, m, lvl, p, h, w)
                if not ok:
                    continue
                a = attn[n, q, m, lvl, p]
                g_attn = 0.0
                g_x = 0.0
                g_y = 0.0
                for cy in range(2):
                    yy = y0 + cy
                    if yy < 0 or yy >= h:
                        continue
                    wy = ly if cy else 1.0 - ly
                    dwy = 1.0 if cy else -1.0
                    for cx in range(2):
                        xx = x0 + cx
                        if xx < 0 or xx >= w:
                            continue
                        wx = lx if cx else 1.0 - lx
                        dwx = 1.0 if cx else -1.0
                        idx = s0 + yy * w + xx
                        v = value[n, idx, m, d]
                        cuda.atomic.add(grad_value, (n, idx, m, d), a * wy * wx * g)
                        g_attn += wy * wx * v * g
                        g_x += wy * dwx * v * g
                        g_y += dwy * wx * v * g
                cuda.atomic.add(grad_attn, (n, q, m, lvl, p), g_attn)
                cuda.atomic.add(grad_loc, (n, q, m, lvl, p, 0), g_x * a * w)
                cuda.atomic.add(grad_loc, (n, q, m, lvl, p, 1), g_y * a * h)

    return forward, backward


def kernels():
    global _cuda_kernels
    if _cuda_kernels is None:
        _cuda_kernels = _build_kernels()
    return _cuda_kernels


def launch_forward(value, shapes, starts, loc, attn, out, stream=0):
    """Run the CUDA forward on device arrays (``__cuda_array_interface__`` objects)."""
    forward, _ = kernels()
    total = out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3]
    if total:
        forward[(total + 255) // 256, 256, stream](value, shapes, starts, loc, attn, out)


def launch_backward(value, shapes, starts, loc, attn, grad, grad_value, grad_loc,
                         grad_attn, stream=0):
    _, backward = kernels()
    total = grad.shape[0] * grad.shape[1] * grad.shape[2] * grad.shape[3]
    if total:
        backward[(total + 255) // 256, 256, stream](value, shapes, starts, loc, attn, grad,
                                                    grad_value, grad_loc, grad_attn)


def _cuda_views(value, shapes, loc, attn):
    from numba import cuda

    s, starts = level_tables(shapes)
    dev = value.device
    s_t = torch.as_tensor(s, device=dev)
    st_t = torch.as_tensor(starts, device=dev)
    stream = cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)
    arr = cuda.as_cuda_array
    return (arr(value.detach().contiguous()), arr(s_t), arr(st_t),
            arr(loc.detach().contiguous()), arr(attn.detach().contiguous()), stream,
            (s_t, st_t))


def forward_cuda(value, shapes, loc, attn):
    from numba import cuda

    n, _, m, d = value.shape
    out = value.new_empty(n, loc.shape[1], m, d)
    v, s, st, lo, at, stream, _keep = _cuda_views(value, shapes, loc, attn)
    launch_forward(v, s, st, lo, at, cuda.as_cuda_array(out), stream)
    return out.view(n, loc.shape[1], m * d)


def backward_cuda(grad, value, shapes, loc, attn):
    from numba import cuda

    n, _, m, d = value.shape
    grad_value = torch.zeros_like(value)
    grad_loc = torch.zeros_like(loc)
    grad_attn = torch.zeros_like(attn)
    v, s, st, lo, at, stream, _keep = _cuda_views(value, shapes, loc, attn)
    g = cuda.as_cuda_array(grad.contiguous().view(n, loc.shape[1], m, d))
    arr = cuda.as_cuda_array
    launch_backward(v, s, st, lo, at, g, arr(grad_value), arr(grad_loc), arr(grad_attn),
                         stream)
    return grad_value, grad_loc, grad_attn
