"""Datasets: the built-in ``shapes`` data and a split of any dataset on disk (COCO JSON, a
YOLO set, Pascal VOC; ``qdet.data.formats``) give the same samples: ``(image [3,H,W]
normalized with ImageNet mean/std, target)`` where ``target`` holds ``labels`` (contiguous
0..K-1), ``boxes`` (normalized cx,cy,w,h), ``image_id``, ``orig_size`` and ``size`` (h, w).
Data on disk is checked before anything trains (``qdet.data.coco``, ``yolo``, ``voc``)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from . import shapes
from .coco import validate_coco
from .errors import DataError
from .formats import read_source, spec_sources
from .images import load_image
from .split import SplitData
from .transforms import AugmentConfig, augment, to_sample


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
    """The built-in synthetic data (see ``qdet.data.shapes``); category ids 1..K."""

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


class AnnotatedDataset(DetectionDataset):
    """A split read from disk in any format (``qdet.data.formats``: COCO JSON, a YOLO set,
    Pascal VOC), as the COCO-style data every reader produces and the folder its file
    names are relative to; crowd boxes (and VOC's difficult ones) are kept for evaluation
    and left out of training targets."""

    def __init__(self, split: SplitData, augment_cfg: AugmentConfig | None = None,
                 train: bool = True, seed: int = 0):
        super().__init__(augment_cfg or AugmentConfig(), train, seed)
        self.split_data, self.data = split, split.data
        self.image_dir, self.source = Path(split.image_root), split.source
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
            raise DataError(f"{self.source}: images[{index}] (id {im['id']}): {e}") from None

    def __getitem__(self, index: int):
        im = self.images[index]
        img = self.raw_image(index)
        boxes, labels = self.targets[index]
        return self.make_sample(index, img, boxes, labels, im["id"])

    def coco_dict(self) -> dict:
        return self.data


class CocoDataset(AnnotatedDataset):
    """COCO-format annotations + image folder, validated up front."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path,
                 augment_cfg: AugmentConfig | None = None, train: bool = True, seed: int = 0,
                 verify_images: bool = True):
        self.ann_file = Path(ann_file)
        data = validate_coco(self.ann_file, Path(image_dir), verify_images)
        super().__init__(SplitData(data, Path(image_dir), str(self.ann_file), "coco"),
                         augment_cfg, train, seed)


def open_source(src: dict, augment_cfg: AugmentConfig | None = None, train: bool = True,
                seed: int = 0, classes: list[str] | None = None) -> AnnotatedDataset:
    """The dataset of a data spec's source (``qdet.data.formats``); ``classes`` orders a
    VOC set's classes (the training split's, a checkpoint's)."""
    return AnnotatedDataset(read_source(src, classes), augment_cfg, train, seed)


def open_spec(spec: dict, augment_cfg: AugmentConfig, seed: int = 0):
    """``(train, val or None)`` datasets of a run's data spec other than the built-in data;
    the validation split takes the training split's class order."""
    train_src, val_src = spec_sources(spec)
    train_set = open_source(train_src, augment_cfg, True, seed)
    val_set = None if val_src is None else open_source(val_src, augment_cfg, False, seed,
                                                       classes=train_set.class_names)
    return train_set, val_set


def collate(batch):
    """Images stay a list (the model pads them); targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
