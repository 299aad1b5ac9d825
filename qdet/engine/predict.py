"""Inference on image files, and finding the images and videos ``qdet predict`` is given."""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..blocks.base import Detector, model_device, postprocess
from ..data.errors import DataError
from ..data.images import load_image
from ..data.transforms import eval_transform
from ..data.video import is_video_name, looks_like_video


@torch.inference_mode()
def detect(model: Detector, images: list[Image.Image], threshold: float = 0.5,
           batch_size: int = 4, bf16: bool = False) -> list[list[dict]]:
    """Detections above ``threshold`` for PIL images, in their own pixel coordinates."""
    device = model_device(model)
    size, max_size = model.preprocess["size"], model.preprocess["max_size"]
    results = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        xs = [eval_transform(im, size, max_size).to(device) for im in chunk]
        sizes = torch.tensor([[im.height, im.width] for im in chunk], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(xs)
        for det in postprocess(outputs, sizes, model.focal, model.max_detections):
            keep = det["scores"] >= threshold
            order = det["scores"][keep].argsort(descending=True)
            results.append([
                {"label": int(lab), "name": model.class_names[lab],
                 "category_id": int(model.category_ids[lab]), "score": float(s),
                 "box": [round(float(v), 2) for v in box]}
                for s, lab, box in zip(det["scores"][keep][order], det["labels"][keep][order],
                                       det["boxes"][keep][order])])
    return results


def is_image_name(path: Path) -> bool:
    """Whether the file's extension is one PIL opens (how folders are searched)."""
    return path.suffix.lower() in Image.registered_extensions()


def is_video(path: Path, named: bool = False) -> bool:
    """Whether ``qdet predict`` reads ``path`` as a video: a video suffix (``.mp4``, ...);
    or, for a file ``named`` on the command line with neither an image's nor a video's
    suffix, one that PyAV opens as a moving picture."""
    if is_video_name(path):
        return True
    return named and not is_image_name(path) and looks_like_video(path)


def find_images(inputs: list[str]) -> tuple[list[Path], dict[Path, int]]:
    """The image and video files that ``qdet predict`` arguments name: a file as given
    (whatever its extension), every file with an image or video extension under a folder
    (recursively), or the files a glob pattern matches (``"photos/**/*.jpg"``). Returns the
    files, sorted within each argument and without repeats, and per folder how many other
    files were skipped. Raises DataError for ``-``, a URL, or a name that matches
    nothing."""
    files, skipped = {}, {}
    for arg in inputs:
        if arg == "-":
            raise DataError("'-': reading an image from standard input is not supported; "
                            "save it to a file and pass its path")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", arg):
            raise DataError(f"{arg!r} is a URL; qdet predict reads local files only: "
                            "download the image first")
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            images = [p for p in found if is_image_name(p) or is_video_name(p)]
            if len(images) < len(found):
                skipped[path] = len(found) - len(images)
            if not images:
                raise DataError(f"folder {path} holds no image or video files "
                                f"({len(found)} other file(s))")
        elif path.exists() or path.is_symlink():
            images = [path]  # named explicitly: tried whatever it is, its error said
        elif any(c in arg for c in "*?["):  # a pattern the shell did not expand
            images = sorted(Path(p) for p in glob.glob(arg, recursive=True)
                            if Path(p).is_file())
            if not images:
                raise DataError(f"no file matches {arg!r}")
        else:
            raise DataError(f"image {arg} not found")
        files.update(dict.fromkeys(images))
    return list(files), skipped


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct ``STEM_pred.png`` per image (``a/x.jpg`` and ``b/x.jpg`` from a folder
    would collide): repeats get ``-2``, ``-3``, ..."""
    names, used = {}, set()
    for p in paths:
        name, k = f"{p.stem}_pred.png", 2
        while name in used:
            name, k = f"{p.stem}-{k}_pred.png", k + 1
        names[p] = name
        used.add(name)
    return names


def predict_files(model: Detector, paths: list[Path], threshold: float = 0.5,
                  bf16: bool = False,
                  on_error: Callable[[Path, str], None] | None = None) -> list[dict]:
    """Run the model on image files; one dict per image with its detections. An image that
    cannot be read raises DataError, or with ``on_error`` is reported to it and skipped."""
    out = []
    for path in paths:
        try:
            img = load_image(Path(path))
        except DataError as e:
            if on_error is None:
                raise
            on_error(Path(path), str(e))
            continue
        dets = detect(model, [img], threshold, bf16=bf16)[0]
        out.append({"image": str(path), "width": img.width, "height": img.height,
                    "detections": dets})
    return out
