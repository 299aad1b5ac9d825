"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021, Sec. 4.1).

``ms_deform_attn`` samples each head's value map at a few learned points per level and sums
them with learned weights. Three backends compute the same thing, with the official core's
semantics and F.grid_sample's bilinear rule (``align_corners=False``, zero padding: points
outside a map contribute zero):

- ``torch``: the pure-PyTorch reference (grid_sample), kept as the ground truth;
- ``numba``: fused CPU kernels (``qdet.ops.deform_attn_kernels``), forward and backward, that
  never materialize the ``[N,M,D,Lq,L,P]`` samples. Each parallel task owns the outputs it
  writes, so results are deterministic;
- ``cuda``: Numba CUDA kernels (same module) on torch's current stream, reading torch tensors
  in place (atomics scatter the value gradient, so its float sums may differ run to run).

While a model is exported to ONNX (``qdet.blocks.base.exporting()``) the op is the traceable
grid_sample formulation ``ms_deform_attn_onnx`` (ONNX GridSample, opset 16), whatever the
backend.

All three sit behind one custom op with a registered backward (``torch.library``), which
torch.compile treats as a single opaque call. float32 and float64 are computed as given;
half and bfloat16 inputs (e.g. under autocast) are computed in float32 and the result is
returned in the dtype of ``value``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import deform_attn_kernels as kernels
from .backends import default_backend, run_cuda
from .modes import exporting

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


def ms_deform_attn_onnx(value: Tensor, shapes, loc: Tensor, attn: Tensor) -> Tensor:
    """The reference's grid_sample formulation with each level's weighted samples summed as
    it goes (what ONNX export traces): the same result, and in onnxruntime at Deformable
    DETR's 800x1066 encoder shapes faster than stacking every level's samples first or than
    a gather formulation (``qdet bench deform-attn-onnx``). ``shapes`` may hold traced
    sizes, so the graph keeps them dynamic."""
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = loc.shape
    grids = 2 * loc - 1
    a = attn.transpose(1, 2).reshape(n * m, 1, lq, nl, p)
    out = None
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = v.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)          # [N*M, D, H, W]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)              # [N*M, Lq, P, 2]
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        s = (s * a[:, :, :, lvl]).sum(-1)                                   # [N*M, D, Lq]
        out = s if out is None else out + s
    return out.view(n, m * d, lq).transpose(1, 2)


# ----------------------------------------------------- one op, three backends


def _pairs(shapes: list[int]) -> list[tuple[int, int]]:
    return [(shapes[i], shapes[i + 1]) for i in range(0, len(shapes), 2)]


@torch.library.custom_op("qdet::ms_deform_attn", mutates_args=())
def _msda(value: Tensor, shapes: list[int], loc: Tensor, attn: Tensor, backend: str) -> Tensor:
    if backend == "numba":
        return kernels.forward_cpu(value, shapes, loc, attn)
    if backend == "cuda":
        return run_cuda("deformable attention forward", value.device,
                        lambda: kernels.forward_cuda(value, shapes, loc, attn),
                        lambda: _reference_forward(value, shapes, loc, attn))
    return _reference_forward(value, shapes, loc, attn)


def _reference_forward(value, shapes, loc, attn):
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
        return kernels.backward_cpu(grad, value, shapes, loc, attn)
    if backend == "cuda":
        return run_cuda("deformable attention backward", value.device,
                        lambda: kernels.backward_cuda(grad, value, shapes, loc, attn),
                        lambda: _reference_backward(grad, value, shapes, loc, attn))
    return _reference_backward(grad, value, shapes, loc, attn)


def _reference_backward(grad, value, shapes, loc, attn):
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
    if exporting():
        return ms_deform_attn_onnx(value, spatial_shapes, sampling_locations, attention_weights)
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

    def sampling(self, query: Tensor, reference_points: Tensor,
                 shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Where each head samples and with what weight, as the op receives them: locations
        ``[N,Lq,M,L,P,2]`` (normalized x, y per level) and weights ``[N,Lq,M,L,P]`` (softmax
        over a head's L*P points). ``qdet.explain`` reads them through this method."""
        n, lq, _ = query.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(n, lq, m, nl, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, nl * p).softmax(-1)
        weights = weights.view(n, lq, m, nl, p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            if exporting():  # traced sizes: a tensor op, not a constant
                norm = torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)])
                                    for h, w in shapes]).to(query)
            else:
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
        return loc, weights

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                shapes: list[tuple[int, int]], padding_mask: Tensor | None = None,
                backend: str | None = None) -> Tensor:
        """query ``[N,Lq,C]``, value ``[N,S,C]`` (all levels), padding_mask ``[N,S]``
        (True on padding) -> ``[N,Lq,C]``."""
        n = query.shape[0]
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, v.shape[1], self.n_heads, self.d_model // self.n_heads)
        loc, weights = self.sampling(query, reference_points, shapes)
        return self.output_proj(ms_deform_attn(v, shapes, None, loc, weights, backend))
