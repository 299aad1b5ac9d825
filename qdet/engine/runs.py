"""Setting up a training run, the Python twin of ``qdet train``: a new run of a method on the
built-in data or COCO-format files with a preset's recipe, a run that fine-tunes pretrained
weights to the data's classes (``qdet.weights.finetune``), or a run resumed exactly from its
``last.pt``; then the loop of ``qdet.engine.trainer``.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..blocks.base import Detector
from ..common.config import apply_overrides, config_from_dict
from ..common.terminal import console, rank_zero_only
from ..data.datasets import DetectionDataset
from ..data.transforms import AugmentConfig
from ..models.registry import build_config, build_model, method
from ..weights.checkpoint import read_checkpoint
from ..weights.finetune import transfer
from ..weights.loading import model_from_checkpoint, model_from_source
from . import budget, presets
from .config import TrainConfig
from .evaluation import match_classes
from .faults import stopping_clearly
from .run_folder import RUNS, RunFolder, claim_folder, latest_run
from .trainer import check_batches, init_distributed, train


def make_datasets(spec: dict, cfg: TrainConfig):
    """(train, val) datasets from a data spec (stored in checkpoints for --resume; any format
    ``qdet.data.formats`` reads)."""
    from ..data.datasets import ShapesDataset, open_spec

    if spec["kind"] == "shapes":
        return (ShapesDataset("train", cfg.shapes, cfg.augment, train=True, seed=cfg.seed),
                ShapesDataset("val", cfg.shapes, cfg.augment, train=False, seed=cfg.seed))
    return open_spec(spec, cfg.augment, cfg.seed)


@dataclass
class Run:
    """A training run, set up: what ``train`` needs, and where it came from."""
    model: Detector
    cfg: TrainConfig
    data_spec: dict
    out: Path
    train_set: DetectionDataset
    val_set: DetectionDataset | None
    resume: dict | None = None       # the checkpoint continued from
    weights: dict | None = None      # fine-tuning: the source and what was transferred
    notes: list[str] = field(default_factory=list)   # said first: choices made for the data


def resume_run(out: str | None, train_overrides: dict) -> Run:
    """The run in ``out`` (else the most recent under ./runs), rebuilt from its last.pt;
    only training options (e.g. a larger ``epochs``) may change."""
    run = Path(out) if out else latest_run(files=("last.pt",))
    if run is None or not RunFolder(run).last.is_file():
        raise FileNotFoundError(f"nothing to resume: no last.pt in {run or 'runs/*'}; "
                                "start a run without --resume")
    last = RunFolder(run).last
    ckpt = read_checkpoint(last)
    model = model_from_checkpoint(ckpt, str(last))
    cfg = config_from_dict(TrainConfig, ckpt["train"])
    timed = cfg.time.minutes > 0
    fixed = [k for k in train_overrides if k == "epochs" or k.startswith("time")]
    if fixed and (timed or any(k.startswith("time") for k in fixed)):
        raise ValueError(f"{last}: --resume keeps a run's length (" + (
            f"a timed run's plan of {cfg.time.total_steps} steps" if timed else
            f"{cfg.epochs} epochs") + "), so --epochs / --time cannot change it here; "
            + ("start a new run for another budget" if timed else "pass --epochs alone to "
               "extend it"))
    cfg = apply_overrides(cfg, train_overrides)
    if timed and ckpt["epoch"] >= cfg.time.evals:
        raise ValueError(f"{last} already finished its {cfg.time.minutes:g}-minute "
                         f"budget ({cfg.time.total_steps} steps); start a new run to train "
                         "more")
    if not timed and ckpt["epoch"] >= cfg.epochs:
        raise ValueError(f"{last} already finished {ckpt['epoch']} of "
                         f"{cfg.epochs} epochs; pass a larger --epochs to continue")
    train_set, val_set = make_datasets(ckpt["data"], cfg)
    return Run(model, cfg, ckpt["data"], run, train_set, val_set, resume=ckpt)


def data_spec(data: str | None, images: str | None, val_data: str | None,
              val_images: str | None, split: str | None = None,
              val_split: str | None = None) -> dict:
    """Where a run's data comes from: the built-in shapes data, or files in any format
    ``qdet.data.formats`` reads (its ``data_spec``)."""
    from ..data.formats import data_spec as spec_of

    return spec_of(data, images, val_data, val_images, split, val_split)


def train_config(arch: str, kind: str, spec: dict, train_overrides: dict) -> TrainConfig:
    """The preset's training config plus overrides; on the built-in data, images keep their
    size unless augmentation options are given."""
    cfg = apply_overrides(TrainConfig(), {**presets.preset(arch, kind).train, **train_overrides})
    if cfg.time.minutes < 0:
        raise ValueError(f"--time must be a positive number of minutes, got {cfg.time.minutes:g}")
    if cfg.time.minutes and "epochs" in train_overrides:
        raise ValueError("--time sets the run's length from a wall-clock budget, so it "
                         "replaces --epochs: pass one of them")
    if cfg.time.total_steps:
        raise ValueError("time.total_steps is planned by a timed run itself; set --time "
                         "(and time.warmup, time.max_evals) instead")
    if cfg.tensorboard:  # before any folder is made
        from .run_log import check_tensorboard

        check_tensorboard()
    if spec["kind"] == "shapes" and not any(k.startswith("augment") for k in train_overrides):
        s = cfg.shapes.image_size
        cfg = dataclasses.replace(cfg, augment=AugmentConfig(
            train_scales=(s,), max_size=None, crop=False, eval_size=s))
    return cfg


def fit_sizes(cfg: TrainConfig, kind: str, spec: dict, train_overrides: dict,
              datasets) -> tuple[TrainConfig, str | None]:
    """A user's data gets the image sizes of its recipe: the shapes preset's own size, or
    the paper's fitted to the data (``presets.sized_for_data``); sizes given with ``--set
    augment.*`` and the built-in data's are kept. The datasets are switched to them;
    returns the config and the line that says what was chosen and why."""
    if spec["kind"] == "shapes":
        return cfg, None
    if any(k.startswith("augment") for k in train_overrides):
        note = (f"image sizes: as --set augment.* says (training at "
                f"{min(cfg.augment.train_scales)}-{max(cfg.augment.train_scales)}, "
                f"evaluating at {cfg.augment.eval_size})")
    elif kind == "shapes":
        cfg = dataclasses.replace(cfg, augment=presets.shapes_augment())
        note = (f"image sizes: the shapes preset's, {presets.SHAPES_SIZE} px in training and "
                "evaluation (the size its recipe is tuned for)")
    else:
        aug, note = presets.sized_for_data(cfg.augment, presets.data_sides(datasets[0]))
        cfg = dataclasses.replace(cfg, augment=aug)
    for d in datasets:
        if d is not None:
            d.augment_cfg = cfg.augment
    return cfg, note


def run_folder(arch: str, out: str | None, world: int) -> Path:
    """``out``, or a new ``runs/ARCH-TIME`` that rank 0 claims by creating it (``-2``,
    ``-3``, ... for runs started in the same second) and tells the other ranks; never a
    folder that holds a run already."""
    if out:
        folder = Path(out)
        if RunFolder(folder).last.exists():
            raise FileExistsError(f"{folder} already holds a run; pass --resume to continue "
                                  "it or another --out")
        return folder
    rank = dist.get_rank() if world > 1 else 0
    box = [str(claim_folder(RUNS, f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"))
           if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def new_run(arch: str, spec: dict, out: str | None, preset: str | None,
            model_overrides: dict, train_overrides: dict, backbone_weights: str | None,
            world: int) -> Run:
    """A fresh model of ``arch`` on the data of ``spec`` with a preset's recipe."""
    method(arch)  # an unknown architecture is the first thing to say
    kind = preset or ("shapes" if spec["kind"] == "shapes" else "paper")
    cfg = train_config(arch, kind, spec, train_overrides)
    train_set, val_set = make_datasets(spec, cfg)
    cfg, sizes = fit_sizes(cfg, kind, spec, train_overrides, (train_set, val_set))
    overrides = {**presets.preset(arch, kind).model, **model_overrides,
                 "num_classes": len(train_set.category_ids)}
    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
    model = build_model(arch, overrides)
    model.category_ids, model.class_names = train_set.category_ids, train_set.class_names
    if val_set is not None:  # by id, else by name (and say so), else refused
        note = match_classes(model, val_set).note
        if note:
            warnings.warn(note, stacklevel=2)
    if backbone_weights:
        model.backbone.load_weights(backbone_weights)
    return Run(model, cfg, spec, run_folder(arch, out, world), train_set, val_set,
               notes=[sizes] if sizes else [])


