"""The everyday commands as a new user meets them (issue 22): where `qdet eval` writes its
results, the lr the progress bar shows during warm-up, which run `predict` and `match-debug`
pick without --weights."""
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from qdet.cli.app import app

from conftest import TINY, TINY_SHAPES

WARMUP = ["--lr", "1e-3", "--set", "schedule=step", "--set", "warmup_steps=100"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run trained through the CLI with a long warm-up: 16 images in batches of 4,
    so 4 steps at lr 1e-3 * (step + 1) / 100."""
    cwd = tmp_path_factory.mktemp("everyday")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        args = ["train", "--epochs", "1", *TINY_SHAPES, *WARMUP]
        for k, v in TINY["detr"].items():
            if k != "num_classes":
                args += ["--set", f"{k}={v}"]
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    (run,) = (cwd / "runs").iterdir()
    return cwd, run, result.output


def test_progress_bar_shows_the_lr_of_the_step(run_dir):
    """The last of 4 warm-up steps runs at 1e-3 * 4/100; the scheduler has already moved to
    5e-5 when the bar is drawn, which is what it used to show."""
    _, _, output = run_dir
    bar = next(line for line in output.splitlines() if line.startswith("epoch 1/1"))
    assert " lr 4e-05 " in bar, bar


def test_eval_writes_results_into_the_run_folder(run_dir, monkeypatch, tmp_path):
    _, run, _ = run_dir
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["eval", str(run / "best.pt"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    written = run / "best_results.json"
    assert written.is_file() and not list(tmp_path.iterdir())
    assert f"written to {written}" in r.output.replace("\n", "")
    assert json.loads(written.read_text())[0].keys() == {"image_id", "category_id", "bbox",
                                                         "score"}


def test_eval_of_weights_outside_a_run_writes_into_the_current_folder(run_dir, monkeypatch,
                                                                        tmp_path):
    """A downloaded or shared checkpoint: nothing is written beside it."""
    _, run, _ = run_dir
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(run / "best.pt", shared / "model.pt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = CliRunner().invoke(app, ["eval", str(shared / "model.pt"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in shared.iterdir()] == ["model.pt"]
    assert (work / "model_results.json").is_file()
    assert "written to model_results.json" in r.output
    r = CliRunner().invoke(app, ["eval", str(shared / "model.pt"), "--workers", "0",
                                 "--out", "elsewhere.json"])
    assert r.exit_code == 0 and (work / "elsewhere.json").is_file(), r.output


def copy_run(src, dst, files):
    dst.mkdir(parents=True)
    for name in ["config.json", *files]:
        shutil.copy(src / name, dst / name)
    return dst


def test_predict_finds_the_latest_run_by_best_or_last(run_dir, tmp_path, monkeypatch):
    """Runs are found by best.pt or last.pt, the most recently written first; in a run,
    best.pt is preferred."""
    _, run, _ = run_dir
    monkeypatch.chdir(tmp_path)
    from qdet.data.shapes import ShapesConfig, render

    render(ShapesConfig(image_size=64), "val", 0)[0].save(tmp_path / "photo.png")
    runner = CliRunner()
    old = copy_run(run, tmp_path / "runs" / "a-old", ["best.pt", "last.pt"])
    os.utime(old / "best.pt", (1, 1))
    os.utime(old / "last.pt", (1, 1))
    only_best = copy_run(run, tmp_path / "runs" / "b-only-best", ["best.pt"])
    r = runner.invoke(app, ["predict", "photo.png"])
    assert r.exit_code == 0, r.output
    said = r.output.replace("\n", "")
    assert "using runs/b-only-best/best.pt (best checkpoint of the most recent run)" in said
    (only_best / "best.pt").unlink()
    only_last = copy_run(run, tmp_path / "runs" / "c-only-last", ["last.pt"])
    r = runner.invoke(app, ["match-debug", "--index", "0"])
    assert r.exit_code == 0, r.output
    assert "using runs/c-only-last/last.pt (last checkpoint" in r.output.replace("\n", "")
    shutil.rmtree(only_last)
    r = runner.invoke(app, ["predict", "photo.png"])  # both files: best.pt
    assert r.exit_code == 0 and "using runs/a-old/best.pt" in r.output, r.output


def test_resume_ignores_runs_without_last_pt(run_dir, tmp_path, monkeypatch):
    _, run, _ = run_dir
    monkeypatch.chdir(tmp_path)
    copy_run(run, tmp_path / "runs" / "only-best", ["best.pt"])
    r = CliRunner().invoke(app, ["train", "--resume"])
    assert r.exit_code == 1 and "nothing to resume: no last.pt in runs/*" in r.output, r.output
