"""``qdet data``: the built-in data written as COCO files, and a dataset checked as training
checks it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ..common.terminal import console
from .common import fail

data_app = typer.Typer(help="Datasets: write the built-in data, check a dataset.",
                       no_args_is_help=True)


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

    from ..data.shapes import ShapesConfig, write_coco

    kinds = {} if categories is None else {"categories": tuple(
        c.strip() for c in categories.split(",") if c.strip())}
    try:
        cfg = ShapesConfig(image_size=image_size, train_images=train_images,
                           val_images=val_images, seed=seed, **kinds)
    except ValueError as e:
        fail(f"--categories: {e}")
    with Progress(console=console.get()) as bar:
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
    from ..data.coco import validate_coco
    from ..data.errors import DataError

    try:
        data = validate_coco(ann, images)
    except DataError as e:
        fail(str(e))
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    console.print(Text(f"{ann}: {len(data['images'])} images, {len(data['annotations'])} "
                       f"boxes ({crowd} crowd) of {len(data['categories'])} categories: ok"),
                  soft_wrap=True)
