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
# value [N,S,M,D], shapes [L,2] int64, starts [L] int64, loc [N,Lq,M,L,P,2], attn [N,Lq,M,L,P]


@njit(inline="always")
def _corners(x: float, y: float, h: int, w: int):
    """grid_sample's bilinear corners of pixel position (x, y): top-left integer corner,
    fractional parts, and whether the point can touch the map at all."""
    inside = x >= -1.0 and y >= -1.0 and x <= w and y <= h  # False for NaN too
    if not inside:
        return False, 0, 0, 0.0, 0.0
    x0, y0 = math.floor(x), math.floor(y)
    return True, int(x0), int(y0), x - x0, y - y0


@njit(parallel=True, cache=True)
def _forward_cpu(value, shapes, starts, loc, attn, out):
    n_, _, m_, d_ = value.shape
    lq, nl, np_ = loc.shape[1], loc.shape[3], loc.shape[4]
    for task in prange(n_ * lq):  # one (batch, query) per task: it owns out[n, q]
        n, q = task // lq, task % lq
        for m in range(m_):
            for lvl in range(nl):
                h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
                for p in range(np_):
                    ok, x0, y0, lx, ly = _corners(loc[n, q, m, lvl, p, 0] * w - 0.5,
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
                            wgt = a * wy * (lx if cx else 1.0 - lx)
                            idx = s0 + yy * w + xx
                            for d in range(d_):
                                out[n, q, m, d] += wgt * value[n, idx, m, d]


@njit(parallel=True, cache=True)
def _backward_loc_attn_cpu(value, shapes, starts, loc, attn, grad, grad_loc, grad_attn):
    n_, _, m_, d_ = value.shape
    lq, nl, np_ = loc.shape[1], loc.shape[3], loc.shape[4]
    for task in prange(n_ * lq):  # owns grad_loc[n, q], grad_attn[n, q]
        n, q = task // lq, task % lq
        for m in range(m_):
            for lvl in range(nl):
                h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
                for p in range(np_):
                    ok, x0, y0, lx, ly = _corners(loc[n, q, m, lvl, p, 0] * w - 0.5,
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
                            dot = 0.0
                            for d in range(d_):
                                dot += grad[n, q, m, d] * value[n, idx, m, d]
                            g_attn += wy * wx * dot
                            g_x += wy * dwx * dot
                            g_y += dwy * wx * dot
                    grad_attn[n, q, m, lvl, p] = g_attn
                    grad_loc[n, q, m, lvl, p, 0] = g_x * a * w
                    grad_loc[n, q, m, lvl, p, 1] = g_y * a * h


@njit(parallel=True, cache=True)
def _backward_value_cpu(shapes, starts, loc, attn, grad, grad_value, chunks):
    n_, _, m_, d_ = grad_value.shape
    lq, nl, np_ = loc.shape[1], loc.shape[3], loc.shape[4]
    step = (d_ + chunks - 1) // chunks
    # one (batch, head, channel chunk) per task: it owns grad_value[n, :, m, chunk]; more
    # chunks keep all cores busy when they outnumber batch x heads
    for task in prange(n_ * m_ * chunks):
        n, rest = task // (m_ * chunks), task % (m_ * chunks)
        m, c = rest // chunks, rest % chunks
        d_lo, d_hi = c * step, min(d_, (c + 1) * step)
        for q in range(lq):
            for lvl in range(nl):
                h, w, s0 = shapes[lvl, 0], shapes[lvl, 1], starts[lvl]
                for p in range(np_):
                    ok, x0, y0, lx, ly = _corners(loc[n, q, m, lvl, p, 0] * w - 0.5,
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
                            wgt = a * wy * (lx if cx else 1.0 - lx)
                            idx = s0 + yy * w + xx
                            for d in range(d_lo, d_hi):
                                grad_value[n, idx, m, d] += wgt * grad[n, q, m, d]


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


def _forward_numba(value, shapes, loc, attn):
    n, _, m, d = value.shape
    out = np.zeros((n, loc.shape[1], m, d), dtype=_np(value).dtype)
    s, starts = _shape_arrays(shapes)
    _numba_threads()
    _forward_cpu(_np(value), s, starts, _np(loc), _np(attn), out)
    return torch.from_numpy(out).view(n, loc.shape[1], m * d)


def _backward_numba(grad, value, shapes, loc, attn):
    n, _, m, d = value.shape
    v, lo, at = _np(value), _np(loc), _np(attn)
    g = _np(grad).reshape(n, loc.shape[1], m, d)
    s, starts = _shape_arrays(shapes)
    threads = _numba_threads()
    grad_value = np.zeros_like(v)
    grad_loc = np.zeros_like(lo)
    grad_attn = np.zeros_like(at)
    _backward_loc_attn_cpu(v, s, starts, lo, at, g, grad_loc, grad_attn)
    chunks = max(1, min(d, -(-threads // max(n * m, 1))))
    _backward_value_cpu(s, starts, lo, at, g, grad_value, chunks)
    return torch.from_numpy(grad_value), torch.from_numpy(grad_loc), torch.from_numpy(grad_attn)


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
