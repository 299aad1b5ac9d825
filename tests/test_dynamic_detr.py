"""Dynamic DETR: the encoder's attentions against hand-built cases, the decoder is Sparse
R-CNN's dynamic head over P3-P7."""
import torch
import torch.nn.functional as F

from qdet.blocks.dynamic_head import DynamicConv
from qdet.models.dynamic_detr import DyReLU, EncoderBlock
from qdet.models.registry import build_model

from conftest import TINY, random_images


def test_dyrelu_by_hand():
    torch.manual_seed(0)
    act = DyReLU(8, reduction=4)
    x = torch.randn(2, 8, 3, 3)
    y = act.fc(x).view(2, 4, 8, 1, 1)
    a1, a2, b1, b2 = 2 * (y[:, 0] - .5) + 1, 2 * (y[:, 1] - .5), y[:, 2] - .5, y[:, 3] - .5
    ref = torch.where(x * a1 + b1 > x * a2 + b2, x * a1 + b1, x * a2 + b2)
    torch.testing.assert_close(act(x), ref)


def test_spatial_attention_starts_as_a_masked_convolution():
    """Offsets start at zero and the mask at sigmoid(0) = 1/2: each deformable convolution
    is then half an ordinary 3x3 convolution of its (resized) level."""
    torch.manual_seed(0)
    block = EncoderBlock(16)
    fine, mid, coarse = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)
    om = block.offset(mid)
    assert torch.count_nonzero(om) == 0
    for role, src in ((0, fine), (1, mid), (2, coarse)):
        src = F.interpolate(src, size=(4, 4), mode="bilinear", align_corners=False) \
            if src.shape[-1] != 4 else src
        got = block.dcn[role](src, om[:, :18], om[:, 18:].sigmoid())
        ref = 0.5 * F.conv2d(src, block.dcn[role].weight, padding=1) \
            + block.dcn[role].bias[None, :, None, None]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    outs = block([fine, mid, coarse])
    assert [o.shape for o in outs] == [fine.shape, mid.shape, coarse.shape]
    w = block.scale_attn(outs[1])
    assert w.shape == (1, 1, 1, 1) and 0 <= w.item() <= 1


def test_decoder_shares_sparse_rcnns_dynamic_interaction_over_p3_p7():
    model = build_model("dynamic", {**TINY["dynamic"], "num_levels": 5})
    heads = model.head.head_series
    assert len(heads) == 2 and all(isinstance(h.inst_interact, DynamicConv) for h in heads)
    assert heads[0].first_level == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the deformable conv runs in float32
        assert torch.isfinite(model(random_images([(64, 64)]))["pred_boxes"]).all()
    out = model(random_images([(128, 128)]))
    assert out["pred_boxes"].shape == (1, 6, 4) and len(out["aux_outputs"]) == 1
    assert torch.equal(model.init_proposal_boxes.weight[0], torch.tensor([.5, .5, 1., 1.]))
