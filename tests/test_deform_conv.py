"""Modulated deformable convolution: every backend against torchvision's deform_conv2d (the
independent reference), gradcheck, borders, far and NaN offsets, groups, determinism, bf16,
and the CUDA kernels under Numba's simulator."""
import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from qdet.ops.deform_conv import DeformConv2d, deform_conv2d

from conftest import run_under_cudasim

BACKENDS = ["torch", "numba"]


def inputs(n=2, c=4, h=5, w=6, cout=3, og=1, groups=1, stride=1, padding=1, dilation=1,
           spread=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - 2 * dilation - 1) // stride + 1
    wo = (w + 2 * padding - 2 * dilation - 1) // stride + 1
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    offset = torch.randn(n, 2 * 9 * og, ho, wo, generator=g, dtype=dtype) * spread
    mask = torch.rand(n, 9 * og, ho, wo, generator=g, dtype=dtype)
    weight = torch.randn(cout, c // groups, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(cout, generator=g, dtype=dtype)
    return [x, offset, mask, weight, bias], dict(stride=stride, padding=padding,
                                                 dilation=dilation)


def run(fn, tensors, grad=None):
    """Output and the gradients of (x, offset, mask, weight, bias)."""
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts)
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    return [out] + [t.grad for t in ts], grad


def reference(tensors, geo, grad=None):
    def tv(x, offset, mask, weight, bias):
        return tv_deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
    return run(tv, tensors, grad)


def ours(backend, tensors, geo, grad):
    return run(lambda x, o, m, w, b: deform_conv2d(x, o, m, w, b, backend=backend, **geo),
               tensors, grad)[0]


def assert_matches(tensors, geo, backend, tol):
    ref, grad = reference(tensors, geo)
    got = ours(backend, tensors, geo, grad)
    for name, r, g in zip(("out", "x", "offset", "mask", "weight", "bias"), ref, got):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=name)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_torchvision(backend, dtype, tol):
    tensors, geo = inputs(dtype=dtype)
    got = assert_matches(tensors, geo, backend, tol)
    assert got[0].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [dict(og=2), dict(og=4), dict(groups=2, cout=4),
                                  dict(stride=2, padding=0), dict(dilation=2, padding=2),
                                  dict(stride=2, padding=2, dilation=2, og=2)])
def test_groups_stride_dilation(backend, case):
    tensors, geo = inputs(**case)
    assert_matches(tensors, geo, backend, 1e-10)


@pytest.mark.parametrize("case", [dict(), dict(og=2, c=8), dict(groups=2, c=8, cout=4),
                                  dict(og=4, groups=2, c=8, cout=6)])
def test_channel_blocks_sum_to_the_whole(monkeypatch, case):
    """With a columns budget of a few channels, the kernel backend samples and multiplies
    block by block (inside offset and convolution groups) and sums: still torchvision's
    result and gradients."""
    import qdet.ops.deform_conv as dc

    tensors, geo = inputs(**case)
    n, c = tensors[0].shape[:2]
    per_channel = n * 9 * 5 * 6 * 8                    # float64 columns of one channel
    monkeypatch.setattr(dc, "COLUMNS_BUDGET", 2 * per_channel)
    blocks = list(dc.channel_blocks(tensors[0], case.get("og", 1), case.get("groups", 1),
                                    9, 30))
    assert len(blocks) == c // 2 and all(c1 - c0 == 2 for c0, c1, _, _ in blocks)
    assert_matches(tensors, geo, "numba", 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_borders_and_integer_positions(backend):
    """Integer offsets land taps exactly on pixels, on the map's edges (-1, 0, H-1, H) and
    just beyond: torchvision's boundary rule, one-sided derivatives included."""
    tensors, geo = inputs(h=4, w=4)
    g = torch.Generator().manual_seed(1)
    tensors[1] = torch.randint(-3, 4, tensors[1].shape, generator=g).double()
    tensors[1][0, :, 0, 0] = torch.tensor([-0.999, -1.001] * 9, dtype=torch.float64)
    assert_matches(tensors, geo, backend, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_far_outside_give_zero(backend):
    tensors, geo = inputs(spread=20.0)           # most taps off the map
    assert_matches(tensors, geo, backend, 1e-10)
    # huge and infinite positions (torchvision's own kernel misbehaves there): only bias
    grad = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    for far in (1e6, 1e30, float("inf"), -float("inf")):
        tensors[1].fill_(far)
        out, gx, goff, gmask, gw, _ = ours(backend, tensors, geo, grad)
        torch.testing.assert_close(out, tensors[4].view(1, 3, 1, 1).expand_as(out))
        for g in (gx, goff, gmask, gw):
            assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_offsets_contribute_zero(backend):
    """A NaN position (a diverged run) neither crashes nor reads out of bounds: the tap
    samples zero, like a position far off the map, and its gradients are zero."""
    tensors, geo = inputs()
    nan = tensors[1].clone()
    nan[0, 4:6, 2, 3] = float("nan")                   # tap 2 (y and x) of one pixel
    far = tensors[1].clone()
    far[0, 4:6, 2, 3] = 1e6
    grad = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    got = ours(backend, [tensors[0], nan] + tensors[2:], geo, grad)
    want = ours(backend, [tensors[0], far] + tensors[2:], geo, grad)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    tensors, geo = inputs(n=1, c=2, h=2, w=3, cout=2, og=2)
    # keep taps off pixel-grid lines, where bilinear sampling has kinks
    tensors[1] = torch.floor(tensors[1] * 4) / 4 + 0.37

    def f(x, offset, mask, weight, bias):
        return deform_conv2d(x, offset, mask, weight, bias, backend=backend, **geo)

    # fast mode: one random projection of the Jacobian instead of every column of it
    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in tensors], eps=1e-6,
                                    atol=1e-6, fast_mode=True)


