"""Datasets, DETR's augmentations, and COCO ground truth for evaluation.

Two sources give the same samples: the built-in ``shapes`` data and any COCO-format JSON
with an image folder (read through pycocotools). A sample is ``(image [3,H,W] normalized
with ImageNet mean/std, target)`` where ``target`` holds ``labels`` (contiguous 0..K-1),
``boxes`` (normalized cx,cy,w,h), ``image_id``, ``orig_size`` and ``size`` (h, w).

COCO input is checked before anything trains: malformed JSON, missing fields, unknown image
or category ids and missing or unreadable images are errors that name the file and what to
fix; degenerate boxes are dropped and counted in one warning; crowd boxes are kept for
evaluation and left out of training targets.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from . import shapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class DataError(ValueError):
    """Bad input data; the message names the file and what to fix, on one line."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises this type with the worker's whole traceback as the
        # message; keep the one line that was raised.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("\n", 1)[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


# ------------------------------------------------------------------------ transforms


@dataclass
class AugmentConfig:
    """DETR's augmentations (paper Sec. A.4), sizes in pixels of the shorter side."""
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    hflip: bool = True
    crop: bool = True                          # with p=0.5: resize, random crop, resize
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    eval_size: int = 800


def detr_resize_shape(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) with shorter side ``size`` and longer side at most ``max_size``,
    rounded exactly as the official DETR transforms (so evaluation reproduces its AP)."""
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _resize(img, boxes, size: int, max_size: int | None):
    h, w = img.height, img.width
    oh, ow = detr_resize_shape(h, w, size, max_size)
    if (oh, ow) == (h, w):
        return img, boxes
    return TF.resize(img, [oh, ow]), None if boxes is None else TF.resize(boxes, [oh, ow])


def normalize_image(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 ``[3,H,W]`` in [0, 1], normalized with ImageNet mean/std."""
    return TF.normalize(TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True),
                        IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(img: Image.Image, size: int, max_size: int | None) -> torch.Tensor:
    """The evaluation input of an image: DETR's resize (shorter side ``size``, longer at most
    ``max_size``) and normalization; the same as the datasets' evaluation samples (``augment``
    with ``train=False``, then ``to_sample``), which AP reproduction depends on."""
    return normalize_image(_resize(img, None, size, max_size)[0])


def augment(img: Image.Image, boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor,
            cfg: AugmentConfig, rng: np.random.Generator, train: bool):
    """DETR's train/eval pipeline on a PIL image and its xyxy pixel boxes."""
    if not train:
        img, boxes = _resize(img, boxes, cfg.eval_size, cfg.max_size)
        return img, boxes, labels
    if cfg.hflip and rng.random() < 0.5:
        img, boxes = TF.horizontal_flip(img), TF.horizontal_flip(boxes)
    if cfg.crop and rng.random() < 0.5:
        img, boxes = _resize(img, boxes, int(rng.choice(cfg.crop_scales)), None)
        lo, hi = cfg.crop_size
        cw = int(rng.integers(lo, min(img.width, hi) + 1)) if img.width > lo else img.width
        ch = int(rng.integers(lo, min(img.height, hi) + 1)) if img.height > lo else img.height
        top = int(rng.integers(0, img.height - ch + 1))
        left = int(rng.integers(0, img.width - cw + 1))
        img, boxes = TF.crop(img, top, left, ch, cw), TF.crop(boxes, top, left, ch, cw)
        boxes = TF.clamp_bounding_boxes(boxes)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = tv_tensors.wrap(boxes[keep], like=boxes), labels[keep]
    img, boxes = _resize(img, boxes, int(rng.choice(cfg.train_scales)), cfg.max_size)
    return img, boxes, labels


