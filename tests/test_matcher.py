"""Hungarian matcher: optimal vs brute force, batched vs per image, empty targets."""
import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from qdet.blocks.base import LossConfig
from qdet.engine.matcher import HungarianMatcher


def random_case(b, q, c, sizes, seed, focal):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, c + (0 if focal else 1), generator=g)
    boxes = torch.rand(b, q, 4, generator=g) * 0.5 + 0.25
    targets = [{"labels": torch.randint(0, c, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25} for n in sizes]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def reference_cost(logits, boxes, labels, tboxes, cfg, focal):
    """Per-image cost from torchvision's pairwise GIoU, written independently."""
    if focal:
        p = logits.sigmoid()
        a, g = cfg.focal_alpha, cfg.focal_gamma
        pos = a * (1 - p) ** g * -torch.log(p + 1e-8)
        neg = (1 - a) * p ** g * -torch.log(1 - p + 1e-8)
        cls = (pos - neg)[:, labels]
    else:
        cls = -logits.softmax(-1)[:, labels]
    l1 = (boxes[:, None] - tboxes[None]).abs().sum(-1)
    giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                box_convert(tboxes, "cxcywh", "xyxy"))
    return cfg.class_cost * cls + cfg.bbox_cost * l1 + cfg.giou_cost * giou


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_optimal_against_brute_force(focal, seed):
    cfg = LossConfig(class_cost=2.0 if focal else 1.0)
    outputs, targets = random_case(2, 5, 3, [3, 4], seed, focal)
    indices = HungarianMatcher(cfg, focal)(outputs, targets)
    for i, (t, (rows, cols)) in enumerate(zip(targets, indices)):
        cost = reference_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i],
                              t["labels"], t["boxes"], cfg, focal)
        n = len(t["labels"])
        assert sorted(cols.tolist()) == list(range(n))  # every target matched once
        assert len(set(rows.tolist())) == n              # by distinct queries
        best = min(sum(cost[p[j], j].item() for j in range(n))
                   for p in itertools.permutations(range(5), n))
        got = cost[rows, cols].sum().item()
        assert got == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("focal", [False, True])
def test_batched_equals_per_image(focal):
    cfg = LossConfig()
    outputs, targets = random_case(4, 10, 6, [2, 0, 7, 5], seed=7, focal=focal)
    matcher = HungarianMatcher(cfg, focal)
    batched = matcher(outputs, targets)
    costs = matcher.costs(outputs, targets)
    for i, t in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [t])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        n = len(t["labels"])
        ref = reference_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i],
                             t["labels"], t["boxes"], cfg, focal)
        torch.testing.assert_close(costs.total[i, :, :n], ref, rtol=1e-5, atol=1e-5)


def test_empty_targets():
    outputs, targets = random_case(2, 4, 3, [0, 0], seed=1, focal=False)
    for rows, cols in HungarianMatcher(LossConfig(), False)(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64


def test_more_targets_than_queries():
    outputs, targets = random_case(1, 3, 3, [5], seed=2, focal=False)
    rows, cols = HungarianMatcher(LossConfig(), False)(outputs, targets)[0]
    assert len(rows) == 3 and len(set(cols.tolist())) == 3


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError):
        HungarianMatcher(LossConfig(class_cost=0, bbox_cost=0, giou_cost=0), False)
