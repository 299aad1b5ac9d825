"""``qdet data``: the built-in data written as COCO files, a dataset (COCO, YOLO, Pascal VOC)
checked as training checks it, and converted between formats."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ..common.terminal import console, err
from .common import fail

data_app = typer.Typer(help="Datasets: write the built-in data, check a dataset, convert one "
                            "(COCO, YOLO, Pascal VOC).", no_args_is_help=True)


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


DataArg = Annotated[Path, typer.Argument(help="A COCO JSON file (with --images), a YOLO "
                                        "dataset YAML or its folder, or a Pascal VOC folder.",
                                        metavar="DATA")]
ImagesOpt = Annotated[Optional[Path], typer.Option(help="Folder of the images its file_name "
                                                   "fields are in (COCO files only).")]


def say_problems(e) -> None:
    """Every problem of a DataError on its own line (a DataProblems lists them all)."""
    from ..data.errors import DataProblems

    lines = e.problems if isinstance(e, DataProblems) else [str(e)]
    for line in lines:
        err.print(Text("error: ", style="bold red") + Text(line), highlight=False,
                  soft_wrap=True)
    if isinstance(e, DataProblems) and e.count > len(e.problems):
        err.print(Text(f"error: ... and {e.count - len(e.problems)} more problems "
                       f"({e.count} in all)"), soft_wrap=True)


def say_notes(notes, said: set | None = None) -> None:
    """Each note once (``said``: those already printed)."""
    said = set() if said is None else said
    for note in notes:
        if note in said:
            continue
        said.add(note)
        err.print(Text("note: ", style="yellow") + Text(note), soft_wrap=True)


@data_app.command("check")
def data_check(
    data: DataArg,
    images: ImagesOpt = None,
    split: Annotated[Optional[list[str]], typer.Option(
        help="Split of a YOLO or VOC set to check (repeatable); default: every split.")] = None,
):
    """Check a dataset as `qdet train` does before it trains. COCO: the JSON, every entry's
    fields and types, ids, boxes, every image file's header; the first problem stops it.
    YOLO and VOC: the YAML or XML, every label line or object, every image's header; every
    problem is listed, one line each naming the file and the line or element."""
    from ..data.coco import validate_coco
    from ..data.errors import DataError
    from ..data.formats import detect_format, read_split, split_names

    try:
        fmt = detect_format(data)
    except DataError as e:
        fail(str(e))
    if fmt == "coco":
        if images is None:
            fail(f"{data}: a COCO file needs --images (the folder its file_name fields are in)")
        if split:
            fail(f"--split: {data} is a COCO file, which is one split")
        try:
            coco = validate_coco(data, images)
        except DataError as e:
            fail(str(e))
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        console.print(Text(f"{data}: {len(coco['images'])} images, {len(coco['annotations'])} "
                           f"boxes ({crowd} crowd) of {len(coco['categories'])} categories: ok"),
                      soft_wrap=True)
        return
    try:
        if images is not None:
            fail(f"--images applies to a COCO file; {data} is a {fmt.upper()} set, which "
                 "names its own image folders")
        splits = split or split_names(data) or ["train"]   # none: the reader says why
    except DataError as e:
        fail(str(e))
    failed, said = 0, set()
    for name in splits:
        try:
            sd = read_split(data, name)
        except DataError as e:
            say_problems(e)
            failed += 1
            continue
        say_notes(sd.notes, said)
        console.print(Text(f"{sd.source}: {sd.summary()}: ok"), soft_wrap=True)
    if failed:
        fail(f"{data}: {failed} of {len(splits)} split(s) have problems (above)")


@data_app.command("convert")
def data_convert(
    src: DataArg,
    out: Annotated[Path, typer.Argument(help="New (or empty) folder to write to.")],
    to: Annotated[str, typer.Option(help="coco: a JSON file per split, images in a folder "
                                    "beside it; yolo: data.yaml with train/valid/test "
                                    "folders (Roboflow's layout).")],
    images: ImagesOpt = None,
    split: Annotated[Optional[list[str]], typer.Option(
        help="Split to convert (repeatable); default: train, val and test where they "
             "exist.")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the images instead of linking "
                                       "them (hard links, else symbolic ones).")] = False,
):
    """Convert a dataset (COCO, YOLO or Pascal VOC) to COCO files or a YOLO set: every split
    is checked first; boxes are kept exactly (to the printed digits) with every class name;
    images are linked (or copied with --copy), never moved or re-encoded."""
    from rich.markup import escape
    from rich.progress import Progress

    from ..data.convert import convert
    from ..data.errors import DataError

    try:
        with Progress(console=err.get(), transient=True) as bar:
            task = bar.add_task("writing")
            done = convert(src, out, to.lower(), images, split, copy,
                           progress=lambda: bar.advance(task))
    except DataError as e:
        say_problems(e)
        raise typer.Exit(1)
    say_notes(done.notes)
    for name, info in done.splits.items():
        console.print(Text(f"{name}: {info['images']} images, {info['boxes']} boxes -> "
                           f"{info['file']} (images in {info['images_folder']}/)"),
                      soft_wrap=True)
    placed = ", ".join(f"{n} {how.replace('link', ' link')}{'s' * (n > 1)}"
                       if how != "copy" else f"{n} cop{'ies' if n > 1 else 'y'}"
                       for how, n in done.placed.items())
    console.print(f"images: {escape(placed)}")
    if done.to == "coco":
        first = next(iter(done.splits.values()))
        console.print(Text(f"check it: qdet data check {first['file']} --images "
                           f"{first['images_folder']}"), soft_wrap=True)
    else:
        console.print(Text(f"check it: qdet data check {out / 'data.yaml'}"), soft_wrap=True)
