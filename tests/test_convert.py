"""`qdet data convert` (issue 33): YOLO and VOC sets built by hand, converted to COCO and back,
keep every box to the printed digits and every class name; images are linked (or copied
with --copy), byte for byte, never moved; nothing is written outside OUT, or at all when the
source has a problem."""
import json
import os
from pathlib import Path

import pytest
from test_voc import year
from test_yolo import image, text
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.convert import convert
from qdet.data.errors import DataError, DataProblems
from qdet.data.formats import read_split

# YOLO lines as a labelling tool writes them (6 decimals), two splits, one background image
LABELS = {"train/a": "0 0.512345 0.487654 0.2 0.3\n2 0.1 0.9 0.05 0.123457\n",
          "train/b": "1 0.5 0.5 1 1\n0 0.013 0.02 0.026 0.04\n",
          "train/c": None,
          "val/d": "2 0.333333 0.666667 0.111111 0.222222\n"}
SIZES = {"train/a": (64, 48), "train/b": (33, 17), "train/c": (20, 20), "val/d": (99, 101)}


@pytest.fixture
def yolo(tmp_path):
    root = tmp_path / "src"
    text(root / "data.yaml", "train: images/train\nval: images/val\nnames: [cat, dog, 'null']\n")
    for key, content in LABELS.items():
        split, stem = key.split("/")
        image(root / "images" / split / f"{stem}.png", SIZES[key])
        if content is not None:
            text(root / "labels" / split / f"{stem}.txt", content)
    return root


def yolo_lines(root: Path, split_folder: str) -> dict:
    """{stem: [[class, cx, cy, w, h], ...]} of a YOLO split's label files, as numbers."""
    return {p.stem: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
            for p in sorted((root / split_folder).glob("*.txt"))}


