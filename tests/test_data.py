"""Data: COCO validation errors, category mapping, crowd boxes, transforms, shapes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from qdet.data import shapes
from qdet.data.datasets import CocoDataset, ShapesDataset
from qdet.data.errors import DataError
from qdet.data.transforms import AugmentConfig, augment, detr_resize_shape


def write_dataset(tmp_path, anns=None, images=None, categories=None, make_files=True):
    images = images if images is not None else [
        {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 9, "file_name": "b.png", "width": 50, "height": 20}]
    categories = categories if categories is not None else [
        {"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}]
    anns = anns if anns is not None else [
        {"id": 1, "image_id": 7, "category_id": 90, "bbox": [5, 5, 10, 10]},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 20, 30], "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 10]}]
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    if make_files:
        for im in images:
            img = Image.new("RGB", (im["width"], im["height"]), (100, 50, 20))
            img.save(folder / im["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann, folder


def test_category_ids_map_to_contiguous_labels_and_crowd_is_excluded(tmp_path):
    ann, folder = write_dataset(tmp_path)
    ds = CocoDataset(ann, folder, train=False, augment_cfg=AugmentConfig(eval_size=30))
    assert ds.category_ids == [1, 90] and ds.class_names == ["person", "toothbrush"]
    x, t = ds[0]
    assert t["labels"].tolist() == [1, 0]   # id 90 -> label 1, id 1 -> label 0; crowd dropped
    assert t["image_id"] == 7 and t["orig_size"].tolist() == [30, 40]
    torch.testing.assert_close(t["boxes"][0], torch.tensor([10 / 40, 10 / 30, 10 / 40, 10 / 30]))
    _, t2 = ds[1]                             # an image without annotations is fine
    assert t2["labels"].numel() == 0 and t2["boxes"].shape == (0, 4)
    gt = ds.coco_gt()
    assert len(gt.getAnnIds(iscrowd=True)) == 1   # crowd kept for evaluation


def test_malformed_json(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"ann.json: not valid JSON \(line 1"):
        CocoDataset(bad, tmp_path)


def test_missing_section(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="missing the list 'annotations'"):
        CocoDataset(bad, tmp_path)


def test_unknown_image_and_category(tmp_path):
    ann, folder = write_dataset(tmp_path, anns=[{"id": 5, "image_id": 3, "category_id": 1,
                                                 "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DataError, match=r"annotations\[0\] \(id 5\) refers to image id 3"):
        CocoDataset(ann, folder)
    ann, folder = write_dataset(tmp_path, anns=[{"id": 5, "image_id": 7, "category_id": 4,
                                                 "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DataError, match="category_id 4, which is not in 'categories'"):
        CocoDataset(ann, folder)


def test_missing_and_unreadable_images(tmp_path):
    ann, folder = write_dataset(tmp_path, make_files=False)
    with pytest.raises(DataError, match=r"2 of 2 images .*a.png \(missing\)"):
        CocoDataset(ann, folder)
    ann, folder = write_dataset(tmp_path)
    (folder / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"b.png \(unreadable"):
        CocoDataset(ann, folder)


def test_degenerate_boxes_dropped_with_warning(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 10]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [100, 100, 5, 5]},  # outside
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [30, 20, 20, 20]},  # clipped
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [1, 1, 3, 3]}]
    ann, folder = write_dataset(tmp_path, anns=anns)
    with pytest.warns(UserWarning, match="dropped 2 degenerate box"):
        ds = CocoDataset(ann, folder, train=False, augment_cfg=AugmentConfig(eval_size=30))
    assert [a["bbox"] for a in ds.data["annotations"]] == [[30, 20, 10, 10], [1, 1, 3, 3]]
    assert len(ds[0][1]["labels"]) == 2


def test_bad_bbox_field(tmp_path):
    ann, folder = write_dataset(tmp_path, anns=[{"id": 1, "image_id": 7, "category_id": 1,
                                                 "bbox": "0 0 1 1"}])
    with pytest.raises(DataError, match=r"bbox must be \[x, y, width, height\]"):
        CocoDataset(ann, folder)


@pytest.mark.parametrize("h,w,size,max_size,expected", [
    (480, 640, 800, 1333, (800, 1066)),      # shorter side to 800
    (427, 640, 800, 1333, (800, 1199)),
    (300, 1000, 800, 1333, (400, 1333)),     # longer side capped: round(1333*300/1000)=400
    (640, 480, 800, None, (1066, 800)),
    (800, 600, 600, 1333, (800, 600)),       # already there
])
def test_resize_rule_matches_official(h, w, size, max_size, expected):
    assert detr_resize_shape(h, w, size, max_size) == expected


def test_train_augment_keeps_boxes_on_objects():
    """A white square on black: after flip/crop/resize, each kept box still frames white."""
    img = Image.new("RGB", (200, 160))
    img.paste((255, 255, 255), (50, 40, 110, 100))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[50., 40., 110., 100.]]), format="XYXY",
                                     canvas_size=(160, 200))
    cfg = AugmentConfig(train_scales=(96, 128), max_size=200, crop_scales=(120, 150),
                        crop_size=(60, 100))
    for seed in range(20):
        out, b, labels = augment(img, boxes, torch.tensor([3]), cfg, np.random.default_rng(seed),
                                 train=True)
        arr = np.asarray(out.convert("L")) > 128
        assert len(b) == len(labels)
        for x0, y0, x1, y1 in b.tolist():
            inside = arr[int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2]
            assert inside.size == 0 or inside.mean() > 0.95
        if len(b):
            ys, xs = np.nonzero(arr)
            assert abs(xs.min() - b[0, 0].item()) <= 2 and abs(ys.max() + 1 - b[0, 3].item()) <= 2


def test_shapes_is_deterministic_and_boxes_are_tight():
    cfg = shapes.ShapesConfig(image_size=96)
    a = shapes.render(cfg, "train", 3)
    b = shapes.render(cfg, "train", 3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1]
    assert shapes.render(cfg, "val", 3)[1] != a[1]
    for i in range(20):
        _, boxes, labels = shapes.render(cfg, "train", i)
        assert 1 <= len(boxes) <= cfg.max_objects and len(labels) == len(boxes)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96


def test_shapes_dataset_and_written_coco_agree(tmp_path):
    cfg = shapes.ShapesConfig(image_size=64, train_images=3, val_images=2)
    written = shapes.write_coco(cfg, tmp_path)
    coco = CocoDataset(written["val"], tmp_path / "val", train=False,
                       augment_cfg=AugmentConfig(eval_size=64))
    builtin = ShapesDataset("val", cfg)
    assert coco.category_ids == builtin.category_ids and coco.class_names == builtin.class_names
    for i in range(2):
        (x1, t1), (x2, t2) = coco[i], builtin[i]
        torch.testing.assert_close(x1, x2)
        torch.testing.assert_close(t1["boxes"], t2["boxes"])
        assert t1["labels"].tolist() == t2["labels"].tolist()
