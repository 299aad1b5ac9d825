"""RoIAlign: the Numba kernel against torchvision's roi_align (the independent reference),
forward and input gradient, aligned or not, fixed and adaptive sampling, boxes across and
beyond the borders, float64 and float32, and a gradcheck."""
import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from qdet.ops.roi_align import roi_align


def boxes(k, n, h, w, scale, seed=0, beyond=0.3):
    """``k`` boxes ``[K, 5]`` in input pixels over ``n`` images of a map h x w at
    ``scale``, reaching up to ``beyond`` of the map past its borders."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([w, h, w, h], dtype=torch.float64) / scale
    a = (torch.rand(k, 4, generator=g, dtype=torch.float64) * (1 + 2 * beyond) - beyond) * size
    xyxy = torch.stack([a[:, [0, 2]].min(1).values, a[:, [1, 3]].min(1).values,
                        a[:, [0, 2]].max(1).values, a[:, [1, 3]].max(1).values], 1)
    idx = torch.randint(0, n, (k, 1), generator=g).double()
    return torch.cat([idx, xyxy], 1)


def both(x, rois, grad=None, **kw):
    """Output and input gradient of torchvision's op and of qdet's kernel."""
    results = []
    for backend in ("torchvision", "numba"):
        xi = x.detach().clone().requires_grad_()
        out = roi_align(xi, rois, backend=backend, **kw)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        results.append((out, xi.grad))
    return results


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio", [2, 0, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_torchvision(aligned, ratio, dtype, tol):
    n, c, h, w, scale = 3, 6, 9, 13, 1 / 8
    x = torch.randn(n, c, h, w, dtype=dtype)
    rois = boxes(40, n, h, w, scale).to(dtype)
    rois[0, 1:] = torch.tensor([-30.0, -30.0, -10.0, -10.0])        # wholly off the map
    rois[1, 1:] = torch.tensor([0.0, 0.0, w / scale, h / scale])     # the whole map
    rois[2, 1:] = torch.tensor([20.0, 20.0, 20.0, 20.0])             # empty box
    rois[3, 1:] = torch.tensor([90.0, 70.0, 10.0, 5.0])              # inverted box
    (ref, gref), (got, ggot) = both(x, rois, output_size=(7, 5), spatial_scale=scale,
                                    sampling_ratio=ratio, aligned=aligned)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(ggot, gref, rtol=tol, atol=tol)


def test_channels_last_input_bf16_and_empty():
    x = torch.randn(2, 8, 6, 7)
    rois = boxes(10, 2, 6, 7, 0.5).float()
    ref = tv_roi_align(x, rois, 4, 0.5, 2, True)
    out = roi_align(x.to(memory_format=torch.channels_last), rois, 4, 0.5, 2, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # channels-last output: the heads' flatten(2).transpose(1, 2) is contiguous
    assert out.flatten(2).transpose(1, 2).is_contiguous()
    # bfloat16 computed in float32 and returned in bfloat16, as torchvision under autocast
    low = roi_align(x.bfloat16(), rois, 4, 0.5, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = tv_roi_align(x.bfloat16(), rois, 4, 0.5, 2, True)
    assert low.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(low, want)
    assert roi_align(x, rois[:0], 4, 0.5, 2, True).shape == (0, 8, 4, 4)


def test_gradient_is_deterministic_and_nan_boxes_are_zero():
    x = torch.randn(2, 32, 10, 10, dtype=torch.float64)
    rois = boxes(50, 2, 10, 10, 1.0, beyond=0.0)
    grad = torch.randn(50, 32, 3, 3, dtype=torch.float64)
    a = both(x, rois, grad, output_size=3, sampling_ratio=2, aligned=True)[1][1]
    b = both(x, rois, grad, output_size=3, sampling_ratio=2, aligned=True)[1][1]
    assert torch.equal(a, b)
    bad = rois.clone()
    bad[3, 1:] = float("nan")
    bad[4, 3] = float("inf")
    for ratio in (2, 0):
        out = roi_align(x, bad, 3, 1.0, ratio, True)
        assert torch.isfinite(out).all() and (out[3] == 0).all()


def test_gradcheck_and_refusals():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = boxes(6, 2, 5, 6, 1.0, beyond=0.0)
    # a sample on a cell edge is a kink of bilinear sampling: keep the boxes off them
    rois[:, 1:] = rois[:, 1:].floor() + torch.tensor([0.13, 0.29, 1.71, 1.57],
                                                      dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 2, 1.0, 2, True), [x],
                                    eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside the batch"):
        roi_align(x, torch.tensor([[2.0, 0, 0, 1, 1]], dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        roi_align(x, torch.zeros(3, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="unknown backend"):
        roi_align(x, rois, 2, backend="triton")
