"""Wall-clock budgets (``qdet train --time MINUTES``): how many steps fit, and the data they
read.

The budget counts from the start of ``qdet train`` (``fit``), data and model set-up included,
to its last line. A timed run trains ``TimeConfig.warmup`` steps (fewer when they take more
than ``warmup_share`` of the budget: slow steps must not spend it before the plan), times
them and one small evaluation, and then fixes its total number of steps so that the steps
left, the planned evaluations and the final report fill the rest of the budget; the
learning-rate schedule (cosine, or the step schedule's drops at the
same fractions of the run as in epochs) is laid over those steps, so it ends when the budget
does. The run is split into ``evals`` equal parts, each ending with an evaluation and a
checkpoint; the plan is stored in the checkpoint, so ``--resume`` keeps it. Steps that turn
out slower than the warm-up's (another program started, larger images later in the data)
are caught as they happen: once the last evaluation and the report would no longer fit, the
current part ends and becomes the last (``Deadline``; the plan records the cut). A resumed
run follows its plan exactly instead (after a crash the wall clock is broken anyway).

The parts need not line up with passes over the data: a timed run reads one stream of passes,
each in its own random order (``StreamSampler``), and any stretch of it can be rebuilt from
(seed, position) alone, which keeps resuming exact.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

# The clock every budget reads (a module attribute, so tests can replace it).
clock = time.perf_counter


@dataclass
class TimeConfig:
    """A run's wall-clock budget; ``minutes == 0``: no budget, the run trains ``epochs``."""
    minutes: float = 0.0
    warmup: int = 20        # steps timed before the run is planned
    warmup_share: float = 0.1   # ... or fewer, once they have used this share of the budget
    max_evals: int = 10     # evaluations at most (fewer if they would take over a tenth of it)
    # the plan, fixed after the warm-up (0: not planned yet)
    total_steps: int = 0
    evals: int = 0
    planned_steps: int = 0      # total_steps before a cut (``Deadline``)
    step_seconds: float = 0.0   # what the warm-up measured
    eval_seconds: float = 0.0


def report_seconds(eval_s: float) -> float:
    """Time kept for the final report (per-class table, confusion matrix, PR curves): half
    an evaluation's (on the built-in data it took 2.6 s after evaluations of 5.3 s)."""
    return 0.5 * eval_s


def plan(budget_s: float, elapsed_s: float, step_s: float, eval_s: float, steps_done: int,
         max_evals: int) -> tuple[int, int]:
    """``(total_steps, evals)`` for a run that has used ``elapsed_s`` of ``budget_s`` seconds
    and done ``steps_done`` steps, where a step takes ``step_s`` and an evaluation ``eval_s``.

    Evaluations are at most ``max_evals`` and together at most a tenth of the budget (at
    least one, at the end); the steps left fill what the evaluations and the final report
    (``report_seconds``) leave.
    """
    evals = max_evals
    if eval_s > 0:
        evals = max(1, min(max_evals, int(0.1 * budget_s / eval_s)))
    left = budget_s - elapsed_s - evals * eval_s - report_seconds(eval_s)
    total = steps_done + max(0, math.floor(left / max(step_s, 1e-9)))
    return total, max(1, min(evals, total - steps_done))


def cut_short(cfg: TimeConfig, steps_done: int, part: int) -> TimeConfig:
    """The plan of a run whose time ran out in part ``part`` (0-based) after ``steps_done``
    steps: that part is its last."""
    return dataclasses.replace(cfg, total_steps=steps_done, evals=part + 1)


def part_bounds(cfg: TimeConfig) -> list[int]:
    """Step boundaries ``[0, b1, ..., total]`` of a planned run's parts: the first part holds
    the warm-up and each part an equal share of the steps after it."""
    w, n = min(cfg.warmup, cfg.total_steps), cfg.total_steps
    return [0] + [w + round(k * (n - w) / cfg.evals) for k in range(1, cfg.evals + 1)]


class Deadline:
    """The ``on_step`` of a planned timed run's parts: ends the part (returns the steps
    done) once the clock reaches ``end``, where the last evaluation and the report must
    start to fit; ``cut`` says it did. Under DDP rank 0's clock decides for all ranks."""

    def __init__(self, end: float, world: int = 1, device=None):
        self.end, self.world, self.device = end, world, device
        self.cut = False

    def passes_in(self, seconds: float) -> bool:
        """Whether the deadline is less than ``seconds`` away (rank 0's answer)."""
        late = clock() + seconds >= self.end
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(late)], device=self.device)
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        return late

    def __call__(self, done: int) -> int | None:
        late = self.passes_in(0.0)
        self.cut = self.cut or late
        return done if late else None


class StepTimer:
    """Times the warm-up: ``tick()`` after each step (after its device sync)."""

    def __init__(self):
        self.ticks = [clock()]

    def tick(self) -> None:
        self.ticks.append(clock())

    def step_seconds(self) -> float:
        """Mean duration of the warm-up's steps, leaving out its first quarter (data-loader
        start, allocator and compile warm-up are one-time costs)."""
        d = [b - a for a, b in zip(self.ticks, self.ticks[1:])]
        steady = d[len(d) // 4:] or d
        return sum(steady) / max(len(steady), 1)


class StreamSampler(Sampler[int]):
    """Sample indices from positions ``[start, stop)`` (``stop=None``: no end) of an endless
    stream of passes over ``n`` samples, pass ``p`` in the order ``torch.randperm(n)`` gives
    with seed ``seed + p``. Rank ``rank`` of ``world`` takes every ``world``-th position.
    Yields ``p * n + i`` for sample ``i`` of pass ``p`` (``PassIndexed`` reads it)."""

    def __init__(self, n: int, seed: int, start: int, stop: int | None, rank: int = 0,
                 world: int = 1):
        self.n, self.seed, self.start, self.stop = n, seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an open-ended stream has no length")
        return max(0, -(-(self.stop - self.start - self.rank) // self.world))

    def __iter__(self):
        pos, order, order_pass = self.start + self.rank, [], -1
        while self.stop is None or pos < self.stop:
            p, j = divmod(pos, self.n)
            if p != order_pass:
                gen = torch.Generator().manual_seed(self.seed + p)
                order, order_pass = torch.randperm(self.n, generator=gen).tolist(), p
            yield p * self.n + order[j]
            pos += self.world


class PassIndexed(Dataset):
    """``dataset`` read by ``StreamSampler`` indices: item ``p * n + i`` is sample ``i``
    augmented with pass ``p``'s randomness, as epoch ``p`` of an epoch-based run would."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        p, i = divmod(index, len(self.dataset))
        self.dataset.set_epoch(p)  # this worker's copy; its items come one at a time
        return self.dataset[i]
