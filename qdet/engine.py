"""The training loop, shared by every method (evaluation: ``qdet.evaluation``).

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
from torch.utils.data import DataLoader, DistributedSampler

from .base import Detector
from .checkpoint import model_checkpoint, save_checkpoint
from .criterion import SetCriterion
from .data import AugmentConfig, DetectionDataset, collate
from .evaluation import console, evaluate, progress_bar, stats_table
from .shapes import ShapesConfig


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


# The training part of every built-in-data preset (methods override a few keys): from
# scratch in minutes on a CPU, so a short warmup, cosine decay, bf16 where native.
SHAPES_TRAIN = dict(lr=2e-4, lr_backbone=2e-4, weight_decay=1e-4, batch_size=16, epochs=8,
                    schedule="cosine", warmup_steps=100, clip_max_norm=0.1, precision="auto",
                    channels_last=True)


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


def train(model: Detector, train_set: DetectionDataset, val_set: DetectionDataset | None,
          cfg: TrainConfig, out: Path, device: torch.device, data_spec: dict,
          resume: dict | None = None) -> dict:
    """Train ``model``; returns the last epoch's metrics. ``resume`` is a checkpoint dict."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = Path(out)
    model.preprocess = {"size": cfg.augment.eval_size, "max_size": cfg.augment.max_size}
    model.to(device)
    criterion = SetCriterion(model.config.num_classes, model.config.loss).to(device)
    optimizer = make_optimizer(model, cfg)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True) if world > 1 else None
    steps_per_epoch = max(len(train_set) // (cfg.batch_size * world), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    state = RunState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = RunState(epoch=resume["epoch"], best_ap=resume.get("best_ap", -1.0))
    bf16 = use_bf16(cfg, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_transformer()
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = {}
    for epoch in range(state.epoch, cfg.epochs):
        seed_everything(cfg.seed + 1000 * epoch + rank)
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None,
                            sampler=sampler, generator=gen, drop_last=True,
                            num_workers=cfg.num_workers, collate_fn=collate,
                            persistent_workers=False, pin_memory=device.type == "cuda")
        t0 = time.time()
        sums: dict[str, float] = {}
        net.train()
        with progress_bar(disable=rank != 0) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="")
            for step, (images, targets) in enumerate(loader):
                images, targets = to_device(images, targets, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    outputs = net(images)
                losses = criterion(outputs, targets)  # in float32
                loss = criterion.weighted(losses)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step}: "
                        f"{ {k: round(v.item(), 4) for k, v in losses.items()} }; lower --lr "
                        f"or check the data. The last good checkpoint is {out / 'last.pt'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
                optimizer.step()
                scheduler.step()
                logged = {"loss": loss, **{k: losses[k] for k in ("loss_ce", "loss_bbox",
                                                                   "loss_giou")}}
                enc = {k: v for k, v in losses.items() if k.endswith("_enc")}
                if enc:  # two-stage / dense-prior models: the encoder's own set loss
                    logged["loss_enc"] = criterion.weighted(enc)
                values = torch.stack([v.detach() for v in logged.values()]).tolist()  # 1 sync
                for k, v in zip(logged, values):
                    sums[k] = sums.get(k, 0.0) + v
                n = step + 1
                bar.update(task, advance=1, info=f"loss {sums['loss'] / n:.3f} "
                           f"lr {optimizer.param_groups[0]['lr']:.2e} "
                           f"{n / max(time.time() - t0, 1e-9):.2f} it/s")
        metrics = {"epoch": epoch + 1, **{k: v / max(len(loader), 1) for k, v in sums.items()},
                   "lr": optimizer.param_groups[0]["lr"], "steps": len(loader),
                   "world_size": world, "bf16": bf16, "train_seconds": time.time() - t0}
        if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            stats, _ = evaluate(net, val_set, device, batch_size=cfg.batch_size,
                                num_workers=cfg.num_workers, bf16=bf16)
            metrics.update(stats)
        state.epoch = epoch + 1
        if rank == 0:
            ap = metrics.get("AP", -1.0)
            improved = ap > state.best_ap or val_set is None
            state.best_ap = max(state.best_ap, ap)
            ckpt = model_checkpoint(model, epoch=state.epoch, best_ap=state.best_ap,
                                    optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(),
                                    train=dataclasses.asdict(cfg), data=data_spec,
                                    metrics=metrics)
            save_checkpoint(out / "last.pt", ckpt)
            if improved or not (out / "best.pt").exists():
                save_checkpoint(out / "best.pt", {k: v for k, v in ckpt.items()
                                                  if k not in ("optimizer", "scheduler")})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if "AP" in metrics:
                console.print(stats_table(metrics, f"epoch {epoch + 1}: val COCO bbox"))
        if dist.is_initialized():
            dist.barrier()
    return metrics


# ------------------------------------------------------------- setting up a training run


