"""Part 1 of ``qdet bench gpu``: every Numba CUDA kernel against its reference, forward and
backward, in float32 and bfloat16, with the worst error of each check.

The kernels are those of ``qdet.ops``: multi-scale deformable attention (reference: the
grid_sample formulation ``ms_deform_attn_torch``) and the modulated deformable convolution
(reference: torchvision's ``deform_conv2d``, its CUDA op on a GPU). RoIAlign runs
torchvision's own op on GPUs, so it has no qdet kernel to check.

A check feeds both sides the same inputs: float32 ones, or for bf16 the inputs rounded to
bfloat16. The reference computes in float64 on those values, so what a check measures is
the kernel's own error. Each check reports, over its tensors (forward: the output;
backward: every input's gradient, for the same random output gradient), the largest
absolute difference and that difference relative to the reference tensor's largest
magnitude ("relative to scale": a gradient near zero does not blow it up), and passes when
the relative one is within the tolerance of its dtype (:data:`TOLERANCES`, which say why).

Runners: on a GPU the public ops with ``backend="cuda"`` on CUDA tensors, through autograd,
exactly as a model calls them (inside ``cuda_kernels_strict``: a kernel that cannot run
fails its check instead of falling back). Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, no GPU) the same kernels run through their launchers on host
arrays, at tiny shapes (the simulator runs every thread in Python), with the deformable
convolution's weight product done around them as ``qdet.ops.deform_conv`` does it. On the
CPU the plan also runs with ``backend="numba"``, which is how the tests check this module.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .bench import deform_attn_inputs
from .bench_deform_conv import DEFORM_CONV_SHAPES, deform_conv_inputs

# Deformable DETR's levels at an 800x1066 input (strides 8..64), and at the built-in
# preset's 128 px images (3 levels, strides 8..32)
PAPER_LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]
PRESET_LEVELS = [(16, 16), (8, 8), (4, 4)]

# name -> keyword arguments of deform_attn_inputs. Paper: Deformable DETR (8 heads x 32, 4
# points, 300 queries), batch 1. Preset: the built-in data's (d 128 = 8 heads x 16, 20
# queries, batch 16). Tiny: for the simulator.
DEFORM_ATTN_SHAPES = {
    "preset encoder": dict(num_queries=None, batch=16, heads=8, channels=16, points=4,
                           levels=PRESET_LEVELS),
    "preset decoder": dict(num_queries=20, batch=16, heads=8, channels=16, points=4,
                           levels=PRESET_LEVELS),
    "paper encoder": dict(num_queries=None, batch=1, levels=PAPER_LEVELS),
    "paper decoder": dict(num_queries=300, batch=1, levels=PAPER_LEVELS),
}
TINY_DEFORM_ATTN = {
    "tiny encoder": dict(num_queries=None, batch=1, heads=2, channels=2, points=2,
                         levels=[(3, 4), (2, 2), (1, 1)], spread=1.0),
    "tiny decoder": dict(num_queries=5, batch=2, heads=2, channels=2, points=2,
                         levels=[(3, 4), (2, 2), (1, 1)], spread=1.0),
}
TINY_DEFORM_CONV = {"tiny": (1, 2, 3, 4)}

# dtype -> (largest relative error, why): both sides see the same input values
TOLERANCES = {
    "fp32": (1e-4, "float32 arithmetic against the float64 reference: rounding and the "
                   "order of summation (atomics add in any order) differ"),
    "bf16": (2e-2, "inputs rounded to bfloat16 on both sides; the kernels compute in "
                   "float32 and round the results to bfloat16 (2^-9 of each value), and the "
                   "deformable convolution's weight product runs in bfloat16, as under "
                   "autocast"),
}

OPS = {"deform_attn": "multi-scale deformable attention",
       "deform_conv": "modulated deformable convolution"}
REFERENCES = {"deform_attn": "ms_deform_attn_torch (grid_sample), float64",
              "deform_conv": "torchvision.ops.deform_conv2d, float64"}


@dataclass(frozen=True)
class Check:
    """One planned comparison: an op at a named shape in a dtype, forward and backward."""
    op: str                      # "deform_attn" or "deform_conv"
    shape: str
    dtype: str                   # "fp32" or "bf16"
    sizes: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class CheckResult:
    """The worst error of one direction ("forward" or "backward") of a check."""
    op: str
    shape: str
    dtype: str
    direction: str
    worst: str = ""              # the tensor where the relative error is largest
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tolerance: float = float("nan")
    passed: bool = False
    error: str | None = None     # why the check could not run
    seconds: float = 0.0         # both directions, first call (compiling) included

    def as_dict(self) -> dict:
        return asdict(self)


def plan_checks(simulate: bool = False, paper: bool = True) -> list[Check]:
    """The checks ``qdet bench gpu`` runs: each kernel at the built-in preset's and (with
    ``paper``) the paper's shapes, or at tiny shapes under the simulator; float32 and
    bfloat16 each."""
    if simulate:
        attn, conv = TINY_DEFORM_ATTN, TINY_DEFORM_CONV
    else:
        attn = {k: v for k, v in DEFORM_ATTN_SHAPES.items() if paper or k.startswith("preset")}
        conv = {k: v for k, v in DEFORM_CONV_SHAPES.items() if paper or k == "preset"}
    checks = []
    for dtype in ("fp32", "bf16"):
        checks += [Check("deform_attn", name, dtype, sizes) for name, sizes in attn.items()]
        checks += [Check("deform_conv", name, dtype, {"shape": shape})
                   for name, shape in conv.items()]
    return checks


# ------------------------------------------------------------------------ the errors


def worst_error(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[str, float, float]:
    """(name, max abs, max rel) of the tensor whose error relative to its reference's
    largest magnitude is largest; NaN anywhere in ``got`` gives a NaN error."""
    worst = ("", 0.0, -1.0)
    for name, r in ref.items():
        g = got[name].double()
        r = r.double()
        diff = (g - r).abs().max().item() if r.numel() else 0.0
        if torch.isnan(g).any():
            diff = float("nan")
        scale = r.abs().max().item() if r.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if rel != rel or rel > worst[2]:            # NaN beats everything
            worst = (name, diff, rel)
        if rel != rel:
            break
    return worst


# ------------------------------------------------------------------- the references


def _inputs(check: Check, device) -> tuple[list[Tensor], dict]:
    """The check's inputs on ``device`` (float32, or rounded to bfloat16) and what the op
    needs beside them."""
    torch_dtype = torch.bfloat16 if check.dtype == "bf16" else torch.float32
    if check.op == "deform_attn":
        tensors, levels = deform_attn_inputs(device=device, **check.sizes)
        # Locations on a grid of 2^-14: the gradient with respect to a location jumps where
        # the point crosses a pixel line, so a kernel that computes the pixel position in
        # float32 (the CPU's) and the float64 reference would disagree on the side of the
        # line for the few points within rounding of one (a 0.23 relative error at the
        # paper's encoder shape, measured). On this grid x * W - 0.5 is exact in float32.
        tensors[1] = torch.round(tensors[1] * 2**14) / 2**14
        extra = {"levels": levels}
    else:
        tensors, extra = deform_conv_inputs(check.sizes["shape"], device), {}
    return [t.to(torch_dtype) for t in tensors], extra


def _names(op: str) -> tuple[str, ...]:
    return ("value", "loc", "attn") if op == "deform_attn" else \
        ("x", "offset", "mask", "weight", "bias")


def reference(op: str, tensors: list[Tensor], extra: dict, grad: Tensor) -> dict[str, Tensor]:
    """Output and input gradients of ``op``'s reference in float64, for output gradient
    ``grad``."""
    import torchvision

    from ..ops.deform_attn import ms_deform_attn_torch

    ts = [t.detach().double().requires_grad_() for t in tensors]
    if op == "deform_attn":
        out = ms_deform_attn_torch(ts[0], extra["levels"], ts[1], ts[2])
    else:
        x, offset, mask, weight, bias = ts
        out = torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    out.backward(grad.double())
    return {"out": out.detach(), **{n: t.grad for n, t in zip(_names(op), ts)}}


def output_shape(op: str, tensors: list[Tensor]) -> tuple[int, ...]:
    if op == "deform_attn":
        value, loc = tensors[0], tensors[1]
        return (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    x, weight = tensors[0], tensors[3]
    return (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


# ---------------------------------------------------------------------- the runners

Runner = Callable[[str, list[Tensor], dict, Tensor], dict[str, Tensor]]


def op_runner(backend: str) -> Runner:
    """The public op with ``backend``, through autograd, as a model calls it."""
    def run(op: str, tensors: list[Tensor], extra: dict, grad: Tensor) -> dict[str, Tensor]:
        from ..ops.deform_attn import ms_deform_attn
        from ..ops.deform_conv import deform_conv2d

        ts = [t.detach().requires_grad_() for t in tensors]
        if op == "deform_attn":
            out = ms_deform_attn(ts[0], extra["levels"], None, ts[1], ts[2], backend=backend)
        else:
            out = deform_conv2d(*ts, padding=1, backend=backend)
        out.backward(grad.to(out.dtype))
        return {"out": out.detach(), **{n: t.grad for n, t in zip(_names(op), ts)}}
    return run


def simulator_runner(op: str, tensors: list[Tensor], extra: dict,
                     grad: Tensor) -> dict[str, Tensor]:
    """The CUDA kernels through their launchers on host arrays (Numba's CUDA simulator),
    computing in float32 and returning each tensor in its input's dtype as the op does."""
    if op == "deform_attn":
        return _simulate_deform_attn(tensors, extra["levels"], grad)
    return _simulate_deform_conv(tensors, grad)


def _host(t: Tensor):
    from numba import cuda

    return cuda.to_device(t.detach().float().contiguous().numpy())


def _zeros(shape):
    import numpy as np
    from numba import cuda

    return cuda.to_device(np.zeros(tuple(shape), dtype=np.float32))


def _back(array, like: Tensor, shape=None) -> Tensor:
    t = torch.from_numpy(array.copy_to_host())
    return t.view(shape or like.shape).to(like.dtype)


def _simulate_deform_attn(tensors, levels, grad):
    from numba import cuda

    from ..ops.deform_attn_kernels import launch_backward, launch_forward, level_tables

    value, loc, attn = tensors
    n, _, m, d = value.shape
    lq = loc.shape[1]
    sh, st = level_tables([v for hw in levels for v in hw])
    args = [_host(value), cuda.to_device(sh), cuda.to_device(st), _host(loc), _host(attn)]
    out = _zeros((n, lq, m, d))
    launch_forward(*args, out)
    gv, gl, ga = (_zeros(t.shape) for t in tensors)
    launch_backward(*args, _host(grad.to(value.dtype).reshape(n, lq, m, d)), gv, gl, ga)
    return {"out": _back(out, value, (n, lq, m * d)), "value": _back(gv, value),
            "loc": _back(gl, loc), "attn": _back(ga, attn)}


def _simulate_deform_conv(tensors, grad):
    from ..ops.deform_conv import matmul_dtype
    from ..ops.deform_conv_kernels import geometry, launch_backward, launch_im2col

    x, offset, mask, weight, bias = tensors
    n, c, h, w = x.shape
    cout, k, p = weight.shape[0], 9, h * w               # 3x3, padding 1, stride 1
    mm = matmul_dtype(torch.device("cuda"), None if x.dtype == torch.float32 else x.dtype,
                      torch.float32)
    from numba import cuda

    geo = cuda.to_device(geometry(3, 3, (1, 1), (1, 1), (1, 1), w))
    xv, ov, mv = _host(x.view(n, c, p)), _host(offset.view(n, 1, k, 2, p)), \
        _host(mask.view(n, 1, k, p))
    cols = _zeros((n, c, k, p))
    launch_im2col(xv, ov, mv, geo, h, w, cols)
    cols = torch.from_numpy(cols.copy_to_host()).view(n, c * k, p)
    wmat = weight.to(mm).reshape(cout, c * k)
    out = torch.matmul(wmat, cols.to(mm)).float() + bias.float().view(1, cout, 1)
    g = grad.to(x.dtype).float().reshape(n, cout, p)      # the gradient reaching the op
    go = g.to(mm)
    gw = sum(torch.mm(go[i], cols[i].to(mm).t()).float() for i in range(n))
    gcols = torch.matmul(wmat.t(), go).float().contiguous()
    gx, goff, gmask = _zeros((n, c, p)), _zeros((n, 1, k, 2, p)), _zeros((n, 1, k, p))
    launch_backward(_host(gcols.view(n, c, k, p)), xv, ov, mv, geo, h, w, gx, goff, gmask)
    return {"out": out.view(n, cout, h, w).to(x.dtype), "x": _back(gx, x),
            "offset": _back(goff, offset), "mask": _back(gmask, mask),
            "weight": gw.view(weight.shape).to(weight.dtype),
            "bias": g.sum((0, 2)).to(bias.dtype)}


# ------------------------------------------------------------------------- the run


def run_check(check: Check, device, runner: Runner, seed: int = 0) -> list[CheckResult]:
    """The forward and backward results of ``check``; an error while running it fails
    both, with the error named."""
    tol = TOLERANCES[check.dtype][0]
    rows = [CheckResult(check.op, check.shape, check.dtype, d, tolerance=tol)
            for d in ("forward", "backward")]
    t0 = time.perf_counter()
    try:
        tensors, extra = _inputs(check, device)
        g = torch.Generator().manual_seed(seed + 1)
        # the output gradient, in the output's dtype: both sides get the same values
        grad = torch.randn(output_shape(check.op, tensors), generator=g).to(
            device=device, dtype=tensors[0].dtype)
        got = runner(check.op, tensors, extra, grad)
        ref = reference(check.op, tensors, extra, grad)
        names = {"forward": ["out"], "backward": [n for n in ref if n != "out"]}
        for row in rows:
            row.worst, row.max_abs, row.max_rel = worst_error(
                {n: got[n] for n in names[row.direction]},
                {n: ref[n] for n in names[row.direction]})
            row.passed = row.max_rel <= tol          # False for NaN
    except Exception as e:  # noqa: BLE001 - the report says what failed and goes on
        for row in rows:
            row.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    finally:
        seconds = time.perf_counter() - t0
        for row in rows:
            row.seconds = seconds
    return rows


def run_checks(checks: list[Check], device, runner: Runner,
               log: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Every check, in order; ``log`` gets a line per check."""
    results = []
    for check in checks:
        rows = run_check(check, device, runner)
        results += rows
        if log is not None:
            status = "error" if rows[0].error else \
                ("ok" if all(r.passed for r in rows) else "FAILED")
            log(f"check {check.op} {check.shape} {check.dtype}: {status} "
                f"(worst rel {max(r.max_rel for r in rows):.1e}, {rows[0].seconds:.1f} s)")
    return results
