"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021, Sec. 4.1).

``ms_deform_attn`` samples each head's value map at a few learned points per level and sums
them with learned weights. Three backends compute the same thing, with the official core's
semantics and F.grid_sample's bilinear rule (``align_corners=False``, zero padding: points
outside a map contribute zero):

- ``torch``: the pure-PyTorch reference (grid_sample), kept as the ground truth;
- ``numba``: fused CPU kernels (``@njit(parallel=True)``), forward and backward, that never
  materialize the ``[N,M,D,Lq,L,P]`` samples. Each parallel task owns the outputs it writes,
  so results are deterministic;
- ``cuda``: Numba CUDA kernels on torch's current stream, reading torch tensors in place
  (atomics scatter the value gradient, so its float sums may differ run to run).

All three sit behind one custom op with a registered backward (``torch.library``), which
torch.compile treats as a single opaque call. float32 and float64 are computed as given;
half and bfloat16 inputs (e.g. under autocast) are computed in float32 and the result is
returned in the dtype of ``value``.
"""
from __future__ import annotations

import math
import os
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor, nn

BACKENDS = ("torch", "numba", "cuda")


# ---------------------------------------------------------------- reference (torch)


def ms_deform_attn_torch(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor,
                         attn: Tensor) -> Tensor:
    """The grid_sample formulation of the official repository (ground truth)."""
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = loc.shape
    grids = 2 * loc - 1
    samples = []
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = v.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)          # [N*M, D, H, W]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)              # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                 # [N*M, D, Lq, P]
    a = attn.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1)           # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2)


# ------------------------------------------------------------------- CPU (Numba)
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


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _shape_arrays(shapes: list[int]):
    s = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(s[:, 0] * s[:, 1])[:-1]]).astype(np.int64)
    return s, starts


def _numba_threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


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
        v = _np(value)
        strides = (s_ * m * d, d, m * d)
    s, starts = _shape_arrays(shapes)
    return (v.reshape(-1), np.asarray(strides, dtype=np.int64), s, s.astype(v.dtype), starts,
            _np(loc), _np(attn), v.dtype.type(1))


def _forward_numba(value, shapes, loc, attn):
    n, _, m, d = value.shape
    vflat, vstr, s, sizes, starts, lo, at, one = _cpu_args(value, shapes, loc, attn)
    out = np.zeros((n, loc.shape[1], m, d), dtype=vflat.dtype)
    _numba_threads()
    _forward_cpu(vflat, vstr, s, sizes, starts, lo, at, out, one)
    return torch.from_numpy(out).view(n, loc.shape[1], m * d)


def _backward_numba(grad, value, shapes, loc, attn):
    n, s_, m, d = value.shape
    vflat, vstr, s, sizes, starts, lo, at, one = _cpu_args(value, shapes, loc, attn)
    g = _np(grad).reshape(n, loc.shape[1], m, d)
    threads = _numba_threads()
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


# ------------------------------------------------------------------ CUDA (Numba)

_cuda_kernels = None
cuda = None  # numba.cuda, imported on first use (importing it costs a second)


def _build_cuda_kernels():
    """Compile-on-first-use CUDA kernels (also under NUMBA_ENABLE_CUDASIM=1). The kernels
    reach ``cuda`` as a module global, which is what the simulator swaps for its own."""
    global cuda
    from numba import cuda as numba_cuda

    cuda = numba_cuda

    @cuda.jit(device=True, inline=True)
    def bilinear_setup(x, y, h, w):
        if not (x >= -1.0 and y >= -1.0 and x <= w and y <= h):
            return False, 0, 0, 0.0, 0.0
        x0 = math.floor(x)
        y0 = math.floor(y)
        return True, int(x0), int(y0), x - x0, y - y0

    @cuda.jit
    def forward(value, shapes, starts, loc, attn, out):
        # one thread per output element (n, q, m, d)
        i = cuda.grid(1)
        n_, lq, m_, d_ = out.shape
        if i >= n_ * lq * m_ * d_:
            return
        d = i % d_
        m = (i // d_) % m_
        q = (i // (d_ * m_)) % lq
        n = i // (d_ * m_ * lq)
        acc = 0.0
        for lvl in range(loc.shape[3]):
            h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
            for p in range(loc.shape[4]):
                ok, x0, y0, lx, ly = bilinear_setup(loc[n, q, m, lvl, p, 0] * w - 0.5,
                                                    loc[n, q, m, lvl, p, 1] * h - 0.5, h, w)
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
        d = i % d_
        m = (i // d_) % m_
        q = (i // (d_ * m_)) % lq
        n = i // (d_ * m_ * lq)
        g = grad[n, q, m, d]
        for lvl in range(loc.shape[3]):
            h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
            for p in range(loc.shape[4]):
                ok, x0, y0, lx, ly = bilinear_setup(loc[n, q, m, lvl, p, 0] * w - 0.5,
                                                    loc[n, q, m, lvl, p, 1] * h - 0.5, h, w)
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


def cuda_kernels():
    global _cuda_kernels
    if _cuda_kernels is None:
        _cuda_kernels = _build_cuda_kernels()
    return _cuda_kernels


def launch_cuda_forward(value, shapes, starts, loc, attn, out, stream=0):
    """Run the CUDA forward on device arrays (``__cuda_array_interface__`` objects)."""
    forward, _ = cuda_kernels()
    total = out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3]
    if total:
        forward[(total + 255) // 256, 256, stream](value, shapes, starts, loc, attn, out)


def launch_cuda_backward(value, shapes, starts, loc, attn, grad, grad_value, grad_loc,
                         grad_attn, stream=0):
    _, backward = cuda_kernels()
    total = grad.shape[0] * grad.shape[1] * grad.shape[2] * grad.shape[3]
    if total:
        backward[(total + 255) // 256, 256, stream](value, shapes, starts, loc, attn, grad,
                                                    grad_value, grad_loc, grad_attn)


def _cuda_views(value, shapes, loc, attn):
    from numba import cuda

    s, starts = _shape_arrays(shapes)
    dev = value.device
    s_t = torch.as_tensor(s, device=dev)
    st_t = torch.as_tensor(starts, device=dev)
    stream = cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)
    arr = cuda.as_cuda_array
    return (arr(value.detach().contiguous()), arr(s_t), arr(st_t),
            arr(loc.detach().contiguous()), arr(attn.detach().contiguous()), stream,
            (s_t, st_t))


def _forward_cuda(value, shapes, loc, attn):
    from numba import cuda

    n, _, m, d = value.shape
    out = value.new_empty(n, loc.shape[1], m, d)
    v, s, st, lo, at, stream, _keep = _cuda_views(value, shapes, loc, attn)
    launch_cuda_forward(v, s, st, lo, at, cuda.as_cuda_array(out), stream)
    return out.view(n, loc.shape[1], m * d)


def _backward_cuda(grad, value, shapes, loc, attn):
    from numba import cuda

    n, _, m, d = value.shape
    grad_value = torch.zeros_like(value)
    grad_loc = torch.zeros_like(loc)
    grad_attn = torch.zeros_like(attn)
    v, s, st, lo, at, stream, _keep = _cuda_views(value, shapes, loc, attn)
    g = cuda.as_cuda_array(grad.contiguous().view(n, loc.shape[1], m, d))
    arr = cuda.as_cuda_array
    launch_cuda_backward(v, s, st, lo, at, g, arr(grad_value), arr(grad_loc), arr(grad_attn),
                         stream)
    return grad_value, grad_loc, grad_attn


# ----------------------------------------------------- one op, three backends


def _pairs(shapes: list[int]) -> list[tuple[int, int]]:
    return [(shapes[i], shapes[i + 1]) for i in range(0, len(shapes), 2)]


@torch.library.custom_op("qdet::ms_deform_attn", mutates_args=())
def _msda(value: Tensor, shapes: list[int], loc: Tensor, attn: Tensor, backend: str) -> Tensor:
    if backend == "numba":
        return _forward_numba(value, shapes, loc, attn)
    if backend == "cuda":
        return _forward_cuda(value, shapes, loc, attn)
    with torch.no_grad():
        return ms_deform_attn_torch(value, _pairs(shapes), loc, attn)


@_msda.register_fake
def _(value, shapes, loc, attn, backend):
    n, _, m, d = value.shape
    return value.new_empty(n, loc.shape[1], m * d)


@torch.library.custom_op("qdet::ms_deform_attn_backward", mutates_args=())
def _msda_backward(grad: Tensor, value: Tensor, shapes: list[int], loc: Tensor, attn: Tensor,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "numba":
        return _backward_numba(grad, value, shapes, loc, attn)
    if backend == "cuda":
        return _backward_cuda(grad, value, shapes, loc, attn)
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda v, lo, a: ms_deform_attn_torch(v, _pairs(shapes), lo, a),
                                value, loc, attn)
        return vjp(grad.contiguous())


@_msda_backward.register_fake
def _(grad, value, shapes, loc, attn, backend):
    return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)


def _setup(ctx, inputs, output):
    value, shapes, loc, attn, backend = inputs
    ctx.save_for_backward(value, loc, attn)
    ctx.shapes, ctx.backend = shapes, backend


def _backward(ctx, grad):
    value, loc, attn = ctx.saved_tensors
    gv, gl, ga = _msda_backward(grad, value, ctx.shapes, loc, attn, ctx.backend)
    return gv, None, gl, ga, None


_msda.register_autograd(_backward, setup_context=_setup)

_warned_no_cuda = False


def default_backend(device: torch.device) -> str:
    """numba on CPU, cuda on a GPU when Numba can use it (else the torch reference)."""
    global _warned_no_cuda
    if device.type == "cpu":
        return "numba"
    if device.type == "cuda":
        try:
            from numba import cuda

            if cuda.is_available():
                return "cuda"
        except Exception:  # noqa: BLE001 - numba's CUDA support is optional at run time
            pass
        if not _warned_no_cuda:
            warnings.warn("Numba cannot use this GPU (install numba-cuda and a CUDA driver); "
                          "deformable attention falls back to the PyTorch reference",
                          stacklevel=3)
            _warned_no_cuda = True
    return "torch"


def ms_deform_attn(value: Tensor, spatial_shapes, level_start_index, sampling_locations: Tensor,
                   attention_weights: Tensor, backend: str | None = None) -> Tensor:
    """Multi-scale deformable attention core (the official op's signature).

    Args:
        value: ``[N, S, M, D]`` per-head values of all levels, flattened row-major per level.
        spatial_shapes: ``[L, 2]`` (H, W) per level: a tensor or a list of int pairs (ints
            keep torch.compile free of tensor-dependent shapes).
        level_start_index: ``[L]`` offsets of the levels in ``S``; accepted for
            compatibility, derived from ``spatial_shapes``.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` normalized (x, y) in [0, 1].
        attention_weights: ``[N, Lq, M, L, P]``.
        backend: ``'torch'``, ``'numba'`` or ``'cuda'``; default by device.
    Returns:
        ``[N, Lq, M*D]``.
    """
    if torch.is_tensor(spatial_shapes):
        spatial_shapes = spatial_shapes.tolist()
    flat = [int(v) for hw in spatial_shapes for v in hw]
    backend = backend or default_backend(value.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "numba" and value.device.type != "cpu":
        raise ValueError("the numba backend runs on the CPU; move the tensors or use 'cuda'")
    if backend == "cuda" and value.device.type != "cuda":
        raise ValueError("the cuda backend needs CUDA tensors")
    dtype = value.dtype
    if dtype in (torch.float16, torch.bfloat16) or sampling_locations.dtype != dtype or \
            attention_weights.dtype != dtype:
        work = torch.float64 if torch.float64 in (dtype, sampling_locations.dtype) else \
            torch.float32
        with torch.autocast(value.device.type, enabled=False):
            out = _msda(value.to(work), flat, sampling_locations.to(work),
                        attention_weights.to(work), backend)
        return out.to(dtype)
    return _msda(value, flat, sampling_locations, attention_weights, backend)


# --------------------------------------------------------------------------- module


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (paper Eq. 3), parameter names as in the
    official code: ``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``.

    Reference points are ``[N, Lq, L, 2]`` normalized points, or ``[N, Lq, L, 4]`` boxes
    (cx, cy, w, h), in which case offsets are scaled by half the box size per point (box
    refinement and two-stage models).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (d_model, n_levels, n_heads,
                                                                     n_points)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: each head's points start on a ring around the reference point,
        in its own direction, at distances 1..P (in pixels of each level)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values          # onto the unit square
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                shapes: list[tuple[int, int]], padding_mask: Tensor | None = None,
                backend: str | None = None) -> Tensor:
        """query ``[N,Lq,C]``, value ``[N,S,C]`` (all levels), padding_mask ``[N,S]``
        (True on padding) -> ``[N,Lq,C]``."""
        n, lq, _ = query.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, v.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, nl, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, nl * p).softmax(-1)
        weights = weights.view(n, lq, m, nl, p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype,
                                device=query.device)
            loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :,
                                                                             None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must end in 2 (points) or 4 (boxes), got "
                             f"{reference_points.shape[-1]}")
        return self.output_proj(ms_deform_attn(v, shapes, None, loc, weights, backend))
