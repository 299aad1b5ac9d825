"""What one training run steps: AdamW over parameter groups (backbone, slow, the rest), the
lr schedule (warmup, then step drops or cosine decay) and the set criterion."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..blocks.base import Detector
from .config import TrainConfig
from .criterion import SetCriterion


def param_groups(model: Detector, cfg: TrainConfig) -> list[dict]:
    backbone, slow, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(p)
        elif any(s in name for s in cfg.lr_slow_names):
            slow.append(p)
        else:
            rest.append(p)
    groups = [{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone},
              {"params": slow, "lr": cfg.lr * cfg.lr_slow_mult}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: Detector, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has it for the device (else foreach)."""
    groups = param_groups(model, cfg)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(cfg: TrainConfig, total: int | None) -> Callable[[int], float]:
    """The lr multiplier at each step of a ``total``-step run: linear warmup, then cosine
    decay to 0 at ``total``, or x0.1 at each of ``lr_drops`` (epochs of ``cfg.epochs``, so at
    the same fraction of a timed run). ``total=None`` (a timed run before its plan): the
    schedule's start."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "cosine":
            done = min(step, total) / total if total else 0.0
            return warm * 0.5 * (1 + math.cos(math.pi * done))
        if cfg.schedule == "step":
            drops = sum(step >= e * total // cfg.epochs for e in cfg.lr_drops) if total else 0
            return warm * 0.1 ** drops
        raise ValueError(f"unknown schedule {cfg.schedule!r} (use 'step' or 'cosine')")
    return factor


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """Steps of the whole run; None for a timed run not planned yet."""
    if cfg.time.minutes:
        return cfg.time.total_steps or None
    return max(cfg.epochs * steps_per_epoch, 1)


@dataclass
class Optimization:
    """What one training run steps: the loss, the optimizer and the lr schedule."""
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def make_optimization(model: Detector, cfg: TrainConfig, total: int | None,
                      device: torch.device, resume: dict | None) -> Optimization:
    """Criterion, AdamW and the lr schedule over ``total`` steps, restored from ``resume``
    when given."""
    criterion = SetCriterion(model.config.num_classes, model.config.loss, model.focal).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    return Optimization(criterion, optimizer, scheduler)
