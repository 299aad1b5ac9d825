"""What the commands share: failing in one line, the ``--device`` option, finding and loading
``--weights`` (resolved once, then read by ``qdet.load``), and the dataset a model is
evaluated or debugged on."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ..common.terminal import err


def fail(message: str, code: int = 1, every_rank: bool = False):
    """Print ``error: message`` and exit. The message is printed verbatim, never read as
    rich markup: it carries user data ("bbox must be [x, y, width, height], got [nan, ...]").
    Under torchrun only rank 0 prints, since every rank meets the same bad input; an error
    only one rank can see (its peers are gone) passes ``every_rank=True``."""
    quiet = err.quiet
    err.quiet = quiet and not every_rank
    err.print(Text("error: ", style="bold red") + Text(message), highlight=False,
              soft_wrap=True)
    err.quiet = quiet
    raise typer.Exit(code)


def pick_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default: CUDA when "
                                               "available, else CPU.")]


WEIGHTS_HELP = ("a checkpoint file, a Hugging Face model folder, a zoo name (`qdet zoo`), "
                "hf:owner/name, or a .onnx file from `qdet export`")


def find_weights(weights: Optional[str]) -> Path:
    """The local file or folder of ``--weights`` (downloading a zoo or Hub model once), else
    the checkpoint of the most recent run under ./runs (``best.pt``, else ``last.pt``)."""
    from ..engine.run_folder import RunFolder, latest_run
    from ..weights.zoo import ZooError, resolve

    if weights is not None:
        try:
            return resolve(weights)
        except (ZooError, FileNotFoundError) as e:
            fail(str(e))
    run = latest_run()
    if run is None:
        fail("no --weights given and no run found under ./runs (no runs/*/best.pt or "
             "last.pt): train one with `qdet train` or pass --weights (" + WEIGHTS_HELP + ")")
    path = RunFolder(run).checkpoint()
    kind = "best" if path.name == "best.pt" else "last"
    err.print(Text(f"using {path} ({kind} checkpoint of the most recent run)"), soft_wrap=True)
    return path


def results_path(weights: Path) -> Path:
    """Where ``qdet eval`` writes results by default: beside the weights in their run folder,
    else in the current folder (never beside a downloaded or shared file)."""
    from ..engine.run_folder import RunFolder

    name = f"{weights.stem}_results.json"
    return weights.parent / name if RunFolder(weights.parent).is_run() else Path(name)


def load_model(weights: Path, device: str, fast: bool = True, compile: bool = False,
               bf16: bool = False):
    from ..weights.checkpoint import CheckpointError
    from ..weights.loading import load

    if weights.suffix.lower() == ".onnx" and (compile or bf16):
        fail(f"{'--compile' if compile else '--bf16'} does not apply to an ONNX file: "
             "onnxruntime runs it in float32 as exported")
    try:
        return load(weights, device=device, fast=fast, compile=compile)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))


def eval_dataset(model, weights: Path, data: Optional[Path], images: Optional[Path],
                 builtin_fallback: bool, split: Optional[str] = None):
    """The dataset to evaluate/debug on, preprocessed as the model expects: ``data`` in any
    format ``qdet.data.formats`` reads (a YOLO or VOC set's ``split``, default ``val``), else
    the validation data the checkpoint trained on (its data spec: the built-in split, or
    the files it names), else the default built-in split with ``builtin_fallback``. A VOC
    set's classes take the model's order, so that its ids match the model's."""
    from ..data.datasets import ShapesDataset, open_source
    from ..data.errors import DataError
    from ..data.formats import source, spec_sources
    from ..data.shapes import ShapesConfig
    from ..data.transforms import AugmentConfig

    aug = AugmentConfig(eval_size=model.preprocess["size"], max_size=model.preprocess["max_size"])
    classes = list(model.class_names)
    try:
        if data is not None:
            if images is None and data.suffix.lower() == ".json":
                fail("--data needs --images (the folder its file_name fields are in)")
            src = source(data, images, split, default="val")
            return open_source(src, aug, train=False, classes=classes)
        ckpt = model.data_info    # what its checkpoint (or ONNX file) says of its data
        spec = ckpt.get("data") or {}
        if spec.get("kind") not in (None, "shapes"):
            train_src, val_src = spec_sources(spec)
            src = val_src if split is None else {**train_src, "split": split}
            if src is None:
                fail(f"{weights} was trained without validation data: pass --data")
            if split is not None and src["format"] == "coco":
                fail(f"--split {split}: {weights} was trained on a COCO file, which is one "
                     "split; pass --data")
            return open_source(src, aug, train=False, classes=classes)
        if split is not None:
            fail(f"--split {split} needs --data (a YOLO or VOC set) or a checkpoint trained "
                 "on one")
        shapes_cfg = ckpt.get("train", {}).get("shapes")
        if spec.get("kind") != "shapes" and not builtin_fallback:
            fail("this checkpoint does not say what data it was trained on: pass --data "
                 "(a COCO JSON file with --images, a YOLO set or a VOC folder)")
        return ShapesDataset("val", ShapesConfig(**(shapes_cfg or {})), aug, train=False)
    except DataError as e:
        fail(str(e))
