"""Per-class AP against pycocotools, the confusion matrix on hand-built predictions, the
diagnosis of broken results, and what `qdet eval` writes beside its results JSON."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.datasets import DetectionDataset
from qdet.data.transforms import AugmentConfig
from qdet.engine.eval_report import (
    build_report,
    confusion_matrix,
    diagnose,
    per_class,
    write_report,
)
from qdet.engine.evaluation import coco_eval
from qdet.engine.runs import fit

from conftest import TINY

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "owl"},
        {"id": 12, "name": "yak"}]


def ann(i, image, cat, box, crowd=0):
    return {"id": i, "image_id": image, "category_id": cat, "bbox": box,
            "area": box[2] * box[3], "iscrowd": crowd}


# cat: found in both images (AP 1); dog: a false positive that outscores the one hit, and
# one target missed (AP 51/101 * 1/2 at every IoU); owl: never detected (AP 0); yak: no
# target at all (no AP)
GT = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
      "annotations": [ann(1, 1, 3, [10, 10, 20, 20]), ann(2, 1, 7, [50, 50, 30, 30]),
                      ann(3, 2, 7, [0, 0, 40, 40]), ann(4, 2, 3, [60, 60, 20, 20]),
                      ann(5, 2, 9, [10, 60, 20, 20])],
      "categories": CATS}
DETS = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [60, 60, 20, 20], "score": 0.8},
        {"image_id": 2, "category_id": 7, "bbox": [70, 0, 20, 20], "score": 0.95},
        {"image_id": 1, "category_id": 7, "bbox": [50, 50, 30, 30], "score": 0.9}]


class HandMade(DetectionDataset):
    def __init__(self, gt):
        super().__init__(AugmentConfig(), train=False)
        self.gt = gt
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [c["name"] for c in cats]

    def coco_dict(self):
        return self.gt


def restricted(cid):
    """pycocotools' own summary for one category: a COCOeval told to look at it alone."""
    gt = COCO()
    gt.dataset = json.loads(json.dumps(GT))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in DETS]), "bbox")
        ev.params.catIds = [cid]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


def test_per_class_ap_matches_pycocotools_and_the_hand_count():
    rows = per_class(coco_eval(HandMade(GT), DETS), GT, DETS, threshold=0.5)
    assert [(r.category_id, r.name, r.targets, r.detections) for r in rows] == \
        [(3, "cat", 2, 2), (7, "dog", 2, 2), (9, "owl", 1, 0), (12, "yak", 0, 0)]
    dog = 51 / 101 * 0.5
    assert [(r.ap, r.ap50) for r in rows] == [pytest.approx((1.0, 1.0)),
                                              pytest.approx((dog, dog)),
                                              pytest.approx((0.0, 0.0)), (None, None)]
    for r in rows[:3]:
        assert (r.ap, r.ap50) == pytest.approx(restricted(r.category_id))


def test_confusion_matrix_on_hand_built_predictions():
    gt = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
          "annotations": [ann(1, 1, 1, [0, 0, 10, 10]), ann(2, 1, 2, [50, 50, 10, 10]),
                          ann(3, 2, 2, [0, 0, 10, 10]), ann(4, 2, 1, [80, 80, 10, 10], crowd=1),
                          ann(5, 3, 1, [0, 0, 10, 10]), ann(6, 3, 2, [2, 0, 10, 10])],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},   # a as a
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 9], "score": 0.8},  # b as a
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.7},   # duplicate
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.3},  # too low
        {"image_id": 2, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.6},  # nothing
        {"image_id": 2, "category_id": 2, "bbox": [80, 80, 10, 10], "score": 0.9},  # crowd
        # image 3: two overlapping targets (IoU 0.67), each hit exactly: one to one
        {"image_id": 3, "category_id": 2, "bbox": [2, 0, 10, 10], "score": 0.9},
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
    ]
    m = confusion_matrix(gt, dets, [1, 2], iou=0.5, threshold=0.5)
    # rows: true a, true b, background; columns: predicted a, b, background
    np.testing.assert_array_equal(m, [[2, 0, 0],
                                      [1, 1, 1],
                                      [1, 1, 0]])


def test_diagnosis_names_each_kind_of_broken():
    healthy = diagnose(GT, DETS, 0.5, ap=0.5, losses=[3.0, 1.0])
    assert healthy is None
    low = [{**d, "score": 0.2} for d in DETS]
    assert diagnose(GT, low, 0.5, 0.3).startswith("no detection scores 0.5 or more (the "
                                                  "highest is 0.20)")
    one = [{**d, "category_id": 7} for d in DETS]
    assert "every detection scoring 0.5 or more is 'dog'" in diagnose(GT, one, 0.5, 0.1)
    sizes = [dict(image_id=1, category_id=3 + 4 * (i % 2), bbox=[i, i, 30, 30], score=0.9)
             for i in range(12)]
    msg = diagnose(GT, sizes, 0.5, 0.1)
    assert "all have one size (about 0.3 x 0.3 of the image)" in msg
    msg = diagnose(GT, DETS, 0.5, ap=0.0, losses=[30.0, 10.0], weights="runs/x/best.pt")
    assert "AP is 0.000 although the training loss fell from 30 to 10" in msg
    for text in (msg, diagnose(GT, low, 0.5, 0.3)):
        assert "qdet match-debug" in text and "\n" not in text


def test_report_files_on_the_hand_made_case(tmp_path):
    report = write_report(HandMade(GT), DETS, tmp_path, threshold=0.5)
    assert [p.name for p in report.files] == ["per_class.csv", "confusion.png", "pr.png"]
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [(r["category_id"], r["name"], r["AP"]) for r in rows] == \
        [("3", "cat", "1"), ("7", "dog", f"{51 / 202:.6g}"), ("9", "owl", "0"),
         ("12", "yak", "")]
    assert report.confusion.shape == (5, 5) and report.confusion[:, :4].sum() == 4


def test_class_table_fits_80_columns_even_with_long_names():
    from rich.console import Console

    from qdet.engine.eval_report import class_table

    long = json.loads(json.dumps(GT))
    long["categories"][0]["name"] = "a category name far longer than any column could hold"
    report = build_report(HandMade(long), DETS, threshold=0.5)
    wide = Console(width=200, record=True, file=io.StringIO())
    wide.print(class_table(report, "hand-made: per class"))
    lines = wide.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("a category name" in line for line in lines)


def test_eval_writes_per_class_results_beside_the_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("detr", out="runs/tiny", device="cpu",
        model_overrides={k: v for k, v in TINY["detr"].items() if k != "num_classes"},
        train_overrides={"batch_size": 4, "num_workers": 0, "shapes.train_images": 8,
                         "shapes.val_images": 4, "shapes.image_size": 64, "epochs": 1})
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(app, ["eval", "runs/tiny/best.pt", "--workers", "0", "--out",
                                 "out/res.json", "--threshold", "0.0"])
    assert r.exit_code == 0, r.output
    for name in ("res.json", "per_class.csv", "confusion.png", "pr.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "per class" in r.output and "rectangle" in r.output
    res = json.loads((tmp_path / "out" / "res.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_class.csv")))
    assert [int(r["detections>=0"]) for r in rows] == \
        [sum(d["category_id"] == c for d in res) for c in (1, 2, 3, 4, 5)]
