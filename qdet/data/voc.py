"""Reading a Pascal VOC dataset into a COCO-style split (``qdet.data.split``).

Layout: a year folder (``VOC2007/``) with ``Annotations/<id>.xml``, ``JPEGImages/`` and
``ImageSets/Main/<split>.txt`` (``train``, ``val``, ``trainval``, ``test``: one image id a
line), or a devkit folder holding year folders (``VOCdevkit/VOC2007``, ``VOC2012``), whose
split is the union of its years' splits of that name (07+12 training: ``--split
trainval``). Only ``<split>.txt`` is read: ``<class>_<split>.txt`` are per-class
classification lists, not splits.

Boxes. VOC's corners are 1-based, inclusive pixel indices: ``(xmin, ymin) = (1, 1)`` is the
top-left pixel and ``xmax = W`` the last column. qdet follows detectron2: ``x0 = xmin - 1,
y0 = ymin - 1, x1 = xmax, y1 = ymax``, the box's pixel edges in the continuous coordinates
COCO boxes use, so ``(1, 1, W, H)`` is exactly the image ``[0, W] x [0, H]`` and a box keeps
its width in pixels (``xmax - xmin + 1``). mmdetection subtracts 1 from all four corners (a
box one pixel narrower and shifted), torchvision from none (shifted one pixel right and
down). Tools that write 0-based edges (CVAT's float corners; LabelImg, which also clamps
``xmin`` to 1) come out one pixel wider at the left and top under this rule, which is below
annotation noise. Corners are read as numbers (CVAT writes ``1484.83984375``), never cut to
integers.

Difficult objects. ``<difficult>1</difficult>`` becomes a crowd box (``iscrowd: 1``): left
out of the training targets, as COCO's crowd boxes are, and ignored by pycocotools in
evaluation, so a detection on one is neither a true nor a false positive, as in the VOC
protocol (which counts a detection on it when IoU >= 0.5; pycocotools counts the share of
the detection inside the crowd box: alike, not identical). mmdetection ignores them the same
way; detectron2 trains on them.

Classes are the names found, sorted (ids 1..K); given an order (a checkpoint's classes, or
the training split's), those keep their ids and new names follow, sorted, so that a
training and a validation split, and a model and its data, agree.

Safety. XML is parsed with defusedxml, DTDs forbidden: entity expansion ("billion laughs")
can take gigabytes from a few hundred bytes and external entities read local files or URLs;
VOC annotations never need a DTD, so a file that declares one is refused before anything is
expanded, whatever version of expat Python is linked with.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .coco import image_sizes, name_problem
from .errors import DataError
from .split import Problems, SplitData, shown

MAX_XML_BYTES = 8 * 2 ** 20       # a VOC file with 1,000 objects is ~250 kB


def is_year(path: Path) -> bool:
    """Whether ``path`` is a VOC year folder (``Annotations/`` and ``ImageSets/Main/`` or
    ``JPEGImages/``)."""
    return (path / "Annotations").is_dir() and ((path / "ImageSets" / "Main").is_dir()
                                                or (path / "JPEGImages").is_dir())


def find_years(path: Path) -> list[Path]:
    """The VOC year folders ``path`` is or holds (directly, or under ``VOCdevkit/``)."""
    path = Path(path)
    if is_year(path):
        return [path]
    for base in (path, path / "VOCdevkit"):
        if base.is_dir():
            years = sorted(p for p in base.iterdir() if p.is_dir() and is_year(p))
            if years:
                return years
    return []


def voc_splits(path: Path) -> list[str]:
    """The splits the year folders of ``path`` list in ``ImageSets/Main``."""
    names = set()
    for year in find_years(path):
        main = year / "ImageSets" / "Main"
        if main.is_dir():
            names |= {p.stem for p in main.glob("*.txt") if "_" not in p.stem}
    order = ["train", "val", "trainval", "test"]
    return sorted(names, key=lambda s: (order.index(s) if s in order else len(order), s))


def _split_ids(years: list[Path], split: str, problems: Problems) -> list[tuple]:
    """``(year, id, split file, line)`` of every image the years' ``<split>.txt`` list."""
    found = []
    for year in years:
        listing = year / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            continue
        try:
            text = listing.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            problems.add(f"{listing}: cannot be read as a list of image ids ({e})")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words:
                continue
            why = name_problem(words[0] + ".xml")
            if len(words) != 1 or why or "/" in words[0] or "\\" in words[0]:
                problems.add(f"{listing}:{n}: expected one image id (a file name in "
                             f"Annotations/ without .xml), found {shown(line)}")
                continue
            found.append((year, words[0], listing, n))
    return found


