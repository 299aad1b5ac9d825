"""Benchmarks of the modulated deformable convolution (``qdet bench deform-conv``): the op
at Dynamic DETR's shapes against torchvision's, and what qdet's kernels buy the whole model.
The shared measuring tools are in ``qdet.tools.bench``."""
from __future__ import annotations

import ctypes

import torch

from .bench import bench_inference, bench_training, peak_memory_mib, ratio, time_it

# Dynamic DETR's largest deformable convolution (P3, 3x3, d -> d): the built-in preset's
# training step (16 images of 128 px, d 128) and the paper's model at 800x1066 (d 256)
# (N, C, H, W), named short so that the bench's table fits 80 columns
DEFORM_CONV_SHAPES = {"preset": (16, 128, 16, 16), "paper": (1, 256, 100, 134)}


def deform_conv_inputs(shape, device, spread: float = 2.0, seed: int = 0):
    """Input, offsets (``spread`` pixels std, as a trained model's), mask, weight and bias
    of one 3x3 modulated deformable convolution with as many output channels as input."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    offset = torch.randn(n, 18, h, w, generator=g) * spread
    mask = torch.rand(n, 9, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.01
    bias = torch.randn(c, generator=g) * 0.01
    return [t.to(device) for t in (x, offset, mask, weight, bias)]


def mmap_large_allocations() -> None:
    """Make glibc serve every allocation above 64 KiB by mmap and give it back on free, so
    that a CPU peak (:func:`peak_memory_mib`) counts what is alive at the peak, not what
    malloc kept from earlier calls (its high-water mark otherwise moves by tens of MiB from
    run to run). It slows every later allocation, so it is for a process that only
    measures memory."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)      # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def deform_conv_step(shape, device, backend: str, bf16: bool, grad: bool = True):
    """A call of the deformable convolution at ``shape`` (see :data:`DEFORM_CONV_SHAPES`):
    forward (no grad) or forward+backward, optionally under bfloat16 autocast."""
    from ..ops.deform_conv import deform_conv2d

    dev = torch.device(device)
    tensors = deform_conv_inputs(shape, dev)

    def step():
        with torch.set_grad_enabled(grad):
            ts = [t.detach().requires_grad_(grad) for t in tensors]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = deform_conv2d(*ts, padding=1, backend=backend)
            if not grad:
                return out
            out.float().backward(torch.ones_like(out, dtype=torch.float32))
            return [t.grad for t in ts]
    return step


_PEAK_IN_FRESH_PROCESS = """
import json, sys
from qdet.tools.bench import peak_memory_mib
from qdet.tools.bench_deform_conv import deform_conv_step, mmap_large_allocations
mmap_large_allocations()
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
step = deform_conv_step(a["shape"], "cpu", a["backend"], a["bf16"])
step()   # the first call allocates once-only buffers (Numba's, oneDNN's)
print(json.dumps(peak_memory_mib(step, torch.device("cpu"))))
"""


def _deform_conv_peak(shape, device, backend: str, bf16: bool) -> float:
    """Peak memory of forward+backward: on the CPU in a fresh process that only measures
    memory (:func:`mmap_large_allocations`), on a GPU by the allocator's own peak."""
    import json
    import subprocess
    import sys

    if torch.device(device).type != "cpu":
        return peak_memory_mib(deform_conv_step(shape, device, backend, bf16),
                               torch.device(device))
    args = json.dumps({"shape": list(shape), "backend": backend, "bf16": bf16,
                       "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-c", _PEAK_IN_FRESH_PROCESS, args],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def bench_deform_conv(device: str = "cpu", repeat: int = 3, shapes=None,
                      memory: bool = True) -> list[dict]:
    """Forward and forward+backward time and (with ``memory``) peak memory of the modulated
    deformable convolution at Dynamic DETR's shapes: torchvision's op (the baseline), the
    torch reference, qdet's kernels in float32 and under bfloat16 autocast."""
    dev = torch.device(device)
    kernel = "numba" if dev.type == "cpu" else "cuda"
    variants = [("torchvision", "torchvision", False), ("torch", "torch", False),
                (kernel, kernel, False), (f"{kernel} bf16", kernel, True)]
    rows = []
    for name, shape in (shapes or DEFORM_CONV_SHAPES).items():
        for label, backend, bf16 in variants:
            rows.append({
                "shape": name, "backend": label,
                "forward_s": time_it(deform_conv_step(shape, dev, backend, bf16, False), dev,
                                     repeat),
                "forward_backward_s": time_it(deform_conv_step(shape, dev, backend, bf16),
                                              dev, repeat),
                "forward_backward_peak_mib": (_deform_conv_peak(shape, dev, backend, bf16)
                                              if memory else float("nan"))})
    for row in rows:  # ratios against torchvision's op at the same shape
        ref = next(r for r in rows if r["shape"] == row["shape"]
                   and r["backend"] == "torchvision")
        row["forward_speedup"] = ref["forward_s"] / row["forward_s"]
        row["forward_backward_speedup"] = ref["forward_backward_s"] / row["forward_backward_s"]
        row["memory_ratio"] = ratio(row["forward_backward_peak_mib"],
                                    ref["forward_backward_peak_mib"])
    return rows


def bench_dynamic_detr(device: str = "cpu", repeat: int = 3,
                       size: tuple[int, int] = (800, 1066), train: bool = True,
                       overrides: dict | None = None) -> dict:
    """What qdet's kernels buy Dynamic DETR, in one process: inference of the paper
    configuration on the fast path in bfloat16 with torchvision's deformable convolution and
    RoIAlign (as before qdet had its own) and with qdet's, beside Deformable DETR's; and a
    training step of the built-in preset (eager float32, and bf16 + channels_last as
    ``qdet train`` runs it) with each. ``overrides`` maps an architecture to changes of its
    paper configuration."""
    from ..blocks.dynamic_head import DynamicHead
    from ..ops.deform_conv import DeformConv2d

    def torchvision_ops(model):
        for module in model.modules():
            if isinstance(module, DeformConv2d):
                module.backend = "torchvision"
            if isinstance(module, DynamicHead):
                module.pool_backend = "torchvision"

    infer, steps = [], []
    for arch, op, prepare in (("dynamic", "torchvision", torchvision_ops),
                              ("dynamic", "qdet", None), ("deformable", "-", None)):
        for row in bench_inference(arch, device, size, 1, repeat, modes=("fast+bf16",),
                                   prepare=prepare, overrides=(overrides or {}).get(arch)):
            infer.append(dict(row, op=op))
        if arch == "dynamic" and train:
            steps += [dict(row, op=op) for row in bench_training(arch, device, repeat=repeat,
                                                                  prepare=prepare)]
    for row in infer:
        row["speedup"] = infer[0]["seconds"] / row["seconds"]
    for row in steps:
        ref = next(r for r in steps if r["mode"] == row["mode"] and r["op"] == "torchvision")
        row["speedup"] = ref["seconds"] / row["seconds"]
    return {"inference": infer, "training": steps}
