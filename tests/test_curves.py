"""The run folder a person reads: results.csv and curves.png after every epoch (surviving
--resume without duplicated rows), TensorBoard when asked, and `qdet plot` over runs."""
import csv
import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

import qdet.engine.plots
from qdet.blocks.base import LossConfig
from qdet.cli.app import app
from qdet.engine.compare import load_run, run_labels
from qdet.engine.run_folder import read_metrics
from qdet.engine.runs import fit

from conftest import TINY, TINY_SHAPES

# 2 decoder layers, and denoising queries, whose loss terms results.csv logs too
MODEL = {**{k: v for k, v in TINY["detr"].items() if k != "num_classes"}, "dn.groups": 5}
TRAIN = {"batch_size": 4, "num_workers": 0, "shapes.train_images": 8, "shapes.val_images": 4,
         "shapes.image_size": 64, "warmup_steps": 0}


def train(out, epochs, resume=False, **extra):
    if resume:
        return fit("detr", out=str(out), resume=True, device="cpu",
                   train_overrides={"epochs": epochs, **extra})
    return fit("detr", out=str(out), device="cpu", model_overrides=MODEL,
               train_overrides={**TRAIN, "epochs": epochs, **extra})


def csv_rows(run):
    with open(run / "results.csv") as f:
        return list(csv.DictReader(f))