def latest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently written run folder under ``root`` (by its last.pt)."""
    runs = [p.parent for p in Path(root).glob("*/last.pt")]
    return max(runs, key=lambda p: (p / "last.pt").stat().st_mtime) if runs else None


def make_datasets(spec: dict, cfg: TrainConfig):
    """(train, val) datasets from a data spec (stored in checkpoints for --resume)."""
    from .data import CocoDataset, ShapesDataset

    if spec["kind"] == "shapes":
        return (ShapesDataset("train", cfg.shapes, cfg.augment, train=True, seed=cfg.seed),
                ShapesDataset("val", cfg.shapes, cfg.augment, train=False, seed=cfg.seed))
    train_set = CocoDataset(spec["train_ann"], spec["train_images"], cfg.augment, True, cfg.seed)
    val_set = None
    if spec.get("val_ann"):
        val_set = CocoDataset(spec["val_ann"], spec["val_images"], cfg.augment, False, cfg.seed)
    return train_set, val_set


def fit(arch: str = "detr", data: str | None = None, images: str | None = None,
        val_data: str | None = None, val_images: str | None = None, out: str | None = None,
        resume: bool = False, device: str | None = None, preset: str | None = None,
        model_overrides: dict | None = None, train_overrides: dict | None = None,
        backbone_weights: str | None = None) -> dict:
    """Set up and run training; the Python twin of ``qdet train``. Returns the last epoch's
    metrics and the run folder.

    Without ``data`` the model trains on the built-in shapes data with the method's
    ``SHAPES`` preset; with COCO-format ``data``/``images`` it uses the paper's recipe
    (``PAPER``). Overrides are dotted config keys (``{'d_model': 128}``,
    ``{'augment.crop': False}``); unset options never override a preset.
    """
    from .checkpoint import model_from_checkpoint, read_checkpoint
    from .registry import apply_overrides, arch_module, config_from_dict

    rank, world, device_ = init_distributed(device)
    resume_ckpt = None
    if resume:
        run = Path(out) if out else latest_run()
        if run is None or not (run / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume: no last.pt in {run or 'runs/*'}; "
                                    "start a run without --resume")
        resume_ckpt = read_checkpoint(run / "last.pt")
        model = model_from_checkpoint(resume_ckpt, str(run / "last.pt"))
        cfg = apply_overrides(config_from_dict(TrainConfig, resume_ckpt["train"]),
                              train_overrides or {})
        spec, out_dir = resume_ckpt["data"], run
        if resume_ckpt["epoch"] >= cfg.epochs:
            raise ValueError(f"{run / 'last.pt'} already finished {resume_ckpt['epoch']} of "
                             f"{cfg.epochs} epochs; pass a larger --epochs to continue")
        train_set, val_set = make_datasets(spec, cfg)
    else:
        mod = arch_module(arch)
        preset = preset or ("shapes" if data is None else "paper")
        chosen = {"shapes": mod.SHAPES, "paper": mod.PAPER}[preset]
        cfg = apply_overrides(TrainConfig(), {**chosen.get("train", {}), **(train_overrides or {})})
        if data is None:
            spec = {"kind": "shapes"}
            if not any(k.startswith("augment") for k in (train_overrides or {})):
                s = cfg.shapes.image_size
                cfg = dataclasses.replace(cfg, augment=AugmentConfig(
                    train_scales=(s,), max_size=None, crop=False, eval_size=s))
        else:
            if images is None:
                raise ValueError("--data needs --images (the folder its file_name fields are in)")
            if val_data is not None and val_images is None:
                raise ValueError("--val-data needs --val-images")
            spec = {"kind": "coco", "train_ann": str(data), "train_images": str(images),
                    "val_ann": val_data and str(val_data),
                    "val_images": val_images and str(val_images)}
        train_set, val_set = make_datasets(spec, cfg)
        overrides = {**chosen.get("model", {}), **(model_overrides or {}),
                     "num_classes": len(train_set.category_ids)}
        torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
        model = mod.Model(apply_overrides(mod.Config(), overrides))
        model.category_ids, model.class_names = train_set.category_ids, train_set.class_names
        if backbone_weights:
            model.backbone.load_weights(backbone_weights)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if world > 1:
            box = [stamp]
            dist.broadcast_object_list(box, src=0)
            stamp = box[0]
        out_dir = Path(out) if out else Path("runs") / f"{arch}-{stamp}"
        if (out_dir / "last.pt").exists():
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it "
                                  "or another --out")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(
            {"arch": model.arch, "model": dataclasses.asdict(model.config),
             "train": dataclasses.asdict(cfg), "data": spec}, indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        console.print(f"[bold]qdet train[/] {model.arch}: {n_params / 1e6:.1f}M parameters, "
                      f"{len(train_set)} training images, {cfg.epochs} epochs, "
                      f"batch {cfg.batch_size}x{world} on {device_} -> {out_dir}"
                      + (f" (resuming after epoch {resume_ckpt['epoch']})" if resume_ckpt else ""))
    metrics = train(model, train_set, val_set, cfg, out_dir, device_, spec, resume_ckpt)
    return {"metrics": metrics, "out": str(out_dir)}
