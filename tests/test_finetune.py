"""Fine-tuning to a dataset's classes: the class heads every method declares are all of its
class heads, rows follow class names exactly (outputs of matched classes are the source's),
new rows start as the method initialises them, and `qdet train --weights` does it end to end
(with --lr 0 the copied rows stay the source's exactly)."""
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import qdet
from qdet.blocks.base import class_key
from qdet.cli.app import app
from qdet.models.registry import ARCHS, build_model
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint
from qdet.weights.finetune import class_head_modules, match_classes, transfer

from conftest import TINY, random_images

VARIANTS = {**{a: {} for a in ARCHS},
            "deformable-refine": {"with_box_refine": True},
            "deformable-two-stage": {"with_box_refine": True, "two_stage": True,
                                     "loss.enc_class_agnostic": True}}
NAMES = ["person", "traffic light", "Fire_Hydrant", "car", "dog"]
PRIOR = -math.log((1 - 0.01) / 0.01)


def build(variant: str, num_classes: int = 5, names=NAMES, seed: int = 0):
    arch = variant.split("-")[0] if variant.startswith("deformable") else variant
    torch.manual_seed(seed)
    model = build_model(arch, {**TINY[arch], **VARIANTS[variant], "num_classes": num_classes})
    model.class_names = list(names)[:num_classes]
    return model


def randomize_heads(model):
    """Distinct rows in every class head (a fresh focal head has equal biases)."""
    with torch.no_grad():
        for _, kind, head in class_head_modules(model):
            if kind != "label":          # a label embedding has no bias, its rows differ
                head.bias.copy_(torch.randn_like(head.bias))


