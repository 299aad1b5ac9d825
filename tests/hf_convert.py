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


LAYER_KEY = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.*)")
# HF's per-layer names -> the official nn.TransformerEncoderLayer-style names
ENCODER_NAMES = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
                 "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
DECODER_NAMES = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2",
                 "final_layer_norm": "norm3", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}


def rename_start(name: str, table: dict) -> str:
    """``name`` with its leading module renamed by ``table`` (unchanged when none applies)."""
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def mha_keys(sd: dict, hf_attn: str, which: str, kind: str, v, target: str) -> dict:
    """One of HF's separate q/k/v/o projections as nn.MultiheadAttention names under
    ``target``: o -> out_proj; q -> in_proj, stacked with k and v (which map to nothing)."""
    if which == "o":
        return {f"{target}.out_proj.{kind}": v}
    if which == "q":
        return {f"{target}.in_proj_{kind}": torch.cat([sd[f"{hf_attn}.{w}_proj.{kind}"]
                                                       for w in "qkv"])}
    return {}


def to_official(sd: dict, layer, other) -> dict:
    """An HF DETR-family state dict in an official repository's names: the backbone through
    ``hf_resnet_key``; each encoder/decoder layer key through ``layer(sd, hf_prefix, part,
    rest, v)`` -> {name under ``transformer.{part}.layers.{i}.``: tensor}; the rest through
    ``other(key)``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.backbone."):
            out[hf_resnet_key(k)] = v
        elif m := LAYER_KEY.match(k):
            part, i, rest = m.groups()
            for name, t in layer(sd, k[:len(k) - len(rest)], part, rest, v).items():
                out[f"transformer.{part}.layers.{i}.{name}"] = t
        else:
            out[other(k)] = v
    return out


def detr_top_key(k: str) -> str:
    """DETR and Conditional DETR names outside the layers."""
    return (k.replace("model.query_position_embeddings", "query_embed")
             .replace("model.input_projection", "input_proj")
             .replace("model.decoder.layernorm", "transformer.decoder.norm")
             .replace("model.decoder.", "transformer.decoder.")
             .replace("class_labels_classifier", "class_embed")
             .replace("bbox_predictor", "bbox_embed"))


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
