"""`qdet train --time`: the plan from a measured warm-up (on a fake clock, so the numbers are
hand-computable), the schedule ending with the budget, the data stream, exact resuming."""
import json

import pytest
import torch
from typer.testing import CliRunner

import qdet
import qdet.engine.budget
import qdet.engine.step
import qdet.engine.timed
import qdet.engine.trainer
from qdet.cli.app import app
from qdet.engine.budget import PassIndexed, StreamSampler, TimeConfig, part_bounds, plan
from qdet.engine.config import TrainConfig
from qdet.engine.optim import lr_factor
from qdet.engine.runs import fit

from conftest import TINY, TINY_SHAPES

MODEL = {k: v for k, v in TINY["detr"].items() if k != "num_classes"}
TRAIN = {"batch_size": 4, "num_workers": 0, "shapes.train_images": 8, "shapes.val_images": 4,
         "shapes.image_size": 64, "warmup_steps": 0, "time.warmup": 2, "time.max_evals": 3,
         "time.warmup_share": 1.0}
STEP_S, PROBE_S = 2.0, 0.5   # what the fake clock says a step and the evaluation probe take


def test_plan_by_hand():
    # 600 s budget, 100 s used, 0.5 s a step, 10 s an evaluation: 6 evaluations (a tenth of
    # the budget) and a report of half of one, (600 - 100 - 60 - 5) / 0.5 = 870 steps more
    assert plan(600, 100, 0.5, 10, 20, 10) == (890, 6)
    assert plan(600, 100, 0.5, 1, 20, 10) == (20 + int((500 - 10.5) / 0.5), 10)  # 10 at most
    assert plan(600, 100, 0.5, 0, 20, 4) == (20 + 1000, 4)                      # no val data
    assert plan(60, 70, 0.5, 1, 20, 10) == (20, 1)          # budget spent by the warm-up
    assert part_bounds(TimeConfig(warmup=4, total_steps=14, evals=3)) == [0, 7, 11, 14]
    assert part_bounds(TimeConfig(warmup=4, total_steps=4, evals=1)) == [0, 4]


def test_step_timer_leaves_out_the_first_quarter(monkeypatch):
    ticks = iter([0.0, 5.0, 6.0, 7.0, 8.0])          # the first step paid for a start-up
    monkeypatch.setattr(qdet.engine.budget, "clock", lambda: next(ticks))
    timer = qdet.engine.budget.StepTimer()
    for _ in range(4):
        timer.tick()
    assert timer.step_seconds() == pytest.approx(1.0)


