"""The training loop, shared by every method (setting up a run: ``qdet.engine.runs``; evaluation:
``qdet.engine.evaluation``).

One process or many (``torchrun --nproc_per_node N -m qdet train ...``: DistributedSampler,
gloo on CPU, nccl on GPU; rank 0 logs and writes checkpoints). Each epoch ends with a COCO
evaluation, a line in ``metrics.jsonl`` and atomic ``last.pt``/``best.pt`` checkpoints that
carry arch, config, class names, epoch, optimizer and scheduler. Randomness (data order,
augmentation, dropout) is seeded from (seed, epoch, rank), so ``--resume`` continues exactly
where an uninterrupted run would be. With a wall-clock budget (``TrainConfig.time``,
``qdet train --time``) the run is planned after a timed warm-up and split into equal parts
instead of epochs (``qdet.engine.budget``, ``qdet.engine.timed``). Rank 0 keeps the run folder readable as it goes
(``results.csv``, ``curves.png``, optional TensorBoard: ``qdet.engine.run_log``) and ends with the
best checkpoint's per-class results (``qdet.engine.eval_report``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ..blocks.base import Detector
from ..common.files import remove_stale_temporaries, write_atomic
from ..common.terminal import console, stats_table
from ..data.datasets import DetectionDataset, collate
from ..data.errors import DataError
from ..ops.modes import bf16_native
from ..weights.checkpoint import model_checkpoint, save_checkpoint
from . import budget
from .config import TrainConfig
from .ema import ModelEMA
from .evaluation import evaluate
from .optim import Optimization, make_optimization, total_steps
from .run_folder import RunFolder, restore_rows
from .run_log import RunLog
from .step import train_one_epoch
from .timed import Timekeeper

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


def num_parts(cfg: TrainConfig) -> int:
    """Epochs, or a timed run's parts (1 until it is planned)."""
    if cfg.time.minutes:
        return cfg.time.evals or 1
    return cfg.epochs


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {cfg.precision!r}")
    return cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_native(device))


# ------------------------------------------------------------------------- training


@dataclass
class RunState:
    epoch: int = 0            # epochs completed
    best_ap: float = -1.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


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


def record_plan(out: Path, cfg: TrainConfig) -> None:
    """A timed run's plan into ``config.json``: its ``train`` entry is replaced, everything
    else the file holds is kept."""
    folder = RunFolder(out)
    folder.write_config({**folder.read_config(), "train": dataclasses.asdict(cfg)})


def save_epoch(model: Detector, opt: Optimization, state: RunState, cfg: TrainConfig,
               data_spec: dict, metrics: dict, out: Path, evaluated: bool,
               ema: ModelEMA | None = None) -> bool:
    """Rank 0 after an epoch: ``best.pt`` when the AP improved (or without validation data),
    then ``last.pt`` (everything to resume), then a line in ``metrics.jsonl``. In this order
    a run killed at any point resumes from a last.pt whose best.pt and metrics are
    consistent with it (``run_log.restore_rows`` restores a line lost after last.pt).
    With ``ema`` both hold the averaged weights as their model (what eval, predict and
    export read), and last.pt also the trained ones and the average's state, to resume.
    Returns whether the AP improved."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a step at a NaN lr, or a NaN gradient: finite loss, ruined weights
        raise FloatingPointError(
            f"training stopped after epoch {state.epoch}: {len(bad)} weight tensor(s) are NaN "
            f"or inf (e.g. {bad[0]}), so this epoch is not saved; lower --lr or check the data")
    ap = metrics.get("AP", -1.0)
    improved = ap > state.best_ap or not evaluated
    state.best_ap = max(state.best_ap, ap)
    extra = {}
    if ema is not None:
        extra = {"train_model": model.state_dict(), "ema": ema.state()}
        model = ema.module
    ckpt = model_checkpoint(model, epoch=state.epoch, best_ap=state.best_ap,
                            optimizer=opt.optimizer.state_dict(),
                            scheduler=opt.scheduler.state_dict(),
                            train=dataclasses.asdict(cfg), data=data_spec, metrics=metrics,
                            **extra)
    folder = RunFolder(out)
    if improved or not folder.best.exists():
        save_checkpoint(folder.best, {k: v for k, v in ckpt.items()
                                      if k not in ("optimizer", "scheduler", "train_model")})
    save_checkpoint(folder.last, ckpt)
    append_metrics(out, metrics)
    return improved


def append_metrics(out: Path, metrics: dict) -> None:
    RunFolder(out).append_metrics(metrics)


def make_ema(model: Detector, cfg: TrainConfig, resume: dict | None) -> ModelEMA | None:
    """The moving average of ``model``'s weights (``--ema``), continued from ``resume``:
    the checkpoint's model is the average, its ``train_model`` the trained weights."""
    if not cfg.ema.enabled:
        return None
    if resume is None or "ema" not in resume:
        ema = ModelEMA(model, cfg.ema)
    else:
        averaged = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(resume["train_model"])
        ema = ModelEMA(model, cfg.ema, resume["ema"]["updates"])
        ema.module.load_state_dict(averaged)
    if cfg.channels_last:
        ema.module.to(memory_format=torch.channels_last)
    return ema


