"""``qdet.load``: any weights source to a model, through one dispatch.

1. The source is resolved once to a local file or folder (:func:`qdet.weights.zoo.resolve`:
   a path as it is, a zoo name or an ``hf:owner/name`` Hub id downloaded once).
2. One reader per format turns it into :class:`Weights` (architecture, config, state dict,
   labels): a qdet checkpoint, an official release checkpoint (``qdet.weights.official``),
   or a Hugging Face model folder (``qdet.weights.hf_format``). A ``.onnx`` file from
   ``qdet export`` is run by onnxruntime instead (``qdet.weights.onnx_runtime``).
3. One builder makes the model: the method's class from the config, the state dict loaded
   strictly, the labels and preprocessing attached.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..blocks.base import Detector
from ..common.config import config_from_dict
from ..models.registry import method
from .checkpoint import FORMAT, CheckpointError, read_checkpoint

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# what a qdet checkpoint says about the data it trained on (``qdet eval`` reads it)
DATA_INFO = ("data", "train")


@dataclass
class Weights:
    """What a reader found: everything the builder needs, nothing built yet."""
    arch: str
    config: Any                       # the method's Config dataclass
    state: dict[str, torch.Tensor]
    source: str                       # for messages: the file or folder
    class_names: list[str] | None = None
    category_ids: list[int] | None = None
    preprocess: dict | None = None
    # a qdet checkpoint's description of its data: {"data": spec, "train": {"shapes": ...}}
    data_info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- the readers


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


def qdet_weights(ckpt: dict, source: str) -> Weights:
    """A qdet checkpoint dict (``format`` = ``qdet-1``)."""
    missing = [k for k in ("arch", "config", "model", "class_names", "category_ids")
               if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source}: a {FORMAT} checkpoint without {missing}; it "
                              "was not written by qdet train, or was edited")
    m = method(ckpt["arch"])
    config = config_from_dict(m.config, _upgrade_config(ckpt["arch"], ckpt["config"], source))
    train = ckpt.get("train") or {}
    info = {"data": ckpt.get("data") or {}, "train": {"shapes": train.get("shapes")}
            if train.get("shapes") else {}}
    return Weights(ckpt["arch"], config, ckpt["model"], source, list(ckpt["class_names"]),
                   list(ckpt["category_ids"]), ckpt.get("preprocess"), info)


def official_weights(ckpt: dict, source: str) -> Weights:
    """An official release checkpoint (``{'model': state_dict, 'args': ...}`` or a bare state
    dict): the layout found from its keys (``qdet.weights.official``)."""
    from .layouts import coco_labels
    from .official import official_arch, read_official

    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: no state dict found (expected a qdet checkpoint or an "
                              "official release checkpoint {'model': state_dict, ...})")
    if official_arch(state) is None:
        raise CheckpointError(f"{source}: the state dict's keys match no architecture's official "
                              f"layout (first keys: {list(state)[:4]})")
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    args.setdefault("_filename", os.path.basename(source))  # e.g. "dc5" in a release's name
    arch, cfg, state = read_official(state, args)
    ids, names = coco_labels(cfg.num_classes)  # official releases are COCO models
    return Weights(arch, cfg, state, source, names, ids)


def checkpoint_weights(ckpt: dict, source: str = "checkpoint") -> Weights:
    """A checkpoint dict of either kind: qdet's (by its ``format``) or an official one."""
    fmt = ckpt.get("format")
    if fmt is not None and fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("qdet-")
        raise CheckpointError(
            f"{source}: checkpoint format {fmt!r}, which this qdet does not read (it reads "
            f"{FORMAT!r} and official releases)"
            + ("; it was written by a newer qdet: upgrade qdet to load it" if newer else ""))
    if fmt == FORMAT:
        return qdet_weights(ckpt, source)
    return official_weights(ckpt, source)


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict, dict]:
    """``(config.json dict, state dict)`` of a Hugging Face model folder; safetensors when
    the folder has them (also sharded), else ``pytorch_model.bin`` (weights_only)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} is a folder but not a Hugging Face model folder (no "
                              "config.json); pass a checkpoint file or a folder with "
                              "config.json and model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    found = next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder} has config.json but no weights: put its "
                              "model.safetensors (or pytorch_model.bin) beside it")
    if found.name == "pytorch_model.bin":
        return config, read_checkpoint(found)
    from safetensors.torch import load_file

    files = [found]
    if found.name.endswith(".index.json"):
        shards = json.loads(found.read_text())["weight_map"].values()
        files = [folder / n for n in sorted(set(shards))]
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return config, state


def hf_weights(folder: str | os.PathLike) -> Weights:
    """An HF transformers DETR-family model folder (``qdet.weights.hf_format``)."""
    from .hf_format import read_hf

    config, state = read_hf_folder(folder)
    arch, cfg, state, ids, names = read_hf(config, state, str(folder))
    return Weights(arch, cfg, state, str(folder), names, ids)


def read_weights(path: str | os.PathLike) -> Weights:
    """The reader for a local file or folder: an HF folder, else a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return hf_weights(path)
    return checkpoint_weights(read_checkpoint(path), str(path))


# ----------------------------------------------------------------------- the builder


def build(weights: Weights) -> Detector:
    """The model ``weights`` describe, in train mode on the CPU, its state loaded strictly
    and its labels, preprocessing and data description attached."""
    model = method(weights.arch).model(weights.config)
    missing, unexpected = model.load_state_dict(weights.state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights.source}: weights do not fit the {model.arch} model they describe: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if weights.class_names is not None:
        model.class_names = list(weights.class_names)
    if weights.category_ids is not None:
        model.category_ids = list(weights.category_ids)
    if weights.preprocess:
        model.preprocess = dict(weights.preprocess)
    model.data_info = dict(weights.data_info)
    return model


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> Detector:
    """Build the model a checkpoint dict describes (qdet or official layout)."""
    return build(checkpoint_weights(ckpt, source))


def model_from_source(source: str | os.PathLike) -> Detector:
    """The model of any source ``qdet.load`` accepts (file, HF folder, zoo name, hf: id),
    in train mode on the CPU."""
    from .zoo import resolve

    return build(read_weights(resolve(source)))


def load(source: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
         compile: bool = False) -> Detector:
    """Load a detector as an eval-mode model on ``device``. ``source``: a qdet or official
    release checkpoint file, a Hugging Face model folder, a zoo name (``qdet zoo``) or an
    ``hf:owner/name`` Hub id (downloaded once, then read from the cache).

    Architecture and sizes come from the weights: the stored config of a qdet checkpoint,
    the key names and tensor shapes of an official one (plus its ``args`` when present),
    or an HF folder's config.json.
    ``fast=True`` returns the inference fast path (``qdet.blocks.fast``): same outputs,
    faster; with ``compile=True`` its transformer is also compiled (torch.compile), which
    pays only when input sizes repeat: every new size compiles again.

    A ``.onnx`` file written by ``qdet export`` loads as a :class:`qdet.OnnxDetector`
    (onnxruntime; ``fast`` and ``compile`` do not apply).
    """
    from .zoo import resolve

    if str(source).lower().endswith(".onnx"):    # a file, never a zoo name
        from .onnx_runtime import OnnxDetector

        return OnnxDetector(source, device)
    model = build(read_weights(resolve(source))).to(device).eval()
    if fast:
        from ..blocks.fast import optimize_for_inference

        model = optimize_for_inference(model, compile=compile)
    elif compile:
        model.compile_transformer()
    return model
