"""``qdet match-debug``: what the Hungarian matcher did on one image, and why."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.terminal import console, err
from .common import WEIGHTS_HELP, Device, eval_dataset, fail, find_weights, load_model, pick_device


def match_debug_cmd(
    weights: Annotated[Optional[str], typer.Option(help="Weights: " + WEIGHTS_HELP + "; "
                                                   "default: best.pt of the most recent run "
                                                   "under ./runs.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A COCO JSON file (with --images), a "
                                                 "YOLO dataset YAML or its folder, or a "
                                                 "Pascal VOC folder; default: the validation "
                                                 "data the model trained on, else the "
                                                 "built-in data.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the images (COCO).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a YOLO or VOC set (default "
                                                 "val).")] = None,
    index: Annotated[int, typer.Option(help="Which image of the dataset (0-based).")] = 0,
    image_id: Annotated[Optional[int], typer.Option(help="Pick the image by its COCO "
                                                    "id instead.")] = None,
    threshold: Annotated[float, typer.Option(help="Score above which an unmatched query "
                                             "overlapping a match is a likely duplicate.")] = 0.3,
    save: Annotated[Optional[Path], typer.Option(help="Draw targets and their matched "
                                                 "predictions, linked, to this PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the same data as JSON.")] = False,
    device: Device = None,
):
    """Show what the Hungarian matcher did on one image: per target, the matched query,
    its cost terms and total, the runner-up and margin; per decoder layer, the assignment
    and how often it changes; likely duplicate predictions."""
    import torch

    from ..data.errors import DataError
    from ..data.images import save_image
    from ..tools.match_debug import debug_image, draw, render, to_json

    path = find_weights(weights)
    if path.suffix.lower() == ".onnx":
        fail("match-debug needs the PyTorch model (every decoder layer's outputs): pass the "
             "checkpoint the ONNX file was exported from")
    model = load_model(path, pick_device(device))
    dataset = eval_dataset(model, path, data, images, builtin_fallback=True, split=split)
    if image_id is not None:
        ids = [im["id"] for im in dataset.images] if hasattr(dataset, "images") \
            else list(range(len(dataset)))
        if image_id not in ids:
            fail(f"no image with id {image_id} in the dataset")
        index = ids.index(image_id)
    if not 0 <= index < len(dataset):
        fail(f"--index {index} is out of range: the dataset has {len(dataset)} images")
    try:
        x, target = dataset[index]
    except DataError as e:
        fail(str(e))
    label_of = {cid: i for i, cid in enumerate(model.category_ids)}
    keep = [i for i, l in enumerate(target["labels"].tolist())
            if dataset.category_ids[l] in label_of]
    if len(keep) < len(target["labels"]):
        err.print(f"{len(target['labels']) - len(keep)} target(s) have categories the model "
                  "does not know; left out")
    labels = torch.tensor([label_of[dataset.category_ids[target["labels"][i]]] for i in keep],
                          dtype=torch.long)
    dev = next(model.parameters()).device
    tgt = {"labels": labels.to(dev), "boxes": target["boxes"][keep].to(dev)}
    try:
        result = debug_image(model, x.to(dev), tgt, threshold)
    except FloatingPointError as e:
        fail(f"{path}: {e}")
    names = model.class_names
    if as_json:
        print(json.dumps({"image_id": target["image_id"], "weights": str(path),
                          **to_json(result, names)}, indent=1))
    else:
        render(result, names, console, title=f"image {target['image_id']}: ")
    if save is not None:
        save_image(draw(dataset.raw_image(index), result, names), save)
        if not as_json:
            console.print(f"drawing saved to {save}")