def finetune_run(weights: str, arch: str | None, spec: dict, out: str | None,
                 preset: str | None, model_overrides: dict, train_overrides: dict,
                 freeze_backbone: bool, world: int) -> Run:
    """Pretrained ``weights`` (any source ``qdet.load`` takes) rebuilt for the data's classes:
    architecture and sizes from the weights (``arch``, if given, must agree), the preset's
    training recipe (the paper's with COCO-format data: its lower backbone lr applies)."""
    source = model_from_source(weights)
    if arch is not None and arch != source.arch:
        raise ValueError(f"--arch {arch}: the weights {weights} are a {source.arch} model; drop "
                         f"--arch or pass {arch} weights")
    kind = preset or ("shapes" if spec["kind"] == "shapes" else "paper")
    cfg = train_config(source.arch, kind, spec, train_overrides)
    train_set, val_set = make_datasets(spec, cfg)
    cfg, sizes = fit_sizes(cfg, kind, spec, train_overrides, (train_set, val_set))
    overrides = {**model_overrides, "num_classes": len(train_set.category_ids)}
    if freeze_backbone:  # no gradients and fixed BatchNorm statistics
        overrides.update(backbone_trainable=0, frozen_bn=True)
    build_config(source.arch, overrides)  # refuses a change of head kind
    torch.manual_seed(cfg.seed)  # the same new class rows for the same seed
    model = method(source.arch).model(apply_overrides(source.config, overrides))
    model.category_ids, model.class_names = train_set.category_ids, train_set.class_names
    report = transfer(source, model, str(weights))
    return Run(model, cfg, spec, run_folder(source.arch, out, world), train_set, val_set,
               weights=report.to_json(), notes=[sizes] if sizes else [])


