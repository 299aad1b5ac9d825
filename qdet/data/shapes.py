"""``shapes``: the built-in synthetic detection data, so qdet trains with no download.

Each image is drawn from its own seed (``seed``, split, index), so a split is the same on
every machine and in every worker, and nothing is stored. Objects are filled shapes of
several categories in varied colours, sizes, counts and overlaps, on solid, gradient or
noisy backgrounds. A shape's box is its tight bounding box; a shape may be partly covered by
a later one, but never mostly (at most ``max_covered`` of its box).

``categories`` picks the kinds drawn (default: the five of ``CATEGORIES``; ``KINDS`` has three
more), so a dataset whose classes are partly those of the built-in data and partly new is
one option away (``qdet data shapes OUT --categories ...``, used to show fine-tuning).
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..common.files import write_atomic
from .images import save_image

CATEGORIES = ("rectangle", "ellipse", "triangle", "cross", "star")
KINDS = CATEGORIES + ("hexagon", "diamond", "ring")
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.15     # object side, as a fraction of the image side
    max_size: float = 0.45
    max_covered: float = 0.4   # at most this fraction of a box may be covered by later shapes
    train_images: int = 4000
    val_images: int = 200
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES   # the kinds drawn, label i = categories[i]

    def __post_init__(self):
        unknown = [c for c in self.categories if c not in KINDS]
        if unknown or not self.categories:
            raise ValueError(f"shapes categories {list(self.categories)}: choose from "
                             f"{', '.join(KINDS)}")


def _colour(rng: np.random.Generator, avoid: float | None = None) -> tuple[int, int, int]:
    """A saturated colour; with ``avoid``, one whose brightness differs from it."""
    for _ in range(20):
        h, s, v = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)
        if avoid is None or abs(v - avoid) > 0.3:
            break
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, float]:
    """Solid, gradient or smooth-noise background; returns it and its mean brightness."""
    kind = rng.integers(3)
    v = rng.uniform(0.0, 1.0)
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), v)) * 255
    if kind == 0:
        arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    elif kind == 1:
        other = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), v)) * 255
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[:, None] if rng.random() < 0.5 else t[None, :]
        arr = base + (other - base) * np.broadcast_to(t, (size, size))[..., None]
    else:
        coarse = rng.normal(0, 25, (8, 8, 3)).astype(np.float32)
        noise = np.asarray(Image.fromarray(coarse[..., 0]).resize((size, size), Image.BILINEAR))
        arr = base + noise[..., None] + rng.normal(0, 6, (size, size, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img, v


def _polygon(kind: str, cx: float, cy: float, w: float, h: float, angle: float):
    if kind == "triangle":
        pts = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
    elif kind == "hexagon":
        pts = [(math.cos(i * math.pi / 3), math.sin(i * math.pi / 3)) for i in range(6)]
    elif kind == "diamond":
        pts = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    elif kind == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                -(1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    else:  # cross
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
               (-a, a), (-1, a), (-1, -a), (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x * c - y * s) * w / 2, cy + (x * s + y * c) * h / 2) for x, y in pts]


def _covered(box, by) -> float:
    """Fraction of ``box``'s area inside ``by`` (both x0, y0, x1, y1)."""
    iw = max(0.0, min(box[2], by[2]) - max(box[0], by[0]))
    ih = max(0.0, min(box[3], by[3]) - max(box[1], by[1]))
    return iw * ih / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)


def render(cfg: ShapesConfig, split: str, index: int) -> tuple[Image.Image, list, list]:
    """Draw one image: ``(PIL RGB image, boxes [[x0,y0,x1,y1]...], labels [int...])``."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    size = cfg.image_size
    img, brightness = _background(rng, size)
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(cfg.categories)))
            kind = cfg.categories[label]
            w = rng.uniform(cfg.min_size, cfg.max_size) * size
            h = w * rng.uniform(0.6, 1.6) if kind != "star" else w
            h = min(h, cfg.max_size * size * 1.2)
            cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
            if kind in ("rectangle", "ellipse", "ring"):
                pts = [(cx - w / 2, cy - h / 2), (cx + w / 2, cy + h / 2)]
            else:
                angle = rng.uniform(-0.3, 0.3) if kind != "cross" else 0.0
                pts = _polygon(kind, cx, cy, w, h, angle)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [max(0.0, min(xs)), max(0.0, min(ys)), min(size, max(xs)), min(size, max(ys))]
            if all(_covered(b, box) <= cfg.max_covered for b in boxes):
                break
        else:
            continue  # no room for another object
        fill = _colour(rng, avoid=brightness)
        if kind == "rectangle":
            draw.rectangle(pts, fill=fill)
        elif kind == "ellipse":
            draw.ellipse(pts, fill=fill)
        elif kind == "ring":
            draw.ellipse(pts, outline=fill, width=max(2, round(min(w, h) / 6)))
        else:
            draw.polygon(pts, fill=fill)
        boxes.append(box)
        labels.append(label)
    return img, boxes, labels


def num_images(cfg: ShapesConfig, split: str) -> int:
    return cfg.train_images if split == "train" else cfg.val_images


def coco_dict(cfg: ShapesConfig, split: str) -> dict:
    """The split's annotations in COCO format (category ids 1..K, boxes x,y,w,h)."""
    images, anns = [], []
    for i in range(num_images(cfg, split)):
        _, boxes, labels = render(cfg, split, i)
        images.append({"id": i, "file_name": f"{i:06d}.png",
                       "width": cfg.image_size, "height": cfg.image_size})
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": 0})
    cats = [{"id": k + 1, "name": n, "supercategory": "shape"}
            for k, n in enumerate(cfg.categories)]
    return {"images": images, "annotations": anns, "categories": cats}


def write_coco(cfg: ShapesConfig, out: Path, progress=None) -> dict[str, Path]:
    """Write ``train``/``val`` as ``OUT/{split}.json`` + ``OUT/{split}/*.png``."""
    out = Path(out)
    written = {}
    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(num_images(cfg, split)):
            save_image(render(cfg, split, i)[0], folder / f"{i:06d}.png")
            if progress is not None:
                progress()
        ann = out / f"{split}.json"
        write_atomic(ann, json.dumps(coco_dict(cfg, split)))
        written[split] = ann
    return written
