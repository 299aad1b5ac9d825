"""Helpers for parity tests against HF transformers: a torchvision-shaped backbone in
either HF flavour, random weights that exercise every parameter, saving a model folder, and
comparing outputs. (The HF -> qdet mapping itself is the package's, ``qdet.weights.hf_format``.)"""
import re

import pytest
import torch


def hf_resnet_config(out_features):
    """An HF ResNet with torchvision resnet18's exact structure."""
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                        layer_type="basic", out_features=list(out_features))


def randomize_(model):
    """Random BN statistics, biases and norm scales, so nothing cancels out by default."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(torch.rand_like(t) + 0.5)
            elif "running_mean" in name or name.endswith("bias"):
                t.copy_(torch.randn_like(t) * 0.1)
            elif re.search(r"(normalization|norm|layernorm)\.weight$", name):
                t.copy_(1 + 0.1 * torch.randn_like(t))
    return model


def backbone_kwargs(flavour: str, out_features) -> dict:
    """HF config arguments for a torchvision-resnet18-shaped backbone of either flavour:
    HF's own ResNet, or timm's (random weights, so nothing is downloaded)."""
    if flavour == "timm":
        pytest.importorskip("timm")
        return dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)
    return dict(use_timm_backbone=False, backbone_config=hf_resnet_config(out_features))


def save_hf(model, folder):
    """``save_pretrained`` into ``folder`` (as a user would, or the Hub holds it)."""
    model.save_pretrained(folder)
    return folder


def assert_outputs_close(out: dict, logits, boxes, aux: list) -> None:
    """qdet's output dict against HF's final logits and boxes and its per-layer
    ``[(logits, boxes)]``, to float32 precision."""
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    close(out["pred_logits"], logits)
    close(out["pred_boxes"], boxes)
    assert len(out["aux_outputs"]) == len(aux)
    for ours, (layer_logits, layer_boxes) in zip(out["aux_outputs"], aux):
        close(ours["pred_logits"], layer_logits)
        close(ours["pred_boxes"], layer_boxes)