def test_yolo_to_coco_and_back_keeps_boxes_names_and_bytes(yolo, tmp_path):
    coco = convert(yolo, tmp_path / "coco", "coco")
    assert set(coco.splits) == {"train", "val"} and coco.placed == {"hardlink": 4}
    data = json.loads((tmp_path / "coco/train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["cat", "dog", "null"]
    # the COCO boxes are the hand-computed pixels of a's first line: 64 x 48 image
    first = data["annotations"][0]["bbox"]
    assert first == pytest.approx([0.512345 * 64 - 0.1 * 64, 0.487654 * 48 - 0.15 * 48,
                                   0.2 * 64, 0.3 * 48], abs=1e-9)
    for name in ("a.png", "b.png", "c.png"):                 # linked, not copied or moved
        src, dst = yolo / "images/train" / name, tmp_path / "coco/train" / name
        assert os.path.samefile(src, dst) and src.exists()
    back = convert(tmp_path / "coco/train.json", tmp_path / "back", "yolo",
                   images=tmp_path / "coco/train")
    assert back.splits["train"]["boxes"] == 4
    got, want = yolo_lines(tmp_path / "back", "train/labels"), yolo_lines(yolo, "labels/train")
    assert got.pop("c") == [] and got.keys() == want.keys()
    for stem in want:
        for g, w in zip(got[stem], want[stem]):
            assert g[0] == w[0] and g[1:] == pytest.approx(w[1:], abs=5e-7)
    yaml_text = (tmp_path / "back/data.yaml").read_text()
    assert "names:\n- cat\n- dog\n- 'null'\n" in yaml_text      # a name YAML would misread
    again = read_split(tmp_path / "back", "train")
    assert [c["name"] for c in again.data["categories"]] == ["cat", "dog", "null"]


def test_voc_to_coco_is_the_reading_and_to_yolo_drops_difficult_with_a_count(tmp_path):
    root = year(tmp_path / "VOC2007", {
        "1": [("dog", False, (1, 1, 60, 40)), ("cat", True, (10, 5, 20, 15))],
        "2": [("cat", False, (5.5, 3, 30.25, 20))]}, {"train": ["1"], "val": ["2"]})
    done = convert(root, tmp_path / "coco", "coco")
    train = json.loads((tmp_path / "coco/train.json").read_text())
    val = json.loads((tmp_path / "coco/val.json").read_text())
    assert train["categories"] == val["categories"] == [{"id": 1, "name": "cat"},
                                                        {"id": 2, "name": "dog"}]
    assert [(a["bbox"], a["iscrowd"]) for a in train["annotations"]] == [
        ([0, 0, 60, 40], 0), ([9, 4, 11, 11], 1)]               # detectron2's corners
    assert val["annotations"][0]["bbox"] == [4.5, 2, 25.75, 18]
    assert (tmp_path / "coco/train/JPEGImages/1.jpg").is_file() and done.placed["hardlink"] == 2
    out = convert(root, tmp_path / "yolo", "yolo")
    assert "1 difficult box(es) left out: YOLO labels have no such flag" in out.notes
    assert yolo_lines(tmp_path / "yolo", "train/labels/JPEGImages") == {
        "1": [[1, 0.5, 0.5, 1, 1]]}
    assert yolo_lines(tmp_path / "yolo", "valid/labels/JPEGImages")["2"][0] == pytest.approx(
        [0, (4.5 + 25.75 / 2) / 60, (2 + 9) / 40, 25.75 / 60, 18 / 40], abs=5e-7)


def test_copy_and_the_cli_summary(yolo, tmp_path):
    r = CliRunner().invoke(app, ["data", "convert", str(yolo), str(tmp_path / "out"),
                                 "--to", "coco", "--copy", "--split", "val"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert f"val: 1 images, 1 boxes -> {out / 'val.json'} (images in {out / 'val'}/)" in r.output
    assert "images: 1 copy" in r.output
    src, dst = yolo / "images/val/d.png", out / "val/d.png"
    assert not os.path.samefile(src, dst) and src.read_bytes() == dst.read_bytes()
    r = CliRunner().invoke(app, ["data", "check", str(out / "val.json"), "--images",
                                 str(out / "val")])
    assert r.exit_code == 0 and "1 images, 1 boxes (0 crowd) of 3 categories: ok" in r.output


def test_out_must_be_new_and_outside_the_source_and_problems_write_nothing(yolo, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        convert(yolo, tmp_path / "full", "yolo")
    with pytest.raises(DataError, match="is inside the images of"):
        convert(yolo, yolo / "images" / "train" / "conv", "coco")
    with pytest.raises(DataError, match="--split trainval: .* has no such split"):
        convert(yolo, tmp_path / "o", "coco", splits=["trainval"])
    (yolo / "labels/train/a.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DataProblems, match="a.txt:1: 3 number"):
        convert(yolo, tmp_path / "new", "coco")
    assert not (tmp_path / "new").exists() and not (tmp_path / "o").exists()


def test_a_coco_file_with_odd_ids_becomes_classes_in_id_order(tmp_path):
    image(tmp_path / "imgs/x.jpg", (50, 50))
    ann = {"images": [{"id": 3, "file_name": "x.jpg"}],
           "annotations": [{"id": 1, "image_id": 3, "category_id": 90, "bbox": [-5, 10, 20, 10]},
                           {"id": 2, "image_id": 3, "category_id": 7, "bbox": [0, 0, 10, 10],
                            "iscrowd": 1},
                           {"id": 3, "image_id": 3, "category_id": 7, "bbox": [-15, 0, 20, 5]}],
           "categories": [{"id": 90, "name": "toothbrush"}, {"id": 7, "name": "train"}]}
    (tmp_path / "instances_val2017.json").write_text(json.dumps(ann))
    out = convert(tmp_path / "instances_val2017.json", tmp_path / "y", "yolo",
                  images=tmp_path / "imgs")
    assert out.splits["val"]["images"] == 1                      # from the file's name
    assert "category ids 7, 90 written as YOLO classes 0-1 in that order" in out.notes
    assert "1 crowd box(es) left out: YOLO labels have no such flag" in out.notes
    assert any("1 box(es) reaching past their image clipped" in n for n in out.notes)
    # kept as it is where YOLO can hold it (the centre inside the image), else clipped
    assert yolo_lines(tmp_path / "y", "valid/labels") == {"x": [[1, 0.1, 0.3, 0.4, 0.2],
                                                                [0, 0.05, 0.05, 0.1, 0.1]]}
    assert "names:\n- train\n- toothbrush\n" in (tmp_path / "y/data.yaml").read_text()
