"""Reading a YOLO dataset (the layout Ultralytics documents and Roboflow exports) into a
COCO-style split (``qdet.data.split``).

A YOLO set is a YAML file: ``path`` (the root, optional: else the YAML's folder), ``train``,
``val`` (or ``validation``), optional ``test``, each a folder of images, a ``.txt`` list of
image paths, or a list of those; ``names`` as a list or an ``{id: name}`` map, ``nc``
optional. An image's labels are the ``.txt`` file at the same path with the last
``/images/`` replaced by ``/labels/`` (beside the image when there is none), one object per
line: ``class cx cy w h``, normalized by the image's width and height.

Where this reader and Ultralytics part, and why:

- A relative ``path:`` is read against the YAML's folder, then the current folder (Ultralytics
  tries the current folder, then a ``datasets_dir`` from its settings file): a set reads the
  same from anywhere, and nothing outside it decides where it is.
- ``download:`` is never run (Ultralytics may ``exec`` it); the YAML is read with PyYAML's
  safe loader, so a ``!!python/...`` tag is an error, never a call.
- Roboflow writes ``train: ../train/images``, relative to a folder that does not exist; as in
  Ultralytics, such an entry is read without the ``../``, but here it is said (once).
- Each label line is read by its own count of numbers: 4 after the class is a box, 6 or more
  in pairs a polygon (a segmentation label), read as its bounding box and counted. Ultralytics
  reads every line of a file as a polygon once one line is, and so misreads plain boxes
  beside polygons.
- A bad line stops with a line naming the file and line (Ultralytics drops the whole image as
  "corrupt" and trains on); every problem of the set is listed, not only the first.
- Unquoted ``yes``/``no``/``on``/``off`` in the YAML stay text: ``names: [yes, no]`` are two
  class names, not ``True``/``False`` (YAML 1.1's booleans).

Category ids are the YOLO classes plus one (COCO's ids start at 1): a set converted to COCO
and back keeps its classes, and so does a COCO set with ids 1..K converted to YOLO and back.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .coco import image_sizes
from .errors import DataError
from .split import Problems, SplitData, shown

# the suffixes Ultralytics finds in an image folder (IMG_FORMATS), so that a set means the
# same images here; a file among them that PIL cannot open is reported, not skipped
IMAGE_SUFFIXES = frozenset((".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff",
                            ".webp", ".pfm", ".heic"))
SPLITS = ("train", "val", "test")
YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
MAX_YAML_BYTES = 4 * 2 ** 20      # a dataset YAML is a few lines; 80k class names fit


@dataclass
class YoloSet:
    """A dataset YAML, read: its root folder, classes and each split's entries as written."""
    yaml: Path
    root: Path
    names: dict[int, str]                 # class -> name
    entries: dict[str, list[str]]         # split -> folders / list files, as written
    notes: list[str] = field(default_factory=list)


def find_yaml(path: Path) -> Path | None:
    """The dataset YAML ``path`` is or holds (``data.yaml`` first), None if none; DataError
    when a folder holds several and none has a usual name."""
    if path.is_file() or path.suffix.lower() in (".yaml", ".yml"):
        return path
    if not path.is_dir():
        return None
    for name in YAML_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".yaml", ".yml")
                   and p.is_file())
    if len(found) > 1:
        raise DataError(f"{path}: several YAML files ({', '.join(p.name for p in found)}) and "
                        "no data.yaml; pass the dataset's YAML file itself")
    return found[0] if found else None


