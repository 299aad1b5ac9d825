"""DETR's transforms (paper Sec. A.4): the evaluation resize, and the training pipeline of
random flips, crops and multi-scale resizes, on a PIL image and its pixel boxes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .images import normalize_image


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
