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
    """Bad input data; the message names the file and what to fix."""


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


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except OSError as e:
        raise DataError(f"image {path} cannot be read: {e}") from None


# -------------------------------------------------------------------------- datasets


class DetectionDataset(Dataset):
    """Common part: category mapping, epoch-seeded augmentation, COCO ground truth."""

    category_ids: list[int]
    class_names: list[str]

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
        return load_image(self.image_dir / self.images[index]["file_name"])

    def __getitem__(self, index: int):
        im = self.images[index]
        img = load_image(self.image_dir / im["file_name"])
        boxes, labels = self.targets[index]
        return self.make_sample(index, img, boxes, labels, im["id"])

    def coco_dict(self) -> dict:
        return self.data


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
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
                            f"{json.dumps(e)[:120]})")


def _image_problem(path: Path, verify: bool) -> str | None:
    if not path.is_file():
        return "missing"
    if verify:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return f"unreadable ({type(e).__name__})"
    return None


def validate_coco(ann_file: Path, image_dir: Path, verify_images: bool = True) -> dict:
    """Check a COCO-format dataset; returns a cleaned copy (degenerate boxes dropped,
    ``area``/``iscrowd`` filled in) or raises DataError naming the file and the fix."""
    data = _read_json(ann_file)
    _check_fields(ann_file, "images", data["images"], ("id", "file_name"))
    _check_fields(ann_file, "categories", data["categories"], ("id",))
    _check_fields(ann_file, "annotations", data["annotations"], ("image_id", "category_id", "bbox"))
    if not data["categories"]:
        raise DataError(f"{ann_file}: 'categories' is empty; list the classes the boxes are "
                        "of there, e.g. [{\"id\": 1, \"name\": \"forklift\"}]")
    images = {}
    for im in data["images"]:
        if im["id"] in images:
            raise DataError(f"{ann_file}: image id {im['id']} appears twice in 'images'")
        images[im["id"]] = im
    cat_ids = {c["id"] for c in data["categories"]}
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} not found (given with the annotations "
                        f"{ann_file})")
    paths = [image_dir / im["file_name"] for im in data["images"]]
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda p: _image_problem(p, verify_images), paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why]
    if bad:
        listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        raise DataError(f"{ann_file}: {len(bad)} of {len(paths)} images in {image_dir} are "
                        f"missing or unreadable: {listing}{' ...' if len(bad) > 5 else ''}. "
                        "Check --images and the 'file_name' fields")
    anns, dropped = [], 0
    for i, a in enumerate(data["annotations"]):
        where = f"{ann_file}: annotations[{i}] (id {a.get('id', '?')})"
        if a["image_id"] not in images:
            raise DataError(f"{where} refers to image id {a['image_id']}, which is not in "
                            "'images'")
        if a["category_id"] not in cat_ids:
            raise DataError(f"{where} has category_id {a['category_id']}, which is not in "
                            f"'categories' (ids: {sorted(cat_ids)[:20]})")
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise DataError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        im = images[a["image_id"]]
        x0, y0, w, h = bbox
        x1, y1 = x0 + w, y0 + h
        if "width" in im and "height" in im:  # clip to the image, as DETR does
            x0, x1 = min(max(x0, 0), im["width"]), min(max(x1, 0), im["width"])
            y0, y1 = min(max(y0, 0), im["height"]), min(max(y1, 0), im["height"])
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        anns.append({**a, "id": a.get("id", i + 1), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": a.get("area", (x1 - x0) * (y1 - y0)),
                     "iscrowd": a.get("iscrowd", 0)})
    if dropped:
        warnings.warn(f"{ann_file}: dropped {dropped} degenerate box(es) (width or height <= 0 "
                      "after clipping to the image)", stacklevel=2)
    return {**data, "annotations": anns}


def collate(batch):
    """Images stay a list (the model pads them); targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