@stopping_clearly()  # under torchrun: a peer lost while setting up, said in one line
def fit(arch: str | None = None, *, data: str | None = None, images: str | None = None,
        val_data: str | None = None, val_images: str | None = None, out: str | None = None,
        resume: bool = False, device: str | None = None, preset: str | None = None,
        model_overrides: dict | None = None, train_overrides: dict | None = None,
        backbone_weights: str | None = None, weights: str | None = None,
        freeze_backbone: bool = False, split: str | None = None,
        val_split: str | None = None, started: float | None = None) -> dict:
    """Set up and run training; the Python twin of ``qdet train``. Returns the last epoch's
    metrics and the run folder (and, fine-tuning, what was transferred).

    Without ``data`` the model trains on the built-in shapes data with the method's
    ``shapes`` preset; with ``data`` (a COCO file with ``images``, a YOLO set or a VOC
    folder: ``qdet.data.formats``; ``split``/``val_split`` pick a set's splits, default
    ``train``/``val``) it uses the paper's recipe (``paper``; ``qdet.engine.presets``).
    ``arch`` defaults to ``detr``. Overrides are dotted config keys (``{'d_model': 128}``, ``{'augment.crop': False}``); unset options never
    override a preset. ``resume`` continues the run in ``out`` (else the most recent)
    from its own architecture, model and data: only training overrides may be given.
    ``weights`` (a file, HF folder, zoo name or ``hf:owner/name``) fine-tunes those weights
    to the data's classes: architecture and sizes come from them, class rows are copied by
    class name (``qdet.weights.finetune``); ``freeze_backbone`` keeps the backbone fixed.
    ``started``: when a timed run's budget began (``budget.clock()``; default: now).
    """
    started = budget.clock() if started is None else started
    rank, world, device_ = init_distributed(device)
    if world > 1:
        rank_zero_only(rank)
    if resume:
        given = [name for name, value in (
            ("--preset", preset), ("--set (model options)", model_overrides),
            ("--backbone-weights", backbone_weights), ("--weights", weights),
            ("--freeze-backbone", freeze_backbone), ("--data", data), ("--images", images),
            ("--val-data", val_data), ("--val-images", val_images), ("--split", split),
            ("--val-split", val_split)) if value]
        if given:
            raise ValueError(f"--resume continues a run with its own model and data, so "
                             f"{', '.join(given)} cannot apply; drop them, or start a new run")
        run = resume_run(out, train_overrides or {})
        if arch is not None and arch != run.model.arch:
            raise ValueError(f"--resume: the run in {run.out} trains {run.model.arch}, not "
                             f"{arch}; drop --arch or start a new run")
    elif weights is not None:
        if backbone_weights:
            raise ValueError("--backbone-weights cannot apply with --weights (which holds the "
                             "backbone too); drop one")
        spec = data_spec(data, images, val_data, val_images, split, val_split)
        run = finetune_run(weights, arch, spec, out,
                           preset, model_overrides or {}, train_overrides or {},
                           freeze_backbone, world)
    else:
        if freeze_backbone:
            raise ValueError("--freeze-backbone needs --weights (a backbone trained from "
                             "scratch cannot stay fixed)")
        run = new_run(arch or "detr", data_spec(data, images, val_data, val_images, split,
                                                val_split), out,
                      preset, model_overrides or {}, train_overrides or {}, backbone_weights,
                      world)
    check_batches(run.train_set, run.cfg, world)
    if run.resume is not None and run.cfg.tensorboard:
        from .run_log import check_tensorboard

        check_tensorboard()
    if rank == 0:
        announce(run, world, device_)
    with stopping_clearly(rank, world, run.out):
        metrics = train(run.model, run.train_set, run.val_set, run.cfg, run.out, device_,
                        run.data_spec, run.resume, started)
    return {"metrics": metrics, "out": str(run.out), "weights": run.weights}


