"""``qdet data convert``: any dataset qdet reads (COCO, YOLO, Pascal VOC) written as COCO files
or as a YOLO set in Roboflow's layout.

- ``coco``: ``OUT/<split>.json`` per split, its ``file_name`` fields relative to
  ``OUT/<split>/``, which holds the images (the layout of ``qdet data shapes``).
- ``yolo``: ``OUT/data.yaml`` and ``OUT/{train,valid,test}/{images,labels}/`` (Roboflow's
  export layout, with paths that need no ``../`` fallback), class ``k`` = the ``k``-th
  category by id.

Images keep their names and bytes: linked (``qdet.common.files.place_file``: a hard link,
else a symbolic link), copied with ``copy=True``, never moved or re-encoded. Nothing is written
outside OUT, and OUT must be new or empty.

Conversion is exact: boxes are written as read (not clipped to the image; YOLO numbers with
6 decimals, COCO's in full), so a YOLO or VOC set converted to COCO and back keeps every box
within the rounding of the printed digits, and every class name. What a format cannot hold is
said with a count: YOLO has no crowd or difficult flag (those boxes are left out), and a box
that reaches past its image is clipped for YOLO, whose numbers must lie in [0, 1].

The many image links and label files are written atomically but not each fsynced; the index
(the JSON files, ``data.yaml``) is written last and durably, so an OUT without it is an
unfinished conversion (``qdet.common.files``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..common.files import place_file, write_atomic
from .errors import DataError
from .formats import detect_format, read_split, split_names
from .split import SplitData
from .yolo import label_path

TARGETS = ("coco", "yolo")
YOLO_FOLDERS = {"train": "train", "val": "valid", "test": "test"}   # Roboflow's names


@dataclass
class Converted:
    """What a conversion wrote: per split its index file, image folder and counts; how
    the images were placed (``hardlink``/``symlink``/``copy``: count); notes."""
    out: Path
    to: str
    splits: dict[str, dict] = field(default_factory=dict)
    placed: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def _splits(src: Path, fmt: str, wanted: list[str] | None, to: str) -> list[str | None]:
    have = split_names(src)
    if fmt == "coco":
        if wanted:
            raise DataError(f"--split: {src} is a COCO file, which is one split")
        return [None]
    if not have:
        raise DataError(f"{src}: no split to convert (no ImageSets/Main/<split>.txt); list the "
                        "image ids of each split there, one per line")
    for s in wanted or []:
        if s not in have:
            raise DataError(f"--split {s}: {src} has no such split (it has {', '.join(have)})")
    chosen = wanted or [s for s in ("train", "val", "test") if s in have] or have
    if to == "yolo":
        bad = [s for s in chosen if s not in YOLO_FOLDERS]
        if bad:
            raise DataError(f"--split {bad[0]}: a YOLO set holds train, val and test splits "
                            "only; pick those with --split")
    return chosen


def _check_out(out: Path, sources: list[SplitData]) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; convert into a new "
                        "folder")
    target = os.path.abspath(out)
    for sd in sources:
        root = os.path.abspath(sd.image_root)
        if target == root or target.startswith(root + os.sep):
            raise DataError(f"{out} is inside the images of {sd.source} ({sd.image_root}): the "
                            "converted images would join the source's; convert elsewhere")


def _inside(out: Path, path: Path) -> Path:
    """``path``, after making sure it is under ``out`` (file names come from the data)."""
    if not os.path.abspath(path).startswith(os.path.abspath(out) + os.sep):
        raise DataError(f"{path}: would be written outside {out}; refused")
    return path


def _unify(sources: list[SplitData]) -> None:
    """Every split lists the same categories (a VOC set's splits may each miss a class; the
    reader gave later splits the earlier ones' order, so ids agree and the last is whole)."""
    whole = sources[-1].data["categories"]
    for sd in sources:
        sd.data["categories"] = [dict(c) for c in whole]


def convert(src: str | os.PathLike, out: str | os.PathLike, to: str,
            images: str | os.PathLike | None = None, splits: list[str] | None = None,
            copy: bool = False, progress: Callable[[], None] | None = None) -> Converted:
    """Convert the dataset at ``src`` (any format ``qdet.data.formats`` reads; ``images``
    for a COCO file) to ``to`` (``coco`` or ``yolo``) in the new folder ``out``: the
    ``splits`` given, else train, val and test where they exist. Every split is read and
    checked before anything is written. ``progress`` is called once per image placed."""
    if to not in TARGETS:
        raise DataError(f"--to {to}: choose coco or yolo")
    src, out = Path(src), Path(out)
    fmt = detect_format(src)
    sources, classes = [], None
    for split in _splits(src, fmt, splits, to):
        sd = read_split(src, split, images, classes=classes, clip=False)
        classes = [c["name"] for c in sorted(sd.data["categories"], key=lambda c: c["id"])]
        sources.append(sd)
    _unify(sources)
    _check_out(out, sources)
    result = Converted(out, to)
    result.notes += dict.fromkeys(note for sd in sources for note in sd.notes)
    if to == "coco":
        for sd in sources:
            _write_coco(sd, out, sd.split or src.stem, copy, result, progress)
    else:
        _write_yolo(sources, out, copy, result, progress, src)
    return result


def _number(v: float):
    """A coordinate as JSON writes it: an integer when whole (VOC's corners), else in full."""
    return int(v) if float(v).is_integer() else float(v)


def _write_coco(sd: SplitData, out: Path, name: str, copy: bool, result: Converted,
                progress) -> None:
    folder = out / name
    for i, im in enumerate(sd.data["images"]):
        dst = _inside(out, folder / im["file_name"])
        result.placed[place_file(sd.image_path(i), dst, copy)] += 1
        if progress:
            progress()
    data = {"images": [{k: im[k] for k in ("id", "file_name", "width", "height")}
                       for im in sd.data["images"]],
            "annotations": [{"id": a["id"], "image_id": a["image_id"],
                             "category_id": a["category_id"],
                             "bbox": [_number(v) for v in a["bbox"]],
                             "area": _number(a["area"]), "iscrowd": a["iscrowd"]}
                            for a in sd.data["annotations"]],
            "categories": [{"id": c["id"], "name": c["name"]} for c in sd.data["categories"]]}
    ann = write_atomic(out / f"{name}.json", json.dumps(data))
    result.splits[name] = {"file": ann, "images_folder": folder,
                           "images": len(data["images"]), "boxes": len(data["annotations"])}


def _fraction(v: float) -> str:
    """A YOLO number: 6 decimals, trailing zeros dropped (``0.5``, ``0.123457``)."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _yolo_line(cls: int, box, size) -> tuple[str | None, bool]:
    """``class cx cy w h`` of a pixel box, and whether it had to be clipped to its image;
    None when nothing of it is inside the image."""
    (x, y, w, h), (iw, ih) = box, size
    cx, cy, nw, nh = (x + w / 2) / iw, (y + h / 2) / ih, w / iw, h / ih
    clipped = not all(0 <= v <= 1 for v in (cx, cy, nw, nh))
    if clipped:  # YOLO's numbers must lie in [0, 1]: keep the part inside the image
        x0, y0 = min(max(x, 0), iw), min(max(y, 0), ih)
        x1, y1 = min(max(x + w, 0), iw), min(max(y + h, 0), ih)
        if x1 <= x0 or y1 <= y0:
            return None, True
        cx, cy, nw, nh = (x0 + x1) / 2 / iw, (y0 + y1) / 2 / ih, (x1 - x0) / iw, (y1 - y0) / ih
    return " ".join([str(cls)] + [_fraction(v) for v in (cx, cy, nw, nh)]), clipped


def _yolo_name(file_name: str, used: set[str]) -> str:
    """The image's name under ``images/``: its path, with an ``images`` folder in it renamed
    (the label rule replaces the last ``/images/``), and ``-2``, ``-3`` ... where two images
    would share a label file (``a.jpg`` and ``a.png``)."""
    parts = [p + "_" if p == "images" else p for p in Path(file_name).parts]
    name = Path(*parts)
    stem, k = name.with_suffix(""), 2
    while str(stem) in used:
        stem = name.with_name(f"{name.stem}-{k}").with_suffix("")
        k += 1
    used.add(str(stem))
    return str(stem) + name.suffix


def _split_of_file(path: Path) -> str:
    """The YOLO split a COCO file becomes, from its name: ``val``/``valid`` in it (COCO's
    ``instances_val2017``) -> val, ``test`` -> test, else train."""
    stem = path.stem.lower()
    return "val" if "val" in stem else "test" if "test" in stem else "train"


def _write_yolo(sources: list[SplitData], out: Path, copy: bool, result: Converted,
                progress, src: Path) -> None:
    import yaml

    cats = sorted(sources[0].data["categories"], key=lambda c: c["id"])
    cls_of = {c["id"]: k for k, c in enumerate(cats)}
    ids = [c["id"] for c in cats]
    if ids != list(range(1, len(ids) + 1)):
        result.notes.append(f"category ids {', '.join(map(str, ids[:8]))}"
                            f"{', ...' if len(ids) > 8 else ''} written as YOLO classes 0-"
                            f"{len(ids) - 1} in that order")
    left, clipped, renamed = Counter(), 0, 0
    for sd in sources:
        split = sd.split or _split_of_file(src)
        folder = out / YOLO_FOLDERS[split]
        per_image: dict[int, list] = {im["id"]: [] for im in sd.data["images"]}
        for a in sd.data["annotations"]:
            if a["iscrowd"]:
                left[sd.format] += 1
            else:
                per_image[a["image_id"]].append(a)
        used, boxes = set(), 0
        for i, im in enumerate(sd.data["images"]):
            name = _yolo_name(im["file_name"], used)
            renamed += name != im["file_name"]
            image = _inside(out, folder / "images" / name)
            label = _inside(out, folder / "labels" / Path(name).with_suffix(".txt"))
            assert label_path(str(image)) == os.path.abspath(label), (image, label)
            lines = []
            for a in per_image[im["id"]]:
                line, cut = _yolo_line(cls_of[a["category_id"]], a["bbox"],
                                       (im["width"], im["height"]))
                clipped += cut
                if line is not None:
                    lines.append(line)
            result.placed[place_file(sd.image_path(i), image, copy)] += 1
            write_atomic(label, "".join(line + "\n" for line in lines), durable=False)
            boxes += len(lines)
            if progress:
                progress()
        result.splits[split] = {"file": out / "data.yaml",
                                              "images_folder": folder / "images",
                                              "images": len(sd.data["images"]), "boxes": boxes}
    if left:
        what = " and ".join(f"{n} {'difficult' if f == 'voc' else 'crowd'}"
                            for f, n in left.items())
        result.notes.append(f"{what} box(es) left out: YOLO labels have no such flag")
    if clipped:
        result.notes.append(f"{clipped} box(es) reaching past their image clipped to it (YOLO "
                            "numbers lie in [0, 1]); those with nothing inside left out")
    if renamed:
        result.notes.append(f"{renamed} image(s) renamed so that each has its own label file")
    spec = {key: f"{YOLO_FOLDERS[key]}/images" for key in YOLO_FOLDERS if key in result.splits}
    spec.update(nc=len(cats), names=[c["name"] for c in cats])
    write_atomic(out / "data.yaml", f"# qdet data convert {src} --to yolo\n"
                 + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