def assert_png(path, min_size=(400, 300)):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs that differ in lr: one of 2 epochs with TensorBoard, one of 1 epoch
    extended to 2 by --resume."""
    root = tmp_path_factory.mktemp("runs")
    train(root / "a", 2, tensorboard=True)
    train(root / "b", 1, lr=5e-4)
    first = csv_rows(root / "b")
    train(root / "b", 2, resume=True)
    return root, first


def test_results_csv_has_every_term_of_every_layer(two_runs):
    root, _ = two_runs
    rows = csv_rows(root / "a")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    head = list(rows[0])
    assert head[:9] == ["epoch", "step", "images", "time", "lr", "loss", "loss_ce",
                        "loss_bbox", "loss_giou"]
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0", "AP", "AP50", "AP75", "APs", "APm",
            "APl", "AR100"} <= set(head)
    assert [r["step"] for r in rows] == ["2", "4"] and [r["images"] for r in rows] == ["8", "16"]
    # the logged total is the weighted sum of the logged terms of both layers, the
    # denoising queries' (--dn 5) included; loss_dn is their subtotal
    w = LossConfig()
    weight = {"ce": w.class_weight, "bbox": w.bbox_weight, "giou": w.giou_weight}
    terms = [k for k in head if k.startswith("loss_") and k != "loss_dn"]
    assert {"loss_ce_dn", "loss_bbox_dn_0"} <= set(terms)
    for r in rows:
        total = sum(weight[k.split("_")[1]] * float(r[k]) for k in terms)
        assert float(r["loss"]) == pytest.approx(total, rel=1e-4)
        dn = sum(weight[k.split("_")[1]] * float(r[k]) for k in terms if "_dn" in k)
        assert float(r["loss_dn"]) == pytest.approx(dn, rel=1e-4)
    jsonl = read_metrics(root / "a")
    assert float(rows[1]["AP50"]) == pytest.approx(jsonl[1]["AP50"], rel=1e-5)
    assert float(rows[1]["time"]) > float(rows[0]["time"]) > 0


def test_curves_and_best_report_are_in_the_run_folder(two_runs):
    root, _ = two_runs
    assert_png(root / "a" / "curves.png", (1000, 600))
    for name in ("confusion.png", "pr.png"):
        assert_png(root / "a" / name)
    per_class = list(csv.DictReader(open(root / "a" / "per_class.csv")))
    assert [r["name"] for r in per_class] == ["rectangle", "ellipse", "triangle", "cross",
                                              "star"]
    best = json.loads((root / "a" / "best_results.json").read_text())
    assert best and {"image_id", "category_id", "bbox", "score"} == set(best[0])


def test_resume_continues_the_csv_without_duplicates(two_runs):
    root, first = two_runs
    assert [r["epoch"] for r in first] == ["1"]       # written after the first epoch
    rows = csv_rows(root / "b")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]
    assert float(rows[1]["time"]) > float(rows[0]["time"])
    assert [r["epoch"] for r in read_metrics(root / "b")] == [1, 2]


def test_lines_from_epochs_the_resumed_run_redoes_are_dropped(two_runs, tmp_path):
    """A checkpoint whose metrics.jsonl line was lost in a crash, and a line from an epoch
    past the checkpoint, give neither a missing nor a duplicated row."""
    root, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(root / "b", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    stale = {**json.loads(lines[1]), "epoch": 3, "loss": 123.0}
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps(stale) + "\n{\"cut sho")
    train(run, 3, resume=True)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["loss"] != 123.0
    assert rows[:2] == [json.loads(line) for line in lines]   # epoch 2 from last.pt
    assert [r["epoch"] for r in csv_rows(run)] == ["1", "2", "3"]


def test_a_failing_figure_is_one_warning_not_a_failed_run(tmp_path, monkeypatch, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(qdet.engine.plots, "curves", broken)
    train(tmp_path / "run", 1)
    assert len(csv_rows(tmp_path / "run")) == 1
    assert not (tmp_path / "run" / "curves.png").exists()
    err = capfd.readouterr().err
    assert err.count("no fonts today") == 1 and "training goes on" in err


def test_tensorboard_logs_steps_and_epochs(two_runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = two_runs
    events = EventAccumulator(str(root / "a" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/AP", "val/AP50", "loss/loss_giou_0"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    jsonl = read_metrics(root / "a")
    assert [e.value for e in events.Scalars("val/AP50")] == \
        pytest.approx([r["AP50"] for r in jsonl])
    assert not (root / "b" / "tensorboard").exists()


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("TensorBoard logging requires TensorBoard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--tensorboard", "--epochs", "1", *TINY_SHAPES])
    assert r.exit_code == 1 and "pip install 'qdet[tensorboard]'" in r.output
    assert not (tmp_path / "runs").exists()      # refused before anything was written


def test_plot_overlays_runs(two_runs, tmp_path):
    root, _ = two_runs
    for x, metric in (("epoch", "AP50"), ("time", "AP"), ("images", "loss")):
        out = tmp_path / f"{x}.png"
        r = CliRunner().invoke(app, ["plot", str(root / "a"), str(root / "b"), "--x", x,
                                     "--metric", metric, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert_png(out)
    # the label: the method with its switches, then the option the runs differ in (not
    # --tensorboard: a way of logging, not of training)
    assert "DETR + DN 5 groups" in r.output
    assert "lr=0.0005" in r.output and "lr=0.0002" in r.output
    assert "tensorboard" not in r.output
    r = CliRunner().invoke(app, ["plot", str(root / "a"), "--markdown", "--out",
                                 str(tmp_path / "m.png")])
    assert r.output.splitlines()[0].startswith("| run | steps | images | minutes | AP |")


def test_labels_name_only_what_differs_within_an_architecture(tmp_path):
    def record(name, arch, **train):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"arch": arch, "model": {"d_model": 128}, "train": {"lr": 1e-4, **train}}))
        return load_run(tmp_path / name)

    recs = [record("a", "detr"), record("b", "conditional", lr=3e-4),
            record("c", "deformable"), record("d", "deformable", lr=2e-4,
                                                 time={"total_steps": 5})]
    assert run_labels(recs) == ["DETR", "Conditional DETR", "Deformable DETR lr=0.0001",
                                "Deformable DETR lr=0.0002"]
    assert run_labels([recs[0], record("e", "detr")]) == ["DETR [a]", "DETR [e]"]


def test_labels_say_the_variant_and_the_switches_in_words(tmp_path):
    def record(name, arch, model, **train):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"arch": arch, "model": model, "train": train}))
        return load_run(tmp_path / name)

    recs = [record("a", "deformable", {"with_box_refine": True, "two_stage": True}),
            record("b", "deformable", {"with_box_refine": True, "two_stage": False}),
            record("c", "detr", {"dn": {"groups": 5, "queries": 0}, "query_groups": 3},
                   ema={"enabled": True}),
            record("d", "detr", {"dn": {"groups": 0, "queries": 0}, "query_groups": 1},
                   ema={"enabled": False}),
            record("e", "dino", {"dn": {"groups": 0, "queries": 20, "contrastive": True}})]
    assert run_labels(recs) == [
        "Deformable DETR (two-stage)", "Deformable DETR (box refinement)",
        "DETR + DN 5 groups, query groups 3, EMA", "DETR",
        "DINO + contrastive DN 20 queries"]


def test_plot_errors_are_one_line(two_runs, tmp_path):
    root, _ = two_runs
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "no metrics (metrics.jsonl is missing or empty)" in r.output
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such run folder" in r.output
    r = CliRunner().invoke(app, ["plot", str(root / "a"), "--metric", "mAP"])
    assert r.exit_code == 1 and "no 'mAP' in metrics.jsonl" in r.output
    r = CliRunner().invoke(app, ["plot", str(root / "a"), "--x", "steps"])
    assert r.exit_code == 1 and "--x must be one of epoch, time, images" in r.output
