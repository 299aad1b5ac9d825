"""Where Numba's CUDA target cannot start or a kernel cannot compile or launch, the ops fall
back to their PyTorch formulations with one warning that names the cause (qdet/ops/backends.py).
No GPU is needed: the availability checks are monkeypatched, and a kernel launch on this
GPU-less machine fails for real inside Numba."""
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from qdet.ops import backends
from qdet.ops import deform_attn_kernels as attn_kernels
from qdet.ops import deform_conv_kernels as conv_kernels
from qdet.ops.backends import cuda_kernels_strict, cuda_problem, default_backend, run_cuda
from qdet.ops.deform_attn import _msda, ms_deform_attn_torch
from qdet.ops.deform_conv import _fused

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_state():
    backends.reset_cuda_problem()
    yield
    backends.reset_cuda_problem()


def warned(fn):
    """fn()'s result and the messages of the fallback warnings it gave (not Numba's own, such
    as its low-occupancy one for a tiny launch)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "fall back" in str(w.message)]


def test_no_driver_is_named_once(monkeypatch):
    from numba import cuda

    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda, "cuda_error", lambda: "CUDA driver library cannot be found.")
    problem = cuda_problem()
    assert "CUDA driver does not start" in problem and "cannot be found" in problem
    assert 'qdet[cuda]' in problem and 'qdet[cuda12]' in problem
    backend, messages = warned(lambda: default_backend(CUDA))
    assert backend == "torch" and len(messages) == 1
    assert "cannot be found" in messages[0] and "fall back" in messages[0]
    assert warned(lambda: default_backend(CUDA)) == ("torch", [])      # once
    assert default_backend(torch.device("cpu")) == "numba"


def test_missing_nvvm_is_named(monkeypatch):
    from numba import cuda
    from numba.cuda.cudadrv import nvvm
    from numba.cuda.cudadrv.error import NvvmSupportError

    def no_nvvm():
        raise NvvmSupportError("libNVVM cannot be found. Do `conda install cudatoolkit`")

    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda, "cuda_error", lambda: None)
    monkeypatch.setattr(nvvm, "NVVM", no_nvvm)
    problem = cuda_problem()
    assert problem.startswith("libNVVM, the compiler of Numba's CUDA target, is not available")
    assert "libNVVM cannot be found" in problem


def test_import_failure_and_disabled_target_are_named(monkeypatch):
    import sys

    import numba

    monkeypatch.setitem(sys.modules, "numba.cuda", None)
    monkeypatch.delattr(numba, "cuda")
    assert cuda_problem().startswith("numba's CUDA module does not import (ModuleNotFoundError")
    backends.reset_cuda_problem()
    monkeypatch.setenv("NUMBA_DISABLE_CUDA", "1")
    assert "NUMBA_DISABLE_CUDA" in cuda_problem()


def _launch_for_real():
    """A real launch of the attention kernel on host arrays: on a machine without a usable
    GPU, Numba fails inside (driver init or compile)."""
    out = np.zeros((1, 2, 1, 2), np.float32)
    attn_kernels.launch_forward(np.zeros((1, 4, 1, 2), np.float32), np.array([[2, 2]]),
                                np.array([0]), np.zeros((1, 2, 1, 1, 1, 2), np.float32),
                                np.zeros((1, 2, 1, 1, 1), np.float32), out)
    return "kernel"


@pytest.mark.skipif(cuda_problem() is None, reason="Numba's CUDA target works here")
def test_a_kernel_that_cannot_launch_falls_back_once_with_its_cause():
    backends.reset_cuda_problem()
    cpu = torch.device("cpu")
    out, messages = warned(lambda: run_cuda("attention forward", cpu, _launch_for_real,
                                            lambda: "fallback"))
    assert out == "fallback" and len(messages) == 1
    assert "attention forward" in messages[0]          # which kernel, and Numba's own error
    assert "SupportError" in messages[0]
    assert cuda_problem() is not None
    # later calls go straight to the fallback, silently, and so does the default backend
    assert warned(lambda: run_cuda("attention forward", cpu, _launch_for_real,
                                   lambda: "fallback")) == ("fallback", [])
    assert warned(lambda: default_backend(CUDA)) == ("torch", [])
    with cuda_kernels_strict(), pytest.raises(ImportError):   # the checks see the error
        run_cuda("attention forward", cpu, _launch_for_real, lambda: "fallback")


def _cannot_compile(*args, **kwargs):
    from numba.cuda.cudadrv.error import NvvmSupportError

    raise NvvmSupportError("libNVVM cannot be found")


def test_ops_fall_back_to_their_formulations_when_kernels_cannot_compile(monkeypatch):
    """Both ops, forward and backward, through their custom ops with backend "cuda": the
    results are the PyTorch formulation's, and one warning says why."""
    for name in ("forward_cuda", "backward_cuda"):
        monkeypatch.setattr(attn_kernels, name, _cannot_compile)
    for name in ("im2col_cuda", "im2col_backward_cuda"):
        monkeypatch.setattr(conv_kernels, name, _cannot_compile)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 3, generator=g, dtype=torch.float64)
    loc = torch.rand(1, 5, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    attn = torch.rand(1, 5, 2, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
    offset = torch.randn(1, 18, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(1, 9, 5, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    geo = [int(v) for v in conv_kernels.geometry(3, 3, (1, 1), (1, 1), (1, 1), 6)]

    def both(fn, tensors):
        ts = [t.clone().requires_grad_() for t in tensors]
        out = fn(*ts)
        out.backward(torch.ones_like(out))
        return [out] + [t.grad for t in ts]

    def ours():
        a = both(lambda v, lo, at: _msda(v, [3, 4, 2, 2], lo, at, "cuda"), (value, loc, attn))
        c = both(lambda xx, o, m, w: _fused(xx, o, m, w, None, geo, "cuda", "float64"),
                 (x, offset, mask, weight))
        return a, c

    (a, c), messages = warned(ours)
    assert len(messages) == 1 and "deformable attention forward" in messages[0]
    assert "NvvmSupportError: libNVVM cannot be found" in messages[0]
    ref_a = both(lambda v, lo, at: ms_deform_attn_torch(v, shapes, lo, at), (value, loc, attn))
    ref_c = both(lambda xx, o, m, w: tv_deform_conv2d(xx, o, w, padding=1, mask=m),
                 (x, offset, mask, weight))
    for got, ref in zip(a + c, ref_a + ref_c):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_errors_of_the_computation_itself_are_raised(monkeypatch):
    """Only Numba failing to compile, load or launch falls back: an error of the computation
    (out of memory), or a GPU context already lost to an earlier kernel (illegal address),
    is raised as it is."""
    from numba.cuda.cudadrv.driver import CudaAPIError

    cpu = torch.device("cpu")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def lost():
        raise CudaAPIError(700, "an illegal memory access was encountered")

    with pytest.raises(torch.OutOfMemoryError):
        run_cuda("x", cpu, oom, lambda: "fallback")
    with pytest.raises(CudaAPIError):
        run_cuda("x", cpu, lost, lambda: "fallback")
    assert backends._kernel_failure is None

    def no_resources():
        raise CudaAPIError(701, "too many resources requested for launch")

    out, messages = warned(lambda: run_cuda("x", cpu, no_resources, lambda: "fallback"))
    assert out == "fallback" and "too many resources" in messages[0]
