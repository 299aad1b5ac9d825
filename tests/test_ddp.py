"""Two CPU processes under torchrun (gloo): DistributedSampler, rank-0 checkpoints, an
evaluation whose predictions are gathered from both ranks, and output from rank 0 alone."""
import json
import subprocess
import sys

import qdet

from conftest import TINY


def test_torchrun_two_processes(tmp_path):
    sets = []
    for k, v in TINY["detr"].items():
        if k != "num_classes":
            sets += ["--set", f"{k}={v}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "qdet", "train", "--epochs", "1", "--device", "cpu", "--out",
           str(tmp_path / "run"), "--batch-size", "2", "--workers", "0",
           "--set", "shapes.train_images=8", "--set", "shapes.val_images=5",
           "--set", "shapes.image_size=64", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert sum("run saved in" in line for line in shown) == 1, shown
    assert len(shown) == len(set(shown)), shown   # no line printed by both ranks
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1                      # only rank 0 writes
    m = json.loads(lines[0])
    assert m["world_size"] == 2 and m["steps"] == 2   # 8 images / (2 per step x 2 ranks)
    assert "AP" in m
    model = qdet.load(tmp_path / "run" / "last.pt")
    assert model.config.d_model == 32
