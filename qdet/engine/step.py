"""One optimizer step, and the steps of one epoch (or one part of a timed run).

A step takes ``TrainConfig.accumulate`` micro-batches: each is run forward and backward in
turn (under DDP without the gradient all-reduce until the last), so a step of N
micro-batches of B images needs the memory of B and gives the gradients of one batch of N*B.
That holds exactly because every loss is normalized by the whole step's number of boxes
(and a softmax head's class weight, ``criterion.softmax_class_weight``) counted before the
first forward, not by each micro-batch's own. Then the gradients are clipped, the optimizer
and the lr schedule step, and the moving average of the weights follows (``--ema``).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ..blocks.base import Detector
from ..common.terminal import progress_bar
from .config import TrainConfig
from .criterion import num_boxes_across_workers, softmax_class_weight
from .ema import ModelEMA
from .optim import Optimization
from .run_log import RunLog


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def micro_batches(loader: Iterable, n: int) -> Iterator[list]:
    """The loader's batches in lists of ``n`` (one optimizer step each); a last incomplete
    list is dropped, as DataLoader's drop_last drops a partial batch."""
    chunk = []
    for batch in loader:
        chunk.append(batch)
        if len(chunk) == n:
            yield chunk
            chunk = []


def _stop(where: str, lr: float, e: Exception) -> FloatingPointError:
    return FloatingPointError(f"training stopped at {where}: {e}; lower --lr (this step's: "
                              f"{lr:.3g}) or check the data")


def _check_finite(loss: Tensor, losses: dict, where: str, lr: float) -> None:
    if torch.isfinite(loss):
        return
    values = {k: v.item() for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    raise FloatingPointError(
        f"training stopped at {where}: loss is {loss.item()} (not finite: "
        f"{', '.join(bad) or 'the weighted sum'}; terms: "
        f"{ {k: round(v, 4) for k, v in values.items()} }); lower --lr (this step's: "
        f"{lr:.3g}) or check the data")


def train_step(net, model: Detector, opt: Optimization, micro: list, cfg: TrainConfig,
               bf16: bool, where: str, ema: ModelEMA | None = None) -> dict[str, Tensor]:
    """One optimization step over ``micro``: a list of ``(images, targets)`` micro-batches
    already on the device. Returns the logged losses of the step: the weighted total, every
    term of every layer (``loss_ce``, ``loss_ce_0``, ..., ``loss_ce_enc``, ``loss_ce_dn``)
    and the encoder's and the denoising queries' weighted totals (``loss_enc``,
    ``loss_dn``) where there are some."""
    device = micro[0][0][0].device
    everything = [t for _, targets in micro for t in targets]
    num_boxes = num_boxes_across_workers(everything, device)
    class_weight = None
    if not model.focal:   # a softmax head averages its cross-entropy by class weight
        cfg_m = model.config
        class_weight = softmax_class_weight(everything, cfg_m.num_queries,
                                            cfg_m.query_groups, cfg_m.loss.eos_coef)
    lr = opt.optimizer.param_groups[0]["lr"]
    opt.optimizer.zero_grad(set_to_none=True)
    logged: dict[str, Tensor] = {}
    for k, (images, targets) in enumerate(micro):
        last = k == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else \
            net.no_sync()    # DDP: all-reduce the gradients once, after the last
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outputs = net(images, targets)
            try:
                losses = opt.criterion(outputs, targets, num_boxes, class_weight)  # float32
            except FloatingPointError as e:  # the matcher's costs are not finite
                raise _stop(where, lr, e) from None
            loss = opt.criterion.weighted(losses)
            _check_finite(loss, losses, where, lr)
            loss.backward()
        for name, value in {"loss": loss, **losses}.items():
            logged[name] = logged.get(name, 0) + value.detach()
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
    opt.optimizer.step()
    opt.scheduler.step()
    if ema is not None:
        ema.update(model)
    for part in ("enc", "dn"):   # the encoder's and the denoising queries' own totals
        terms = {k: v for k, v in logged.items() if k.endswith(f"_{part}")
                 or f"_{part}_" in k}
        if terms:
            logged[f"loss_{part}"] = opt.criterion.weighted(terms)
    return logged


def train_one_epoch(net, model: Detector, opt: Optimization, loader, steps: int,
                    cfg: TrainConfig, device: torch.device, bf16: bool, epoch: int,
                    title: str, show: bool, log: RunLog | None = None,
                    on_step: Callable[[int], int | None] | None = None,
                    ema: ModelEMA | None = None) -> dict:
    """``steps`` optimizer steps over ``loader`` with a progress bar; returns their mean
    losses, lr, steps and seconds. ``on_step(done)`` may return a new number of steps (a
    timed run's plan)."""
    t0 = time.time()
    sums: dict[str, float] = {}
    n = 0
    net.train()
    with progress_bar(disable=not show) as bar:
        task = bar.add_task(title, total=steps, info="")
        for micro in micro_batches(loader, cfg.accumulate):
            micro = [to_device(images, targets, device) for images, targets in micro]
            lr = opt.optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves on)
            logged = train_step(net, model, opt, micro, cfg, bf16,
                                f"epoch {epoch + 1}, step {n}", ema)
            values = torch.stack([torch.as_tensor(v, device=device).float()
                                  for v in logged.values()]).tolist()    # one sync
            for k, v in zip(logged, values):
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if log is not None:
                log.add_step(opt.scheduler.last_epoch, values[0], lr)
            if on_step is not None:
                steps = on_step(n) or steps
            bar.update(task, advance=1, total=steps, info=f"loss {sums['loss'] / n:.3f} "
                       f"lr {lr:.3g} {n / max(time.time() - t0, 1e-9):.2f} it/s")
            if n >= steps:
                break
    return {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()},
            "lr": opt.optimizer.param_groups[0]["lr"], "steps": n,
            "train_seconds": time.time() - t0}
