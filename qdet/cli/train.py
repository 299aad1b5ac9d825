"""``qdet train``: training, fine-tuning and resuming, over :func:`qdet.fit`."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..common.terminal import console
from ..models.registry import ARCHS
from . import clock
from .common import WEIGHTS_HELP, Device, fail, pick_device


def parse_sets(items: list[str] | None) -> tuple[dict, dict]:
    """``--set key=value``: keys of the training config (``lr``, ``augment.crop``) go to
    training, every other key to the model config (``d_model``, ``loss.giou_weight``)."""
    from dataclasses import fields

    from ..engine.config import TrainConfig

    train_keys = {f.name for f in fields(TrainConfig)}
    model, train = {}, {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set expects KEY=VALUE, got {item!r}")
        (train if key.split(".")[0] in train_keys else model)[key.strip()] = value.strip()
    return model, train


@contextlib.contextmanager
def say_why_on_sigterm():
    """Under torchrun, which SIGTERMs every process once one has failed: say so instead of
    vanishing, while this one is still starting (importing torch, checking data; the
    training loop then names the checkpoint to resume from: ``faults.stopping_clearly``),
    and once this one has said why it stops, let it exit with its own code."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if int(world) <= 1:
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fail(f"rank {rank} of {world}: stopped by SIGTERM, which torchrun sends to every "
             "process once one has failed; nothing was trained yet", every_rank=True)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


Arch = Annotated[Optional[str], typer.Option(
    "--arch", "-a", help=f"Architecture: {', '.join(ARCHS)} (default: detr).")]


@say_why_on_sigterm()
def train(
    arch: Arch = None,
    data: Annotated[Optional[Path], typer.Option(help="Training data: a COCO JSON file "
                                                 "(with --images), a YOLO dataset YAML or "
                                                 "its folder, or a Pascal VOC folder. "
                                                 "Default: the built-in shapes data.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the training images "
                                                   "(COCO).")] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="Validation data, as --data; "
                                                     "default: the 'val' split of a YOLO or "
                                                     "VOC --data.")] = None,
    val_images: Annotated[Optional[Path], typer.Option(help="Folder of the validation "
                                                       "images (COCO).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a YOLO or VOC --data to train "
                                                 "on (default train).")] = None,
    val_split: Annotated[Optional[str], typer.Option(help="Split to validate on (default "
                                                     "val).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Number of epochs (preset default "
                                                  "if unset).")] = None,
    time_budget: Annotated[Optional[float], typer.Option(
        "--time", metavar="MINUTES", help="Wall-clock budget instead of --epochs: after a "
        "timed warm-up the run fixes its steps so the lr schedule ends when the budget does, "
        "and evaluates at up to 10 points along the way.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step and process.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the transformer.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/ARCH-TIME); "
                                                "with --resume, the run to continue.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a run (--out, else the most recent) "
                                         "exactly where its last.pt left off.")] = False,
    device: Device = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-loading worker processes.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="'shapes' (small, from scratch) or "
                                                  "'paper' (the paper's recipe); default: "
                                                  "shapes without --data, paper with.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the "
                                          "transformer.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to "
                                              "RUN/tensorboard (needs the tensorboard "
                                              "package).")] = False,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bfloat16 autocast "
                                                 "(default: the preset's; built-in presets use "
                                                 "it where the hardware supports it).")] = None,
    dn: Annotated[Optional[int], typer.Option(
        "--dn", metavar="N", help="Denoising training: N groups of every target box noised, "
        "reconstructed by extra queries (DN-DETR; 0: off). Details: --set dn.label_noise=P, "
        "dn.box_noise=L, dn.contrastive=true (DINO's negatives).")] = None,
    query_groups: Annotated[Optional[int], typer.Option(
        "--query-groups", metavar="K", help="Group DETR: K groups of queries, each matched "
        "one to one on its own (1: off); inference runs group 0 alone.")] = None,
    ema: Annotated[Optional[bool], typer.Option(
        "--ema/--no-ema", help="Keep a moving average of the weights (decay with a warm-up, "
        "as RT-DETR: --set ema.decay=D, ema.warmup=N); evaluation, best.pt and export use "
        "it. Default: the preset's.")] = None,
    accumulate: Annotated[Optional[int], typer.Option(
        "--accumulate", metavar="N", help="Gradients of N micro-batches of --batch-size per "
        "optimizer step: the step of one batch of N times the images, in the memory of "
        "one.")] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option(
        help="Local torchvision ResNet state dict to start the backbone from.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="Fine-tune these pretrained weights to the data's classes: " + WEIGHTS_HELP
             + ". Architecture and sizes come from them; class rows are copied by class "
               "name.")] = None,
    freeze_backbone: Annotated[bool, typer.Option(
        "--freeze-backbone", help="With --weights: keep the backbone fixed (no gradients, "
                                  "frozen BatchNorm).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override any model or training option, KEY=VALUE (repeatable), e.g. "
                      "--set d_model=128 --set loss.giou_weight=3 --set augment.crop=false.")
    ] = None,
):
    """Train a detector. With no data options: the built-in shapes data, small preset
    (about 10 minutes on a 2-core CPU). With --weights: fine-tune a pretrained detector to
    the data's classes. Multi-process: torchrun --nproc_per_node N -m qdet train ..."""
    from ..data.errors import DataError
    from ..engine.faults import TrainingStopped
    from ..engine.runs import fit

    model_o, train_o = parse_sets(set_)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                       ("num_workers", workers), ("seed", seed),
                       ("time.minutes", time_budget)):
        if value is not None:
            train_o[key] = value
    if time_budget is not None and time_budget <= 0:
        fail(f"--time must be a positive number of minutes, got {time_budget:g}")
    if compile:
        train_o["compile"] = True
    if tensorboard:
        train_o["tensorboard"] = True
    if bf16 is not None:
        train_o["precision"] = "bf16" if bf16 else "fp32"
    if dn is not None:
        if dn < 0:
            fail(f"--dn must be a number of groups >= 0, got {dn}")
        model_o.update({"dn.groups": dn, "dn.queries": 0})
    if query_groups is not None:
        if query_groups < 1:
            fail(f"--query-groups must be at least 1 (1: off), got {query_groups}")
        model_o["query_groups"] = query_groups
    if ema is not None:
        train_o["ema.enabled"] = ema
    if accumulate is not None:
        if accumulate < 1:
            fail(f"--accumulate must be at least 1, got {accumulate}")
        train_o["accumulate"] = accumulate
    if preset not in (None, "shapes", "paper"):
        fail(f"--preset must be 'shapes' or 'paper', got {preset!r}")
    try:
        result = fit(arch, data=data and str(data), images=images and str(images),
                     val_data=val_data and str(val_data),
                     val_images=val_images and str(val_images), out=out and str(out),
                     resume=resume, device=pick_device(device), preset=preset,
                     model_overrides=model_o, train_overrides=train_o,
                     backbone_weights=backbone_weights and str(backbone_weights),
                     weights=weights, freeze_backbone=freeze_backbone, split=split,
                     val_split=val_split, started=clock.STARTED)
    except TrainingStopped as e:  # part-way: under torchrun perhaps on this rank alone
        fail(str(e), every_rank=True)
    except (DataError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f"the disk is full: {e.strerror} writing {e.filename or 'the run'}; free some "
             "space and continue with --resume")
    console.print(f"run saved in {escape(result['out'])} (best.pt, last.pt, metrics.jsonl, "
                  "results.csv, curves.png)")
