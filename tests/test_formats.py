"""`--data PATH` in every format (issue 33): the format found from the path, the data spec a run
stores (old COCO specs unchanged), and a VOC set trained on, evaluated without --data (the
run finds its validation split again), on another split, on the same boxes as YOLO, and
resumed."""
import json

import pytest
from test_data_errors import write
from test_voc import year
from test_yolo import image, text
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.datasets import open_spec
from qdet.data.errors import DataError
from qdet.data.formats import data_spec, detect_format
from qdet.data.transforms import AugmentConfig

from conftest import TINY


def test_the_format_is_found_from_the_path(tmp_path):
    year(tmp_path / "VOC2012", {"a": [("dog", False, (1, 1, 5, 5))]}, {"train": ["a"]})
    text(tmp_path / "y" / "data.yaml", "train: images\nnames: [a]\n")
    (tmp_path / "empty").mkdir()
    text(tmp_path / "coco" / "annotations" / "instances_val.json", "{}")
    assert detect_format(tmp_path / "ann.json") == "coco"       # missing: the reader says so
    assert detect_format(tmp_path / "VOC2012") == detect_format(tmp_path) == "voc"
    assert detect_format(tmp_path / "y") == detect_format(tmp_path / "y" / "data.yaml") == "yolo"
    for path, says in ((tmp_path / "empty", "neither a YOLO set (no data.yaml) nor a Pascal "
                                            "VOC folder"),
                       (tmp_path / "coco", "for COCO, pass its JSON file (e.g. "
                                           f"{tmp_path / 'coco/annotations/instances_val.json'})"
                                           " with --images"),
                       (tmp_path / "nope", f"dataset {tmp_path / 'nope'} not found"),
                       (tmp_path / "y" / "data.yaml.bak", "not a dataset qdet reads")):
        if path.suffix == ".bak":
            path.write_text("x")
        with pytest.raises(DataError, match=says.replace("(", r"\(").replace(")", r"\)")):
            detect_format(path)


def test_coco_specs_keep_their_old_shape_and_still_open(tmp_path):
    ann, folder = write(tmp_path)
    spec = data_spec(str(ann), str(folder), str(ann), str(folder))
    assert spec == {"kind": "coco", "train_ann": str(ann), "train_images": str(folder),
                    "val_ann": str(ann), "val_images": str(folder)}
    train, val = open_spec(spec, AugmentConfig(eval_size=30))
    assert len(train) == len(val) == 2 and train.source == str(ann)
    with pytest.raises(ValueError, match="--data needs --images"):
        data_spec(str(ann))


@pytest.fixture
def voc(tmp_path):
    boxes = {f"{i:03d}": [("cat" if i % 2 else "dog", False, (3, 3, 20 + i, 24))]
             for i in range(6)}
    return year(tmp_path / "VOC2007", boxes, {"train": ["000", "001", "002", "003"],
                                              "val": ["004", "005"], "test": ["005"]},
                size=(40, 32))


def tiny(*args):
    sets = [f"{k}={v}" for k, v in TINY["detr"].items() if k != "num_classes"]
    sets += ["augment.train_scales=32", "augment.crop=false", "augment.eval_size=32",
             "augment.max_size=48"]
    return [*args, "--batch-size", "2", "--workers", "0",
            *[x for s in sets for x in ("--set", s)]]


def test_a_voc_set_trains_evaluates_and_resumes_without_being_named_again(voc, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(app, tiny("train", "--data", str(voc), "--out", str(run),
                                     "--epochs", "1"))
    assert r.exit_code == 0, r.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == {"kind": "voc",
                              "train": {"format": "voc", "path": str(voc), "images": None,
                                        "split": "train"},
                              "val": {"format": "voc", "path": str(voc), "images": None,
                                      "split": "val"}}
    r = CliRunner().invoke(app, ["eval", str(run / "last.pt"), "--workers", "0"])
    assert r.exit_code == 0 and "COCO bbox (2 images)" in r.output, r.output
    r = CliRunner().invoke(app, ["eval", str(run / "last.pt"), "--workers", "0", "--split",
                                 "test", "--out", str(tmp_path / "test.json")])
    assert r.exit_code == 0 and "COCO bbox (1 images)" in r.output, r.output
    # the same val boxes as a YOLO set: classes 0 cat, 1 dog, as the VOC ids 1, 2
    root = tmp_path / "yolo"
    text(root / "data.yaml", "val: images\nnames: [cat, dog]\n")
    for i, cls in ((4, 1), (5, 0)):
        image(root / "images" / f"{i:03d}.jpg", (40, 32))
        w, h = 20 + i - 2, 22
        text(root / "labels" / f"{i:03d}.txt", f"{cls} {(2 + w / 2) / 40} {(2 + h / 2) / 32} "
                                               f"{w / 40} {h / 32}\n")
    ours = json.loads((run / "last_results.json").read_text())
    r = CliRunner().invoke(app, ["eval", str(run / "last.pt"), "--workers", "0", "--data",
                                 str(root), "--out", str(tmp_path / "yolo.json")])
    assert r.exit_code == 0 and "note:" not in r.output, r.output  # ids and names agree
    theirs = json.loads((tmp_path / "yolo.json").read_text())
    assert [d["category_id"] for d in theirs] == [d["category_id"] for d in ours]
    r = CliRunner().invoke(app, ["train", "--resume", "--out", str(run), "--epochs", "2",
                                 "--workers", "0"])
    assert r.exit_code == 0 and "resuming after epoch 1" in " ".join(r.output.split()), r.output


def test_split_options_are_checked(voc, tmp_path):
    r = CliRunner().invoke(app, ["train", "--data", str(voc), "--val-split", "nope"])
    assert r.exit_code == 1 and f"--val-split nope: {voc} has no such split" in r.output
    r = CliRunner().invoke(app, ["train", "--data", str(voc), "--images", str(voc)])
    assert r.exit_code == 1 and "--images applies to a COCO file" in r.output, r.output