def announce(run: Run, world: int, device: torch.device) -> None:
    """Rank 0: create the run folder, write ``config.json`` and say what will happen."""
    from rich.markup import escape

    model, cfg = run.model, run.cfg
    for note in run.notes:
        console.print(note, highlight=False)
    folder = RunFolder(run.out)
    if run.resume is not None:  # a resumed fine-tuning run still says where its weights came from
        run.weights = folder.read_config().get("weights")
    folder.write_config({"arch": model.arch, "model": dataclasses.asdict(model.config),
                         "train": dataclasses.asdict(cfg), "data": run.data_spec,
                         **({"weights": run.weights} if run.weights else {})})
    if run.weights and run.resume is None:
        console.print(f"[bold]fine-tuning[/] {run.weights['source']}: {run.weights['summary']}",
                      highlight=False)
    n_params = sum(p.numel() for p in model.parameters())
    length = (f"{cfg.time.minutes:g} min budget" if cfg.time.minutes else f"{cfg.epochs} epochs")
    console.print(f"[bold]qdet train[/] {model.arch}: {n_params / 1e6:.1f}M parameters, "
                  f"{len(run.train_set)} training images, {length}, "
                  f"batch {cfg.batch_size}x{world} on {device} -> {escape(str(run.out))}"
                  + (f" (resuming after epoch {run.resume['epoch']})" if run.resume else ""))