def test_numba_is_deterministic():
    tensors, geo = inputs(n=3, c=32, h=9, w=11, cout=8, og=2, dtype=torch.float32)
    grad = torch.randn(3, 8, 9, 11)
    a = ours("numba", tensors, geo, grad)
    b = ours("numba", tensors, geo, grad)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bfloat16_and_autocast_are_close_to_float32():
    tensors, geo = inputs(dtype=torch.float32)
    ref = deform_conv2d(*tensors, **geo)
    low = deform_conv2d(*(t.bfloat16() for t in tensors), **geo)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.1)
    for mm in (None, torch.bfloat16):   # by hardware; forced bf16 product
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = deform_conv2d(*tensors, **geo, mm_dtype=mm)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


def test_module_keeps_torchvisions_parameter_names_and_refuses_bad_input():
    from torchvision.ops import DeformConv2d as TV

    ours_m, theirs = DeformConv2d(4, 3), TV(4, 3, 3, padding=1)
    assert ours_m.state_dict().keys() == theirs.state_dict().keys()
    ours_m.load_state_dict(theirs.state_dict())
    tensors, geo = inputs(dtype=torch.float32)
    torch.testing.assert_close(ours_m(tensors[0], tensors[1], tensors[2]),
                               theirs(tensors[0], tensors[1], tensors[2]), rtol=1e-5, atol=1e-5)
    x, offset, mask, weight, bias = tensors
    with pytest.raises(ValueError, match="unknown backend"):
        deform_conv2d(x, offset, mask, weight, bias, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        deform_conv2d(x, offset, mask, weight, bias, backend="cuda")
    with pytest.raises(ValueError, match="mask has"):
        deform_conv2d(x, offset, mask[:, :4], weight, bias)
    with pytest.raises(ValueError, match="must be"):
        deform_conv2d(x, offset, mask, weight, bias, stride=2)
    with pytest.raises(ValueError, match="offset groups"):
        deform_conv2d(x, torch.zeros(2, 54, 5, 6), torch.zeros(2, 27, 5, 6), weight, bias)


CUDASIM = r"""
import numpy as np, torch
from numba import cuda
from torchvision.ops import deform_conv2d
from qdet.ops.deform_conv_kernels import geometry, launch_backward, launch_im2col
torch.manual_seed(0)
n, c, h, w, og, k = 2, 4, 3, 4, 2, 9
x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
offset = (torch.randn(n, 2 * og * k, h, w, dtype=torch.float64) * 1.5)
offset[0, :4, 0, 0] = torch.tensor([-1.0, 0.0, 3.0, 4.0])    # on the borders
offset[1, :2, 1, 1] = float("nan")
mask = torch.rand(n, og * k, h, w, dtype=torch.float64, requires_grad=True)
weight = torch.randn(3, c, 3, 3, dtype=torch.float64)
safe = torch.where(offset.isnan(), 1e6, offset).requires_grad_()
ref = deform_conv2d(x, safe, weight, padding=1, mask=mask)
grad = torch.randn_like(ref)
ref.backward(grad)
geo = cuda.to_device(geometry(3, 3, (1, 1), (1, 1), (1, 1), w))
d = lambda t: cuda.to_device(t.detach().numpy().copy())
p = h * w
xv, ov, mv = d(x.view(n, c, p)), d(offset.view(n, og, k, 2, p)), d(mask.view(n, og, k, p))
cols = cuda.to_device(np.zeros((n, c, k, p)))
launch_im2col(xv, ov, mv, geo, h, w, cols)
cols_t = torch.from_numpy(cols.copy_to_host()).view(n, c * k, p)
out = (weight.view(3, c * k) @ cols_t).view(n, 3, h, w)
gcols = (weight.view(3, c * k).t() @ grad.view(n, 3, p)).contiguous()
gx, go, gm = (cuda.to_device(np.zeros(s)) for s in ((n, c, p), (n, og, k, 2, p), (n, og, k, p)))
launch_backward(d(gcols.view(n, c, k, p)), xv, ov, mv, geo, h, w, gx, go, gm)
for name, got, want in (("out", out.numpy(), ref), ("x", gx.copy_to_host(), x.grad),
                        ("offset", go.copy_to_host(), safe.grad),
                        ("mask", gm.copy_to_host(), mask.grad)):
    err = np.abs(got.reshape(-1) - want.detach().numpy().reshape(-1)).max()
    assert err < 1e-10, (name, err)
print("CUDASIM OK")
"""


def test_cuda_kernels_under_numba_simulator():
    run_under_cudasim(CUDASIM)