def _parse(path: Path, problems: Problems):
    """The root element of an annotation file, or None (the problem added)."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import parse

    try:
        size = path.stat().st_size
        if size > MAX_XML_BYTES:
            problems.add(f"{path}: {size:,} bytes, too large for a VOC annotation (at most "
                         f"{MAX_XML_BYTES:,})")
            return None
        return parse(path, forbid_dtd=True).getroot()
    except DefusedXmlException as e:
        problems.add(f"{path}: refused: it declares a DTD or entities ({e}); qdet parses XML "
                     "with defusedxml, which refuses them, since entity expansion can take "
                     "gigabytes and external entities read local files; VOC annotations "
                     "never need either")
    except ParseError as e:
        problems.add(f"{path}: not well-formed XML ({e}); is it cut short?")
    except OSError as e:
        problems.add(f"{path}: cannot be read ({e.strerror or e})")
    return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _annotation(path: Path, year: Path, image_id: str, problems: Problems):
    """``(image file, declared (w, h) or None, objects)`` of one XML file, or None; objects
    are ``(name, difficult, (xmin, ymin, xmax, ymax), where)``."""
    root = _parse(path, problems)
    if root is None:
        return None
    if root.tag != "annotation":
        problems.add(f"{path}: the root element is <{root.tag}>, not <annotation>")
        return None
    filename = (root.findtext("filename") or "").strip() or f"{image_id}.jpg"
    why = name_problem(filename)
    if why:
        problems.add(f"{path}: <filename> {shown(filename)} {why.replace('image', 'JPEGImages')}")
        return None
    size = None
    width, height = (_number(root.findtext(f"size/{k}")) for k in ("width", "height"))
    if width and height:     # 0 or absent (some tools write 0): the file's size is used
        size = (width, height)
    objects, ok = [], True
    for k, obj in enumerate(root.findall("object"), 1):
        where = f"{path}: <object> {k}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            problems.add(f"{where} has no <name>")
            ok = False
            continue
        where += f" ({shown(name)})"
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            problems.add(f"{where}: <difficult> must be 0 or 1, got {shown(difficult)}")
            ok = False
            continue
        corners = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = obj.findtext(f"bndbox/{key}")
            value = _number(text)
            if value is None:
                problems.add(f"{where}: <bndbox><{key}> " + (
                    "is missing" if text is None else f"{shown(text)} is not a number"))
                break
            corners.append(value)
        if len(corners) < 4:
            ok = False
            continue
        objects.append((name, difficult == "1", tuple(corners), where))
    return (year / "JPEGImages" / filename, size, objects) if ok else None


def read_voc_split(path: str | os.PathLike, split: str, classes: list[str] | None = None,
                   verify: bool = True) -> SplitData:
    """One split of a VOC folder (year or devkit) as COCO-style data (boxes in pixels by the
    convention above, not clipped), after checking every annotation file and image header;
    raises DataProblems listing every problem (file and element), or DataError when the
    folder or split is not there."""
    path = Path(path)
    years = find_years(path)
    if not years:
        raise DataError(f"{path}: not a Pascal VOC folder (no Annotations/ with ImageSets/Main/ "
                        "or JPEGImages/, nor VOC20xx folders holding them)")
    if split not in voc_splits(path):
        have = voc_splits(path)
        raise DataError(f"{path}: no split '{split}' (no ImageSets/Main/{split}.txt; it has "
                        f"{', '.join(have) or 'none'}); pick one with --split" + (
                            "" if have else ", after listing the image ids of each split in "
                            "ImageSets/Main/<split>.txt"))
    problems = Problems()
    read = []
    for year, image_id, listing, n in _split_ids(years, split, problems):
        xml = year / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            problems.add(f"{listing}:{n}: image id {shown(image_id)} has no annotation file "
                         f"{xml}")
            continue
        found = _annotation(xml, year, image_id, problems)
        if found is not None:
            read.append((xml, *found))
    checked = image_sizes([image for _, image, _, _ in read], verify)
    per_image, counts = [], {"difficult": 0}
    for (xml, image, declared, objects), (size, why) in zip(read, checked):
        if why:
            problems.add(f"{xml}: names image {image}, which is {why}")
            continue
        if declared and declared != size:
            problems.add(f"{xml}: <size> is {declared[0]:g} x {declared[1]:g} but the image "
                         f"{image} is {size[0]} x {size[1]}; fix <size> or leave it out")
            continue
        boxes = []
        for name, difficult, (xmin, ymin, xmax, ymax), where in objects:
            if xmin > xmax or ymin > ymax:
                problems.add(f"{where}: <bndbox> has xmin {xmin:g} > xmax {xmax:g} or ymin "
                             f"{ymin:g} > ymax {ymax:g}")
                continue
            if min(xmin, ymin) < 0 or xmax > size[0] or ymax > size[1]:
                problems.add(f"{where}: <bndbox> ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) "
                             f"leaves the {size[0]} x {size[1]} image")
                continue
            counts["difficult"] += difficult
            boxes.append((name, difficult, xmin - 1, ymin - 1, xmax, ymax))
        per_image.append((image, size, boxes))
    if not read and not problems:
        problems.add(f"{path}: ImageSets/Main/{split}.txt lists no image")
    problems.raise_any()
    return _split_data(path, years, split, per_image, counts, classes)


def _split_data(path: Path, years: list[Path], split: str, per_image: list, counts: dict,
                classes: list[str] | None) -> SplitData:
    names = list(classes or [])
    found = {name for _, _, boxes in per_image for name, *_ in boxes}
    names += sorted(found - set(names))
    cat_id = {name: i for i, name in enumerate(names, 1)}
    root = os.path.commonpath([os.path.abspath(y) for y in years])
    images, annotations = [], []
    for i, (image, (w, h), boxes) in enumerate(per_image, 1):
        images.append({"id": i, "file_name": os.path.relpath(os.path.abspath(image), root),
                       "width": w, "height": h})
        for name, difficult, x0, y0, x1, y1 in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": cat_id[name], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "iscrowd": int(difficult)})
    if not annotations:
        raise DataError(f"{path} ({split}): none of the {len(images)} annotation files has an "
                        "<object>: there is nothing to learn from or to be scored against")
    categories = [{"id": i, "name": name} for name, i in cat_id.items()]
    return SplitData({"images": images, "annotations": annotations, "categories": categories},
                     Path(root), f"{path} ({split})", "voc", split, counts)
