"""``qdet eval``: COCO metrics of a model on a dataset, and its per-class report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from ..common.files import write_atomic
from ..common.terminal import console, err
from .common import (
    WEIGHTS_HELP,
    Device,
    eval_dataset,
    fail,
    find_weights,
    load_model,
    pick_device,
    results_path,
)


def eval_(
    weights: Annotated[str, typer.Argument(help="Weights: " + WEIGHTS_HELP + ".")],
    data: Annotated[Optional[Path], typer.Option(help="A COCO JSON file (with --images), a "
                                                 "YOLO dataset YAML or its folder, or a "
                                                 "Pascal VOC folder. Default: the validation "
                                                 "data the model trained on.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the images (COCO).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a YOLO or VOC set (default "
                                                 "val).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 4,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 2,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the COCO results JSON; "
                                                "default: WEIGHTS-stem_results.json in the "
                                                "run folder when WEIGHTS belong to a run, "
                                                "else in the current folder.")] = None,
    device: Device = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (faster on CPUs "
                                       "with AVX-512 BF16 and on GPUs).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the transformer: "
                                          "about 1.2x for the Deformable DETR family on a "
                                          "CPU, but every new input size compiles again "
                                          "(seconds each), so it pays on long evaluations "
                                          "of same-sized images.")] = False,
    threshold: Annotated[float, typer.Option(help="Score from which a detection counts in "
                                             "the confusion matrix and the diagnosis.")] = 0.5,
):
    """COCO bbox metrics (AP, AP50, AP75, APs/m/l, AR@100) of a checkpoint on a dataset,
    and per class; writes the results JSON and beside it per_class.csv, confusion.png
    (IoU 0.5, with background) and pr.png. A model whose classes differ from the data's is
    evaluated on the classes whose names match (and says so)."""
    from ..blocks.base import model_device
    from ..common.terminal import stats_table
    from ..data.errors import DataError
    from ..engine.eval_report import show_report, write_report
    from ..engine.evaluation import coco_eval, match_classes, predict_dataset, stats_of

    path = find_weights(weights)
    model = load_model(path, pick_device(device), compile=compile, bf16=bf16)
    dataset = eval_dataset(model, path, data, images, builtin_fallback=False, split=split)
    try:
        classes = match_classes(model, dataset)
    except ValueError as e:
        fail(f"{weights}: {e}")
    if classes.note:
        err.print(Text(f"note: {classes.note}"), soft_wrap=True)
    try:
        results = predict_dataset(model, dataset, model_device(model), batch_size, workers,
                                  bf16=bf16)
    except DataError as e:  # an image whose pixels are cut short
        fail(str(e))
    ev = coco_eval(dataset, results, classes.cat_ids)
    console.print(stats_table(stats_of(ev), f"{path.name}: COCO bbox ({len(dataset)} images)"))
    out = out or results_path(path)
    write_atomic(out, json.dumps(results))
    console.print(f"{len(results)} detections written to {escape(str(out))}")
    show_report(write_report(dataset, results, out.parent, threshold, ev=ev,
                             weights=str(weights)), path.name)
