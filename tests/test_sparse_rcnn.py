"""Sparse R-CNN: a checkpoint in the official (detectron2) key layout loads with no missing or
unexpected keys; the pooler, deltas and dynamic interaction against hand-built cases."""
import math
import re

import torch
from torchvision.ops import roi_align

import qdet
from qdet.blocks.dynamic_head import DynamicConv, apply_deltas, roi_pool
from qdet.models.registry import build_model

from conftest import TINY, random_images


def to_detectron2(key: str) -> str:
    """qdet/torchvision names -> detectron2's, written independently of qdet's converter."""
    k = key
    k = k.replace("backbone.body.conv1.", "backbone.bottom_up.stem.conv1.")
    k = k.replace("backbone.body.bn1.", "backbone.bottom_up.stem.conv1.norm.")
    k = re.sub(r"backbone\.body\.layer(\d)\.",
               lambda m: f"backbone.bottom_up.res{int(m.group(1)) + 1}.", k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
    k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    k = re.sub(r"fpn\.inner_blocks\.(\d)\.0\.",
               lambda m: f"backbone.fpn_lateral{int(m.group(1)) + 2}.", k)
    return re.sub(r"fpn\.layer_blocks\.(\d)\.0\.",
                  lambda m: f"backbone.fpn_output{int(m.group(1)) + 2}.", k)


def test_detectron2_layout_loads_exactly(tmp_path):
    cfg = {**TINY["sparse-rcnn"], "backbone": "resnet50", "num_proposals": 7, "num_heads": 3,
           "nheads": 8}  # the head count is not in the weights: official models use 8
    model = build_model("sparse-rcnn", cfg).eval()
    sd = {to_detectron2(k): v for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    assert "backbone.bottom_up.res2.0.shortcut.norm.running_var" in sd
    assert "backbone.fpn_lateral5.weight" in sd and "head.head_series.2.bboxes_delta.bias" in sd
    path = tmp_path / "r50_7pro.pth"
    torch.save(sd, path)                       # released files are flat state dicts
    loaded = qdet.load(path)                   # raises on any missing or unexpected key
    c = loaded.config
    assert (c.backbone, c.num_proposals, c.num_heads, c.num_classes, c.d_model, c.dim_dynamic,
            c.num_cls, c.num_reg, c.pooler_resolution) == ("resnet50", 7, 3, 5, 32, 8, 1, 3, 7)
    images = random_images([(96, 128)])
    torch.testing.assert_close(loaded(images)["pred_boxes"], model(images)["pred_boxes"])
    torch.save({"model": sd, "iteration": 10}, tmp_path / "model_final.pth")   # trainer output
    assert qdet.load(tmp_path / "model_final.pth").config.num_heads == 3


def test_pooler_levels_and_aligned_roi_align():
    """Boxes go to P2..P5 by floor(4 + log2(sqrt(area)/224)); each is pooled with
    roi_align(aligned=True) at its level's scale."""
    feats = [torch.randn(1, 4, 256 // 2 ** i, 256 // 2 ** i) for i in range(2, 6)]
    boxes = torch.tensor([[0., 0., 50., 50.], [10., 10., 160., 160.], [0., 0., 300., 300.],
                          [0., 0., 500., 500.]])
    levels = [2, 3, 4, 5]                        # sizes 50, 150, 300, 500
    out = roi_pool(feats, [boxes], 7)
    for i, lvl in enumerate(levels):
        rois = torch.cat([torch.zeros(1, 1), boxes[i:i + 1]], 1)
        ref = roi_align(feats[lvl - 2], rois, 7, spatial_scale=1 / 2 ** lvl, sampling_ratio=2,
                        aligned=True)
        torch.testing.assert_close(out[i:i + 1], ref)


def test_apply_deltas_by_hand():
    box = torch.tensor([[10., 20., 30., 60.]])          # w 20, h 40, centre (20, 40)
    out = apply_deltas(torch.tensor([[2., -1., math.log(2.), 0.]]), box)
    # dx = 2/2 -> cx = 20 + 20; dy = -1/2 -> cy = 40 - 20; w doubles; h unchanged
    torch.testing.assert_close(out, torch.tensor([[20., 0., 60., 40.]]))
    huge = apply_deltas(torch.tensor([[0., 0., 100., 100.]]), box)
    assert torch.isfinite(huge).all()                     # scale clamped at log(1e5/16)


def test_dynamic_conv_matches_explicit_convolutions():
    """Each proposal's generated parameters act as two 1x1 convolutions on its own RoI."""
    torch.manual_seed(0)
    dc = DynamicConv(8, 4, 2).eval()
    q, roi = torch.randn(3, 8), torch.randn(3, 4, 8)
    out = dc(q, roi)
    for b in range(3):
        p = dc.dynamic_layer(q[b])
        w1, w2 = p[:32].view(8, 4), p[32:].view(4, 8)
        conv1 = torch.nn.functional.conv2d(roi[b].T.reshape(1, 8, 2, 2), w1.T[:, :, None, None])
        x = torch.relu(dc.norm1(conv1.flatten(2).transpose(1, 2)))
        conv2 = torch.nn.functional.conv2d(x.transpose(1, 2).reshape(1, 4, 2, 2),
                                           w2.T[:, :, None, None])
        x = torch.relu(dc.norm2(conv2.flatten(2).transpose(1, 2)))     # [1, 4 positions, 8]
        ref = torch.relu(dc.norm3(dc.out_layer(x.reshape(1, -1))))
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-6)


def test_proposals_start_as_whole_image():
    model = build_model("sparse-rcnn", TINY["sparse-rcnn"])
    assert torch.equal(model.init_proposal_boxes.weight,
                       torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(6, 4))
