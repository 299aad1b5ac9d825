"""Pascal VOC as it comes (issue 33): year and devkit folders built by hand, boxes against the
convention written in qdet/data/voc.py (detectron2's: xmin - 1, ymin - 1, xmax, ymax),
difficult objects left out of training and ignored by evaluation, classes in a stable order;
every broken file named in one line; hostile XML refused before it is expanded."""
import contextlib
import io

import pytest
from PIL import Image
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.datasets import open_source
from qdet.data.errors import DataError, DataProblems
from qdet.data.formats import data_spec, detect_format, read_split, spec_sources
from qdet.data.transforms import AugmentConfig


def xml(filename, objects, size=(60, 40), extra=""):
    """A VOC annotation as the devkit writes it; objects: (name, difficult, corners)."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{c[0]}</xmin><ymin>{c[1]}</ymin>"
        f"<xmax>{c[2]}</xmax><ymax>{c[3]}</ymax></bndbox></object>" for n, d, c in objects)
    return (f"<annotation>{extra}<folder>VOC2007</folder><filename>{filename}</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def year(root, entries: dict, splits: dict, size=(60, 40)):
    """A year folder: entries {id: objects}, splits {name: [ids]}; JPEG images of ``size``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in entries.items():
        Image.new("RGB", size, (10, 20, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            xml(f"{image_id}.jpg", objects, size))
    for name, ids in splits.items():
        (root / "ImageSets/Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root


@pytest.fixture
def voc(tmp_path):
    root = year(tmp_path / "VOC2007", {
        "000001": [("dog", False, (1, 1, 60, 40)), ("cat", True, (10, 5, 20, 15))],
        "000002": [("person", False, (5.5, 3, 30.25, 20))],     # CVAT writes floats
        "000003": [("cat", False, (2, 2, 3, 3))]},
        {"train": ["000001", "000002"], "val": ["000003"], "trainval": ["000001", "000003"]})
    # a per-class classification list: never read as a split
    (root / "ImageSets/Main/dog_train.txt").write_text("000001  1\n000002 -1\n")
    return root


def test_boxes_follow_detectron2s_convention_and_difficult_is_crowd(voc):
    sd = read_split(voc, "train")
    names = {c["id"]: c["name"] for c in sd.data["categories"]}
    assert list(names.values()) == ["cat", "dog", "person"]            # sorted
    got = [(a["image_id"], names[a["category_id"]], a["bbox"], a["iscrowd"])
           for a in sd.data["annotations"]]
    # (1, 1, W, H) is the whole 60x40 image; a box keeps xmax - xmin + 1 pixels
    assert got == [(1, "dog", [0, 0, 60, 40], 0), (1, "cat", [9, 4, 11, 11], 1),
                   (2, "person", [4.5, 2, 25.75, 18], 0)]
    assert sd.counts == {"difficult": 1} and sd.summary().endswith("(1 difficult)")
    assert [im["file_name"] for im in sd.data["images"]] == ["JPEGImages/000001.jpg",
                                                              "JPEGImages/000002.jpg"]
    assert detect_format(voc) == "voc"
    from qdet.data.formats import split_names
    assert split_names(voc) == ["train", "val", "trainval"]


def evaluate(ds, results) -> float:
    """AP50 of ``results`` on the dataset's ground truth, by pycocotools."""
    gt = ds.coco_gt()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1]


def test_difficult_boxes_are_not_trained_on_nor_counted_against_the_model(tmp_path):
    root = year(tmp_path / "VOC2007", {"000001": [("dog", False, (1, 1, 20, 20)),
                                                  ("dog", True, (31, 11, 60, 40))]},
                {"val": ["000001"]})
    ds = open_source({"format": "voc", "path": str(root), "split": "val"},
                     AugmentConfig(eval_size=40, max_size=60), train=False)
    assert ds.targets[0] == ([[0, 0, 20, 20]], [0])          # the difficult dog is no target
    found = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.5}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [30, 10, 30, 30], "score": 0.9}
    elsewhere = {**on_difficult, "bbox": [30, 0, 10, 10]}
    # the highest-scoring detection is on the difficult dog: ignored, as VOC's protocol
    # does, so AP50 stays 1; the same detection off any box is a false positive
    assert evaluate(ds, [found, on_difficult]) == pytest.approx(1.0)
    assert evaluate(ds, [found, elsewhere]) == pytest.approx(0.5, abs=0.01)


def test_class_order_is_kept_across_splits(voc):
    spec = data_spec(str(voc))
    assert spec == {"kind": "voc", "train": {"format": "voc", "path": str(voc), "images": None,
                                             "split": "train"},
                    "val": {"format": "voc", "path": str(voc), "images": None, "split": "val"}}
    from qdet.data.datasets import open_spec
    train, val = open_spec(spec, AugmentConfig(eval_size=40, max_size=60))
    assert val.class_names == train.class_names == ["cat", "dog", "person"]
    assert val.category_ids == train.category_ids
    # a checkpoint's order comes first, new names after it
    sd = read_split(voc, "val", classes=["zebra", "cat"])
    assert [c["name"] for c in sd.data["categories"]] == ["zebra", "cat"]
    assert spec_sources(spec) == (spec["train"], spec["val"])


