"""Checking a COCO-format dataset before anything trains on it.

Malformed JSON, missing fields, unknown image or category ids and missing or unreadable
images are errors that name the file, the entry and what to fix; degenerate boxes are
dropped and counted in one warning; crowd boxes are kept for evaluation and left out of
training targets. Image files are checked by their headers, not decoded.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import DataError
from .images import bomb_guard, error_reason, open_image


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


def name_problem(name) -> str | None:
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
        problem = name_problem(im["file_name"])
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


def image_problem(path: Path, verify: bool) -> tuple[tuple[int, int] | None, str | None]:
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
        return None, f"unreadable: {error_reason(e)}"


def image_sizes(files: list[Path], verify: bool = True) -> list:
    """:func:`image_problem` of every file, read in threads (headers are small reads, so
    the disk's latency, not the CPU, sets the pace)."""
    with bomb_guard(), ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: image_problem(p, verify), files))


def _check_files(path: Path, image_dir: Path, images: list, verify: bool) -> list:
    """The (width, height) of every image file, checked against the declared sizes."""
    if not images:
        raise DataError(f"{path}: 'images' is empty: there is nothing to train or evaluate "
                        "on; list the image files in 'images'")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} not found (given with the annotations "
                        f"{path})")
    files = [image_dir / im["file_name"] for im in images]
    checked = image_sizes(files, verify)
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


def _check_annotations(path: Path | str, annotations: list, images: dict, cat_ids: set,
                       sizes: dict, clip: bool = True) -> tuple[list, int]:
    """The annotations with their boxes clipped to their images (``clip``); degenerate ones
    dropped (and counted); ids unique (missing ones numbered after the largest)."""
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
        if size is not None and clip:  # clip to the image, as DETR does
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


def validate_coco(ann_file: Path, image_dir: Path, verify_images: bool = True,
                  clip: bool = True) -> dict:
    """Check a COCO-format dataset; returns a cleaned copy (boxes clipped to their images,
    degenerate ones dropped, ``id``/``area``/``iscrowd`` and each image's ``width``/``height``
    filled in) or raises DataError
    naming the file, the entry and the fix. Image files are checked by their headers (and
    PIL's ``verify``); a file whose pixels are cut short is found when it is decoded.
    ``clip=False`` keeps boxes as written (conversion copies them exactly)."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = _read_json(ann_file)
    _check_fields(ann_file, "images", data["images"], ("id", "file_name"))
    _check_fields(ann_file, "categories", data["categories"], ("id",))
    _check_fields(ann_file, "annotations", data["annotations"], ("image_id", "category_id", "bbox"))
    images = _check_images(ann_file, data["images"])
    cat_ids = _check_categories(ann_file, data["categories"])
    file_sizes = _check_files(ann_file, image_dir, data["images"], verify_images)
    sizes = {im["id"]: size for im, size in zip(data["images"], file_sizes)}
    anns, dropped = _check_annotations(ann_file, data["annotations"], images, cat_ids, sizes,
                                       clip)
    _warn_dropped(ann_file, dropped)
    images = [{**im, "width": w, "height": h} for im, (w, h) in zip(data["images"], file_sizes)]
    return {**data, "images": images, "annotations": anns}


def _warn_dropped(source, dropped: int) -> None:
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} degenerate box(es) (width or height <= 0 "
                      "after clipping to the image)", stacklevel=3)


def check_coco_dict(data: dict, source: str, clip: bool = True) -> dict:
    """The checks of :func:`validate_coco` that need no file, on a dict a YOLO or VOC reader
    built (which has read every image's header and every label itself, and says where a
    problem is in its own files' terms): the same cleaned copy, boxes clipped to the sizes
    in ``images`` (unless ``clip`` is False), degenerate ones dropped and counted. A failure
    here is a bug of the reader, not of the data."""
    images = _check_images(source, data["images"])
    cat_ids = _check_categories(source, data["categories"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    anns, dropped = _check_annotations(source, data["annotations"], images, cat_ids, sizes,
                                       clip)
    _warn_dropped(source, dropped)
    return {**data, "annotations": anns}
