"""RoIAlign (He et al., Mask R-CNN, 2017) as torchvision's ``roi_align`` computes it, with a
Numba CPU kernel: the pooler of Sparse R-CNN's and Dynamic DETR's heads.

torchvision's CPU kernels walk the boxes one after another on one core, and its backward
(which scatters onto the feature map) took about a third of Dynamic DETR's training step
on the built-in preset (measured with the profiler in development). Here the forward runs
a task per box and the backward a task per (image, block of channels), on channels-last
maps so that each bilinear sample reads and writes whole channel vectors; the results are
deterministic. The output is ``[K, C, PH, PW]`` in channels-last memory, so the heads'
``flatten(2).transpose(1, 2)`` to ``[K, PH*PW, C]`` is free.

Backends: ``numba`` (CPU, default there) and ``torchvision`` (its op: GPUs, ONNX export,
and the reference the tests compare with). Float64 inputs run in float64, others in
float32 and are returned in their own dtype (torchvision's autocast rule).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

from . import roi_align_kernels as kernels
from .modes import exporting

BACKENDS = ("numba", "torchvision")


@torch.library.custom_op("qdet::roi_align", mutates_args=())
def _roi_align(x: Tensor, rois: Tensor, size: list[int], scale: float, ratio: int,
               aligned: bool) -> Tensor:
    return kernels.forward_cpu(x, rois, (size[0], size[1]), scale, ratio, aligned)


@_roi_align.register_fake
def _(x, rois, size, scale, ratio, aligned):
    return x.new_empty(rois.shape[0], size[0], size[1], x.shape[-1])


@torch.library.custom_op("qdet::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: Tensor, rois: Tensor, shape: list[int], scale: float,
                        ratio: int, aligned: bool) -> Tensor:
    return kernels.backward_cpu(grad, rois, shape, scale, ratio, aligned)


@_roi_align_backward.register_fake
def _(grad, rois, shape, scale, ratio, aligned):
    return grad.new_empty(shape)


def _setup(ctx, inputs, output):
    x, rois, size, scale, ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = list(x.shape), scale, ratio, aligned


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    shape, scale, ratio, aligned = ctx.args
    gx = _roi_align_backward(grad.contiguous(), rois, shape, scale, ratio, aligned)
    return gx, None, None, None, None, None


_roi_align.register_autograd(_backward, setup_context=_setup)


def prepare_map(x: Tensor, backend: str | None = None) -> Tensor:
    """``x`` in the dtype and memory layout that :func:`roi_align` with ``backend`` reads
    (numba: float32 or float64, channels last; torchvision: contiguous), so that a map
    pooled many times is converted once."""
    if _backend(x, backend) == "torchvision":
        return x.contiguous()
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(work).contiguous(memory_format=torch.channels_last)


def roi_align(x: Tensor, rois: Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              backend: str | None = None) -> Tensor:
    """torchvision's ``roi_align``: x ``[N, C, H, W]``, rois ``[K, 5]`` (image index, x1,
    y1, x2, y2 in input pixels) -> ``[K, C, PH, PW]``. No gradient reaches ``rois``.
    ``backend``: ``'numba'`` (default on the CPU) or ``'torchvision'`` (default elsewhere,
    and while exporting to ONNX)."""
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    backend = _backend(x, backend)
    if backend == "torchvision" or exporting():
        return tv_roi_align(x, rois, size, spatial_scale, sampling_ratio, aligned)
    if x.device.type != "cpu" or rois.device != x.device:
        raise ValueError("the numba backend runs on the CPU (map and rois); move the tensors "
                         "or use 'torchvision'")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5] (image index, x1, y1, x2, y2), got "
                         f"{tuple(rois.shape)}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rois = rois.detach().to(work)                   # the dtype the kernel reads them in
    if rois.shape[0] and not (0 <= rois[:, 0].min() and rois[:, 0].max() < x.shape[0]):
        raise ValueError(f"rois name images outside the batch of {x.shape[0]}")
    nhwc = x.to(work).permute(0, 2, 3, 1).contiguous()     # free for a channels-last map
    with torch.autocast("cpu", enabled=False):
        out = _roi_align(nhwc, rois, [int(size[0]), int(size[1])], float(spatial_scale),
                         int(sampling_ratio), bool(aligned))
    return out.permute(0, 3, 1, 2).to(x.dtype if x.dtype.is_floating_point else work)


def _backend(x: Tensor, backend: str | None) -> str:
    if backend is None:
        return "numba" if x.device.type == "cpu" else "torchvision"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    return backend
