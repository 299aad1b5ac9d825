"""One split of a dataset as every reader hands it over, and the list of problems a reader
collects on its way through the files.

COCO is qdet's currency: whatever the format on disk (COCO JSON, a YOLO set, Pascal VOC),
a split is read into a COCO-style dict, so that the dataset class, evaluation
(pycocotools), reports and conversion never ask which format it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataProblems


@dataclass
class SplitData:
    """A split read from disk.

    ``data`` is COCO-style: ``images`` (``id``, ``file_name`` relative to ``image_root``,
    ``width``, ``height`` of the file), ``annotations`` (``id``, ``image_id``,
    ``category_id``, ``bbox`` [x, y, width, height] in pixels, ``area``, ``iscrowd``) and
    ``categories`` (``id``, ``name``). ``source`` is what messages call the split
    (``data/data.yaml (val)``); ``counts`` what a summary reports beside images and boxes
    (``backgrounds``, ``polygons``, ``difficult``, ...); ``notes`` what the reader accepted
    but should say once (a path read the way Roboflow means it)."""
    data: dict
    image_root: Path
    source: str
    format: str                      # coco, yolo or voc
    split: str | None = None         # None for a COCO file, which is one split
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.data["images"][index]["file_name"]

    def summary(self) -> str:
        """``12 images, 30 boxes of 3 classes (2 background images, 1 difficult)``."""
        d = self.data
        extra = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return (f"{len(d['images'])} images, {len(d['annotations'])} boxes of "
                f"{len(d['categories'])} classes" + (f" ({extra})" if extra else ""))


class Problems:
    """One line per problem, each naming the file and the line or element; raised together
    as :class:`~qdet.data.errors.DataProblems` once the reader has been through every file."""

    def __init__(self):
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < DataProblems.LIMIT:
            self.lines.append(line)

    def __bool__(self) -> bool:
        return self.count > 0

    def raise_any(self) -> None:
        if self.count:
            raise DataProblems(self.lines, self.count)


def shown(text: str, limit: int = 120) -> str:
    """Offending text as it is in the file, quoted and shortened: ``"0 0.5 abc 0.1"``."""
    text = text.strip()
    return '"' + (text if len(text) <= limit else text[:limit] + "...") + '"'