def _loader():
    """PyYAML's safe loader (no tag builds a Python object), with YAML 1.1's boolean words
    left as text, so that class names such as ``no`` and ``off`` stay names."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag != "tag:yaml.org,2002:bool"]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return Loader


def _load_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise DataError(f"dataset YAML {path} not found"
                        + (" (it is a folder)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise DataError(f"{path}: {size:,} bytes, too large for a dataset YAML (at most "
                        f"{MAX_YAML_BYTES:,}); is it the right file?")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
    try:
        cfg = yaml.load(text, Loader=_loader())  # noqa: S506 - _loader() is a SafeLoader
    except yaml.constructor.ConstructorError as e:
        raise DataError(f"{path}: {_yaml_where(e)}refused: {e.problem}; qdet reads YAML with "
                        "PyYAML's safe loader, which builds plain values only (a "
                        "!!python/... tag would run code)") from None
    except yaml.YAMLError as e:
        what = "; ".join(filter(None, (getattr(e, "context", None),
                                       getattr(e, "problem", None)))) or str(e)
        raise DataError(f"{path}: not valid YAML ({_yaml_where(e)}{what})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a dataset YAML") from None
    if cfg is None:
        raise DataError(f"{path}: empty; a dataset YAML names train, val and the classes")
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected keys such as 'train', 'val' and 'names', found a "
                        f"{type(cfg).__name__}")
    return cfg


def _yaml_where(e) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def _names(path: Path, cfg: dict) -> dict[int, str]:
    raw, nc = cfg.get("names"), cfg.get("nc")
    if nc is not None and not (isinstance(nc, int) and nc >= 1):
        raise DataError(f"{path}: 'nc' must be the number of classes (an integer >= 1), got "
                        f"{shown(str(nc))}")
    if raw is None:
        if nc is None:
            raise DataError(f"{path}: no 'names' (the class names, e.g. names: [person, car]) "
                            "and no 'nc'")
        return {i: f"class_{i}" for i in range(nc)}
    if isinstance(raw, list):
        items = list(enumerate(raw))
    elif isinstance(raw, dict):
        items = []
        for key, value in raw.items():
            if isinstance(key, str) and key.strip().isdigit():
                key = int(key)
            if not isinstance(key, int) or key < 0:
                raise DataError(f"{path}: names: key {shown(str(key))} must be a class id "
                                "(an integer >= 0)")
            items.append((key, value))
    else:
        raise DataError(f"{path}: 'names' must be a list of class names or an {{id: name}} "
                        f"map, got {shown(str(raw))}")
    names = {}
    for key, value in items:
        if isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}: names[{key}] must be a class name, got "
                            f"{shown(str(value))}")
        names[key] = value
    if not names:
        raise DataError(f"{path}: 'names' is empty; list the classes the labels number")
    if nc is not None and nc != len(names):
        raise DataError(f"{path}: 'nc' is {nc} but 'names' has {len(names)} classes; fix one "
                        "(or drop 'nc')")
    return dict(sorted(names.items()))


def read_yolo_set(path: str | os.PathLike) -> YoloSet:
    """The dataset YAML at ``path`` (or in the folder ``path``), checked: classes, root and
    each split's entries; the entries themselves are read by :func:`read_yolo_split`."""
    path = Path(path)
    yaml_path = find_yaml(path)
    if yaml_path is None:
        raise DataError(f"{path}: no dataset YAML (data.yaml) in this folder")
    cfg = _load_yaml(yaml_path)
    names, notes = _names(yaml_path, cfg), []
    root = yaml_path.parent
    given = cfg.get("path")
    if given is not None and str(given).strip():
        if not isinstance(given, str):
            raise DataError(f"{yaml_path}: 'path' must be a folder, got {shown(str(given))}")
        here, cwd = root / Path(given).expanduser(), Path.cwd() / given
        if here.is_dir():
            root = here
        elif cwd.is_dir():
            root = cwd
            notes.append(f"{yaml_path}: 'path: {given}' read from the current folder ({cwd}), "
                         "as Ultralytics reads it: it is not a folder beside the YAML")
        else:
            notes.append(f"{yaml_path}: 'path: {given}' does not exist; reading the entries "
                         f"relative to the YAML's folder {root}")
    if cfg.get("val") is None and cfg.get("validation") is not None:
        cfg["val"] = cfg["validation"]
    entries = {}
    for split in SPLITS:
        value = cfg.get(split)
        if value is None or value == "":
            continue
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if not isinstance(v, str) or not v.strip()]
        if bad:
            raise DataError(f"{yaml_path}: '{split}' must be a folder, a .txt list of images "
                            f"or a list of those, got {shown(str(bad[0]))}")
        entries[split] = items
    if not entries:
        raise DataError(f"{yaml_path}: no 'train', 'val' or 'test' entry: name the image "
                        "folders (e.g. train: train/images)")
    return YoloSet(yaml_path, root, names, entries, notes)


