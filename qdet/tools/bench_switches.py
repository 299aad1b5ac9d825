"""What the training-only switches cost (``qdet bench switches``).

One training step of a method's built-in preset, as ``qdet train`` takes it
(``engine.step.train_step``: forward with the targets, loss, backward, clipping, AdamW, the
lr schedule, the moving average), on the same 16 built-in images of 128 px, with each switch
alone against all off, in one process, the switches timed in turn round by round. Inference is untouched by every switch (the tests
check it), so only training is timed.
"""
from __future__ import annotations

import functools
import statistics

import torch

from .bench import time_it

OFF = {"dn.groups": 0, "dn.queries": 0, "query_groups": 1, "loss.mal": False}

# row name -> (model overrides, train overrides), each on top of OFF
SWITCHES: dict[str, tuple[dict, dict]] = {
    "none": ({}, {}),
    "--dn 5": ({"dn.groups": 5}, {}),
    "--dn 5, contrastive": ({"dn.groups": 5, "dn.contrastive": True}, {}),
    "--query-groups 3": ({"query_groups": 3}, {}),
    "--ema": ({}, {"ema.enabled": True}),
    "--accumulate 2": ({}, {"accumulate": 2}),   # two micro-batches of 8: the same 16 images
    "loss.mal": ({"loss.mal": True}, {}),
}


def bench_switches(arch: str, device: str = "cpu", batch: int = 16, size: int = 128,
                   repeat: int = 3, switches: list[str] | None = None) -> list[dict]:
    """Rows ``{arch, switch, seconds, ratio}``: a training step with each switch (names of
    ``SWITCHES``; MAL on focal heads only) against ``none``, all on ``batch`` images of
    ``size`` px."""
    from ..common.config import apply_overrides
    from ..data.datasets import ShapesDataset, collate
    from ..data.shapes import ShapesConfig
    from ..engine.config import TrainConfig
    from ..engine.ema import ModelEMA
    from ..engine.optim import make_optimization
    from ..engine.presets import preset
    from ..engine.step import micro_batches, to_device, train_step
    from ..models.registry import build_model, method

    dev = torch.device(device)
    data = ShapesDataset("train", ShapesConfig(image_size=size))
    samples = [data[i] for i in range(batch)]
    names = switches or list(SWITCHES)
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown switch {unknown[0]!r}; choose from {', '.join(SWITCHES)}")
    if not method(arch).focal:    # MAL replaces the sigmoid focal loss
        names = [n for n in names if n != "loss.mal"]
    steps = {}
    for name in ["none"] + [n for n in names if n != "none"]:
        model_o, train_o = SWITCHES[name]
        torch.manual_seed(0)
        p = preset(arch, "shapes")
        model = build_model(arch, {**p.model, "num_classes": 5, **OFF, **model_o}).to(dev)
        model.train()
        cfg = apply_overrides(TrainConfig(), {**p.train, "warmup_steps": 0, **train_o})
        opt = make_optimization(model, cfg, 10**6, dev, None)
        ema = ModelEMA(model, cfg.ema) if cfg.ema.enabled else None
        per = batch // cfg.accumulate
        loader = [collate(samples[i:i + per]) for i in range(0, batch, per)]
        micro = [to_device(im, t, dev) for im, t in next(micro_batches(loader, cfg.accumulate))]
        steps[name] = functools.partial(train_step, model, model, opt, micro, cfg, False,
                                        "bench", ema)
    # interleaved: each round times every switch once, so a slow spell of the machine
    # falls on all of them rather than on one
    times = {name: [] for name in steps}
    for name, step in steps.items():
        step()                                           # warm-up
    for _ in range(repeat):
        for name, step in steps.items():
            times[name].append(time_it(step, dev, repeat=1, warmup=0))
    rows = [{"arch": arch, "switch": name, "seconds": statistics.median(t)}
            for name, t in times.items()]
    for row in rows:
        row["ratio"] = row["seconds"] / rows[0]["seconds"]
    return rows