def test_stream_covers_each_pass_once_and_splits_anywhere():
    n = 10
    whole = list(StreamSampler(n, seed=3, start=0, stop=35))
    for p in range(3):
        assert sorted(i - p * n for i in whole[p * n:(p + 1) * n]) == list(range(n))
    assert [i - 10 for i in whole[10:20]] != whole[:10]   # each pass in its own order
    parts = [list(StreamSampler(n, 3, a, b)) for a, b in ((0, 7), (7, 22), (22, 35))]
    assert sum(parts, []) == whole
    ranks = [list(StreamSampler(n, 3, 4, 20, rank=r, world=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(whole[4:20])
    assert len(StreamSampler(n, 3, 4, 20, rank=1, world=2)) == len(ranks[1]) == 8
    opened = iter(StreamSampler(n, 3, 30, None))
    assert [next(opened) for _ in range(5)] == whole[30:35]


def test_pass_indexed_augments_with_the_pass():
    class Data:
        epoch = None

        def __len__(self):
            return 4

        def set_epoch(self, e):
            self.epoch = e

        def __getitem__(self, i):
            return (self.epoch, i)

    assert PassIndexed(Data())[9] == (2, 1)


def test_step_schedule_drops_at_the_same_fraction():
    """(A timed run's schedule is this factor over its planned total, as the cosine end in
    the run below shows.)"""
    cfg = TrainConfig(epochs=10, schedule="step", lr_drops=(5, 8), warmup_steps=0)
    f = lr_factor(cfg, 200)   # 200 steps: drops at 100 and 160, as epochs 5 and 8 of 20 each
    assert [f(s) for s in (99, 100, 159, 160)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_factor(cfg, None)(150) == 1.0    # before a timed run's plan: its start


@pytest.fixture
def fake_clock(monkeypatch):
    """Time that moves only when a training step (STEP_S), the evaluation probe or an
    evaluation (PROBE_S each) runs."""
    clock = {"now": 0.0, "step": STEP_S, "steps": 0, "slower": (10**9, 0.0)}
    monkeypatch.setattr(qdet.engine.budget, "clock", lambda: clock["now"])
    real_step, real_predict = qdet.engine.step.train_step, qdet.engine.timed.predict_dataset

    def step(*args, **kwargs):
        clock["steps"] += 1
        after, seconds = clock["slower"]          # steps after the first `after` take longer
        clock["now"] += seconds if clock["steps"] > after else clock["step"]
        return real_step(*args, **kwargs)

    def predict(*args, **kwargs):
        clock["now"] += PROBE_S
        return real_predict(*args, **kwargs)

    real_evaluate = qdet.engine.trainer.evaluate

    def evaluate(*args, **kwargs):   # the whole 4-image val set, as the probe predicted it
        clock["now"] += PROBE_S
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(qdet.engine.step, "train_step", step)
    monkeypatch.setattr(qdet.engine.timed, "predict_dataset", predict)
    monkeypatch.setattr(qdet.engine.trainer, "evaluate", evaluate)
    return clock


def timed_run(out, minutes=0.3, **extra):
    return fit("detr", out=str(out), device="cpu", model_overrides=MODEL,
               train_overrides={**TRAIN, "time.minutes": minutes, **extra})


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_time_sets_steps_from_the_warm_up_and_resumes_exactly(tmp_path, fake_clock, monkeypatch):
    """18 s budget; 2 warm-up steps of 2 s and a probe of the whole 4-image val set of 0.5 s:
    4.5 s used; 3 evaluations (0.5 s each fits a tenth of 18 s three times) and a report of
    0.25 s; the 11.75 s left hold 5 more steps: 7 in all, in parts of 4, 1 and 2 steps."""
    timed_run(tmp_path / "straight")
    ckpt = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    t = ckpt["train"]["time"]
    assert (t["total_steps"], t["evals"], t["planned_steps"]) == (7, 3, 7)
    assert t["step_seconds"] == pytest.approx(STEP_S) and t["eval_seconds"] == pytest.approx(0.5)
    r = rows(tmp_path / "straight")
    assert [x["epoch"] for x in r] == [1, 2, 3] and [x["step"] for x in r] == [4, 5, 7]
    assert [x["steps"] for x in r] == [4, 1, 2] and [x["images"] for x in r] == [16, 20, 28]
    assert all("AP" in x for x in r)                      # every part ends evaluated
    assert r[-1]["lr"] == pytest.approx(0.0, abs=1e-12)   # cosine ends with the budget
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["train"]["time"] == t                  # the plan, the rest of it kept:
    assert config["arch"] == "detr" and config["data"] == {"kind": "shapes"}
    # a run that crashes in part 3 and is resumed on a slower machine keeps its plan and
    # ends exactly where the uninterrupted one did
    real_seed = qdet.engine.trainer.seed_everything

    def crash_in_part_3(seed):
        if seed >= 42 + 2000:
            raise KeyboardInterrupt
        real_seed(seed)

    monkeypatch.setattr(qdet.engine.trainer, "seed_everything", crash_in_part_3)
    with pytest.raises(KeyboardInterrupt):
        timed_run(tmp_path / "split")
    monkeypatch.setattr(qdet.engine.trainer, "seed_everything", real_seed)
    fake_clock["step"] = 50.0   # a slower machine now: the plan stays
    fit("detr", out=str(tmp_path / "split"), resume=True, device="cpu")
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [x["step"] for x in b] == [4, 5, 7]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-6)
    wa = qdet.load(tmp_path / "straight" / "last.pt").state_dict()
    wb = qdet.load(tmp_path / "split" / "last.pt").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="already finished its 0.3-minute budget"):
        fit("detr", out=str(tmp_path / "split"), resume=True, device="cpu")
    with pytest.raises(ValueError, match="keeps a run's length"):
        fit("detr", out=str(tmp_path / "split"), resume=True, device="cpu",
            train_overrides={"epochs": 5})


def test_steps_slower_than_planned_end_the_run_early(tmp_path, fake_clock):
    """The plan above (7 steps in parts ending at 4, 5, 7); from step 3 on a step takes 5 s.
    The last evaluation and the report must start by 18 - 0.5 - 0.25 = 17.25 s: part 1 ends
    at 14.5 s as planned and is evaluated by 15 s; step 5 ends at 20 s, so part 2 stops
    there and is the last."""
    fake_clock["slower"] = (2, 5.0)
    timed_run(tmp_path / "run")
    t = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["time"]
    assert (t["total_steps"], t["evals"], t["planned_steps"]) == (5, 2, 7)
    r = rows(tmp_path / "run")
    assert [x["step"] for x in r] == [4, 5] and all("AP" in x for x in r)
    # over by the one step that crossed the deadline, less the report's unused 0.25 s
    assert fake_clock["now"] == pytest.approx(20.5)
    with pytest.raises(ValueError, match="already finished"):
        fit("detr", out=str(tmp_path / "run"), resume=True, device="cpu")


@pytest.mark.parametrize("minutes, step_s, expected", [
    # 18 s: the first 2 s step passes the warm-up's 1.8 s; 18 - 2.5 - 1.5 - 0.25 = 13.75 s
    # hold 6 more steps, in parts ending at 3, 5, 7
    (0.3, 2.0, dict(warmup=1, total_steps=7, evals=3, ends=[3, 5, 7])),
    # one minute, a step of 50 s (images far larger than the model's preset expects): one
    # step, its evaluation, and the run ends inside the minute
    (1.0, 50.0, dict(warmup=1, total_steps=1, evals=1, ends=[1])),
])
def test_slow_warm_up_keeps_to_its_share_of_the_budget(tmp_path, fake_clock, minutes, step_s,
                                                        expected):
    fake_clock["step"] = step_s
    timed_run(tmp_path / "run", minutes, **{"time.warmup": 20, "time.warmup_share": 0.1})
    t = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["time"]
    assert {k: t[k] for k in ("warmup", "total_steps", "evals")} == \
        {k: v for k, v in expected.items() if k != "ends"}
    assert [x["step"] for x in rows(tmp_path / "run")] == expected["ends"]
    assert fake_clock["now"] <= minutes * 60


def test_time_and_epochs_are_one_or_the_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--time", "1", "--epochs", "3", *TINY_SHAPES])
    assert r.exit_code == 1 and "replaces --epochs: pass one of them" in r.output
    r = CliRunner().invoke(app, ["train", "--time", "-2", *TINY_SHAPES])
    assert r.exit_code == 1 and "--time must be a positive number" in r.output


def test_timed_run_on_two_processes_follows_rank_0s_plan(tmp_path):
    """Under torchrun each rank times its own warm-up; all must follow one plan (rank 0's),
    or their collectives would stop matching. Real clock: the numbers vary, the agreement
    must not."""
    import os
    import subprocess
    import sys

    sets = []
    for k, v in MODEL.items():
        sets += ["--set", f"{k}={v}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "qdet", "train", "--time", "0.1", "--device", "cpu", "--out",
           str(tmp_path / "run"), "--batch-size", "2", "--workers", "0",
           "--set", "shapes.train_images=8", "--set", "shapes.val_images=4",
           "--set", "shapes.image_size=64", "--set", "time.warmup=2",
           "--set", "time.max_evals=2", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    t = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["time"]
    r = rows(tmp_path / "run")
    assert [x["epoch"] for x in r] == list(range(1, t["evals"] + 1))
    assert r[-1]["step"] == t["total_steps"] == sum(x["steps"] for x in r)
    assert r[-1]["images"] == t["total_steps"] * 2 * 2 and r[-1]["world_size"] == 2
    assert (tmp_path / "run" / "curves.png").is_file()
