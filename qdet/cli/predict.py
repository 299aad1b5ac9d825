"""``qdet predict``: detections drawn on images, in a table and in JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..common.files import write_atomic
from ..common.terminal import box_text, console, err, narrow_table
from .common import WEIGHTS_HELP, Device, fail, find_weights, load_model, pick_device


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
    from ..common.terminal import print_table
    from ..data.errors import DataError
    from ..data.images import load_image, save_image
    from ..engine.predict import find_images, output_names, predict_files
    from ..tools.draw import draw_detections

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
        save_image(draw_detections(load_image(path), r["detections"]), out / saved_as[path])
    print_table(console, f"detections (score >= {threshold})", detections_table(results))
    write_atomic(out / "predictions.json", json.dumps(results, indent=1))
    console.print(f"drawn images and predictions.json in {escape(str(out))}/")
    if failed:
        fail(f"{len(failed)} of {len(files)} images could not be read (above); the other "
             f"{len(results)} are done")


def detections_table(results: list[dict]) -> Table:
    """``qdet predict``'s detections (``qdet.engine.predict.predict_files``), one line each; an
    image's name on its first line only, folded rather than cut when long."""
    table = narrow_table("boxes: x0 y0 x1 y1 in pixels")
    table.add_column("image", overflow="fold")
    table.add_column("class")
    for col in ("score", "box"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        name = Path(r["image"]).name
        if not r["detections"]:
            table.add_row(name, "-", "-", "-")
        for k, d in enumerate(r["detections"]):
            table.add_row(name if k == 0 else "", d["name"], f"{d['score']:.2f}",
                          box_text(d["box"]))
    return table
