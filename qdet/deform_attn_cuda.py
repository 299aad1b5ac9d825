"""Multi-scale deformable attention on a GPU: Numba CUDA kernels (``qdet.deform_attn``'s
``cuda`` backend) launched on torch's current stream, reading torch tensors in place. Atomics
scatter the value gradient, so its float sums may differ run to run. The kernels also run
under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how CI tests them.
"""
from __future__ import annotations

import math

import torch

from .deform_attn_cpu import level_tables

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


def forward(value, shapes, loc, attn):
    from numba import cuda

    n, _, m, d = value.shape
    out = value.new_empty(n, loc.shape[1], m, d)
    v, s, st, lo, at, stream, _keep = _cuda_views(value, shapes, loc, attn)
    launch_forward(v, s, st, lo, at, cuda.as_cuda_array(out), stream)
    return out.view(n, loc.shape[1], m * d)


def backward(grad, value, shapes, loc, attn):
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
