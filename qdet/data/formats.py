"""Which dataset format a path is, and reading any split of it into qdet's currency.

``--data PATH`` (train, eval, match-debug, data check, data convert) is:

- COCO: a ``.json`` file, with ``--images DIR`` (the folder its ``file_name`` fields are in);
  it is one split.
- YOLO: a dataset YAML, or a folder holding one (``data.yaml``); splits ``train``, ``val``,
  ``test`` (``qdet.data.yolo``).
- Pascal VOC: a folder with ``Annotations/`` and ``ImageSets/Main/``, or a devkit folder of
  such year folders; splits ``train``, ``val``, ``trainval``, ``test`` (``qdet.data.voc``).

The format is found from the path alone, so that no option names it. A run stores where its
data came from as a *data spec* (in ``config.json`` and every checkpoint), so that
``--resume`` and ``qdet eval`` of a run find it again: ``{"kind": "shapes"}``; a COCO
training file with an optional COCO validation file keeps the spec it always had
(``{"kind": "coco", "train_ann", "train_images", "val_ann", "val_images"}``); anything else is
``{"kind": FORMAT, "train": SOURCE, "val": SOURCE or None}``, a source being ``{"format",
"path", "split", "images"}``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from .coco import check_coco_dict, validate_coco
from .errors import DataError
from .split import SplitData
from .voc import find_years, read_voc_split, voc_splits
from .yolo import find_yaml, read_yolo_set, read_yolo_split

FORMATS = ("coco", "yolo", "voc")


def detect_format(path: str | os.PathLike) -> str:
    """``coco``, ``yolo`` or ``voc`` for a dataset path, or a DataError saying what a dataset
    path may be. A ``.json`` or ``.yaml`` name decides even when the file is missing, so
    that the reader says so in its own words."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix in (".yaml", ".yml"):
        return "yolo"
    if path.is_dir():
        if find_years(path):
            return "voc"
        if find_yaml(path) is not None:
            return "yolo"
        jsons = sorted(path.glob("*.json")) + sorted(path.glob("annotations/*.json"))
        raise DataError(f"{path}: a folder that is neither a YOLO set (no data.yaml) nor a "
                        "Pascal VOC folder (no Annotations/ with ImageSets/Main/)" + (
                            f"; for COCO, pass its JSON file (e.g. {jsons[0]}) with --images"
                            if jsons else ""))
    if not path.exists():
        raise DataError(f"dataset {path} not found")
    raise DataError(f"{path}: not a dataset qdet reads: give a COCO .json file (with "
                    "--images), a YOLO dataset .yaml, or a folder (a YOLO set holding "
                    "data.yaml; a Pascal VOC folder with Annotations/)")


def split_names(path: str | os.PathLike) -> list[str | None]:
    """The splits a dataset has: ``[None]`` for a COCO file (one split)."""
    fmt = detect_format(path)
    if fmt == "coco":
        return [None]
    if fmt == "yolo":
        return list(read_yolo_set(path).entries)
    return voc_splits(Path(path))


def read_split(path: str | os.PathLike, split: str | None = None,
               images: str | os.PathLike | None = None, *, default: str = "val",
               classes: list[str] | None = None, verify: bool = True,
               clip: bool = True) -> SplitData:
    """One split of the dataset at ``path``: ``split`` (``default`` when None) of a YOLO or
    VOC set, or the COCO file with its ``images`` folder. ``classes`` orders a VOC set's
    classes (the training split's, a checkpoint's). Boxes are clipped to their images and
    degenerate ones dropped, unless ``clip`` is False (conversion keeps them as written).
    Raises DataError (DataProblems: every problem found) naming files and lines."""
    fmt = detect_format(path)
    if fmt == "coco":
        if images is None:
            raise DataError(f"{path}: a COCO file needs --images (the folder its file_name "
                            "fields are in)")
        if split is not None:
            raise DataError(f"--split {split}: {path} is a COCO file, which is one split; "
                            "--split picks a split of a YOLO or VOC set")
        data = validate_coco(Path(path), Path(images), verify, clip=clip)
        crowd = sum(a["iscrowd"] for a in data["annotations"])
        return SplitData(data, Path(images), str(path), "coco", None, {"crowd": crowd})
    if images is not None:
        raise DataError(f"--images applies to a COCO file; {path} is a {fmt.upper()} set, "
                        "which names its own image folders")
    split = split or default
    if fmt == "yolo":
        sd = read_yolo_split(path, split, verify)
    else:
        sd = read_voc_split(path, split, classes, verify)
    sd.data = check_coco_dict(sd.data, sd.source, clip)
    return sd


def source(path, images=None, split: str | None = None, default: str = "train") -> dict:
    """The data spec's description of one split (see the module docstring)."""
    fmt = detect_format(path)
    return {"format": fmt, "path": str(path), "images": images and str(images),
            "split": None if fmt == "coco" else (split or default)}


def read_source(src: dict, classes: list[str] | None = None) -> SplitData:
    """The split a data spec's source describes; its notes said once, as warnings."""
    sd = read_split(src["path"], src.get("split"), src.get("images"), classes=classes)
    for note in sd.notes:
        warnings.warn(note, stacklevel=2)
    return sd


def data_spec(data, images=None, val_data=None, val_images=None, split: str | None = None,
              val_split: str | None = None) -> dict:
    """Where a run's data comes from (the spec stored in its checkpoints): the built-in data
    without ``data``; else ``data`` (``split``, default ``train``) validated on ``val_data``
    (``val_split``, default ``val``), or on the same set's ``val`` split when it has one."""
    if data is None:
        if any(v is not None for v in (images, val_data, val_images, split, val_split)):
            raise ValueError("--images, --val-data, --split and --val-split need --data")
        return {"kind": "shapes"}
    train = source(data, images, split, "train")
    if train["format"] == "coco" and images is None:
        raise ValueError("--data needs --images (the folder its file_name fields are in)")
    if train["format"] == "coco" and split is not None:
        raise ValueError(f"--split {split}: {data} is a COCO file, which is one split; --split "
                         "picks a split of a YOLO or VOC set")
    if val_data is None and val_images is not None:
        raise ValueError("--val-images needs --val-data")
    if val_data is not None:
        val = source(val_data, val_images, val_split, "val")
        if val["format"] == "coco" and val_images is None:
            raise ValueError("--val-data needs --val-images")
        if val["format"] == "coco" and val_split is not None:
            raise ValueError(f"--val-split {val_split}: {val_data} is a COCO file, which is "
                             "one split")
    elif train["format"] != "coco" and (val_split or "val") in split_names(data):
        val = source(data, None, val_split, "val")
    elif val_split is not None:
        raise ValueError(f"--val-split {val_split}: {data} has no such split")
    else:
        val = None
    if train["format"] == "coco" and (val is None or val["format"] == "coco"):
        return {"kind": "coco", "train_ann": train["path"], "train_images": train["images"],
                "val_ann": val and val["path"], "val_images": val and val["images"]}
    return {"kind": train["format"], "train": train, "val": val}


def spec_sources(spec: dict) -> tuple[dict, dict | None]:
    """``(train, val)`` sources of a non-shapes data spec, old COCO specs included."""
    if "train" in spec:
        return spec["train"], spec.get("val")
    train = {"format": "coco", "path": spec["train_ann"], "images": spec["train_images"],
             "split": None}
    val = spec.get("val_ann") and {"format": "coco", "path": spec["val_ann"],
                                   "images": spec["val_images"], "split": None}
    return train, val or None
