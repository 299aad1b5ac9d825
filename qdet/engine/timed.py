"""A timed run (``qdet train --time``) inside the training loop: the data of each part, the
warm-up that plans the run, the deadline that keeps it inside its budget
(``qdet.engine.budget`` holds the arithmetic, this module what the loop does with it).

A fresh run is planned after its warm-up and then watched: a part ends early once the last
evaluation and the report would not fit after it (``Deadline``), and after each evaluation
a part that could not even take one step before that point is not started; either way the
part just done becomes the last, and the plan says so. A resumed run follows its stored
plan exactly.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from ..common.terminal import console
from ..data.datasets import DetectionDataset, collate
from . import budget
from .budget import PassIndexed, StreamSampler
from .config import TrainConfig
from .evaluation import coco_stats, predict_dataset
from .optim import Optimization, lr_factor


def part_loader(train_set: DetectionDataset, cfg: TrainConfig, part: int, world: int,
                rank: int, device: torch.device) -> tuple[DataLoader, int]:
    """A timed run's part ``part``: its stretch of the data stream and its number of steps
    (before the plan, the first part is open-ended and its length the warm-up's)."""
    if cfg.time.total_steps:
        bounds = budget.part_bounds(cfg.time)
        start, stop = bounds[part], bounds[part + 1]
    else:
        start, stop = 0, None
    per_step = cfg.batch_size * cfg.accumulate * world
    sampler = StreamSampler(len(train_set), cfg.seed, start * per_step,
                            None if stop is None else stop * per_step, rank, world)
    loader = DataLoader(PassIndexed(train_set), batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.num_workers, collate_fn=collate,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    return loader, (cfg.time.warmup if stop is None else stop - start)


class WarmupPlanner:
    """The ``on_step`` of a timed run's first part: after ``cfg.time.warmup`` steps it times
    them and a small evaluation, fixes the run's steps and parts (``budget.plan``), lays the
    lr schedule over them and returns the first part's length. ``cfg`` is then the planned
    config."""

    def __init__(self, cfg: TrainConfig, opt: Optimization, net, val_set, device,
                 bf16: bool, start: float, world: int, rank: int):
        self.cfg, self.opt, self.net, self.val_set = cfg, opt, net, val_set
        self.device, self.bf16, self.start, self.world, self.rank = device, bf16, start, world, rank
        self.timer = budget.StepTimer()
        self.planned = False
        self.deadline: budget.Deadline

    def eval_seconds(self) -> float:
        """An evaluation's time, from two batches' worth of images: predictions and their
        COCO evaluation (a quarter of the whole on the built-in data)."""
        if self.val_set is None:
            return 0.0
        n = min(len(self.val_set), 2 * self.cfg.batch_size * self.world)
        t = budget.clock()
        results = predict_dataset(self.net, Subset(self.val_set, range(n)), self.device,
                                  self.cfg.batch_size, self.cfg.num_workers,
                                  show_progress=False, bf16=self.bf16)
        coco_stats(self.val_set, results, image_ids=sorted({r["image_id"] for r in results}))
        self.net.train()
        return (budget.clock() - t) * len(self.val_set) / max(n, 1)

    def __call__(self, done: int) -> int | None:
        if self.planned:     # then the first part keeps to the deadline
            return self.deadline(done)
        self.timer.tick()
        tc = self.cfg.time
        warm = budget.clock() - self.timer.ticks[0]     # the warm-up's own time
        if done < tc.warmup and warm < tc.warmup_share * tc.minutes * 60:
            return None
        self.planned = True
        step_s, eval_s = self.timer.step_seconds(), self.eval_seconds()
        total, evals = budget.plan(tc.minutes * 60, budget.clock() - self.start, step_s, eval_s,
                                   done, tc.max_evals)
        if self.world > 1:  # every rank follows rank 0's plan
            box = [total, evals, step_s, eval_s]
            dist.broadcast_object_list(box, src=0)
            total, evals, step_s, eval_s = box
        self.cfg = dataclasses.replace(self.cfg, time=dataclasses.replace(
            tc, warmup=done, total_steps=total, evals=evals, planned_steps=total,
            step_seconds=step_s, eval_seconds=eval_s))
        self.deadline = deadline(self.cfg, self.start, self.world, self.device)
        sched = self.opt.scheduler
        sched.lr_lambdas = [lr_factor(self.cfg, total)] * len(sched.lr_lambdas)
        if self.rank == 0:
            console.print(f"time budget {tc.minutes:g} min: {done} warm-up steps at "
                          f"{step_s:.3f} s, an evaluation about {eval_s:.1f} s -> {total} "
                          f"steps in {evals} part{'s' * (evals > 1)}, each ending with an "
                          "evaluation")
        return budget.part_bounds(self.cfg.time)[1]


def deadline(cfg: TrainConfig, start: float, world: int, device) -> budget.Deadline:
    """When a planned run's part must end to leave its evaluation and the report inside the
    budget (from ``start``): past it, the part ends and is the last."""
    tc = cfg.time
    end = start + tc.minutes * 60 - tc.eval_seconds - budget.report_seconds(tc.eval_seconds)
    return budget.Deadline(end, world, device)




class Timekeeper:
    """What ``train`` asks about a timed run's plan, part by part: the part's data and its
    ``on_step`` (the warm-up planner, then the deadline), and the plan after the part's
    steps and after its evaluation (``changed``: to be recorded)."""

    def __init__(self, opt: Optimization, net, val_set, device, bf16: bool, start: float,
                 world: int, rank: int, resumed: bool):
        self.opt, self.net, self.val_set, self.device, self.bf16 = opt, net, val_set, device, bf16
        self.start, self.world, self.rank, self.resumed = start, world, rank, resumed
        self.planner: WarmupPlanner | None = None
        self.on_step = None
        self.changed = False

    def begin(self, cfg: TrainConfig, part: int, train_set: DetectionDataset):
        """``(loader, steps, on_step)`` of part ``part``."""
        loader, steps = part_loader(train_set, cfg, part, self.world, self.rank, self.device)
        self.planner = self.on_step = None
        if not cfg.time.total_steps:
            self.on_step = self.planner = WarmupPlanner(cfg, self.opt, self.net, self.val_set,
                                                        self.device, self.bf16, self.start,
                                                        self.world, self.rank)
        elif not self.resumed:
            self.on_step = deadline(cfg, self.start, self.world, self.device)
        return loader, steps, self.on_step

    def after_steps(self, cfg: TrainConfig, part: int) -> TrainConfig:
        """The plan once part ``part``'s steps are done: fixed by the warm-up, or cut."""
        self.changed = self.planner is not None
        if self.planner is not None:
            cfg, self.on_step = self.planner.cfg, self.planner.deadline
        if isinstance(self.on_step, budget.Deadline) and self.on_step.cut:
            cfg = self._cut(cfg, part)
        return cfg

    def after_eval(self, cfg: TrainConfig, part: int, seconds: float | None) -> TrainConfig:
        """The plan after part ``part``'s evaluation (``seconds`` long; None: none ran): later
        deadlines use the measured time, and when the next part could not take one step
        before its deadline, this part is the last."""
        if self.resumed or part + 1 >= cfg.time.evals:
            return cfg
        if seconds is not None:
            cfg = dataclasses.replace(cfg, time=dataclasses.replace(cfg.time,
                                                                    eval_seconds=seconds))
        if deadline(cfg, self.start, self.world, self.device).passes_in(cfg.time.step_seconds):
            cfg = self._cut(cfg, part)
        return cfg

    def _cut(self, cfg: TrainConfig, part: int) -> TrainConfig:
        self.changed = True
        return dataclasses.replace(cfg, time=budget.cut_short(
            cfg.time, self.opt.scheduler.last_epoch, part))
