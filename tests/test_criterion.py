"""Set criterion against values computed by hand on a tiny case."""
import math

import pytest
import torch

from qdet.blocks.base import LossConfig
from qdet.engine.criterion import SetCriterion


def tiny_case(focal):
    # query 0 predicts class 0 near the target; query 1 is background
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    if focal:
        logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    boxes = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def test_softmax_losses_by_hand():
    outputs, targets = tiny_case(focal=False)
    losses = SetCriterion(2, LossConfig(eos_coef=0.1), focal=False)(outputs, targets)
    nll0 = math.log(1 + 2 * math.exp(-2))       # -log softmax([2,0,0])[0]
    nll1 = math.log(1 + 2 / math.e)             # -log softmax([0,0,1])[2] (no object)
    assert losses["loss_ce"].item() == pytest.approx((1.0 * nll0 + 0.1 * nll1) / 1.1, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, rel=1e-5)
    # pred (0.45,0.4,0.65,0.6) vs target (0.4,0.4,0.6,0.6): IoU 0.03/0.05, enclosing = union
    assert losses["loss_giou"].item() == pytest.approx(0.4, rel=1e-5)


def test_focal_losses_by_hand():
    outputs, targets = tiny_case(focal=True)
    a, g = 0.25, 2.0

    def fl(x, t):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        return (a if t else 1 - a) * (1 - pt) ** g * -math.log(pt)

    expected = fl(2.0, 1) + fl(0.0, 0) + fl(0.0, 0) + fl(1.0, 0)  # num_boxes = 1
    losses = SetCriterion(2, LossConfig(), focal=True)(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, rel=1e-5)


def test_aux_and_encoder_terms_and_weights():
    outputs, targets = tiny_case(focal=True)
    outputs["aux_outputs"] = [dict(outputs), dict(outputs)]
    outputs["enc_outputs"] = dict(outputs)
    crit = SetCriterion(2, LossConfig(class_weight=2.0, enc_class_agnostic=True), focal=True)
    losses = crit(outputs, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou")
                           for s in ("", "_0", "_1", "_enc")}
    assert losses["loss_ce_1"].item() == pytest.approx(losses["loss_ce"].item())
    total = crit.weighted(losses)
    expected = sum((2.0 if "_ce" in k else 5.0 if "bbox" in k else 2.0) * v
                   for k, v in losses.items())
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_targets_gives_only_background_loss():
    outputs, _ = tiny_case(focal=False)
    losses = SetCriterion(2, LossConfig(), focal=False)(outputs, [{"labels": torch.zeros(0, dtype=torch.long),
                                                       "boxes": torch.zeros(0, 4)}])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    nll_bg0 = math.log(math.exp(2) + 2) - 0.0   # class "no object" logit 0 in [2,0,0]
    nll_bg1 = math.log(2 + math.e) - 1.0
    assert losses["loss_ce"].item() == pytest.approx((nll_bg0 + nll_bg1) / 2, rel=1e-6)


def test_gradients_flow_to_matched_boxes_only():
    outputs, targets = tiny_case(focal=False)
    boxes = outputs["pred_boxes"].clone().requires_grad_(True)
    losses = SetCriterion(2, LossConfig(), focal=False)({**outputs, "pred_boxes": boxes}, targets)
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert boxes.grad[0, 0].abs().sum() > 0 and boxes.grad[0, 1].abs().sum() == 0