def to_sample(img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, image_id: int,
              orig_size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """PIL image + xyxy pixel boxes -> normalized image tensor + DETR-style target."""
    x = normalize_image(img)
    h, w = x.shape[-2:]
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    b = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                     (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=1)
    target = {"labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1), "boxes": b,
              "image_id": int(image_id), "orig_size": torch.tensor(orig_size),
              "size": torch.tensor([h, w])}
    return x, target


def max_pixels() -> int:
    """The largest image qdet opens, in pixels: PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default, about 9459 x 9459). The models
    resize to at most 1333 px anyway; raise the PIL value to open larger images."""
    return Image.MAX_IMAGE_PIXELS or 2 ** 63


@contextlib.contextmanager
def bomb_guard():
    """PIL warns about images over its pixel limit and refuses those over twice it; qdet
    refuses at the limit, so the warning becomes the error :func:`open_image` reports.
    Enter it in the main thread (warning filters are global), around threads too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(path: Path) -> Image.Image:
    """``Image.open`` (header only) or a DataError saying why not: missing, a symlink to
    nowhere, a folder, not an image, or over :func:`max_pixels` (use under
    :func:`bomb_guard`, or PIL also prints its warning)."""
    path = Path(path)
    try:
        if not path.exists():
            if path.is_symlink():
                raise DataError(f"image {path} is a symlink to nowhere "
                                f"({os.readlink(path)!r} does not exist)")
            raise DataError(f"image {path} not found")
        if not path.is_file():
            raise DataError(f"image {path} is not a file")
        im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} is too large: {e} (qdet opens at most {max_pixels():,} "
                        "pixels, PIL's decompression-bomb guard; downscale it)") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"image {path} cannot be read: {_reason(e)}") from None
    if im.width * im.height > max_pixels():
        im.close()
        raise DataError(f"image {path} is too large: {im.width} x {im.height} pixels, over "
                        f"qdet's limit of {max_pixels():,} (PIL's decompression-bomb guard); "
                        "downscale it")
    return im


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` as RGB, decoded, or a DataError naming the file."""
    with bomb_guard():
        im = open_image(path)
    try:
        with im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data shows only when decoded
        raise DataError(f"image {path} cannot be read: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or "no details"
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


# -------------------------------------------------------------------------- datasets


class DetectionDataset(Dataset):
    """Common part: category mapping, epoch-seeded augmentation, COCO ground truth."""

    category_ids: list[int]
    class_names: list[str]
    source: str                 # what messages call it: the annotation file, or the built-in data

    def __init__(self, augment_cfg: AugmentConfig, train: bool, seed: int = 0):
        self.augment_cfg, self.train, self.seed, self.epoch = augment_cfg, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index): resumable and the
        same in every worker process."""
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def make_sample(self, index, img, boxes, labels, image_id):
        orig = (img.height, img.width)
        bb = tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                      format="XYXY", canvas_size=orig)
        img, bb, labels = augment(img, bb, torch.as_tensor(labels, dtype=torch.int64),
                                  self.augment_cfg, self.rng(index), self.train)
        return to_sample(img, bb.as_subclass(torch.Tensor), labels, image_id, orig)

    def coco_gt(self) -> COCO:
        """pycocotools ground truth (original category ids) for COCOeval."""
        coco = COCO()
        coco.dataset = self.coco_dict()
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


class ShapesDataset(DetectionDataset):
    """The built-in synthetic data (see ``qdet.shapes``); category ids 1..K."""

    def __init__(self, split: str, cfg: shapes.ShapesConfig = shapes.ShapesConfig(),
                 augment_cfg: AugmentConfig | None = None, train: bool | None = None,
                 seed: int = 0):
        train = split == "train" if train is None else train
        aug = augment_cfg or AugmentConfig(train_scales=(cfg.image_size,), max_size=None,
                                           crop=False, eval_size=cfg.image_size)
        super().__init__(aug, train, seed)
        self.split, self.cfg = split, cfg
        self.source = f"the built-in shapes data ({split})"
        self.class_names = list(cfg.categories)
        self.category_ids = list(range(1, len(cfg.categories) + 1))

    def __len__(self) -> int:
        return shapes.num_images(self.cfg, self.split)

    def __getitem__(self, index: int):
        img, boxes, labels = shapes.render(self.cfg, self.split, index)
        return self.make_sample(index, img, boxes, labels, index)

    def raw_image(self, index: int) -> Image.Image:
        return shapes.render(self.cfg, self.split, index)[0]

    def coco_dict(self) -> dict:
        return shapes.coco_dict(self.cfg, self.split)


class CocoDataset(DetectionDataset):
    """COCO-format annotations + image folder, validated up front."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path,
                 augment_cfg: AugmentConfig | None = None, train: bool = True, seed: int = 0,
                 verify_images: bool = True):
        super().__init__(augment_cfg or AugmentConfig(), train, seed)
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.source = str(self.ann_file)
        self.data = validate_coco(self.ann_file, self.image_dir, verify_images)
        cats = sorted(self.data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = self.data["images"]
        per_image: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in self.data["annotations"]:
            if not a.get("iscrowd", 0):
                per_image[a["image_id"]].append(a)
        self.targets = []
        for im in self.images:
            anns = per_image[im["id"]]
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                      a["bbox"][1] + a["bbox"][3]] for a in anns]
            self.targets.append((boxes, [label_of[a["category_id"]] for a in anns]))

    def __len__(self) -> int:
        return len(self.images)

    def raw_image(self, index: int) -> Image.Image:
        im = self.images[index]
        try:
            return load_image(self.image_dir / im["file_name"])
        except DataError as e:  # decoding finds what the header check could not (a cut JPEG)
            raise DataError(f"{self.ann_file}: images[{index}] (id {im['id']}): {e}") from None

    def __getitem__(self, index: int):
        im = self.images[index]
        img = self.raw_image(index)
        boxes, labels = self.targets[index]
        return self.make_sample(index, img, boxes, labels, im["id"])

    def coco_dict(self) -> dict:
        return self.data


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file {path} not found"
                        + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 100k deep
        raise DataError(f"{path}: cannot be parsed ({type(e).__name__}: {str(e)[:120]})"
                        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and "
                        f"'categories', found a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing the list '{key}' (COCO format needs 'images', "
                            "'annotations' and 'categories')")
    return data


