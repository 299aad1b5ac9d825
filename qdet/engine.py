"""The training loop, shared by every method (setting up a run: ``qdet.runs``; evaluation:
``qdet.evaluation``).

One process or many (``torchrun --nproc_per_node N -m qdet train ...``: DistributedSampler,
gloo on CPU, nccl on GPU; rank 0 logs and writes checkpoints). Each epoch ends with a COCO
evaluation, a line in ``metrics.jsonl`` and atomic ``last.pt``/``best.pt`` checkpoints that
carry arch, config, class names, epoch, optimizer and scheduler. Randomness (data order,
augmentation, dropout) is seeded from (seed, epoch, rank), so ``--resume`` continues exactly
where an uninterrupted run would be.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from .base import Detector
from .checkpoint import model_checkpoint, save_checkpoint
from .criterion import SetCriterion
from .data import AugmentConfig, DetectionDataset, collate
from .evaluation import evaluate
from .shapes import ShapesConfig
from .terminal import console, progress_bar, stats_table


@dataclass
class TrainConfig:
    """Optimization and data-loading settings; a method's preset overrides the defaults."""
    epochs: int = 50
    batch_size: int = 2                 # per process
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_slow_names: tuple[str, ...] = ()  # parameters whose name contains one of these ...
    lr_slow_mult: float = 0.1            # ... train at lr * lr_slow_mult (Deformable DETR)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    schedule: str = "step"              # "step": x0.1 at each of lr_drops (epochs); "cosine"
    lr_drops: tuple[int, ...] = (400,)
    warmup_steps: int = 0
    num_workers: int = 2
    seed: int = 42
    eval_every: int = 1
    compile: bool = False
    precision: str = "fp32"             # "fp32", "bf16" (autocast), or "auto": bf16 where
                                        # the hardware has it (AVX-512 BF16 CPUs, recent GPUs)
    channels_last: bool = False         # NHWC convolutions (faster on CPU)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)  # the built-in data, if used


# ---------------------------------------------------------------------- distribution


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world,
    device). Without torchrun this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, torch.device(device)


# ------------------------------------------------------------------------ optimizer


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


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(cfg.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if cfg.schedule == "step":
            return warm * 0.1 ** sum(step >= e * steps_per_epoch for e in cfg.lr_drops)
        raise ValueError(f"unknown schedule {cfg.schedule!r} (use 'step' or 'cosine')")
    return factor


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 runs natively (else autocast would emulate it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: no cheap way to know
        return False


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {cfg.precision!r}")
    return cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_native(device))


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


# ------------------------------------------------------------------------- training


@dataclass
class RunState:
    epoch: int = 0            # epochs completed
    best_ap: float = -1.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class Optimization:
    """What one training run steps: the loss, the optimizer and the lr schedule."""
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def make_optimization(model: Detector, cfg: TrainConfig, steps_per_epoch: int,
                      device: torch.device, resume: dict | None) -> Optimization:
    """Criterion, AdamW and the lr schedule, restored from ``resume`` when given."""
    criterion = SetCriterion(model.config.num_classes, model.config.loss, model.focal).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    return Optimization(criterion, optimizer, scheduler)


def prepare_model(model: Detector, cfg: TrainConfig, device: torch.device, world: int):
    """Switch ``model`` (already on ``device``) to the run's memory format, compile it if
    asked, and wrap it for DDP when there are several processes; returns the module to
    call."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_transformer()
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def epoch_loader(train_set: DetectionDataset, sampler, cfg: TrainConfig, epoch: int,
                 device: torch.device) -> DataLoader:
    """The epoch's data order and augmentation, a function of (seed, epoch)."""
    train_set.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed + epoch)
    return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None,
                      sampler=sampler, generator=gen, drop_last=True,
                      num_workers=cfg.num_workers, collate_fn=collate,
                      persistent_workers=False, pin_memory=device.type == "cuda")


def train_step(net, opt: Optimization, images, targets, cfg: TrainConfig, bf16: bool,
               where: str, params) -> dict[str, Tensor]:
    """One optimization step; returns the logged losses (total, main terms, encoder)."""
    with torch.autocast(images[0].device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = net(images)
    losses = opt.criterion(outputs, targets)  # in float32
    loss = opt.criterion.weighted(losses)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at {where}: "
            f"{ {k: round(v.item(), 4) for k, v in losses.items()} }; lower --lr or check "
            "the data")
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_max_norm)
    opt.optimizer.step()
    opt.scheduler.step()
    logged = {"loss": loss, **{k: losses[k] for k in ("loss_ce", "loss_bbox", "loss_giou")}}
    enc = {k: v for k, v in losses.items() if k.endswith("_enc")}
    if enc:  # two-stage / dense-prior models: the encoder's own set loss
        logged["loss_enc"] = opt.criterion.weighted(enc)
    return logged


