"""The inference fast path: the same outputs as the eager model, computed faster.

- Batch norms (frozen, or trainable ones in eval mode) are folded into the convolutions
  before them (torch's ``fuse_conv_bn_weights``): one pass less over every feature map.
- The backbone runs in channels_last memory format (NHWC), which oneDNN's CPU convolutions
  and cuDNN's tensor-core kernels prefer.
- Optionally the transformer is compiled with torch.compile (``compile=True``); measure with
  ``qdet bench`` first: it pays off for some methods and devices, not all.

Attention layers already call PyTorch's fused scaled_dot_product_attention where their
attention allows it (nn.MultiheadAttention with ``need_weights=False``, Conditional DETR's
per-head concatenated attention); callers run under ``torch.inference_mode()``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbone import Backbone
from .base import Detector


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every batch norm (frozen, or trainable used in eval mode) that directly follows a
    convolution in the same parent (torchvision ResNet's conv1/bn1, convK/bnK,
    downsample.0/.1) into that convolution; returns how many were folded. Only for
    inference: a folded model must not be trained."""
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (name_c, conv), (name_b, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                            bn.running_var, bn.eps, bn.weight, bn.bias)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                  conv.stride, conv.padding, conv.dilation, conv.groups,
                                  bias=True, padding_mode=conv.padding_mode).to(conv.weight)
                with torch.no_grad():
                    fused.weight.copy_(w)
                    fused.bias.copy_(b)
                setattr(parent, name_c, fused)
                setattr(parent, name_b, nn.Identity())
                folded += 1
    return folded


def optimize_for_inference(model: Detector, compile: bool = False) -> Detector:
    """Fold BN, switch the backbone to channels_last, optionally compile the transformer.
    Modifies and returns ``model`` (eval mode); its outputs equal the eager model's to
    float32 precision."""
    model.eval()
    fold_batchnorm(model)
    for m in model.modules():
        if isinstance(m, Backbone):
            m.to(memory_format=torch.channels_last)
    if compile:
        model.compile_transformer()
    return model
