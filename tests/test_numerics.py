"""Numerics (issue 18): the matcher's costs are float32 under autocast; NaN or inf costs stop
with the image and the term instead of scipy's message; a loss that turns NaN stops training
at its step with the term and the advice, for every method, and the last checkpoint stays
intact."""
import math

import pytest
import torch

import qdet
import qdet.engine.optim
from qdet.blocks.base import LossConfig
from qdet.engine.criterion import SetCriterion
from qdet.engine.matcher import HungarianMatcher
from qdet.engine.runs import fit

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def case(seed=0, focal=False):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(3, 6, 4 if focal else 5, generator=g),
               "pred_boxes": torch.rand(3, 6, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 2, 1][:n]), "image_id": 10 + i,
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25}
               for i, n in enumerate([2, 3, 1])]
    return outputs, targets


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_costs_are_float32_under_autocast(focal, dtype):
    """Under autocast, and with low-precision outputs, every cost term is float32 and equal
    to the costs of the float32 outputs outside autocast."""
    outputs, targets = case(focal=focal)
    matcher = HungarianMatcher(LossConfig(), focal)
    low = {k: v.to(dtype) for k, v in outputs.items()}
    ref = matcher.costs({k: v.float() for k, v in low.items()}, targets)
    with torch.autocast("cpu", dtype=dtype):
        got = matcher.costs(low, targets)
        indices = matcher(low, targets)
    for name in ("cls", "bbox", "giou"):
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)
    for (rows, cols), (r2, c2) in zip(indices, matcher(low, targets)):
        assert torch.equal(rows, r2) and torch.equal(cols, c2)


@pytest.mark.parametrize("what,where,terms", [
    ("pred_logits", float("nan"), "class cost is"),
    ("pred_boxes", float("inf"), "L1 box and GIoU costs are"),
    ("both", float("nan"), "class, L1 box and GIoU costs are"),
])
def test_non_finite_costs_name_the_image_and_the_term(what, where, terms):
    outputs, targets = case()
    for key in (["pred_logits", "pred_boxes"] if what == "both" else [what]):
        outputs[key][1, 4, 0] = where
    with pytest.raises(FloatingPointError) as info:
        HungarianMatcher(LossConfig(), False)(outputs, targets)
    assert f"the matcher's {terms} NaN or inf for image 1 of the batch (image_id 11)" in \
        str(info.value), str(info.value)
    # through the criterion: which output (a decoder layer) is named too
    outputs, targets = case()
    aux = {k: v.clone() for k, v in outputs.items()}
    aux["pred_boxes"][2, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"for image 2 of the batch \(image_id 12\).*"
                                                 r"\(decoder layer 1\)"):
        SetCriterion(4, LossConfig(), False)({**outputs, "aux_outputs": [aux]}, targets)


TRAIN = {"batch_size": 2, "num_workers": 0, "shapes.train_images": 4, "shapes.val_images": 4,
         "shapes.image_size": 64, "warmup_steps": 0, "epochs": 3, "eval_every": 100}


def nan_lr_at(step_with_nan):
    real = qdet.engine.optim.lr_factor

    def lr_factor(cfg, steps_per_epoch):
        factor = real(cfg, steps_per_epoch)
        return lambda step: math.nan if step == step_with_nan else factor(step)
    return lr_factor


def tiny(arch):
    return {k: v for k, v in TINY[arch].items() if k != "num_classes"}


def assert_epoch_1_intact(out):
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # epoch 1's records and nothing else: no temporary left beside them
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png",
                                                     "last.pt", "metrics.jsonl", "results.csv"]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_diverging_run_stops_at_its_step_and_keeps_the_checkpoint(arch, tmp_path,
                                                                     monkeypatch):
    """Epoch 1 (steps 0-1) trains and writes last.pt; step 2 (epoch 2, step 0) runs at a NaN
    lr, so every weight is NaN and epoch 2, step 1 cannot match or lose: training stops
    there, saying so, and last.pt is epoch 1's, intact. (Every method's forward turns NaN
    weights into NaN outputs without crashing the process.)"""
    monkeypatch.setattr(qdet.engine.optim, "lr_factor", nan_lr_at(2))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        fit(arch, out=str(out), device="cpu", train_overrides=TRAIN, model_overrides=tiny(arch))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("training stopped at epoch 2, step 1: the matcher's "), message
    assert "NaN or inf for image 0 of the batch" in message and "lower --lr" in message
    assert f"the last complete checkpoint is {out / 'last.pt'} (epoch 1)" in message
    assert_epoch_1_intact(out)


def test_ruined_weights_are_never_saved(tmp_path, monkeypatch):
    """The NaN lr in the last step of epoch 2: every loss was finite, but the weights are
    not, so epoch 2 is not saved and last.pt stays epoch 1's."""
    monkeypatch.setattr(qdet.engine.optim, "lr_factor", nan_lr_at(3))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        fit("detr", out=str(out), device="cpu", train_overrides=TRAIN,
            model_overrides=tiny("detr"))
    assert str(info.value).startswith("training stopped after epoch 2: ") and \
        "weight tensor(s) are NaN or inf" in str(info.value) and \
        f"{out / 'last.pt'} (epoch 1)" in str(info.value), str(info.value)
    assert_epoch_1_intact(out)


def test_a_nan_loss_term_is_named(tmp_path, monkeypatch):
    """Finite outputs but a NaN GIoU loss (as degenerate boxes can give): the message names
    the term, the step and the lr, through the CLI as one line."""
    from typer.testing import CliRunner

    from qdet.cli.app import app

    real = SetCriterion.forward
    calls = []

    def forward(self, outputs, targets, *args, **kwargs):
        losses = real(self, outputs, targets, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses["loss_giou"] = losses["loss_giou"] * math.nan
        return losses

    monkeypatch.setattr(SetCriterion, "forward", forward)
    args = ["train", "--out", str(tmp_path / "run"), "--lr", "1e-3", "--set", "schedule=step"]
    for k, v in {**tiny("detr"), **TRAIN}.items():
        args += ["--set", f"{k}={v}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    (error,) = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert error.startswith("error: training stopped at epoch 1, step 1: loss is nan (not "
                            "finite: loss_giou; terms: {"), error
    assert error.endswith("lower --lr (this step's: 0.001) or check the data. no checkpoint was "
                          "written yet"), error