def train_one_epoch(net, model: Detector, opt: Optimization, loader: DataLoader,
                    cfg: TrainConfig, device: torch.device, bf16: bool, epoch: int,
                    out: Path, show: bool) -> dict:
    """One pass over ``loader`` with a progress bar; returns the epoch's mean losses, lr,
    steps and seconds."""
    t0 = time.time()
    sums: dict[str, float] = {}
    net.train()
    with progress_bar(disable=not show) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="")
        for step, (images, targets) in enumerate(loader):
            images, targets = to_device(images, targets, device)
            try:
                logged = train_step(net, opt, images, targets, cfg, bf16,
                                    f"epoch {epoch + 1}, step {step}", model.parameters())
            except FloatingPointError as e:
                raise FloatingPointError(f"{e}. The last good checkpoint is {out / 'last.pt'}"
                                         ) from None
            values = torch.stack([v.detach() for v in logged.values()]).tolist()  # 1 sync
            for k, v in zip(logged, values):
                sums[k] = sums.get(k, 0.0) + v
            n = step + 1
            bar.update(task, advance=1, info=f"loss {sums['loss'] / n:.3f} "
                       f"lr {opt.optimizer.param_groups[0]['lr']:.2e} "
                       f"{n / max(time.time() - t0, 1e-9):.2f} it/s")
    return {"epoch": epoch + 1, **{k: v / max(len(loader), 1) for k, v in sums.items()},
            "lr": opt.optimizer.param_groups[0]["lr"], "steps": len(loader),
            "train_seconds": time.time() - t0}


def save_epoch(model: Detector, opt: Optimization, state: RunState, cfg: TrainConfig,
               data_spec: dict, metrics: dict, out: Path, evaluated: bool) -> None:
    """Rank 0 after an epoch: ``last.pt`` (everything to resume), ``best.pt`` when the AP
    improved (or without validation data), a line in ``metrics.jsonl``."""
    ap = metrics.get("AP", -1.0)
    improved = ap > state.best_ap or not evaluated
    state.best_ap = max(state.best_ap, ap)
    ckpt = model_checkpoint(model, epoch=state.epoch, best_ap=state.best_ap,
                            optimizer=opt.optimizer.state_dict(),
                            scheduler=opt.scheduler.state_dict(),
                            train=dataclasses.asdict(cfg), data=data_spec, metrics=metrics)
    save_checkpoint(out / "last.pt", ckpt)
    if improved or not (out / "best.pt").exists():
        save_checkpoint(out / "best.pt", {k: v for k, v in ckpt.items()
                                          if k not in ("optimizer", "scheduler")})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def train(model: Detector, train_set: DetectionDataset, val_set: DetectionDataset | None,
          cfg: TrainConfig, out: Path, device: torch.device, data_spec: dict,
          resume: dict | None = None) -> dict:
    """Train ``model``; returns the last epoch's metrics. ``resume`` is a checkpoint dict."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = Path(out)
    model.preprocess = {"size": cfg.augment.eval_size, "max_size": cfg.augment.max_size}
    model.to(device)
    steps_per_epoch = max(len(train_set) // (cfg.batch_size * world), 1)
    opt = make_optimization(model, cfg, steps_per_epoch, device, resume)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True) if world > 1 else None
    state = RunState()
    if resume is not None:
        state = RunState(epoch=resume["epoch"], best_ap=resume.get("best_ap", -1.0))
    bf16 = use_bf16(cfg, device)
    net = prepare_model(model, cfg, device, world)
    metrics = {}
    for epoch in range(state.epoch, cfg.epochs):
        seed_everything(cfg.seed + 1000 * epoch + rank)
        loader = epoch_loader(train_set, sampler, cfg, epoch, device)
        metrics = train_one_epoch(net, model, opt, loader, cfg, device, bf16, epoch, out,
                                  show=rank == 0)
        metrics.update(world_size=world, bf16=bf16)
        evaluate_now = val_set is not None and ((epoch + 1) % cfg.eval_every == 0
                                                or epoch + 1 == cfg.epochs)
        if evaluate_now:
            stats, _ = evaluate(net, val_set, device, batch_size=cfg.batch_size,
                                num_workers=cfg.num_workers, bf16=bf16)
            metrics.update(stats)
        state.epoch = epoch + 1
        if rank == 0:
            save_epoch(model, opt, state, cfg, data_spec, metrics, out, val_set is not None)
            if "AP" in metrics:
                console.print(stats_table(metrics, f"epoch {epoch + 1}: val COCO bbox"))
        if dist.is_initialized():
            dist.barrier()
    return metrics
