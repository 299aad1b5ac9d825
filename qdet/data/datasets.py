"""Datasets: the built-in ``shapes`` data and any COCO-format JSON with an image folder give
the same samples: ``(image [3,H,W] normalized with ImageNet mean/std, target)`` where
``target`` holds ``labels`` (contiguous 0..K-1), ``boxes`` (normalized cx,cy,w,h),
``image_id``, ``orig_size`` and ``size`` (h, w). COCO input is checked before anything
trains (``qdet.data.coco``)."""
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
from .images import load_image
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


def collate(batch):
    """Images stay a list (the model pads them); targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
