"""Helpers for parity tests against HF transformers: a torchvision-shaped HF ResNet, random
weights that exercise every parameter, and HF -> official (torchvision) backbone names."""
import re

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


def hf_resnet_key(k: str) -> str:
    k = k.replace("model.backbone.model.", "backbone.0.body.")
    k = k.replace("embedder.embedder.convolution", "conv1")
    k = k.replace("embedder.embedder.normalization", "bn1")
    k = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.",
               lambda m: f"layer{int(m.group(1)) + 1}.{m.group(2)}.", k)
    k = re.sub(r"layer\.(\d+)\.convolution", lambda m: f"conv{int(m.group(1)) + 1}", k)
    k = re.sub(r"layer\.(\d+)\.normalization", lambda m: f"bn{int(m.group(1)) + 1}", k)
    return k.replace("shortcut.convolution", "downsample.0").replace(
        "shortcut.normalization", "downsample.1")
