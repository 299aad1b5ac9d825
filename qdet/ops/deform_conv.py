"""Modulated deformable convolution (DCNv2: Zhu et al., "Deformable ConvNets v2", CVPR 2019),
Dynamic DETR's spatial attention, with torchvision's ``deform_conv2d`` semantics when given
a mask: offsets ``[N, 2*G*K, Hout, Wout]`` ordered (offset group, kernel tap, (dy, dx)), mask
``[N, G*K, Hout, Wout]``, zero padding outside the map (see ``qdet.ops.deform_conv_kernels`` for
the exact sampling rule). A NaN or infinite sampling position contributes zero (torchvision's
CPU kernel reads out of bounds there).

The op is two steps: bilinear sampling of every tap into columns ``[N, C*K, Hout*Wout]``
with the mask folded in, then one matrix product with the weight ``[Cout, C/groups*K]``
(which carries nearly all the arithmetic), plus the bias. The kernel backends take the
channels in blocks (``COLUMNS_BUDGET`` bytes of sampled columns per block) and sample
each block again in the backward rather than keeping its columns, so a training step holds
no more memory than torchvision's op (``qdet bench deform-conv``). Three backends sample:

- ``torch``: a gather formulation in plain PyTorch, differentiated by autograd (reference);
- ``numba``: fused CPU kernels, forward and backward, deterministic;
- ``cuda``: Numba CUDA kernels on torch's current stream (atomics in the input gradient).

A fourth, ``torchvision``, is torchvision's own ``deform_conv2d`` in float32: the independent
reference of the tests and the baseline of ``qdet bench deform-conv``.

Sampling runs in float64 when an input is float64, else in float32. The product runs in the
low-precision dtype of autocast or of the input only where the hardware has it (a GPU, or a
CPU with native bfloat16): elsewhere oneDNN emulates bfloat16 several times slower than
float32 (measured in development), so it stays in float32; the result is returned in the
low-precision dtype all the same, as a convolution under autocast would be.

While a model is exported to ONNX (``qdet.blocks.base.exporting()``) the op is torchvision's, which
``qdet.export`` maps to ONNX DeformConv (opset 19).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from . import deform_conv_kernels as kernels
from .backends import default_backend, run_cuda
from .modes import bf16_native, exporting

BACKENDS = ("torch", "numba", "cuda", "torchvision")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ---------------------------------------------------------------- reference (torch)


def im2col_torch(x: Tensor, offset: Tensor, mask: Tensor, geo) -> Tensor:
    """Columns ``[N, C*K, P]`` by gathering the four corners of every tap; ``geo`` as
    :func:`qdet.ops.deform_conv_kernels.geometry`."""
    kh, kw, sh, sw, ph, pw, dh, dw, wo = (int(v) for v in geo)
    n, c, h, w = x.shape
    k, p = kh * kw, mask.shape[-2] * mask.shape[-1]
    ho = p // wo
    g = mask.shape[1] // k
    off = offset.reshape(n, g, k, 2, p)
    dev, dt = x.device, x.dtype
    # where tap (i, j) of output pixel (oy, ox) samples before its offset: [K, P]
    by = (torch.arange(kh, device=dev) * dh)[:, None, None, None] \
        + (torch.arange(ho, device=dev) * sh - ph)[None, None, :, None]
    bx = (torch.arange(kw, device=dev) * dw)[None, :, None, None] \
        + (torch.arange(wo, device=dev) * sw - pw)[None, None, None, :]
    by, bx = by.expand(kh, kw, ho, wo).reshape(k, p), bx.expand(kh, kw, ho, wo).reshape(k, p)
    y, xx = by.to(dt) + off[:, :, :, 0], bx.to(dt) + off[:, :, :, 1]        # [N, G, K, P]
    ok = (y >= -1) & (y < h) & (xx >= -1) & (xx < w)                        # False for NaN
    y, xx = torch.where(ok, y, 0.0), torch.where(ok, xx, 0.0)
    y0, x0 = y.floor(), xx.floor()
    ly, lx = y - y0, xx - x0
    xg = x.reshape(n, g, c // g, h * w)
    cols = 0
    for cy in (0, 1):
        for cx in (0, 1):
            yy, xc = y0 + cy, x0 + cx
            inside = ok & (yy >= 0) & (yy < h) & (xc >= 0) & (xc < w)
            wgt = (ly if cy else 1 - ly) * (lx if cx else 1 - lx) * inside
            idx = (yy.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()     # [N, G, K, P]
            v = xg.gather(3, idx.view(n, g, 1, k * p).expand(n, g, c // g, k * p))
            cols = cols + v.view(n, g, c // g, k, p) * wgt[:, :, None]
    cols = cols * mask.reshape(n, g, 1, k, p)
    return cols.reshape(n, c * k, p)


# ----------------------------------------------------- one op, two kernel backends

COLUMNS_BUDGET = 16 * 2**20   # bytes of sampled columns per channel block (kernel backends)


def _im2col(x: Tensor, offset: Tensor, mask: Tensor, geo, backend: str) -> Tensor:
    g = np.asarray(geo, dtype=np.int64)
    if backend == "cuda":   # the gather formulation where Numba's kernels cannot run
        return run_cuda("deformable convolution forward", x.device,
                        lambda: kernels.im2col_cuda(x, offset, mask, g),
                        lambda: im2col_torch(x, offset, mask, geo))
    return kernels.im2col_cpu(x, offset, mask, g)


def _im2col_backward(gcols: Tensor, x: Tensor, offset: Tensor, mask: Tensor, geo,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    g = np.asarray(geo, dtype=np.int64)
    if backend == "cuda":
        return run_cuda("deformable convolution backward", x.device,
                        lambda: kernels.im2col_backward_cuda(gcols, x, offset, mask, g),
                        lambda: _im2col_backward_torch(gcols, x, offset, mask, geo))
    return kernels.im2col_backward_cpu(gcols, x, offset, mask, g)


def _im2col_backward_torch(gcols, x, offset, mask, geo):
    """The gradients of :func:`im2col_torch` (x, offset, mask) for columns' ``gcols``."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda a, b, c: im2col_torch(a, b, c, geo), x, offset, mask)
        return vjp(gcols.to(x.dtype))


