"""Multi-scale deformable attention: Numba CPU and CUDA (simulated) kernels against the
grid_sample reference, gradcheck, and edge cases."""
import pytest
import torch

import qdet
from qdet.ops.deform_attn import ms_deform_attn, ms_deform_attn_torch

from conftest import run_under_cudasim

SHAPES = [(6, 4), (3, 5), (1, 1)]


def inputs(n=2, lq=7, m=3, d=5, p=4, shapes=SHAPES, dtype=torch.float64, lo=-0.2, hi=1.2,
           seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    return value, loc, attn


def run(backend, value, loc, attn, shapes=SHAPES, grad=None):
    v, lo, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = ms_deform_attn(v, shapes, None, lo, a, backend=backend)
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    return out, grad, v.grad, lo.grad, a.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_numba_matches_reference(dtype, tol):
    value, loc, attn = inputs(dtype=dtype)
    ref = run("torch", value, loc, attn)
    got = run("numba", value, loc, attn, grad=ref[1])
    for name, r, g in zip(("out", "grad_value", "grad_loc", "grad_attn"),
                          ref[:1] + ref[2:], got[:1] + got[2:]):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=name)
        assert g.dtype == dtype


def test_reference_is_grid_sample_by_hand():
    """One head, one level, one point: bilinear interpolation written out by hand."""
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)   # 3x4 map, v = 4y + x
    loc = torch.tensor([0.3, 0.6], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1, 1), 0.5, dtype=torch.float64)
    x, y = 0.3 * 4 - 0.5, 0.6 * 3 - 0.5                                # pixel coordinates
    expected = 0.5 * (4 * y + x)                                        # bilinear of a plane
    for backend in ("torch", "numba"):
        out = ms_deform_attn(value, [(3, 4)], None, loc, attn, backend=backend)
        assert out.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_gradcheck(backend):
    value, loc, attn = inputs(n=1, lq=3, m=2, d=3, p=2, shapes=[(3, 4), (2, 2)])
    # keep points away from pixel-grid lines, where bilinear sampling has kinks
    loc = (torch.floor(loc * 8) + 0.37) / 8

    def f(v, lo, a):
        return ms_deform_attn(v, [(3, 4), (2, 2)], None, lo, a, backend=backend)

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (value, loc, attn)],
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["outside", "borders", "one_level_one_point", "one_by_one",
                                  "batch_65", "zero_queries", "non_contiguous"])
def test_edge_cases(case):
    shapes = SHAPES
    if case == "outside":
        value, loc, attn = inputs(lo=-3.0, hi=4.0)
    elif case == "borders":  # exactly on pixel centres, map edges and half a pixel beyond
        value, loc, attn = inputs()
        edges = torch.tensor([0.0, 1.0, 0.5, -0.5 / 4, 1 + 0.5 / 4, 0.125, 0.875],
                             dtype=torch.float64)
        idx = torch.randint(0, len(edges), loc.shape, generator=torch.Generator().manual_seed(3))
        loc = edges[idx]
    elif case == "one_level_one_point":
        shapes = [(5, 3)]
        value, loc, attn = inputs(p=1, shapes=shapes)
    elif case == "one_by_one":
        shapes = [(1, 1)]
        value, loc, attn = inputs(shapes=shapes)
    elif case == "batch_65":
        value, loc, attn = inputs(n=65, lq=2, m=1, d=2, p=1)
    elif case == "zero_queries":
        value, loc, attn = inputs(lq=0)
    else:
        value, loc, attn = inputs()
        value = value.transpose(2, 3).contiguous().transpose(2, 3)
        loc, attn = loc[..., [1, 0]][..., [1, 0]], attn.transpose(0, 1).contiguous().transpose(0, 1)
        assert not value.is_contiguous() and not attn.is_contiguous()
    ref = run("torch", value, loc, attn, shapes)
    got = run("numba", value, loc, attn, shapes, grad=ref[1])
    for r, g in zip(ref[:1] + ref[2:], got[:1] + got[2:]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    if case == "outside":  # points beyond the map contribute nothing
        far = ((loc < -0.5) | (loc > 1.5)).any(-1)
        assert (got[4][far] == 0).all()


def test_half_and_bfloat16_are_computed_in_float32():
    value, loc, attn = inputs(dtype=torch.float32)
    ref = ms_deform_attn(value, SHAPES, None, loc, attn, backend="torch")
    for dtype in (torch.bfloat16, torch.float16):
        out = ms_deform_attn(value.to(dtype), SHAPES, None, loc.to(dtype), attn.to(dtype),
                             backend="numba")
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), SHAPES, None, loc, attn)
    assert out.dtype == torch.bfloat16