def _check_fields(path: Path, kind: str, entries: list, fields: tuple[str, ...]) -> None:
    for i, e in enumerate(entries):
        missing = [f for f in fields if not isinstance(e, dict) or f not in e]
        if missing:
            raise DataError(f"{path}: {kind}[{i}] lacks field(s) {missing} (entry: "
                            f"{_show(e)})")


def _show(value, limit: int = 120) -> str:
    """A JSON value as it appears in the file, shortened."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite JSON number (true/false are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        return False


def _name_problem(name) -> str | None:
    """Why ``name`` cannot be a file name under the image folder, if it cannot. Names are
    relative paths that stay inside the folder; symlinks in it are followed."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "\0" in name:
        return "contains a NUL character"
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return "contains characters no file name can hold"
    path = Path(name)
    if path.is_absolute():
        return "is an absolute path; file names are relative to the image folder"
    if ".." in path.parts:
        return "leaves the image folder ('..'); file names are relative to it"
    return None


def _check_images(path: Path, images: list) -> dict:
    """``images`` -> {id: entry}; ids are unique integers, file names stay in the folder,
    declared sizes are positive numbers."""
    by_id = {}
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        if not _is_int(im["id"]):
            raise DataError(f"{where}: 'id' must be an integer, got {_show(im['id'])}")
        where += f" (id {im['id']})"
        if im["id"] in by_id:
            raise DataError(f"{where}: image id {im['id']} appears twice in 'images'")
        problem = _name_problem(im["file_name"])
        if problem:
            raise DataError(f"{where}: file_name {_show(im['file_name'])} {problem}")
        for key in ("width", "height"):
            if key in im and not (_is_number(im[key]) and im[key] > 0):
                raise DataError(f"{where}: '{key}' must be a positive number of pixels, got "
                                f"{_show(im[key])}; fix it or leave it out")
        by_id[im["id"]] = im
    return by_id


def _check_categories(path: Path, categories: list) -> set:
    if not categories:
        raise DataError(f"{path}: 'categories' is empty; list the classes the boxes are "
                        "of there, e.g. [{\"id\": 1, \"name\": \"forklift\"}]")
    ids = set()
    for i, c in enumerate(categories):
        if not _is_int(c["id"]):
            raise DataError(f"{path}: categories[{i}]: 'id' must be an integer, got "
                            f"{_show(c['id'])}")
        if c["id"] in ids:
            raise DataError(f"{path}: categories[{i}]: category id {c['id']} appears twice")
        ids.add(c["id"])
    return ids


