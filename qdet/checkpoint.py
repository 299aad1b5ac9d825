"""Reading and writing checkpoints, safely.

Every file is read with ``torch.load(weights_only=True)``: no code from a checkpoint is ever
run. Official release checkpoints pickle an ``argparse.Namespace`` (their training
arguments), which is the one extra type allowed; any other type is refused with the name of
the type. qdet checkpoints hold only tensors and plain Python values: ``arch``, ``config``,
``model``, ``class_names``, ``category_ids`` (label i <-> dataset category id), ``epoch``,
and for resuming ``optimizer``, ``scheduler``, ``train``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .base import Detector
from .registry import config_from_dict, config_to_dict, method

FORMAT = "qdet-1"
SAFE_TYPES = [argparse.Namespace]


class CheckpointError(ValueError):
    pass


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True`` and the allow-list above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = ""
        try:
            bad = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - older formats cannot be inspected; keep the message
            pass
        raise CheckpointError(
            f"{path}: refused to unpickle {bad or 'a type that is not allowed'}. qdet loads "
            "checkpoints with weights_only=True and allows only tensors, plain Python values "
            "and argparse.Namespace; re-save the file with only its state dict "
            "(torch.save({'model': model.state_dict()}, ...)) if you trust it") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_checkpoint(model: Detector, **extra) -> dict:
    """The part of a qdet checkpoint that describes and holds the model."""
    state = {k: v for k, v in model.state_dict().items()}
    return {"format": FORMAT, "arch": model.arch, "config": config_to_dict(model.config),
            "model": state, "class_names": list(model.class_names),
            "category_ids": [int(c) for c in model.category_ids],
            "preprocess": dict(model.preprocess), **extra}


def _upgrade_config(arch: str, config: dict, source: str) -> dict:
    """A stored config from before fields were removed: ``loss.focal`` (the head kind is now
    the architecture's, so it must agree) and Conditional DETR's unused ``pre_norm``."""
    config = {**config, "loss": dict(config.get("loss", {}))}
    focal = config["loss"].pop("focal", None)
    if focal is not None and bool(focal) != method(arch).focal:
        raise CheckpointError(
            f"{source}: trained with loss.focal={focal}, which gives {arch} a class head it "
            "does not have (the head kind is fixed by the architecture); retrain without "
            "--set loss.focal")
    if arch == "conditional":
        config.pop("pre_norm", None)
    return config


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> Detector:
    """Build the model a checkpoint dict describes (qdet or official layout)."""
    if ckpt.get("format") == FORMAT:
        m = method(ckpt["arch"])
        model = m.model(config_from_dict(
            m.config, _upgrade_config(ckpt["arch"], ckpt["config"], source)))
        _load_state(model, ckpt["model"], source)
        model.class_names = list(ckpt["class_names"])
        model.category_ids = list(ckpt["category_ids"])
        model.preprocess = dict(ckpt.get("preprocess", model.preprocess))
        return model
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: no state dict found (expected a qdet checkpoint or an "
                              "official release checkpoint {'model': state_dict, ...})")
    from .official import coco_labels, official_arch, read_official

    if official_arch(state) is None:
        raise CheckpointError(f"{source}: the state dict's keys match no architecture's official "
                              f"layout (first keys: {list(state)[:4]})")
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    args.setdefault("_filename", os.path.basename(source))  # e.g. "dc5" in a release's name
    arch, cfg, state = read_official(state, args)
    model = method(arch).model(cfg)
    _load_state(model, state, source)
    model.category_ids, model.class_names = coco_labels(cfg.num_classes)  # COCO releases
    return model


def _load_state(model: Detector, state: dict, source: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the {model.arch} model they describe: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
         compile: bool = False) -> Detector:
    """Load a qdet or official release checkpoint as an eval-mode model on ``device``.

    Architecture and sizes come from the file: the stored config of a qdet checkpoint, or
    the key names and tensor shapes of an official one (plus its ``args`` when present).
    ``fast=True`` returns the inference fast path (``qdet.fast``): same outputs, faster;
    with ``compile=True`` its transformer is also compiled (torch.compile), which pays only
    when input sizes repeat: every new size compiles again.

    A ``.onnx`` file written by ``qdet export`` loads as a ``qdet.export.OnnxDetector``
    (onnxruntime; ``fast`` and ``compile`` do not apply).
    """
    if Path(path).suffix.lower() == ".onnx":
        from .export import OnnxDetector

        return OnnxDetector(path, device)
    model = model_from_checkpoint(read_checkpoint(path), str(path)).to(device).eval()
    if fast:
        from .fast import optimize_for_inference

        model = optimize_for_inference(model, compile=compile)
    elif compile:
        model.compile_transformer()
    return model