def test_public_and_default_backend_and_tensor_shapes():
    value, loc, attn = inputs(dtype=torch.float32)
    shapes_t = torch.tensor(SHAPES)
    starts = torch.tensor([0, 24, 39])
    a = qdet.ms_deform_attn(value, shapes_t, starts, loc, attn)        # numba on the CPU
    b = ms_deform_attn_torch(value, SHAPES, loc, attn)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        qdet.ms_deform_attn(value, SHAPES, None, loc, attn, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        qdet.ms_deform_attn(value, SHAPES, None, loc, attn, backend="cuda")


def test_numba_is_deterministic():
    value, loc, attn = inputs(n=2, lq=50, dtype=torch.float32)
    a = run("numba", value, loc, attn)
    b = run("numba", value, loc, attn, grad=a[1])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


CUDASIM = r"""
import numpy as np, torch
from numba import cuda
from qdet.ops.deform_attn import ms_deform_attn_torch
from qdet.ops.deform_attn_kernels import launch_backward, launch_forward, level_tables
torch.manual_seed(0)
shapes = [(3, 4), (2, 2), (1, 1)]
n, lq, m, d, p = 2, 3, 2, 3, 2
s = sum(h * w for h, w in shapes)
value = torch.randn(n, s, m, d, dtype=torch.float64, requires_grad=True)
loc = (torch.rand(n, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2)
loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # exactly on borders
loc.requires_grad_()
attn = torch.rand(n, lq, m, len(shapes), p, dtype=torch.float64, requires_grad=True)
ref = ms_deform_attn_torch(value, shapes, loc, attn)
grad = torch.randn_like(ref)
ref.backward(grad)
sh, st = level_tables([v for hw in shapes for v in hw])
dev = lambda t: cuda.to_device(t.detach().numpy().copy())
out = cuda.to_device(np.zeros((n, lq, m, d)))
args = [dev(value), cuda.to_device(sh), cuda.to_device(st), dev(loc), dev(attn)]
launch_forward(*args, out)
gv, gl, ga = (cuda.to_device(np.zeros(t.shape)) for t in (value, loc, attn))
launch_backward(*args, dev(grad.view(n, lq, m, d)), gv, gl, ga)
for name, got, want in (("out", out, ref.view(n, lq, m, d)), ("grad_value", gv, value.grad),
                        ("grad_loc", gl, loc.grad), ("grad_attn", ga, attn.grad)):
    err = np.abs(got.copy_to_host() - want.detach().numpy()).max()
    assert err < 1e-10, (name, err)
print("CUDASIM OK")
"""


def test_cuda_kernels_under_numba_simulator():
    run_under_cudasim(CUDASIM)


def test_value_gradient_chunking_matches():
    """With more cores than batch x heads the value gradient is split into channel chunks;
    every split gives the same result, in both value layouts."""
    import numpy as np

    from qdet.ops import deform_attn_kernels as da

    for lq in (2, 40):  # 2 queries: caller's layout; 40: head-major copy
        value, loc, attn = inputs(n=1, lq=lq, m=2, d=6, shapes=[(3, 4), (2, 2)])
        flat = [3, 4, 2, 2]
        grad = torch.randn(1, lq, 12, dtype=torch.float64)
        ref = run("torch", value, loc, attn, shapes=[(3, 4), (2, 2)], grad=grad)[2]
        _, _, s, sizes, starts, lo, at, one = da._cpu_args(value, flat, loc, attn)
        g = grad.numpy().reshape(1, lq, 2, 6)
        for chunks in (1, 2, 3, 6):
            cw = 6 // chunks
            gv = np.zeros((1, 2, chunks, 16, cw))
            gstr = np.array([2 * chunks * 16 * cw, chunks * 16 * cw, 16 * cw, cw])
            da._backward_value_cpu(s, sizes, starts, lo, at, g, gv.reshape(-1), gstr, chunks,
                                   one)
            got = torch.from_numpy(gv).permute(0, 3, 1, 2, 4).reshape(1, 16, 2, 6)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