def _image_problem(path: Path, verify: bool) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` of a readable image file, or ``(None, why not)``. Reads
    the header (and with ``verify`` PIL's checks, e.g. PNG checksums), not the pixels."""
    try:
        with open_image(path) as im:
            size = im.size
            if verify:
                im.verify()
        return size, None
    except DataError as e:
        why = str(e).removeprefix(f"image {path} ").removeprefix("is ")
        return None, {"not found": "missing"}.get(why, why.replace("cannot be read", "unreadable"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return None, f"unreadable: {_reason(e)}"


def _check_files(path: Path, image_dir: Path, images: list, verify: bool) -> list:
    """The (width, height) of every image file, checked against the declared sizes."""
    if not images:
        raise DataError(f"{path}: 'images' is empty: there is nothing to train or evaluate "
                        "on; list the image files in 'images'")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} not found (given with the annotations "
                        f"{path})")
    files = [image_dir / im["file_name"] for im in images]
    with bomb_guard(), ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(lambda p: _image_problem(p, verify), files))
    bad = [(i, why) for i, (_, why) in enumerate(checked) if why]
    if bad:
        listing = "; ".join(f"images[{i}] {files[i]} ({why})" for i, why in bad[:5])
        raise DataError(f"{path}: {len(bad)} of {len(files)} images in {image_dir} are "
                        f"missing or unreadable: {listing}{' ...' if len(bad) > 5 else ''}. "
                        "Check --images and the 'file_name' fields")
    sizes = [size for size, _ in checked]
    for i, (im, (w, h)) in enumerate(zip(images, sizes)):
        declared = (im.get("width", w), im.get("height", h))
        if declared != (w, h):
            raise DataError(f"{path}: images[{i}] (id {im['id']}, {_show(im['file_name'])}): "
                            f"width x height is {declared[0]} x {declared[1]} in the JSON but "
                            f"{w} x {h} in the file; fix the entry or leave the sizes out")
    return sizes


def _check_annotations(path: Path, annotations: list, images: dict, cat_ids: set,
                       sizes: dict) -> tuple[list, int]:
    """The annotations with their boxes clipped to their images; degenerate ones dropped
    (and counted); ids unique (missing ones numbered after the largest)."""
    if not annotations:
        raise DataError(f"{path}: 'annotations' is empty: none of the {len(images)} images "
                        "has a box to learn from or to be scored against")
    ids = [a.get("id") for a in annotations]
    next_id = max([i for i in ids if _is_int(i)], default=0) + 1
    seen: dict[int, int] = {}
    anns, dropped = [], 0
    for i, a in enumerate(annotations):
        where = f"{path}: annotations[{i}] (id {_show(a.get('id', '?'))})"
        if "id" in a:
            if not _is_int(a["id"]):
                raise DataError(f"{where}: 'id' must be an integer, got {_show(a['id'])}")
            if a["id"] in seen:
                raise DataError(f"{where}: annotation id {a['id']} appears twice (also "
                                f"annotations[{seen[a['id']]}])")
            seen[a["id"]] = i
        for key, kind in (("image_id", "images"), ("category_id", "categories")):
            if not _is_int(a[key]):
                raise DataError(f"{where}: '{key}' must be an integer (an id in '{kind}'), "
                                f"got {_show(a[key])}")
        if a["image_id"] not in images:
            raise DataError(f"{where} refers to image id {a['image_id']}, which is not in "
                            "'images'")
        if a["category_id"] not in cat_ids:
            raise DataError(f"{where} has category_id {a['category_id']}, which is not in "
                            f"'categories' (ids: {sorted(cat_ids)[:20]})")
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise DataError(f"{where}: bbox must be [x, y, width, height] in pixels (4 finite "
                            f"numbers), got {_show(bbox)}")
        if a.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {_show(a['iscrowd'])}")
        if "area" in a and not (_is_number(a["area"]) and a["area"] >= 0):
            raise DataError(f"{where}: 'area' must be a number >= 0, got {_show(a['area'])}; "
                            "fix it or leave it out")
        x0, y0, w, h = (float(v) for v in bbox)
        x1, y1 = x0 + w, y0 + h
        size = sizes.get(a["image_id"])
        if size is not None:  # clip to the image, as DETR does
            x0, x1 = min(max(x0, 0.0), size[0]), min(max(x1, 0.0), size[0])
            y0, y1 = min(max(y0, 0.0), size[1]), min(max(y1, 0.0), size[1])
        if not all(map(math.isfinite, (x1, y1))):
            raise DataError(f"{where}: bbox {_show(bbox)} reaches past any image")
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        ann_id = a["id"] if "id" in a else next_id + i
        anns.append({**a, "id": ann_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": a.get("area", (x1 - x0) * (y1 - y0)),
                     "iscrowd": int(a.get("iscrowd", 0))})
    if not anns:
        raise DataError(f"{path}: all {len(annotations)} boxes in 'annotations' are degenerate "
                        "(width or height <= 0 after clipping to their image): none is left")
    return anns, dropped


def validate_coco(ann_file: Path, image_dir: Path, verify_images: bool = True) -> dict:
    """Check a COCO-format dataset; returns a cleaned copy (boxes clipped to their images,
    degenerate ones dropped, ``id``/``area``/``iscrowd`` filled in) or raises DataError
    naming the file, the entry and the fix. Image files are checked by their headers (and
    PIL's ``verify``); a file whose pixels are cut short is found when it is decoded."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = _read_json(ann_file)
    _check_fields(ann_file, "images", data["images"], ("id", "file_name"))
    _check_fields(ann_file, "categories", data["categories"], ("id",))
    _check_fields(ann_file, "annotations", data["annotations"], ("image_id", "category_id", "bbox"))
    images = _check_images(ann_file, data["images"])
    cat_ids = _check_categories(ann_file, data["categories"])
    file_sizes = _check_files(ann_file, image_dir, data["images"], verify_images)
    sizes = {im["id"]: size for im, size in zip(data["images"], file_sizes)}
    anns, dropped = _check_annotations(ann_file, data["annotations"], images, cat_ids, sizes)
    if dropped:
        warnings.warn(f"{ann_file}: dropped {dropped} degenerate box(es) (width or height <= 0 "
                      "after clipping to the image)", stacklevel=2)
    return {**data, "annotations": anns}


def collate(batch):
    """Images stay a list (the model pads them); targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