def check_batches(train_set: DetectionDataset, cfg: TrainConfig, world: int) -> None:
    """An epoch drops the last partial step: fewer images than one step train nothing."""
    step = cfg.batch_size * cfg.accumulate * world
    if len(train_set) < step:
        raise DataError(f"{train_set.source}: {len(train_set)} training image(s), fewer than "
                        f"one step of {cfg.batch_size} per process x {world} process(es)"
                        + (f" x {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else "")
                        + "; lower --batch-size" + (" or --accumulate" if cfg.accumulate > 1
                                                    else ""))


def part_title(cfg: TrainConfig, epoch: int) -> str:
    if cfg.time.minutes:
        return f"{cfg.time.minutes:g} min, part {epoch + 1}/{cfg.time.evals or '?'}"
    return f"epoch {epoch + 1}/{cfg.epochs}"


def train(model: Detector, train_set: DetectionDataset, val_set: DetectionDataset | None,
          cfg: TrainConfig, out: Path, device: torch.device, data_spec: dict,
          resume: dict | None = None, started: float | None = None) -> dict:
    """Train ``model``; returns the last epoch's metrics. ``resume`` is a checkpoint dict;
    ``started``: the ``budget.clock()`` the run's set-up began at (a timed run's budget
    counts from there)."""
    start = budget.clock() if started is None else started
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = Path(out)
    model.preprocess = {"size": cfg.augment.eval_size, "max_size": cfg.augment.max_size}
    model.to(device)
    steps_per_epoch = max(len(train_set) // (cfg.batch_size * cfg.accumulate * world), 1)
    opt = make_optimization(model, cfg, total_steps(cfg, steps_per_epoch), device, resume)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True) if world > 1 else None
    state, before = RunState(), {}
    if resume is not None:
        state = RunState(epoch=resume["epoch"], best_ap=resume.get("best_ap", -1.0))
        before = resume.get("metrics") or {}
    bf16 = use_bf16(cfg, device)
    ema = make_ema(model, cfg, resume)
    net = prepare_model(model, cfg, device, world)
    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        rows = restore_rows(out, state.epoch, before or None)
        log = RunLog(out, rows, f"{out.name} ({model.arch})", cfg.tensorboard)
    images, seconds = before.get("images", 0), before.get("time", 0.0)
    keeper = Timekeeper(opt, net, val_set, device, bf16, start, world, rank,
                        resumed=resume is not None) if cfg.time.minutes else None
    metrics = {}
    try:
        while state.epoch < num_parts(cfg):
            epoch = state.epoch
            seed_everything(cfg.seed + 1000 * epoch + rank)
            on_step = None
            if keeper is not None:
                loader, steps, on_step = keeper.begin(cfg, epoch, train_set)
            else:
                loader = epoch_loader(train_set, sampler, cfg, epoch, device)
                steps = len(loader) // cfg.accumulate
            metrics = train_one_epoch(net, model, opt, loader, steps, cfg, device, bf16, epoch,
                                      part_title(cfg, epoch), rank == 0, log, on_step, ema)
            if keeper is not None:
                cfg = keeper.after_steps(cfg, epoch)
            images += metrics["steps"] * cfg.batch_size * cfg.accumulate * world
            metrics.update(world_size=world, bf16=bf16, step=opt.scheduler.last_epoch,
                           images=images)
            last = epoch + 1 == num_parts(cfg)
            evaluate_now = val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last)
            results = eval_s = None
            if evaluate_now:
                judged = net if ema is None else ema.module     # what best.pt will hold
                t = budget.clock()
                stats, results = evaluate(judged, val_set, device, batch_size=cfg.batch_size,
                                          num_workers=cfg.num_workers, bf16=bf16)
                metrics.update(stats)
                eval_s = budget.clock() - t
            if keeper is not None:
                changed = keeper.changed
                cfg = keeper.after_eval(cfg, epoch, eval_s)
                if rank == 0 and (changed or keeper.changed):
                    record_plan(out, cfg)
            metrics["time"] = seconds + budget.clock() - start
            state.epoch = epoch + 1
            if rank == 0:
                improved = save_epoch(model, opt, state, cfg, data_spec, metrics, out,
                                      val_set is not None, ema)
                if improved and results is not None:  # what `qdet eval best.pt` would write
                    write_atomic(RunFolder(out).best_results, json.dumps(results))
                log.add_epoch(metrics)
                if "AP" in metrics:
                    console.print(stats_table(metrics, f"{part_title(cfg, epoch)}: val COCO "
                                                       "bbox"))
            if dist.is_initialized():
                dist.barrier()
    finally:
        if log is not None:
            log.close()
    if rank == 0:
        finish(cfg, val_set, out, log.rows, state, seconds, start)
    return metrics


def finish(cfg: TrainConfig, val_set, out: Path, rows: list[dict], state: RunState,
           seconds: float, start: float) -> None:
    """Rank 0 at the end: the best checkpoint's per-class results, confusion matrix and PR
    curves in the run folder; then how a timed run kept its budget (``seconds`` used before
    this process, which began at ``start``)."""
    folder = RunFolder(out)
    if val_set is not None and folder.best_results.is_file():
        from .eval_report import show_report, write_report

        best = next((r for r in rows if r.get("AP") == state.best_ap), None)
        results = json.loads(folder.best_results.read_text())
        report = write_report(val_set, results, out, losses=[r["loss"] for r in rows])
        show_report(report, "best.pt" + (f" ({part_title(cfg, best['epoch'] - 1)})"
                                         if best else ""))
    if cfg.time.minutes:
        tc, used = cfg.time, seconds + budget.clock() - start
        console.print(f"time budget {tc.minutes:g} min: {tc.total_steps} steps, "
                      f"{used / 60:.2f} min in all" + (
                          f" (cut short from {tc.planned_steps} planned steps: steps were "
                          "slower than the warm-up's)"
                          if tc.total_steps < tc.planned_steps else ""))
