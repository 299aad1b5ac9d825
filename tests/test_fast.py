"""The inference fast path gives the eager outputs to float32 precision, for every method."""
import copy

import pytest
import torch

import qdet
from qdet.blocks.fast import fold_batchnorm, optimize_for_inference
from qdet.models.registry import build_model
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint

from conftest import TINY, random_images


def randomize_bn(model):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "running_var" in name:
                t.copy_(torch.rand_like(t) + 0.5)
            elif "running_mean" in name or ("bn" in name and name.endswith("bias")):
                t.copy_(torch.randn_like(t) * 0.2)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("frozen_bn", [True, False])
def test_fast_path_matches_eager(arch, frozen_bn):
    torch.manual_seed(0)
    model = build_model(arch, {**TINY[arch], "frozen_bn": frozen_bn}).eval()
    randomize_bn(model)
    images = random_images([(96, 128), (128, 96)])
    with torch.inference_mode():
        ref = model(images)
        fast = optimize_for_inference(copy.deepcopy(model))
        out = fast(images)
    assert not any(type(m).__name__.endswith("BatchNorm2d") for m in fast.backbone.modules())
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_load_fast(tmp_path):
    model = build_model("detr", TINY["detr"]).eval()
    randomize_bn(model)
    save_checkpoint(tmp_path / "m.pt", model_checkpoint(model))
    fast = qdet.load(tmp_path / "m.pt", fast=True)
    assert fold_batchnorm(fast) == 0                    # already folded
    images = random_images([(64, 64)])
    with torch.inference_mode():
        torch.testing.assert_close(fast(images)["pred_boxes"], model(images)["pred_boxes"],
                                   rtol=1e-4, atol=1e-5)
