"""ResNet backbones from torchvision, returning the feature maps that a detector asks for.

Pretrained-backbone habits (frozen BatchNorm statistics, a frozen stem and first stage) are
options here, not fixed: official checkpoints use them, while a from-scratch run on the
built-in data trains better with ordinary BatchNorm and every layer trainable
(``qdet.engine.presets.FROM_SCRATCH``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .base import resize_mask

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# trainable=k trains the top k of these (torchvision's `trainable_layers` convention)
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def resnet_channels(name: str) -> list[int]:
    """Output channels of layer1..layer4."""
    if name in ("resnet18", "resnet34"):
        return [64, 128, 256, 512]
    return [256, 512, 1024, 2048]


class Backbone(nn.Module):
    """torchvision ResNet trunk; ``forward(x, mask)`` returns ``[(feature, mask), ...]``.

    Args:
        name: one of ``RESNETS``.
        layers: which stages to return (1..4), e.g. ``(4,)`` for DETR or ``(2, 3, 4)``.
        dilation: replace the stride of the last stage by dilation (DC5 models).
        frozen_bn: torchvision's FrozenBatchNorm2d (pretrained habit) or trainable BatchNorm2d.
        trainable: how many stages, counted from layer4 down to the stem, get gradients.
    """

    def __init__(self, name: str = "resnet50", layers: Sequence[int] = (4,),
                 dilation: bool = False, frozen_bn: bool = True, trainable: int = 3):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"{name} has BasicBlocks, which torchvision cannot dilate; "
                             "use resnet50/101 for a dilated (DC5) backbone")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(
            weights=None, norm_layer=norm, replace_stride_with_dilation=[False, False, dilation])
        for pname, p in net.named_parameters():
            p.requires_grad_(any(pname.startswith(s) for s in _STAGES[:trainable])
                             or (trainable >= 5 and pname.startswith("bn1")))
        self.layers = tuple(layers)
        returned = {f"layer{i}": str(k) for k, i in enumerate(layers)}
        self.body = IntermediateLayerGetter(net, returned)
        chans = resnet_channels(name)
        self.channels = [chans[i - 1] for i in layers]
        strides = [4, 8, 16, 16 if dilation else 32]
        self.strides = [strides[i - 1] for i in layers]

    def forward(self, x: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        if self.body.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # model.to(channels_last)
        feats = self.body(x)
        return [(f, resize_mask(mask, f.shape[-2:])) for f in feats.values()]

    def load_weights(self, weights: str) -> None:
        """Start from a local torchvision ResNet state dict (no network is assumed)."""
        load_backbone_weights(self.body, weights)


def load_backbone_weights(net: nn.Module, weights: str) -> None:
    """Load a torchvision ResNet state dict from a local file into ``net`` (a ResNet or
    the part of one that a Backbone keeps; keys that ``net`` lacks, e.g. ``fc``, are
    ignored)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {weights!r} not found: pass the path of a torchvision ResNet "
            "state dict (e.g. resnet50-0676ba61.pth, downloaded beforehand on a machine "
            "with internet access); qdet never downloads weights itself")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not a torchvision ResNet state dict of this depth "
                         f"({len(missing)} weights missing, e.g. {missing[:3]})")
    net.load_state_dict(state, strict=False)
