"""Faults (issue 18): a run killed at any moment resumes from its last complete checkpoint
and ends with an uninterrupted run's weights; runs started in the same second get their own
folders; a full disk keeps the previous checkpoint and says so; under torchrun a killed
worker makes the other exit with one clear line, in seconds."""
import json
import os
import subprocess
import sys
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import qdet
import qdet.common.files
import qdet.engine.step
import qdet.engine.trainer
import qdet.weights.checkpoint
from qdet.cli.app import app
from qdet.data.datasets import ShapesDataset
from qdet.engine.runs import fit, run_folder

from conftest import TINY

TESTS = Path(__file__).parent
COMMON = dict(device="cpu",
              model_overrides={"d_model": 32, "enc_layers": 1, "dec_layers": 2,
                               "dim_feedforward": 64, "num_queries": 6, "dropout": 0.1,
                               "backbone": "resnet18"},
              train_overrides={"batch_size": 4, "num_workers": 0, "shapes.train_images": 8,
                               "shapes.val_images": 4, "shapes.image_size": 64,
                               "warmup_steps": 0, "epochs": 3, "eval_every": 100})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: 3 epochs of 2 steps, evaluated after the last."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit("detr", out=str(out), **COMMON)
    return out


def lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    la, lb = lines(a), lines(b)
    assert [m["epoch"] for m in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    wa = qdet.load(a / "last.pt").state_dict()
    wb = qdet.load(b / "last.pt").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    assert not list(b.glob("*.tmp"))


class Crash(BaseException):
    """What a kill looks like from inside: nothing after it runs (no except Exception)."""


def test_crashes_at_every_moment_resume_to_the_same_weights(straight, tmp_path, monkeypatch):
    """One run crashed five times, resumed after each: while loading epoch 2's data, in
    epoch 2's second step, inside save_checkpoint between writing epoch 2's last.pt and
    renaming it, after last.pt but before its metrics line, and while evaluating epoch 3."""
    out = tmp_path / "split"
    real_item, real_step = ShapesDataset.__getitem__, qdet.engine.step.train_step
    real_replace, real_append = os.replace, qdet.engine.trainer.append_metrics

    def crashing(kind):
        def loading(self, index):
            if self.train and self.epoch == 1:
                raise Crash
            return real_item(self, index)

        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise Crash
            return real_step(*args, **kwargs)

        def replace(src, dst):
            if str(dst).endswith("last.pt"):
                raise Crash
            return real_replace(src, dst)

        def append(run, metrics):
            if metrics["epoch"] == 2:
                raise Crash
            return real_append(run, metrics)

        def evaluate(*args, **kwargs):
            raise Crash
        return {"data loading": (ShapesDataset, "__getitem__", loading),
                "the step": (qdet.engine.step, "train_step", step),
                "checkpoint writing": (qdet.weights.checkpoint.os, "replace", replace),
                "before the metrics line": (qdet.engine.trainer, "append_metrics", append),
                "evaluation": (qdet.engine.trainer, "evaluate", evaluate)}[kind]

    saved_after = []
    for i, kind in enumerate(["data loading", "the step", "checkpoint writing",
                              "before the metrics line", "evaluation"]):
        with monkeypatch.context() as m:
            m.setattr(*crashing(kind))
            with pytest.raises(Crash):
                if i == 0:
                    fit("detr", out=str(out), **COMMON)
                else:
                    fit("detr", out=str(out), resume=True, device="cpu")
        saved_after.append((torch.load(out / "last.pt", weights_only=True)["epoch"],
                            [m["epoch"] for m in lines(out)]))
    # epoch 2's metrics line, lost in the 4th crash, is restored from last.pt on resuming
    assert saved_after == [(1, [1]), (1, [1]), (1, [1]), (2, [1]), (2, [1, 2])]
    fit("detr", out=str(out), resume=True, device="cpu")
    assert_same_run(straight, out)


KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import qdet.weights.checkpoint
from qdet.engine.runs import fit
from test_faults import COMMON

real = qdet.weights.checkpoint.os.replace
seen = []

def replace(src, dst):  # the temporary file is complete, the rename has not happened
    if str(dst).endswith("last.pt"):
        seen.append(dst)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

qdet.weights.checkpoint.os.replace = replace
fit("detr", out={out!r}, **COMMON)
"""


def test_kill_9_while_writing_a_checkpoint(straight, tmp_path):
    """A real SIGKILL between writing epoch 2's last.pt under its temporary name and the
    rename: last.pt is still epoch 1's, the temporary file is left behind, and the resumed
    run removes it and ends with the uninterrupted run's weights."""
    out = tmp_path / "killed"
    code = KILLED.format(tests=str(TESTS), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=TESTS.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    (stale,) = out.glob(".last.pt.*.tmp")   # qdet.common.files names its temporaries
    assert stale.stat().st_size > 0
    fit("detr", out=str(out), resume=True, device="cpu")
    assert_same_run(straight, out)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20250101-120000")
    folders = ThreadPool(8).map(lambda _: run_folder("detr", None, 1), range(8))
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)
    assert sorted(f.name for f in folders) == sorted(
        ["detr-20250101-120000"] + [f"detr-20250101-120000-{k}" for k in range(2, 9)])


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    """The third checkpoint file written (epoch 2's first) goes to /dev/full, so torch.save
    meets the kernel's ENOSPC: epoch 1's files survive and the error says the disk is full."""
    real = open
    opened = []

    def fake_open(file, mode="r", *args, **kwargs):
        if mode == "wb" and ".pt." in Path(file).name:   # a checkpoint's temporary file
            opened.append(file)
            if len(opened) == 3:
                return real("/dev/full", "wb")
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(qdet.common.files, "open", fake_open, raising=False)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--epochs", "2"]
    for k, v in {**TINY["detr"], **COMMON["train_overrides"], "epochs": 2}.items():
        if k != "num_classes":
            args += ["--set", f"{k}={v}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    (error,) = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: the disk is full: no space left on {out} to write "), error
    assert "(the previous one is intact); free some space; the last complete checkpoint is " \
        f"{out / 'last.pt'} (epoch 1); continue from it with --resume --out {out}" in error
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob("*.tmp"))


def test_torchrun_worker_killed_the_other_says_so_and_exits(tmp_path):
    """Two gloo processes; rank 0 is killed with SIGKILL while training. Rank 1 stops
    within seconds with one line (it lost its peer, or torchrun's SIGTERM came first) and
    no traceback of its own; torchrun then reports the failure and exits."""
    sets = []
    for k, v in TINY["detr"].items():
        if k != "num_classes":
            sets += ["--set", f"{k}={v}"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "qdet", "train", "--epochs", "50", "--device", "cpu", "--out", str(out),
           "--batch-size", "2", "--workers", "0", "--set", "shapes.train_images=400",
           "--set", "shapes.val_images=4", "--set", "shapes.image_size=64", *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists():  # rank 0 is about to train
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        rank0 = [w for w in workers
                 if b"RANK=0" in Path(f"/proc/{w}/environ").read_bytes().split(b"\0")]
        assert len(rank0) == 1, workers
        os.kill(int(rank0[0]), 9)
        killed = time.time()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - killed < 30 and proc.returncode != 0
    said = [line for line in (stdout + stderr).splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: rank 1 of 2: "), stdout + stderr
    assert "lost contact with the other processes" in said[0] or "stopped by SIGTERM" in said[0]
    assert "[rank1]" not in stderr, stderr[-3000:]
