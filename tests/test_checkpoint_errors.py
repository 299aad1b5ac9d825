"""Checkpoints that cannot be used as they are (issue 18): truncated, from an unknown format
version, or of a model whose classes differ from the evaluation data's (evaluated by class
name where names match, and said; refused when none does). One line each."""
import copy
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.datasets import CocoDataset
from qdet.data.transforms import AugmentConfig
from qdet.engine.evaluation import coco_stats, match_classes, predict_dataset
from qdet.models.registry import build_model
from qdet.weights.checkpoint import (
    CheckpointError,
    model_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from qdet.weights.loading import model_from_checkpoint

from conftest import TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)    # module-scoped: set up before the per-test seeding fixture
    m = build_model("detr", {**TINY["detr"], "num_classes": 3}).eval()
    m.category_ids, m.class_names = [1, 2, 3], ["cat", "dog", "fish"]
    m.preprocess = {"size": 32, "max_size": 64}
    return m


@pytest.fixture
def weights(model, tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint(path, model_checkpoint(model))
    return path


def one_error_line(result):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_checkpoint(weights, keep):
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"w.pt: truncated \([0-9,]+ bytes.*fetch or copy "
                                              "it again"):
        read_checkpoint(weights)
    line = one_error_line(CliRunner().invoke(app, ["eval", str(weights)]))
    assert "w.pt: truncated" in line


@pytest.mark.parametrize("fmt,says", [("qdet-2", "written by a newer qdet: upgrade qdet"),
                                      (7, "checkpoint format 7, which this qdet does not read")])
def test_unknown_format_version(model, weights, fmt, says):
    save_checkpoint(weights, {**model_checkpoint(model), "format": fmt})
    with pytest.raises(CheckpointError, match=says):
        model_from_checkpoint(read_checkpoint(weights), str(weights))
    assert says in one_error_line(CliRunner().invoke(app, ["eval", str(weights)]))


def test_qdet_checkpoint_missing_its_parts(model, weights):
    ckpt = model_checkpoint(model)
    del ckpt["class_names"]
    save_checkpoint(weights, ckpt)
    line = one_error_line(CliRunner().invoke(app, ["eval", str(weights)]))
    assert "a qdet-1 checkpoint without ['class_names']" in line


def dataset(tmp_path, categories):
    """Two 32x32 images; a box of each category in turn."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(2):
        Image.new("RGB", (32, 32), (30 * i, 60, 90)).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
    for k, c in enumerate(categories):
        anns.append({"id": k + 1, "image_id": k % 2 + 1, "category_id": c["id"],
                     "bbox": [2 + 3 * k, 4, 10, 12]})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return CocoDataset(ann, folder, AugmentConfig(eval_size=32, max_size=64), train=False)


def test_classes_matched_by_name(model, tmp_path):
    """The data calls dog 5 and cat 9, and has a bird the model lacks (the model's fish is
    not in the data): cat and dog are evaluated under the data's ids, AP is over them only."""
    ds = dataset(tmp_path, [{"id": 5, "name": "dog"}, {"id": 9, "name": "cat"},
                            {"id": 3, "name": "bird"}])
    match = match_classes(model, ds)
    assert match.category_of == [9, 5, None] and match.cat_ids == [5, 9]
    assert match.note == (f"the model's classes differ from {ds.source}'s categories: "
                          "evaluating by class name the 2 that match (ids differ: cat 1->9, "
                          "dog 2->5); left out of AP, not classes of the model: bird")
    results = predict_dataset(model, ds, "cpu", show_progress=False)
    assert results and {r["category_id"] for r in results} <= {5, 9}
    # independent of the model: perfect detections of cat and dog score AP 1 over the
    # matched categories; counted over bird too, the same detections would score 2/3
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in ds.data["annotations"] if a["category_id"] != 3]
    assert coco_stats(ds, perfect, match.cat_ids)["AP"] == pytest.approx(1.0)
    assert coco_stats(ds, perfect)["AP"] == pytest.approx(2 / 3)


def test_same_classes_or_a_subset_are_silent(model, tmp_path):
    ds = dataset(tmp_path, [{"id": 2, "name": "dog"}, {"id": 1, "name": "cat"}])
    match = match_classes(model, ds)
    assert match.note is None and match.category_of == [1, 2, 3] and match.cat_ids is None


def test_evaluation_and_fine_tuning_share_one_rule_for_a_class_name(model, tmp_path):
    """"Dog" and "CAT" are the model's dog and cat, evaluated by id with nothing to say;
    "gold-fish" and "Gold_Fish" are one class, as fine-tuning copies rows for them."""
    from qdet.blocks.base import class_key
    from qdet.weights.finetune import match_classes as finetune_match

    ds = dataset(tmp_path, [{"id": 2, "name": "Dog"}, {"id": 1, "name": "CAT"}])
    match = match_classes(model, ds)
    assert match.note is None and match.category_of == [1, 2, 3]
    renamed = copy.copy(model)
    renamed.class_names = ["cat", "dog", "gold-fish"]
    (tmp_path / "b").mkdir()
    ds = dataset(tmp_path / "b", [{"id": 7, "name": "Gold_Fish"}, {"id": 8, "name": "cat"}])
    assert match_classes(renamed, ds).category_of == [8, None, 7]
    assert finetune_match(["cat", "dog", "gold-fish"], ["Gold_Fish", "cat"]) == [2, 0]
    assert class_key("Gold_Fish") == class_key("gold-fish") == "gold fish"


def test_eval_says_how_it_matched_or_refuses(model, weights, tmp_path):
    ds = dataset(tmp_path, [{"id": 5, "name": "dog"}, {"id": 9, "name": "cat"},
                            {"id": 3, "name": "bird"}])
    args = ["eval", str(weights), "--data", str(ds.ann_file), "--images", str(ds.image_dir),
            "--workers", "0", "--out", str(tmp_path / "res.json")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "note: the model's classes differ from" in r.output
    assert {d["category_id"] for d in json.loads((tmp_path / "res.json").read_text())} <= {5, 9}
    (tmp_path / "other").mkdir()
    other = dataset(tmp_path / "other", [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}])
    r = CliRunner().invoke(app, ["eval", str(weights), "--data", str(other.ann_file),
                                 "--images", str(other.image_dir), "--workers", "0"])
    line = one_error_line(r)
    assert line == (f"error: {weights}: {other.source}: none of its 2 categories (car, bus) is "
                    "a class of the model (cat, dog, fish): it was trained for other data")