def test_names_match_case_and_separators():
    assert class_key(" Traffic_Light ") == class_key("traffic-light") == "traffic light"
    assert match_classes(["N/A", "person", "car"], ["Car", "n/a", "forklift"]) == [2, None, None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_declared_heads_are_all_the_class_heads(variant):
    """With a class count no other layer has, the Linear layers with one output per class
    (+1 for softmax) and the Embeddings with a row per class are exactly the heads the
    method declares."""
    model = build(variant, num_classes=13, names=[str(i) for i in range(13)])
    rows = 13 + (0 if model.focal else 1)
    found = {id(m) for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == rows
             or isinstance(m, nn.Embedding) and m.num_embeddings == 13}
    assert found == {id(m) for _, _, m in class_head_modules(model)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permuted_classes_give_the_source_outputs(variant):
    """Every tensor and every class row transferred: the fine-tuned model's outputs for a
    class equal the source's for the class of that name, in every layer and head."""
    source = build(variant).eval()
    randomize_heads(source)
    perm = [3, 0, 4, 1, 2]
    target = build(variant, names=[NAMES[i].upper().replace(" ", "-") for i in perm],
                   seed=1).eval()
    report = transfer(source, target, "source.pt")
    assert report.loaded == report.total and not report.not_loaded and not report.new
    idx = perm + ([] if source.focal else [5])  # softmax: "no object" last in both
    with torch.no_grad():
        a, b = source(random_images([(64, 96)])), target(random_images([(64, 96)]))
    pairs = [(a, b)] + list(zip(a.get("aux_outputs", []), b.get("aux_outputs", [])))
    if "enc_outputs" in a and variant != "deformable-two-stage":
        pairs.append((a["enc_outputs"], b["enc_outputs"]))
    for x, y in pairs:
        torch.testing.assert_close(y["pred_logits"], x["pred_logits"][..., idx])
        torch.testing.assert_close(y["pred_boxes"], x["pred_boxes"])
    if variant == "deformable-two-stage":  # class-agnostic proposals: row 0 is objectness
        torch.testing.assert_close(b["enc_outputs"]["pred_logits"][..., 0],
                                   a["enc_outputs"]["pred_logits"][..., 0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_partial_overlap_copies_rows_and_initialises_the_rest(variant):
    source = build(variant)
    randomize_heads(source)
    names = ["dog", "forklift", "PERSON", "pallet"]
    target = build(variant, 4, names, seed=7)
    fresh = build(variant, 4, names, seed=7)            # the method's own initialisation
    report = transfer(source, target)
    assert [c for c, _ in report.copied] == ["dog", "PERSON"] and report.new == ["forklift",
                                                                                "pallet"]
    assert report.summary().startswith(f"loaded {report.total} of {report.total} tensors; "
                                       "class rows: 2 of 4 copied by name (dog, PERSON), "
                                       "2 new (forklift, pallet)")
    src_heads = {n: m for n, _, m in class_head_modules(source)}
    for (name, kind, head), (_, _, init) in zip(class_head_modules(target),
                                                class_head_modules(fresh)):
        theirs = src_heads[name]
        copied = [(0, 0)] if kind == "object" else [(0, 4), (2, 0)]
        if not target.focal and kind != "label":     # "no object": not a label's row
            copied.append((4, 5))
        biased = kind != "label"
        for j, i in copied:
            assert torch.equal(head.weight[j], theirs.weight[i])
            assert not biased or torch.equal(head.bias[j], theirs.bias[i])
        for j in {0, 1, 2, 3} - {j for j, _ in copied}:
            assert torch.equal(head.weight[j], init.weight[j])
            if not biased:
                continue
            assert torch.equal(head.bias[j], init.bias[j])
            if target.focal:
                assert head.bias[j].item() == pytest.approx(PRIOR)
    if variant in ("deformable", "anchor"):      # one head shared by every layer stays so
        heads = [target.get_submodule(n) for n in target.class_heads()]
        assert all(h is heads[0] for h in heads)


def test_other_architecture_is_refused():
    with pytest.raises(ValueError, match="detr model, not conditional"):
        transfer(build("detr"), build("conditional"))


# ---------------------------------------------------------------------- end to end


def coco_dataset(tmp_path, categories):
    """A few built-in shapes images as COCO JSON, with the shapes' categories renamed and
    renumbered by ``categories`` [(id, name)] in the shapes' order."""
    from qdet.data.shapes import ShapesConfig, write_coco

    written = write_coco(ShapesConfig(image_size=64, train_images=4, val_images=2), tmp_path)
    for split, ann in written.items():
        data = json.loads(ann.read_text())
        ids = {k + 1: cid for k, (cid, _) in enumerate(categories)}
        data["categories"] = [{"id": cid, "name": n} for cid, n in categories]
        for a in data["annotations"]:
            a["category_id"] = ids[a["category_id"]]
        ann.write_text(json.dumps(data))
    return written


SMALL = ["--set", "augment.train_scales=64", "--set", "augment.crop=false", "--set",
         "augment.eval_size=64", "--batch-size", "2", "--workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    model = build("detr", names=["rectangle", "ellipse", "triangle", "cross", "star"])
    randomize_heads(model)
    path = tmp_path_factory.mktemp("src") / "shapes-detr.pt"
    save_checkpoint(path, model_checkpoint(model))
    return model, path


def test_cli_finetune_with_lr_zero_keeps_copied_rows(source_checkpoint, tmp_path):
    source, path = source_checkpoint
    cats = [(12, "Ellipse"), (3, "forklift"), (40, "star"), (7, "pallet"), (9, "cross")]
    data = coco_dataset(tmp_path / "data", cats)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--weights", str(path), "--data", str(data["train"]),
        "--images", str(tmp_path / "data" / "train"), "--lr", "0", "--set", "lr_backbone=0",
        *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    n = len(source.state_dict())
    line = (f"loaded {n} of {n} tensors; class rows: 3 of 5 copied by name (cross, Ellipse, "
            "star), 2 new (forklift, pallet)")
    assert line in " ".join(result.output.split())
    config = json.loads((out / "config.json").read_text())
    assert config["weights"]["summary"] == line and config["weights"]["source"] == str(path)
    tuned = qdet.load(out / "last.pt")
    assert tuned.class_names == ["forklift", "pallet", "cross", "Ellipse", "star"]  # by id
    assert tuned.category_ids == [3, 7, 9, 12, 40]
    w, b = tuned.class_embed.weight, tuned.class_embed.bias
    for j, i in ((2, 3), (3, 1), (4, 4), (5, 5)):       # cross, Ellipse, star, no object
        assert torch.equal(w[j], source.class_embed.weight[i])
        assert torch.equal(b[j], source.class_embed.bias[i])
    assert not torch.equal(w[0], source.class_embed.weight[0])
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "2"])
    assert result.exit_code == 0, result.output     # a resumed run keeps its provenance
    assert json.loads((out / "config.json").read_text())["weights"]["summary"] == line


def test_cli_finetune_freeze_backbone(source_checkpoint, tmp_path):
    source, path = source_checkpoint
    data = coco_dataset(tmp_path / "data", [(1, "star"), (2, "b"), (3, "c"), (4, "d"),
                                            (5, "e")])
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--weights", str(path), "--data", str(data["train"]),
        "--images", str(tmp_path / "data" / "train"), "--lr", "1e-3",
        "--set", "lr_backbone=1e-3", *SMALL, "--out", str(out), "--freeze-backbone"])
    assert result.exit_code == 0, result.output
    tuned = qdet.load(out / "last.pt")
    assert tuned.config.backbone_trainable == 0 and tuned.config.frozen_bn
    ours, theirs = tuned.backbone.state_dict(), source.backbone.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(tuned.query_embed.weight, source.query_embed.weight)


@pytest.mark.parametrize("args, message", [
    (["--arch", "conditional"], "are a detr model; drop --arch"),
    (["--backbone-weights", "x.pth"], "cannot apply with --weights"),
])
def test_cli_finetune_refusals(source_checkpoint, tmp_path, args, message):
    _, path = source_checkpoint
    data = coco_dataset(tmp_path / "data", [(i, str(i)) for i in range(1, 6)])
    result = CliRunner().invoke(app, ["train", "--weights", str(path), *args, "--data",
                                      str(data["train"]), "--images",
                                      str(tmp_path / "data" / "train")])
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_dataset_without_categories_says_what_to_do(source_checkpoint, tmp_path):
    _, path = source_checkpoint
    data = coco_dataset(tmp_path / "data", [(i, str(i)) for i in range(1, 6)])
    ann = json.loads(data["train"].read_text())
    data["train"].write_text(json.dumps({**ann, "categories": [], "annotations": []}))
    result = CliRunner().invoke(app, ["train", "--weights", str(path), "--data",
                                      str(data["train"]), "--images",
                                      str(tmp_path / "data" / "train")])
    assert result.exit_code == 1
    assert "'categories' is empty; list the classes" in " ".join(result.output.split())


def test_shapes_of_other_categories(tmp_path):
    """The data of the fine-tuning demonstration: other kinds drawn, named as asked."""
    from qdet.data.datasets import ShapesDataset
    from qdet.data.shapes import ShapesConfig, render

    kinds = ("rectangle", "hexagon", "ring", "diamond")
    cfg = ShapesConfig(image_size=64, categories=kinds)
    seen = set()
    for i in range(30):
        img, boxes, labels = render(cfg, "train", i)
        seen.update(kinds[label] for label in labels)
        assert all(0 <= v <= 64 for b in boxes for v in b)
    assert seen == set(kinds)
    assert ShapesDataset("val", cfg).class_names == list(kinds)
    with pytest.raises(ValueError, match="choose from rectangle, .*, ring"):
        ShapesConfig(categories=("rectangle", "forklift"))
    result = CliRunner().invoke(app, ["data", "shapes", str(tmp_path), "--train-images", "2",
                                      "--val-images", "1", "--image-size", "32",
                                      "--categories", "ring,ellipse"])
    assert result.exit_code == 0, result.output
    cats = json.loads((tmp_path / "val.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "ring"), (2, "ellipse")]
    result = CliRunner().invoke(app, ["data", "shapes", str(tmp_path), "--categories", "x"])
    assert result.exit_code == 1 and "choose from" in result.output


@pytest.mark.parametrize("arch", ["conditional", "sparse-rcnn", "anchor"])
def test_query_groups_transfer_group_by_group(arch):
    """A model trained with three query groups fine-tunes with one: group 0, the one
    inference runs, comes across, so the outputs are the source's; with three again from
    one, group 0 is the source's and the two new groups start as the method initialises
    them (copies of group 0 would be matched and trained alike forever)."""
    torch.manual_seed(0)
    cfg = {**TINY[arch], "num_classes": 5}
    three = build_model(arch, {**cfg, "query_groups": 3}).eval()
    three.class_names = list(NAMES)
    one = build_model(arch, cfg).eval()
    one.class_names = list(NAMES)
    report = transfer(three, one)
    assert report.loaded == report.total and report.query_groups == [3, 1]
    assert "query groups 3 -> 1: group 0 kept" in report.summary()
    x = random_images([(64, 96)])
    with torch.no_grad():
        a, b = three(x), one(x)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"])
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"])

    torch.manual_seed(5)
    fresh = build_model(arch, {**cfg, "query_groups": 3})
    torch.manual_seed(5)
    again = build_model(arch, {**cfg, "query_groups": 3})
    again.class_names = list(NAMES)
    assert "1 copied, 2 new" in transfer(one, again).summary()
    src, new, init = one.state_dict(), again.state_dict(), fresh.state_dict()
    grouped = [k for k in src if src[k].shape != new[k].shape]
    assert grouped                           # the method has per-group query parameters
    for k in grouped:
        n = len(src[k])
        assert torch.equal(new[k][:n], src[k]) and torch.equal(new[k][n:], init[k][n:])
