"""On a real GPU, without the simulator: Numba's CUDA target starts, every CUDA kernel matches
its reference through the public ops, the models run on the kernels as on the PyTorch
formulation, and a kernel that cannot compile falls back once. Skipped without CUDA (the
simulator's checks are tests/test_bench_gpu.py's); scripts/gpu_check.sh runs these on a GPU
machine."""
import warnings

import pytest
import torch

from qdet.models.registry import build_model
from qdet.ops import backends, deform_attn_kernels
from qdet.ops import deform_attn as deform_attn_module
from qdet.ops import deform_conv as deform_conv_module
from qdet.ops.backends import cuda_kernels_strict, cuda_problem, default_backend
from qdet.ops.deform_attn import ms_deform_attn, ms_deform_attn_torch
from qdet.tools.bench import deform_attn_inputs
from qdet.tools.gpu_checks import op_runner, plan_checks, run_checks

from conftest import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
GPU = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_float32():
    """No TF32 in products and convolutions: float32 comparisons stay float32."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_numba_cuda_target_starts():
    assert cuda_problem() is None, cuda_problem()
    assert default_backend(GPU) == "cuda"


def test_kernels_match_their_references_at_the_preset_shapes():
    with cuda_kernels_strict():
        rows = run_checks(plan_checks(paper=False), GPU, op_runner("cuda"))
    bad = [(r.op, r.shape, r.dtype, r.direction, r.worst, r.max_rel, r.error)
           for r in rows if not r.passed]
    assert not bad, bad


@pytest.mark.parametrize("arch", ["deformable", "dynamic"])
def test_models_on_the_kernels_match_the_pytorch_formulation(arch, monkeypatch):
    """A tiny model's outputs and gradients on the GPU with the CUDA kernels, against the
    same model with every op on its PyTorch formulation."""
    torch.manual_seed(0)
    model = build_model(arch, TINY[arch]).to(GPU).eval()     # no dropout: two runs alike
    with torch.no_grad():
        # At the paper's init every sampling point lies exactly on a pixel centre, where the
        # bilinear gradient with respect to the location jumps: which side each formulation
        # takes is a matter of rounding. Points off the pixel lines compare what matters.
        for name, p in model.named_parameters():
            if "sampling_offsets" in name:
                p.add_(torch.randn(p.shape, device=GPU) * 0.1)
    images = [torch.randn(3, 96, 128, device=GPU), torch.randn(3, 64, 80, device=GPU)]

    def run():
        model.zero_grad(set_to_none=True)
        out = model(images)
        (out["pred_logits"].square().mean() + out["pred_boxes"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["pred_logits"].detach(), out["pred_boxes"].detach(), grads

    with cuda_kernels_strict():
        logits, boxes, grads = run()
    for module in (deform_attn_module, deform_conv_module):
        monkeypatch.setattr(module, "default_backend", lambda device: "torch")
    ref_logits, ref_boxes, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-4, atol=1e-5)
    top = max(g.abs().max() for g in ref_grads.values())
    for name, g in ref_grads.items():   # some are zero but for rounding (a bias before a norm)
        scale = torch.maximum(g.abs().max(), 1e-3 * top)
        assert (grads[name] - g).abs().max() / scale < 1e-3, name


def test_a_kernel_that_cannot_compile_falls_back_once(monkeypatch):
    from numba.cuda.cudadrv.error import NvvmSupportError

    def cannot_compile():
        raise NvvmSupportError("libNVVM cannot be found")

    backends.reset_cuda_problem()
    monkeypatch.setattr(deform_attn_kernels, "kernels", cannot_compile)
    (value, loc, attn), levels = deform_attn_inputs(50, GPU, batch=1, levels=[(8, 8), (4, 4)])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = ms_deform_attn(value, levels, None, loc, attn)
            b = ms_deform_attn(value, levels, None, loc, attn)
        messages = [str(w.message) for w in caught if "fall back" in str(w.message)]
        assert len(messages) == 1 and "NvvmSupportError" in messages[0]
        ref = ms_deform_attn_torch(value, levels, loc, attn)
        torch.testing.assert_close(a, ref)
        torch.testing.assert_close(b, ref)
    finally:
        backends.reset_cuda_problem()