def label_path(image: str) -> str:
    """Where an image's labels are (Ultralytics' rule): the last ``/images/`` of its absolute
    path replaced by ``/labels/``, the suffix by ``.txt``."""
    image = os.path.abspath(image)
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = image.rpartition(a)
    return os.path.splitext(head + b + tail if sep else image)[0] + ".txt"


def _resolve(ys: YoloSet, split: str, entry: str, notes: list, problems: Problems):
    path = Path(entry).expanduser()
    if not path.is_absolute():
        path = ys.root / path
    if path.exists():
        return path
    if entry.startswith("../") and (ys.root / entry[3:]).exists():
        # the same words for every entry, so that the note is said once
        notes.append(f"{ys.yaml}: paths starting with '../' that do not exist are read "
                     f"without it, from {ys.root} (Roboflow writes them relative to a folder "
                     "that is not there; Ultralytics reads them the same way)")
        return ys.root / entry[3:]
    problems.add(f"{ys.yaml}: {split}: {shown(entry)} not found (looked for {path})")
    return None


def _list_file(path: Path, problems: Problems) -> list[str]:
    """The images a ``.txt`` list names, one per line; relative lines are relative to the
    list's folder (``./images/a.jpg``, as Ultralytics and COCO's lists write them)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.add(f"{path}: cannot be read as a list of images ({e})")
        return []
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        image = Path(name).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            problems.add(f"{path}:{n}: image {shown(name)} not found (looked for {image})")
            continue
        found.append(os.path.abspath(image))
    return found


def _orphans(folder: Path, expected: set[str], problems: Problems) -> None:
    """Label files in the labels folder of an image folder that no image of it claims."""
    inside = os.path.abspath(folder) + os.sep
    labels = os.path.dirname(label_path(inside + "x"))
    if labels + os.sep == inside or not os.path.isdir(labels):
        return   # labels beside the images: other .txt files may live there too
    for txt in sorted(Path(labels).rglob("*.txt")):
        if str(txt) not in expected:
            problems.add(f"{txt}: a label file without an image (no image named "
                         f"{txt.stem}.* in {folder}); add the image or delete the label file")


def _parse_labels(label: str, size: tuple[int, int], classes: dict[int, str],
                  problems: Problems, counts: dict) -> list[tuple] | None:
    """``(class, x, y, w, h)`` in pixels per label line; None when the file does not exist
    (an image without objects)."""
    try:
        raw = Path(label).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        problems.add(f"{label}: cannot be read ({e.strerror or e})")
        return []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(f"{label}: not a UTF-8 text file ({e})")
        return []
    width, height = size
    boxes = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        where, said = f"{label}:{n}", f"(line: {shown(line)})"
        values = []
        for word in words:
            try:
                values.append(float(word))
            except ValueError:
                break
        if len(values) < len(words) or not all(map(math.isfinite, values)):
            bad = words[len(values)] if len(values) < len(words) else \
                next(w for w, v in zip(words, values) if not math.isfinite(v))
            problems.add(f"{where}: {shown(bad)} is not a number {said}")
            continue
        k = len(values) - 1
        if k != 4 and (k < 6 or k % 2):
            problems.add(f"{where}: {k} number(s) after the class; a box is 'class cx cy w h' "
                         f"(4), a polygon 'class x1 y1 x2 y2 x3 y3 ...' (3 or more points) "
                         f"{said}")
            continue
        cls = values[0]
        if not cls.is_integer() or int(cls) not in classes:
            ids = sorted(classes)
            problems.add(f"{where}: class {words[0]} is not in names (classes {ids[0]}-"
                         f"{ids[-1]}) {said}")
            continue
        outside = [w for w, v in zip(words[1:], values[1:]) if not 0 <= v <= 1]
        if outside:
            problems.add(f"{where}: {outside[0]} is outside [0, 1]; YOLO coordinates are "
                         f"fractions of the image's width and height {said}")
            continue
        if k == 4:
            cx, cy, w, h = values[1:]
            if w <= 0 or h <= 0:
                problems.add(f"{where}: width and height must be > 0 {said}")
                continue
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = values[1::2], values[2::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
            if x1 <= x0 or y1 <= y0:
                problems.add(f"{where}: the polygon has no width or no height {said}")
                continue
            counts["polygons read as boxes"] += 1
        boxes.append((int(cls), x0 * width, y0 * height, (x1 - x0) * width,
                      (y1 - y0) * height))
    return boxes


def read_yolo_split(source: YoloSet | str | os.PathLike, split: str,
                    verify: bool = True) -> SplitData:
    """One split of a YOLO set as COCO-style data (boxes in pixels, not clipped), after
    checking every image's header and every label line; raises DataProblems listing every
    problem found (file and line), or DataError for a problem of the YAML."""
    ys = source if isinstance(source, YoloSet) else read_yolo_set(source)
    if split not in ys.entries:
        raise DataError(f"{ys.yaml}: no '{split}' split (it has "
                        f"{', '.join(ys.entries)}); pick one with --split")
    problems, notes = Problems(), list(ys.notes)
    images: dict[str, None] = {}
    folders = []
    for entry in ys.entries[split]:
        path = _resolve(ys, split, entry, notes, problems)
        if path is None:
            continue
        if path.is_dir():
            found = sorted(os.path.abspath(p) for p in path.rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.add(f"{ys.yaml}: {split}: folder {path} holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            images.update(dict.fromkeys(found))
            folders.append(path)
        else:
            images.update(dict.fromkeys(_list_file(path, problems)))
    paths = list(images)
    labels = [label_path(p) for p in paths]
    for folder in folders:
        _orphans(folder, set(labels), problems)
    checked = image_sizes([Path(p) for p in paths], verify)
    counts = {"background images": 0, "polygons read as boxes": 0}
    per_image = []
    for path, label, (size, why) in zip(paths, labels, checked):
        if why:
            problems.add(f"image {path}: {why}")
            continue
        before = problems.count
        boxes = _parse_labels(label, size, ys.names, problems, counts)
        if boxes is None or (not boxes and problems.count == before):
            counts["background images"] += 1     # no label file, or an empty one
        per_image.append((path, size, boxes or []))
    if not paths and not problems:
        problems.add(f"{ys.yaml}: {split}: no images found")
    problems.raise_any()
    if counts["polygons read as boxes"]:
        notes.append(f"{ys.yaml} ({split}): {counts['polygons read as boxes']} segmentation "
                     "label line(s) (polygons) read as their bounding boxes")
    return _split_data(ys, split, per_image, counts, notes)


def _split_data(ys: YoloSet, split: str, per_image: list, counts: dict,
                notes: list) -> SplitData:
    root = os.path.commonpath([os.path.dirname(p) for p, _, _ in per_image])
    images, annotations = [], []
    for i, (path, (w, h), boxes) in enumerate(per_image, 1):
        images.append({"id": i, "file_name": os.path.relpath(path, root), "width": w,
                       "height": h})
        for cls, x, y, bw, bh in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": cls + 1, "bbox": [x, y, bw, bh],
                                "iscrowd": 0})
    if not annotations:
        raise DataError(f"{ys.yaml} ({split}): none of the {len(images)} images has a label "
                        "line: there is nothing to learn from or to be scored against")
    categories = [{"id": c + 1, "name": name} for c, name in ys.names.items()]
    return SplitData({"images": images, "annotations": annotations, "categories": categories},
                     Path(root), f"{ys.yaml} ({split})", "yolo", split, counts, notes)
