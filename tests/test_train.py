"""Training: the loss falls, --resume continues exactly, the CLI works end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import qdet
from qdet.cli.app import app
from qdet.engine.runs import fit

from conftest import TINY, TINY_SHAPES

TINY_TRAIN = {"batch_size": 4, "num_workers": 0, "shapes.train_images": 8,
              "shapes.val_images": 4, "shapes.image_size": 64, "warmup_steps": 0}


def test_loss_goes_down_on_a_few_images(tmp_path):
    res = fit("detr", out=str(tmp_path / "run"), device="cpu",
              model_overrides={k: v for k, v in TINY["detr"].items() if k != "num_classes"},
              train_overrides={**TINY_TRAIN, "epochs": 15, "lr": 1e-3, "lr_backbone": 1e-3,
                               "schedule": "step", "eval_every": 100})
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines[-1]["loss"] < 0.75 * lines[0]["loss"], [round(l["loss"], 2) for l in lines]
    assert res["metrics"]["epoch"] == 15 and "AP" in res["metrics"]


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run that crashes during epoch 3 and is resumed ends exactly where an
    uninterrupted run ends: same epoch-3 loss, same weights."""
    common = dict(device="cpu", model_overrides={"d_model": 32, "enc_layers": 1,
                                                 "dec_layers": 2, "dim_feedforward": 64,
                                                 "num_queries": 6, "dropout": 0.1},
                  train_overrides={**TINY_TRAIN, "epochs": 3, "eval_every": 100})
    fit("detr", out=str(tmp_path / "straight"), **common)
    import qdet.engine.trainer

    real_seed = qdet.engine.trainer.seed_everything

    def crash_in_epoch_3(seed):
        if seed >= 42 + 2000:
            raise KeyboardInterrupt
        real_seed(seed)

    monkeypatch.setattr(qdet.engine.trainer, "seed_everything", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit("detr", out=str(tmp_path / "split"), **common)
    monkeypatch.setattr(qdet.engine.trainer, "seed_everything", real_seed)
    fit("detr", out=str(tmp_path / "split"), resume=True, device="cpu")
    a = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [x["epoch"] for x in b] == [1, 2, 3]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-6)
    wa = qdet.load(tmp_path / "straight" / "last.pt").state_dict()
    wb = qdet.load(tmp_path / "split" / "last.pt").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained through the CLI, in its own working directory."""
    cwd = tmp_path_factory.mktemp("cli")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        args = ["train", "--epochs", "1", *TINY_SHAPES]
        for k, v in TINY["detr"].items():
            if k != "num_classes":
                args += ["--set", f"{k}={v}"]
        result = CliRunner().invoke(app, args)
        yield cwd, result
    finally:
        os.chdir(old)


def test_cli_train_writes_run(trained_run):
    cwd, result = trained_run
    assert result.exit_code == 0, result.output
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1
    assert {p.name for p in runs[0].iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl",
                                                  "config.json"}
    line = json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "AP", "AP50", "lr", "epoch"} <= set(line)
    assert "val COCO bbox" in result.output
    model = qdet.load(runs[0] / "best.pt")
    assert model.class_names == ["rectangle", "ellipse", "triangle", "cross", "star"]
    assert model.preprocess == {"size": 64, "max_size": None}


def test_cli_predict_uses_latest_run(trained_run, monkeypatch):
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    from qdet.data.shapes import ShapesConfig, render

    render(ShapesConfig(image_size=64), "val", 0)[0].save(cwd / "photo.png")
    result = CliRunner().invoke(app, ["predict", "photo.png", "--threshold", "0.0",
                                      "--out", "preds"])
    assert result.exit_code == 0, result.output
    assert "best checkpoint of the most recent run" in result.output
    preds = json.loads((cwd / "preds" / "predictions.json").read_text())
    assert preds[0]["image"] == "photo.png" and len(preds[0]["detections"]) == 6
    assert (cwd / "preds" / "photo_pred.png").is_file()


def test_cli_eval_on_builtin_val(trained_run, monkeypatch):
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    best = next((cwd / "runs").iterdir()) / "best.pt"
    result = CliRunner().invoke(app, ["eval", str(best), "--workers", "0",
                                      "--out", "res.json"])
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output
    res = json.loads((cwd / "res.json").read_text())
    assert res and {"image_id", "category_id", "bbox", "score"} == set(res[0])
    assert {r["category_id"] for r in res} <= {1, 2, 3, 4, 5}


def test_cli_eval_compiled_gives_the_same_detections(trained_run, monkeypatch):
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    best = next((cwd / "runs").iterdir()) / "best.pt"
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for extra, name in (([], "plain.json"), (["--compile"], "compiled.json")):
        result = CliRunner().invoke(app, ["eval", str(best), "--workers", "0", "--out", name,
                                          *extra])
        assert result.exit_code == 0, result.output
    assert counters["stats"]["unique_graphs"] >= 1  # the transformer was compiled
    plain, compiled = (json.loads((cwd / n).read_text()) for n in ("plain.json", "compiled.json"))
    assert len(plain) == len(compiled) > 0
    for a, b in zip(plain, compiled):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


def test_cli_resume_of_finished_run_says_what_to_do(trained_run, monkeypatch):
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["train", "--resume"])
    assert result.exit_code == 1 and "pass a larger --epochs" in result.output


def test_cli_resume_refuses_options_it_cannot_apply(trained_run, monkeypatch):
    """The resumed model and data come from last.pt: model options, a preset or another
    architecture are refused by name instead of being dropped silently."""
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--resume", "--epochs", "2", "--set", "d_model=64",
                            "--preset", "paper"])
    assert r.exit_code == 1 and "--preset, --set (model options) cannot apply" in r.output
    r = runner.invoke(app, ["train", "--resume", "--epochs", "2", "--arch", "conditional"])
    assert r.exit_code == 1 and "trains detr, not conditional" in r.output
    r = runner.invoke(app, ["train", "--set", "loss.focal=true", *TINY_SHAPES])
    assert r.exit_code == 1 and "fixed by the architecture (detr: softmax" in r.output


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["predict", "missing.jpg"])
    assert r.exit_code == 1 and "image missing.jpg not found" in r.output
    (tmp_path / "x.png").write_bytes(b"")
    r = runner.invoke(app, ["predict", "x.png"])
    assert r.exit_code == 1 and "no --weights given and no run found" in r.output
    r = runner.invoke(app, ["train", "--data", "nope.json", "--images", "."])
    assert r.exit_code == 1 and "annotation file nope.json not found" in r.output
    r = runner.invoke(app, ["train", "--arch", "yolo"])
    assert r.exit_code == 1 and "unknown architecture 'yolo'" in r.output
    r = runner.invoke(app, ["train", "--set", "d_model"])
    assert r.exit_code == 1 and "KEY=VALUE" in r.output


def test_cli_data_shapes_writes_coco(tmp_path):
    r = CliRunner().invoke(app, ["data", "shapes", str(tmp_path / "d"), "--train-images", "3",
                                 "--val-images", "2", "--image-size", "48"])
    assert r.exit_code == 0, r.output
    val = json.loads((tmp_path / "d" / "val.json").read_text())
    assert len(val["images"]) == 2 and len(list((tmp_path / "d" / "val").glob("*.png"))) == 2
    assert [c["name"] for c in val["categories"]][:2] == ["rectangle", "ellipse"]


def test_python_dash_m_runs_the_same_app():
    out = subprocess.run([sys.executable, "-m", "qdet", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "train" in out and "predict" in out and "eval" in out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_arch_trains_and_evaluates_on_builtin_data(arch, tmp_path):
    res = fit(arch, out=str(tmp_path / arch), device="cpu",
              model_overrides={k: v for k, v in TINY[arch].items() if k != "num_classes"},
              train_overrides={**TINY_TRAIN, "epochs": 1})
    assert {"loss", "AP", "AP50"} <= set(res["metrics"])
    model = qdet.load(tmp_path / arch / "best.pt")
    assert model.arch == arch and model.config.num_classes == 5


def test_cli_match_debug_on_latest_run(trained_run, monkeypatch):
    cwd, _ = trained_run
    monkeypatch.chdir(cwd)
    runner = CliRunner()
    r = runner.invoke(app, ["match-debug", "--json", "--index", "1", "--save", "md.png"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    from qdet.data.shapes import ShapesConfig, render

    _, boxes, labels = render(ShapesConfig(image_size=64), "val", 1)
    assert len(data["rows"]) == len(boxes)
    assert [row["target_name"] for row in data["rows"]] == \
        [["rectangle", "ellipse", "triangle", "cross", "star"][l] for l in labels]
    assert (cwd / "md.png").is_file()
    r = runner.invoke(app, ["match-debug", "--index", "0"])
    assert r.exit_code == 0 and "Hungarian matching (softmax class cost" in r.output
    r = runner.invoke(app, ["match-debug", "--index", "99"])
    assert r.exit_code == 1 and "out of range" in r.output


def test_two_stage_deformable_trains_with_encoder_loss(tmp_path):
    res = fit("deformable", out=str(tmp_path / "two"), device="cpu",
              model_overrides={**{k: v for k, v in TINY["deformable"].items()
                                  if k != "num_classes"},
                               "with_box_refine": True, "two_stage": True},
              train_overrides={**TINY_TRAIN, "epochs": 1})
    assert res["metrics"]["loss_enc"] > 0


def test_trains_on_coco_json(tmp_path):
    """COCO-format data written by `qdet data shapes`, category ids 1..5, through --data."""
    from qdet.data.shapes import ShapesConfig, write_coco

    files = write_coco(ShapesConfig(image_size=64, train_images=8, val_images=4), tmp_path)
    res = fit("detr", data=str(files["train"]), images=str(tmp_path / "train"),
              val_data=str(files["val"]), val_images=str(tmp_path / "val"),
              out=str(tmp_path / "run"), device="cpu",
              model_overrides={k: v for k, v in TINY["detr"].items() if k != "num_classes"},
              train_overrides={"epochs": 1, "batch_size": 4, "num_workers": 0,
                               "augment.train_scales": (64,), "augment.max_size": 96,
                               "augment.crop": False, "augment.eval_size": 64})
    assert "AP" in res["metrics"]
    model = qdet.load(tmp_path / "run" / "best.pt")
    assert model.category_ids == [1, 2, 3, 4, 5] and model.class_names[0] == "rectangle"
    assert model.preprocess == {"size": 64, "max_size": 96}


def test_bench_commands_run_small():
    """The benchmarks' plumbing (not their numbers): tiny sizes through the CLI."""
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "matcher", "--batch", "2", "--queries", "10",
                            "--targets", "3"])
    assert r.exit_code == 0 and "softmax" in r.output and "focal" in r.output, r.output
    r = runner.invoke(app, ["bench", "rcda", "--height", "4", "--width", "6", "--repeat", "1",
                            "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("{"):])["rows"]
    assert {row["attention"] for row in rows} == {"standard", "standard, weights materialized",
                                                  "rcda"}
    r = runner.invoke(app, ["bench", "models", "--arch", "detr", "--size", "64x64", "--no-train",
                            "--repeat", "1", "--json"])
    assert r.exit_code == 0, r.output
    infer = json.loads(r.output[r.output.index("{"):])["inference"]
    assert [row["mode"] for row in infer] == ["eager", "fast", "fast+bf16"]
    assert infer[1]["max_rel_diff"] < 1e-4        # the fast path keeps float32 outputs


def test_bench_deform_conv_plumbing():
    """``qdet bench deform-conv``'s functions at tiny shapes: every op measured, ratios
    against torchvision's row, and Dynamic DETR built with either op."""
    from qdet.tools.bench_deform_conv import (
        _deform_conv_peak,
        bench_deform_conv,
        bench_dynamic_detr,
    )

    rows = bench_deform_conv(repeat=1, shapes={"tiny": (2, 8, 6, 7)}, memory=False)
    assert [r["backend"] for r in rows] == ["torchvision", "torch", "numba", "numba bf16"]
    assert rows[0]["forward_backward_speedup"] == 1.0
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)
    # the peak is measured in a fresh process: one that sees a [2, 64, 64, 64] float32
    # output and gradients holds at least their 4 MiB
    assert _deform_conv_peak((2, 64, 64, 64), "cpu", "numba", False) >= 4
    dyn = bench_dynamic_detr(repeat=1, size=(64, 64), train=False,
                             overrides={a: TINY[a] for a in ("dynamic", "deformable")})
    assert [(r["arch"], r["op"]) for r in dyn["inference"]] == [
        ("dynamic", "torchvision"), ("dynamic", "qdet"), ("deformable", "-")]
