"""The ``qdet`` command line: thin Typer commands over the Python API."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .bench_cli import bench_app
from .explain_cli import explain_cmd
from .plot_cli import plot
from .export_cli import export_cmd
from .registry import ARCHS
from .terminal import Device, console, err, fail, pick_device
from .zoo_cli import zoo

app = typer.Typer(
    help="qdet: query-based object detectors (DETR family). Train on the built-in shapes "
         "data or COCO-format JSON, evaluate with COCO AP, predict on images.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown")
data_app = typer.Typer(help="Built-in datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.command("zoo")(zoo)


def parse_sets(items: list[str] | None) -> tuple[dict, dict]:
    """``--set key=value``: keys of the training config (``lr``, ``augment.crop``) go to
    training, every other key to the model config (``d_model``, ``loss.giou_weight``)."""
    from dataclasses import fields

    from .engine import TrainConfig

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


WEIGHTS_HELP = ("a checkpoint file, a Hugging Face model folder, a zoo name (`qdet zoo`), "
                "hf:owner/name, or a .onnx file from `qdet export`")


def find_weights(weights: Optional[str]) -> Path:
    """The local file or folder of ``--weights`` (downloading a zoo or Hub model once), else
    the checkpoint of the most recent run under ./runs (``best.pt``, else ``last.pt``)."""
    from .runs import latest_run, run_checkpoint
    from .zoo import ZooError, resolve

    if weights is not None:
        try:
            return resolve(weights)
        except (ZooError, FileNotFoundError) as e:
            fail(str(e))
    run = latest_run()
    if run is None:
        fail("no --weights given and no run found under ./runs (no runs/*/best.pt or "
             "last.pt): train one with `qdet train` or pass --weights (" + WEIGHTS_HELP + ")")
    path = run_checkpoint(run)
    kind = "best" if path.name == "best.pt" else "last"
    err.print(Text(f"using {path} ({kind} checkpoint of the most recent run)"), soft_wrap=True)
    return path


def results_path(weights: Path) -> Path:
    """Where ``qdet eval`` writes results by default: beside the weights in their run folder,
    else in the current folder (never beside a downloaded or shared file)."""
    from .runs import is_run

    name = f"{weights.stem}_results.json"
    return weights.parent / name if is_run(weights.parent) else Path(name)


def load_model(weights: Path, device: str, fast: bool = True, compile: bool = False,
               bf16: bool = False):
    from .checkpoint import CheckpointError, load

    if weights.suffix.lower() == ".onnx" and (compile or bf16):
        fail(f"{'--compile' if compile else '--bf16'} does not apply to an ONNX file: "
             "onnxruntime runs it in float32 as exported")
    try:
        return load(weights, device=device, fast=fast, compile=compile)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))


def eval_dataset(model, weights: Path, data: Optional[Path], images: Optional[Path],
                 builtin_fallback: bool):
    """The dataset to evaluate/debug on, preprocessed as the model expects: COCO JSON when
    given, else the built-in validation split the checkpoint trained on (or the default
    built-in split with ``builtin_fallback``)."""
    from .checkpoint import read_checkpoint
    from .data import AugmentConfig, CocoDataset, DataError, ShapesDataset
    from .shapes import ShapesConfig

    aug = AugmentConfig(eval_size=model.preprocess["size"], max_size=model.preprocess["max_size"])
    try:
        if data is not None:
            if images is None:
                fail("--data needs --images (the folder its file_name fields are in)")
            return CocoDataset(data, images, aug, train=False)
        if weights.suffix.lower() == ".onnx":
            ckpt = model.checkpoint_info
        else:
            ckpt = {} if weights.is_dir() else read_checkpoint(weights)
        shapes_cfg = ckpt.get("train", {}).get("shapes")
        if ckpt.get("data", {}).get("kind") != "shapes" and not builtin_fallback:
            fail("this checkpoint was not trained on built-in data: pass --data ANN.json "
                 "--images DIR")
        return ShapesDataset("val", ShapesConfig(**(shapes_cfg or {})), aug, train=False)
    except DataError as e:
        fail(str(e))


Arch = Annotated[Optional[str], typer.Option(
    "--arch", "-a", help=f"Architecture: {', '.join(ARCHS)} (default: detr).")]


@app.command()
@say_why_on_sigterm()
def train(
    arch: Arch = None,
    data: Annotated[Optional[Path], typer.Option(help="COCO-format training annotations "
                                                 "(JSON). Default: the built-in shapes "
                                                 "data.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the training images.")] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="COCO-format validation JSON.")] = None,
    val_images: Annotated[Optional[Path], typer.Option(help="Folder of the validation "
                                                       "images.")] = None,
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
    from .data import DataError
    from .faults import TrainingStopped
    from .runs import fit

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
    if preset not in (None, "shapes", "paper"):
        fail(f"--preset must be 'shapes' or 'paper', got {preset!r}")
    try:
        result = fit(arch, data=data and str(data), images=images and str(images),
                     val_data=val_data and str(val_data),
                     val_images=val_images and str(val_images), out=out and str(out),
                     resume=resume, device=pick_device(device), preset=preset,
                     model_overrides=model_o, train_overrides=train_o,
                     backbone_weights=backbone_weights and str(backbone_weights),
                     weights=weights, freeze_backbone=freeze_backbone)
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


@app.command("eval")
def eval_(
    weights: Annotated[str, typer.Argument(help="Weights: " + WEIGHTS_HELP + ".")],
    data: Annotated[Optional[Path], typer.Option(help="COCO-format annotations (JSON). "
                                                 "Default: the data the model trained on, "
                                                 "if built in.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the images.")] = None,
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
    from .base import model_device
    from .data import DataError
    from .eval_report import show_report, write_report
    from .evaluation import coco_eval, match_classes, predict_dataset, stats_of
    from .terminal import stats_table

    path = find_weights(weights)
    model = load_model(path, pick_device(device), compile=compile, bf16=bf16)
    dataset = eval_dataset(model, path, data, images, builtin_fallback=False)
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
    out.write_text(json.dumps(results))
    console.print(f"{len(results)} detections written to {escape(str(out))}")
    show_report(write_report(dataset, results, out.parent, threshold, ev=ev,
                             weights=str(weights)), path.name)


@app.command()
def predict(
    image: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively; files that are not images are "
             "skipped and counted) or quoted glob patterns (\"shots/**/*.jpg\").")],
    weights: Annotated[Optional[str], typer.Option(help="Weights: " + WEIGHTS_HELP + "; "
                                                   "default: best.pt of the most recent run "
                                                   "under ./runs.")] = None,
    threshold: Annotated[float, typer.Option(help="Minimum score to report.")] = 0.5,
    out: Annotated[Path, typer.Option(help="Folder for the drawn images and "
                                      "predictions.json.")] = Path("predictions"),
    device: Device = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast.")] = False,
):
    """Detect objects in images: draws boxes, prints a table, writes JSON. An image that
    cannot be read (or is over PIL's 89.5-million-pixel limit) is reported and skipped;
    the others are still done, and the exit code is then 1."""
    from .data import DataError, load_image
    from .predict import draw_detections, find_images, output_names, predict_files
    from .terminal import detections_table, print_table

    try:
        files, skipped = find_images(image)
    except DataError as e:
        fail(str(e))
    for folder, n in skipped.items():
        err.print(Text(f"skipped {n} file(s) in {folder} that are not images"), soft_wrap=True)
    model = load_model(find_weights(weights), pick_device(device), bf16=bf16)
    failed = []

    def unreadable(path: Path, message: str):
        failed.append(path)
        err.print(Text("error: ", style="bold red") + Text(f"{message}; skipped"),
                  soft_wrap=True)

    results = predict_files(model, files, threshold, bf16=bf16, on_error=unreadable)
    saved_as = output_names([Path(r["image"]) for r in results])
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        path = Path(r["image"])
        draw_detections(load_image(path), r["detections"]).save(out / saved_as[path])
    print_table(console, f"detections (score >= {threshold})", detections_table(results))
    (out / "predictions.json").write_text(json.dumps(results, indent=1))
    console.print(f"drawn images and predictions.json in {escape(str(out))}/")
    if failed:
        fail(f"{len(failed)} of {len(files)} images could not be read (above); the other "
             f"{len(results)} are done")


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write train/val JSON and images to.")],
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    train_images: Annotated[int, typer.Option(help="Training images.")] = 4000,
    val_images: Annotated[int, typer.Option(help="Validation images.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    categories: Annotated[Optional[str], typer.Option(
        help="Comma-separated kinds to draw (default rectangle,ellipse,triangle,cross,star; "
             "also hexagon, diamond, ring): e.g. a dataset for fine-tuning whose classes "
             "are partly the built-in data's.")] = None,
):
    """Write the built-in shapes data as COCO JSON + PNG images (to see the format, or to
    make a dataset of other shapes)."""
    from rich.progress import Progress

    from .shapes import ShapesConfig, write_coco

    kinds = {} if categories is None else {"categories": tuple(
        c.strip() for c in categories.split(",") if c.strip())}
    try:
        cfg = ShapesConfig(image_size=image_size, train_images=train_images,
                           val_images=val_images, seed=seed, **kinds)
    except ValueError as e:
        fail(f"--categories: {e}")
    with Progress(console=console) as bar:
        task = bar.add_task("writing", total=train_images + val_images)
        written = write_coco(cfg, out, progress=lambda: bar.advance(task))
    for split, ann in written.items():
        console.print(f"{split}: {ann} + {out / split}/")
    console.print(f"train on it: qdet train --data {written['train']} --images {out / 'train'} "
                  f"--val-data {written['val']} --val-images {out / 'val'}")


@data_app.command("check")
def data_check(
    ann: Annotated[Path, typer.Argument(help="COCO-format annotations (JSON).")],
    images: Annotated[Path, typer.Option(help="Folder of the images its file_name fields "
                                         "are in.")],
):
    """Check a COCO-format dataset as `qdet train` does before it trains: the JSON, every
    entry's fields and types, ids, boxes, and every image file's header."""
    from .data import DataError, validate_coco

    try:
        data = validate_coco(ann, images)
    except DataError as e:
        fail(str(e))
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    console.print(Text(f"{ann}: {len(data['images'])} images, {len(data['annotations'])} "
                       f"boxes ({crowd} crowd) of {len(data['categories'])} categories: ok"),
                  soft_wrap=True)


@app.command("match-debug")
def match_debug_cmd(
    weights: Annotated[Optional[str], typer.Option(help="Weights: " + WEIGHTS_HELP + "; "
                                                   "default: best.pt of the most recent run "
                                                   "under ./runs.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="COCO-format annotations (JSON); "
                                                 "default: the built-in validation data.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the images.")] = None,
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

    from .data import DataError
    from .match_debug import debug_image, draw, render, to_json

    path = find_weights(weights)
    if path.suffix.lower() == ".onnx":
        fail("match-debug needs the PyTorch model (every decoder layer's outputs): pass the "
             "checkpoint the ONNX file was exported from")
    model = load_model(path, pick_device(device))
    dataset = eval_dataset(model, path, data, images, builtin_fallback=True)
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
        draw(dataset.raw_image(index), result, names).save(save)
        if not as_json:
            console.print(f"drawing saved to {save}")


app.command("explain")(explain_cmd)


@app.command()
def archs():
    """List the registered architectures."""
    from .registry import method

    table = Table(title="architectures")
    table.add_column("--arch")
    table.add_column("paper")
    table.add_column("head")
    for name in ARCHS:
        m = method(name)
        table.add_row(name, m.paper, "sigmoid focal" if m.focal else "softmax + no object")
    console.print(table)


app.command()(plot)
app.command("export")(export_cmd)


@app.callback()
def _setup():
    """Warnings (a dropped box, a left-out class) print as one line, like errors."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        err.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)

    warnings.showwarning = show


def main():
    app(prog_name="qdet")


if __name__ == "__main__":
    sys.exit(main())
