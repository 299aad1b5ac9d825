"""Reading and writing checkpoints, safely; ``qdet.load`` of any source.

A source is a checkpoint file (qdet's or an official release's), a Hugging Face model folder
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, read by
``qdet.hf_format``), a zoo name or an ``hf:owner/name`` Hub id (``qdet.zoo`` turns those
into a local file or folder, downloading once).

Every pickled file is read with ``torch.load(weights_only=True)``: no code from a checkpoint is ever
run. Official release checkpoints pickle an ``argparse.Namespace`` (their training
arguments), which is the one extra type allowed; any other type is refused with the name of
the type. qdet checkpoints hold only tensors and plain Python values: ``arch``, ``config``,
``model``, ``class_names``, ``category_ids`` (label i <-> dataset category id), ``epoch``,
and for resuming ``optimizer``, ``scheduler``, ``train``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .base import Detector
from .registry import config_from_dict, config_to_dict, method

FORMAT = "qdet-1"
SAFE_TYPES = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, unknown format, disallowed type)
    or written (the disk is full); the message names the file and what to do."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True`` and the allow-list above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
    if size == 0 or (zipped and not zipfile.is_zipfile(path)):
        raise CheckpointError(f"{path}: truncated ({size:,} bytes, and a checkpoint ends with "
                              "a zip directory this file lacks): the download or copy did not "
                              "finish; fetch or copy it again")
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
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = " ".join(str(e).split(". ")[0].split())[:160]  # torch's first sentence
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """Write atomically: the file is written under a temporary name beside ``path``, then
    renamed over it, so a crash or a full disk mid-write leaves the previous file intact (a
    ``kill -9`` may leave the temporary ``NAME.*.tmp``, which the next run removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: a full disk is an OSError (ENOSPC)
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"the disk is full: no space left on {path.parent} to write {path.name}"
                f"{' (the previous one is intact)' if path.exists() else ''}; free some space"
                ) from None
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed ``save_checkpoint`` left in ``folder``."""
    stale = [p for p in Path(folder).glob("*.pt.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


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
    fmt = ckpt.get("format")
    if fmt is not None and fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("qdet-")
        raise CheckpointError(
            f"{source}: checkpoint format {fmt!r}, which this qdet does not read (it reads "
            f"{FORMAT!r} and official releases)"
            + ("; it was written by a newer qdet: upgrade qdet to load it" if newer else ""))
    if fmt == FORMAT:
        missing = [k for k in ("arch", "config", "model", "class_names", "category_ids")
                   if k not in ckpt]
        if missing:
            raise CheckpointError(f"{source}: a {FORMAT} checkpoint without {missing}; it "
                                  "was not written by qdet train, or was edited")
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


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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


def model_from_hf_folder(folder: str | os.PathLike) -> Detector:
    """Build the qdet model of an HF transformers DETR-family model folder."""
    from .hf_format import read_hf

    config, state = read_hf_folder(folder)
    arch, cfg, state, ids, names = read_hf(config, state, str(folder))
    model = method(arch).model(cfg)
    _load_state(model, state, str(folder))
    model.category_ids, model.class_names = ids, names
    return model


def model_from_source(source: str | os.PathLike) -> Detector:
    """The model of any source ``qdet.load`` accepts (file, HF folder, zoo name, hf: id),
    in train mode on the CPU."""
    from .zoo import resolve

    path = resolve(source)
    if path.is_dir():
        return model_from_hf_folder(path)
    return model_from_checkpoint(read_checkpoint(path), str(path))


def _load_state(model: Detector, state: dict, source: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the {model.arch} model they describe: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load(source: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
         compile: bool = False) -> Detector:
    """Load a detector as an eval-mode model on ``device``. ``source``: a qdet or official
    release checkpoint file, a Hugging Face model folder, a zoo name (``qdet zoo``) or an
    ``hf:owner/name`` Hub id (downloaded once, then read from the cache).

    Architecture and sizes come from the weights: the stored config of a qdet checkpoint,
    the key names and tensor shapes of an official one (plus its ``args`` when present),
    or an HF folder's config.json.
    ``fast=True`` returns the inference fast path (``qdet.fast``): same outputs, faster;
    with ``compile=True`` its transformer is also compiled (torch.compile), which pays only
    when input sizes repeat: every new size compiles again.

    A ``.onnx`` file written by ``qdet export`` loads as a ``qdet.onnx_export.OnnxDetector``
    (onnxruntime; ``fast`` and ``compile`` do not apply).
    """
    if str(source).lower().endswith(".onnx"):
        from .onnx_export import OnnxDetector

        return OnnxDetector(source, device)
    model = model_from_source(source).to(device).eval()
    if fast:
        from .fast import optimize_for_inference

        model = optimize_for_inference(model, compile=compile)
    elif compile:
        model.compile_transformer()
    return model