def channel_blocks(x: Tensor, offset_groups: int, groups: int, k: int, p: int):
    """Blocks of input channels sampled and multiplied together, each with at most
    ``COLUMNS_BUDGET`` bytes of columns (more only when one channel alone needs more; its
    low-precision copy and gradient come on top). A block lies inside one offset group and
    one convolution group: yields
    ``(c0, c1, offset group, convolution group)``."""
    n, c = x.shape[:2]
    step = math.gcd(c // offset_groups, c // groups)
    per_channel = n * k * p * x.element_size()
    size = max([b for b in range(1, step + 1) if step % b == 0
                and b * per_channel <= COLUMNS_BUDGET] or [1])
    for c0 in range(0, c, size):
        yield c0, c0 + size, c0 // (c // offset_groups), c0 // (c // groups)


def _block_inputs(x, offset, mask, c0, c1, og, k):
    """The block's channels and its offset group's offsets and mask, contiguous."""
    n, g2k = offset.shape[:2]
    if g2k == 2 * k:                      # one offset group: the tensors as they are
        return x[:, c0:c1].contiguous(), offset, mask
    return (x[:, c0:c1].contiguous(), offset[:, og * 2 * k:(og + 1) * 2 * k].contiguous(),
            mask[:, og * k:(og + 1) * k].contiguous())


def _sizes(x, offset, mask, weight, geo, mm):
    """Taps, images, output pixels, output channels, input and output channels per
    convolution group, groups, offset groups, the product's dtype and the weight as the
    ``[Cout, Cin/groups * K]`` matrix in it."""
    k = geo[0] * geo[1]
    cout, cin_g = weight.shape[:2]
    groups = x.shape[1] // cin_g
    mm_dtype = getattr(torch, mm)
    return (k, x.shape[0], mask.shape[-2] * mask.shape[-1], cout, cin_g, cout // groups,
            groups, offset.shape[1] // (2 * k), mm_dtype,
            weight.to(mm_dtype).reshape(cout, cin_g * k))


@torch.library.custom_op("qdet::deform_conv2d", mutates_args=())
def _fused(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor],
           geo: list[int], backend: str, mm: str) -> Tensor:
    """Sampling and weight product block by block of channels (``channel_blocks``), the
    products summed in the sampling dtype; out ``[N, Cout, Hout, Wout]`` in x's dtype."""
    k, n, p, cout, cin_g, cout_g, groups, og, mm_dtype, wmat = _sizes(x, offset, mask, weight,
                                                                      geo, mm)
    out = x.new_zeros(n, cout, p)
    for c0, c1, g, grp in channel_blocks(x, og, groups, k, p):
        cols = _im2col(*_block_inputs(x, offset, mask, c0, c1, g, k), geo, backend)
        w0 = (c0 - grp * cin_g) * k
        part = torch.matmul(wmat[grp * cout_g:(grp + 1) * cout_g, w0:w0 + (c1 - c0) * k],
                            cols.to(mm_dtype))                            # [N, Cout/g, P]
        del cols
        out[:, grp * cout_g:(grp + 1) * cout_g] += part
    if bias is not None:
        out += bias.to(out.dtype).view(1, cout, 1)
    return out.view(n, cout, p // geo[8], geo[8])


@_fused.register_fake
def _(x, offset, mask, weight, bias, geo, backend, mm):
    return x.new_empty(x.shape[0], weight.shape[0], mask.shape[-2], mask.shape[-1])


@torch.library.custom_op("qdet::deform_conv2d_backward", mutates_args=())
def _fused_backward(grad: Tensor, x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                    geo: list[int], backend: str, mm: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, offset, mask and weight. Each block's columns are sampled again
    rather than kept from the forward (as torchvision's op does), so a training step holds
    no more columns than the forward did."""
    k, n, p, cout, cin_g, cout_g, groups, og, mm_dtype, wmat = _sizes(x, offset, mask, weight,
                                                                      geo, mm)
    gout = grad.reshape(n, cout, p).to(mm_dtype)
    gx, goff, gmask = torch.empty_like(x), torch.zeros_like(offset), torch.zeros_like(mask)
    gw = torch.zeros(cout, cin_g * k, dtype=x.dtype, device=x.device)
    for c0, c1, g, grp in channel_blocks(x, og, groups, k, p):
        xb, ob, mb = _block_inputs(x, offset, mask, c0, c1, g, k)
        rows, w0 = slice(grp * cout_g, (grp + 1) * cout_g), (c0 - grp * cin_g) * k
        cols = slice(w0, w0 + (c1 - c0) * k)
        go = gout[:, rows]                                                # [N, Cout/g, P]
        sampled = _im2col(xb, ob, mb, geo, backend).to(mm_dtype)
        gw_block = gw[rows, cols]
        for i in range(n):   # image by image: no [N, Cout, (c1-c0)K] partial products
            gw_block.add_(torch.mm(go[i], sampled[i].t()))
        del sampled
        gcols = torch.matmul(wmat[rows, cols].t(), go)                    # [N, (c1-c0)K, P]
        gxb, gob, gmb = _im2col_backward(gcols, xb, ob, mb, geo, backend)
        del gcols
        gx[:, c0:c1] = gxb
        goff[:, g * 2 * k:(g + 1) * 2 * k] += gob
        gmask[:, g * k:(g + 1) * k] += gmb
    return gx, goff, gmask, gw.view(weight.shape).to(weight.dtype)


@_fused_backward.register_fake
def _(grad, x, offset, mask, weight, geo, backend, mm):
    return (torch.empty_like(x), torch.empty_like(offset), torch.empty_like(mask),
            weight.new_empty(weight.shape))           # contiguous, as the real one


def _setup(ctx, inputs, output):
    x, offset, mask, weight, bias, geo, backend, mm = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.geo, ctx.backend, ctx.mm = geo, backend, mm
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, offset, mask, weight = ctx.saved_tensors
    gx, goff, gmask, gw = _fused_backward(grad.contiguous(), x, offset, mask, weight, ctx.geo,
                                          ctx.backend, ctx.mm)
    gb = None if ctx.bias_dtype is None else grad.sum((0, 2, 3)).to(ctx.bias_dtype)
    return gx, goff, gmask, gw, gb, None, None, None


_fused.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------- the op


def _low_precision(x: Tensor) -> torch.dtype | None:
    """The low-precision dtype the caller asked for: autocast's, or that of the input."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else None


def matmul_dtype(device: torch.device, low: torch.dtype | None, work: torch.dtype):
    """The product's dtype: ``low`` where the hardware runs it natively, else ``work``."""
    if low is None:
        return work
    if device.type == "cuda" or (low == torch.bfloat16 and bf16_native(device)):
        return low
    return work


def deform_conv2d_torchvision(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                              bias: Tensor | None, stride=1, padding=1, dilation=1) -> Tensor:
    """torchvision's op (the export path), in float32 (its CPU kernel has no bfloat16);
    NaN offsets become 0, since its kernel turns a NaN position into an out-of-bounds read
    and crashes the process."""
    offset = torch.where(torch.isnan(offset), 0.0, offset)
    with torch.autocast(x.device.type, enabled=False):
        return torchvision.ops.deform_conv2d(
            x.float(), offset.float(), weight.float(),
            None if bias is None else bias.float(), stride, padding, dilation, mask.float())


def deform_conv2d(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                  bias: Tensor | None = None, stride=1, padding=1, dilation=1,
                  backend: str | None = None, mm_dtype: torch.dtype | None = None) -> Tensor:
    """Modulated deformable convolution.

    Args:
        x: ``[N, C, H, W]``.
        offset: ``[N, 2*G*K, Hout, Wout]`` (dy, dx) per offset group and tap, K = kh*kw.
        mask: ``[N, G*K, Hout, Wout]`` modulation (after the sigmoid).
        weight: ``[Cout, C/groups, kh, kw]``; groups follow from its shape.
        bias: ``[Cout]`` or None.
        stride, padding, dilation: ints or (h, w) pairs.
        backend: ``'torch'``, ``'numba'``, ``'cuda'`` or ``'torchvision'``; default by
            device.
        mm_dtype: the weight product's dtype; default :func:`matmul_dtype`.
    Returns:
        ``[N, Cout, Hout, Wout]``, in the low-precision dtype under autocast or for such
        an input, else in the sampling dtype; always float32 with the ``torchvision``
        backend and while exporting (torchvision's CPU kernel has no other).
    """
    if exporting() or backend == "torchvision":
        return deform_conv2d_torchvision(x, offset, mask, weight, bias, stride, padding,
                                         dilation)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    k = kh * kw
    if c % cin_g or cout % (c // cin_g):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {c} input channels")
    groups = c // cin_g
    if offset.shape[1] % (2 * k) or offset.shape[1] == 0:
        raise ValueError(f"offset has {offset.shape[1]} channels; expected 2 x {k} taps x "
                         "offset groups")
    og = offset.shape[1] // (2 * k)
    if c % og:
        raise ValueError(f"{c} input channels are not divisible by {og} offset groups")
    if mask.shape[1] != og * k:
        raise ValueError(f"mask has {mask.shape[1]} channels; expected {og * k}")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if tuple(offset.shape[-2:]) != (ho, wo) or tuple(mask.shape[-2:]) != (ho, wo) \
            or offset.shape[0] != n or mask.shape[0] != n:
        raise ValueError(f"offset {tuple(offset.shape)} and mask {tuple(mask.shape)} must be "
                         f"[{n}, *, {ho}, {wo}] for this input and kernel")
    backend = backend or default_backend(x.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "numba" and x.device.type != "cpu":
        raise ValueError("the numba backend runs on the CPU; move the tensors or use 'cuda'")
    if backend == "cuda" and x.device.type != "cuda":
        raise ValueError("the cuda backend needs CUDA tensors")
    low = _low_precision(x)
    work = torch.float64 if torch.float64 in (x.dtype, offset.dtype, mask.dtype) else \
        torch.float32
    mm = mm_dtype or matmul_dtype(x.device, low, work)
    geo = kernels.geometry(kh, kw, (sh, sw), (ph, pw), (dh, dw), wo)
    with torch.autocast(x.device.type, enabled=False):
        if backend != "torch":
            out = _fused(x.to(work).contiguous(), offset.to(work).contiguous(),
                         mask.to(work).contiguous(), weight, bias, [int(v) for v in geo],
                         backend, str(mm).removeprefix("torch."))
            return out.to(low or work)
        cols = im2col_torch(x.to(work), offset.to(work), mask.to(work), geo)
        p = ho * wo
        wmat = weight.to(mm).reshape(groups, cout // groups, cin_g * k)
        out = torch.matmul(wmat, cols.to(mm).view(n, groups, cin_g * k, p))  # [N,grp,Cout/g,P]
        out = out.view(n, cout, ho, wo)
        if bias is not None:
            out = out + bias.to(mm).view(1, cout, 1, 1)
    return out.to(low or work)


# --------------------------------------------------------------------------- module


class DeformConv2d(nn.Module):
    """A modulated deformable convolution layer whose parameters are named and initialized
    as torchvision's ``DeformConv2d`` (``weight``, ``bias``), so its checkpoints load."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=1, dilation=1, groups: int = 1, bias: bool = True,
                 backend: str | None = None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = in_channels // groups * kh * kw
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x ``[N,C,H,W]``, offset ``[N,2*G*K,Ho,Wo]``, mask ``[N,G*K,Ho,Wo]`` ->
        ``[N,Cout,Ho,Wo]``."""
        return deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride,
                             self.padding, self.dilation, self.backend)
