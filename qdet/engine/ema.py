"""An exponential moving average of the weights (as RT-DETR, DEIM and rf-detr keep one):
evaluation, ``best.pt``, ``last.pt``'s model (and so predict, eval and export) use it.

After every optimizer step each floating-point tensor of the state dict moves towards the
model's: ``ema = d * ema + (1 - d) * model`` with ``d = decay * (1 - exp(-updates /
warmup))`` (RT-DETR's warm-up: early on, when the weights change most, the average follows
them closely); integer buffers are copied. ``updates`` is saved in ``last.pt``, so a resumed
run continues the same average.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999      # RT-DETR's
    warmup: int = 2000         # updates over which the decay ramps up (0: constant)


class ModelEMA:
    """The average of ``model``'s weights: ``module`` (an eval-mode copy, no gradients)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.cfg, self.updates = cfg, updates

    def factor(self) -> float:
        """This update's decay."""
        if not self.cfg.warmup:
            return self.cfg.decay
        return self.cfg.decay * (1 - math.exp(-self.updates / self.cfg.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.factor()
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.dtype.is_floating_point]
        # one fused lerp over all tensors: ema + (1 - d) * (model - ema)
        torch._foreach_lerp_([mine[k] for k in floats],
                             [theirs[k].detach().to(mine[k].dtype) for k in floats], 1 - d)
        for key, value in mine.items():
            if not value.dtype.is_floating_point:
                value.copy_(theirs[key])

    def state(self) -> dict:
        return {"updates": self.updates}