def test_a_devkit_holds_years_whose_splits_join(tmp_path):
    kit = tmp_path / "VOCdevkit"
    year(kit / "VOC2007", {"000005": [("car", False, (1, 1, 10, 10))]}, {"trainval": ["000005"]})
    year(kit / "VOC2012", {"2008_000002": [("bus", False, (2, 2, 8, 9))]},
         {"trainval": ["2008_000002"], "val": ["2008_000002"]})
    for path in (tmp_path, kit):
        sd = read_split(path, "trainval")
        assert [im["file_name"] for im in sd.data["images"]] == [
            "VOC2007/JPEGImages/000005.jpg", "VOC2012/JPEGImages/2008_000002.jpg"]
        assert [a["bbox"] for a in sd.data["annotations"]] == [[0, 0, 10, 10], [1, 1, 7, 8]]
    with pytest.raises(DataError, match=r"no split 'train' \(no ImageSets/Main/train.txt; it "
                                        r"has val, trainval\)"):
        read_split(kit, "train")


CUT = xml("000001.jpg", [("dog", False, (1, 1, 9, 9))])[:-40]


# (change to the dataset, what one line names)
BROKEN = [
    ("cut", lambda r: (r / "Annotations/000001.xml").write_text(CUT),
     "000001.xml: not well-formed XML (unclosed token: line 1, column 302); is it cut short?"),
    ("no xmax", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (1, 1, 9, 9))]).replace("<xmax>9</xmax>", "")),
     "000001.xml: <object> 1 (\"dog\"): <bndbox><xmax> is missing"),
    ("word", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (1, "ten", 9, 9))])),
     "000001.xml: <object> 1 (\"dog\"): <bndbox><ymin> \"ten\" is not a number"),
    ("no name", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("", False, (1, 1, 9, 9))])), "000001.xml: <object> 1 has no <name>"),
    ("difficult 2", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (1, 1, 9, 9))]).replace(
            "<difficult>0</difficult>", "<difficult>2</difficult>")),
     "<difficult> must be 0 or 1, got \"2\""),
    ("inverted", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (9, 1, 2, 9))])),
     "<bndbox> has xmin 9 > xmax 2 or ymin 1 > ymax 9"),
    ("outside", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (1, 1, 61, 9))])),
     "<bndbox> (1, 1, 61, 9) leaves the 60 x 40 image"),
    ("missing image", lambda r: (r / "JPEGImages/000001.jpg").unlink(),
     "000001.xml: names image "),
    ("other size", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("000001.jpg", [("dog", False, (1, 1, 9, 9))], size=(40, 60))),
     "000001.xml: <size> is 40 x 60 but the image "),
    ("no xml", lambda r: (r / "Annotations/000001.xml").unlink(),
     "train.txt:1: image id \"000001\" has no annotation file "),
    ("id leaves", lambda r: (r / "ImageSets/Main/train.txt").write_text("../../etc/passwd\n"),
     "train.txt:1: expected one image id (a file name in Annotations/ without .xml), found "
     "\"../../etc/passwd\""),
    ("filename leaves", lambda r: (r / "Annotations/000001.xml").write_text(
        xml("../../secret.jpg", [("dog", False, (1, 1, 9, 9))])),
     "<filename> \"../../secret.jpg\" leaves the JPEGImages folder"),
    ("root", lambda r: (r / "Annotations/000001.xml").write_text("<html></html>"),
     "the root element is <html>, not <annotation>"),
]


@pytest.mark.parametrize("name,change,says", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_file_is_one_line_naming_it(tmp_path, name, change, says):
    root = year(tmp_path / "VOC2007", {"000001": [("dog", False, (1, 1, 9, 9))]},
                {"train": ["000001"]})
    change(root)
    with pytest.raises(DataProblems) as info:
        read_split(root, "train")
    assert len(info.value.problems) == 1 and says in info.value.problems[0], \
        info.value.problems
    assert str(root) in info.value.problems[0]
    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 1 and f"error: {info.value.problems[0]}" in r.output.splitlines()


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">'
                    for i in range(1, 10)).replace("&lol0;", "&lol;")
          + ']><annotation><filename>&lol9;</filename></annotation>')


@pytest.mark.parametrize("text,declared", [
    (LAUGHS, "DTDForbidden(name='lolz'"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/hostname">]>'
     "<annotation><filename>&xxe;</filename></annotation>", "DTDForbidden(name='a'"),
    ('<!DOCTYPE annotation SYSTEM "http://example.com/voc.dtd"><annotation/>',
     "system_id='http://example.com/voc.dtd'"),
])
def test_hostile_xml_is_refused_before_it_is_expanded(tmp_path, text, declared):
    root = year(tmp_path / "VOC2007", {"000001": [("dog", False, (1, 1, 9, 9))]},
                {"train": ["000001"]})
    (root / "Annotations/000001.xml").write_text(text)
    with pytest.raises(DataProblems) as info:
        read_split(root, "train")
    line = info.value.problems[0]
    assert line.startswith(f"{root / 'Annotations/000001.xml'}: refused: it declares a DTD or "
                           "entities (") and declared in line and "defusedxml" in line, line


def test_a_folder_without_splits_says_how_to_make_them(tmp_path):
    root = tmp_path / "labelimg"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    with pytest.raises(DataError, match=r"it has none\); pick one with --split, after listing "
                                        r"the image ids of each split in ImageSets/Main"):
        read_split(root, "train")
    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 1 and "after listing the image ids of each split" in r.output
