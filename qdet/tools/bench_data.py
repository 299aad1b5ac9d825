"""``qdet bench data``: how fast each dataset format is read and converted, on the built-in
data written as COCO (``images`` training images of 128 px), converted to YOLO by ``qdet
data convert`` and written as Pascal VOC here. Reading is everything ``qdet train`` does
before its first step (every label or annotation parsed and checked, every image header
read); the ratio is against reading the same images as COCO, in the same process. Not a
test: numbers depend on the machine and its disk cache (each reading is timed after one
untimed pass, so the files are cached)."""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..common.files import place_file, write_atomic
from ..data.convert import convert
from ..data.formats import read_split
from ..data.shapes import ShapesConfig, coco_dict, write_coco


def write_voc(coco: dict, image_dir: Path, out: Path) -> Path:
    """A VOC year folder of the COCO-style ``coco`` (corners by qdet's convention, the
    inverse of ``qdet.data.voc``: xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h)."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]].append(a)
    ids = []
    for im in coco["images"]:
        image_id = Path(im["file_name"]).stem
        ids.append(image_id)
        place_file(image_dir / im["file_name"], out / "JPEGImages" / im["file_name"])
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin><xmax>{x + w:g}</xmax>"
            f"<ymax>{y + h:g}</ymax></bndbox></object>"
            for a in per_image[im["id"]] for x, y, w, h in [a["bbox"]])
        write_atomic(out / "Annotations" / f"{image_id}.xml",
                     f"<annotation><filename>{im['file_name']}</filename><size><width>"
                     f"{im['width']}</width><height>{im['height']}</height></size>{objects}"
                     "</annotation>", durable=False)
    write_atomic(out / "ImageSets" / "Main" / "train.txt", "".join(i + "\n" for i in ids))
    return out


def _median_seconds(fn, repeat: int) -> float:
    fn()   # untimed: the files come into the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_data(images: int = 4000, repeat: int = 3, workdir: str | None = None) -> dict:
    """Reading speed of each format and conversion speed, on ``images`` built-in images.
    Returns ``{"images", "reading": [rows], "conversion": [rows]}``."""
    base = Path(tempfile.mkdtemp(prefix="qdet-bench-data-", dir=workdir))
    try:
        cfg = ShapesConfig(train_images=images, val_images=1)
        written = write_coco(cfg, base / "coco")
        coco_ann, coco_images = written["train"], base / "coco" / "train"
        write_voc(coco_dict(cfg, "train"), coco_images, base / "voc")
        conversion = []
        for name, src, to, out, kw in (
                ("coco -> yolo (links)", coco_ann, "yolo", "yolo", {"images": coco_images}),
                ("coco -> yolo (--copy)", coco_ann, "yolo", "yolo-copy",
                 {"images": coco_images, "copy": True}),
                ("yolo -> coco (links)", base / "yolo", "coco", "coco-again", {}),
                ("voc -> coco (links)", base / "voc", "coco", "coco-voc", {})):
            t0 = time.perf_counter()
            convert(src, base / out, to, **kw)
            seconds = time.perf_counter() - t0
            conversion.append({"conversion": name, "seconds": seconds,
                               "images_per_s": images / seconds})
        sources = (("coco", (coco_ann, None, coco_images)),
                   ("yolo", (base / "yolo", "train", None)),
                   ("voc", (base / "voc", "train", None)))
        reading = []
        for fmt, (path, split, folder) in sources:
            seconds = _median_seconds(lambda: read_split(path, split, folder), repeat)
            reading.append({"format": fmt, "seconds": seconds, "images_per_s": images / seconds})
        for row in reading:
            row["vs_coco"] = reading[0]["seconds"] / row["seconds"]
        return {"images": images, "reading": reading, "conversion": conversion}
    finally:
        shutil.rmtree(base, ignore_errors=True)
