"""Checkpoint files, read safely and written atomically.

Every pickled file is read with ``torch.load(weights_only=True)``: no code from a checkpoint is ever
run. Official release checkpoints pickle an ``argparse.Namespace`` (their training
arguments), which is the one extra type allowed; any other type is refused with the name of
the type. qdet checkpoints hold only tensors and plain Python values: ``arch``, ``config``,
``model``, ``class_names``, ``category_ids`` (label i <-> dataset category id), ``epoch``,
and for resuming ``optimizer``, ``scheduler``, ``train``. Turning a checkpoint into a model
is ``qdet.weights.loading``'s job.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..blocks.base import Detector
from ..common.config import config_to_dict
from ..common.files import atomic_open

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
    """Write ``obj`` to ``path`` atomically (``qdet.common.files``): a crash or a full disk
    mid-write leaves the previous file intact."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:  # a file object: a full disk is an OSError (ENOSPC)
            torch.save(obj, f)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"the disk is full: no space left on {path.parent} to write {path.name}"
                f"{' (the previous one is intact)' if path.exists() else ''}; free some space"
                ) from None
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def model_checkpoint(model: Detector, **extra) -> dict:
    """The part of a qdet checkpoint that describes and holds the model."""
    state = {k: v for k, v in model.state_dict().items()}
    return {"format": FORMAT, "arch": model.arch, "config": config_to_dict(model.config),
            "model": state, "class_names": list(model.class_names),
            "category_ids": [int(c) for c in model.category_ids],
            "preprocess": dict(model.preprocess), **extra}
