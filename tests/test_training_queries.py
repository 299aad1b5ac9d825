"""Denoising queries and query groups, for every method; gradient accumulation; the moving
average of the weights.

The invariants (each independent of the code under test's own outputs): group 0 of a
training forward is the inference forward; no matching query sees a target or a denoising
query (changing the targets changes none of them); a denoising group does not see another,
nor an image's queries the padding its batch adds; denoising queries are built as the
papers say (labels flipped to another class, boxes moved within their band and kept valid,
paired with the target they came from); one step of N micro-batches has the gradients of
one batch of all of them; an averaged model resumed continues the same average."""
import copy
import math

import pytest
import torch
from torchvision.ops import box_convert

import qdet
from qdet.blocks import denoising
from qdet.blocks.denoising import Denoising, DNConfig, make_denoising, noise_boxes
from qdet.engine.config import TrainConfig
from qdet.engine.criterion import SetCriterion
from qdet.engine.ema import EMAConfig, ModelEMA
from qdet.engine.optim import make_optimization
from qdet.engine.runs import fit
from qdet.engine.step import train_step
from qdet.models.registry import build_model

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {"detr": ("detr", {}), "conditional": ("conditional", {}), "anchor": ("anchor", {}),
            "deformable": ("deformable", {}),
            "deformable-two-stage": ("deformable", {"with_box_refine": True,
                                                    "two_stage": True}),
            "efficient": ("efficient", {}), "sparse-rcnn": ("sparse-rcnn", {}),
            "dynamic": ("dynamic", {})}
K = 2   # query groups


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.long)}


TARGETS = [target([[0.5, 0.5, 0.3, 0.4], [0.25, 0.3, 0.2, 0.2]], [1, 3]),
           target([[0.6, 0.4, 0.3, 0.3]], [0])]
OTHER = [target([[0.2, 0.7, 0.1, 0.2]], [4]),
         target([[0.5, 0.5, 0.9, 0.9], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.2, 0.1]], [2, 2, 1])]


def model_of(name, **extra):
    arch, variant = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(arch, {**TINY[arch], **variant, "dn.groups": 2, "dn.contrastive": True,
                               "query_groups": K, **extra})
    with torch.no_grad():     # zero-initialized heads and offsets take part
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def run(model, x, targets):
    with torch.no_grad():
        return model(x, targets)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_group_zero_is_inference_and_no_matching_query_sees_targets(name):
    model = model_of(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    q = model.config.num_queries
    out = run(model, x, TARGETS)
    assert out["pred_logits"].shape[1] == K * q and out["query_groups"] == K
    assert out["dn"]["pred_logits"].shape[1] == 2 * 2 * 2   # groups x (pos + neg) x 2 boxes
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert set(ref) == {"pred_logits", "pred_boxes", "aux_outputs"} | (
        {"enc_outputs"} if "enc_outputs" in out else set())
    model.train()
    # inference = group 0 (BatchNorm is frozen and dropout off in these configs)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key][:, :q], ref[key], rtol=1e-4, atol=1e-5)
        for a, r in zip(out["aux_outputs"], ref["aux_outputs"]):
            torch.testing.assert_close(a[key][:, :q], r[key], rtol=1e-4, atol=1e-5)
    # other targets (other counts, so other denoising queries): no matching query changes
    again = run(model, x, OTHER)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(again[key], out[key], rtol=1e-4, atol=1e-5)


def fixed_dn(labels, boxes, groups, size, valid):
    """Denoising queries given by hand: ``labels [B,N]``, ``boxes [B,N,4]``."""
    valid = torch.tensor(valid)
    target = torch.where(valid, torch.arange(labels.shape[1]) % size, -1)
    return Denoising(labels, boxes, target, valid.clone(), valid, groups, size)


@pytest.mark.parametrize("name", ["detr", "deformable-two-stage", "sparse-rcnn", "anchor"])
def test_denoising_groups_and_padding_are_invisible(name, monkeypatch):
    """Group 0's outputs do not change when group 1's queries do; an image's outputs do not
    change when its batch neighbour has more boxes (so its padding grows)."""
    model = model_of(name, **{"dn.contrastive": False})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    boxes = torch.rand(2, 4, 4, generator=g) * 0.4 + 0.3
    labels = torch.randint(0, 5, (2, 4), generator=g)
    valid = [[True, False, True, False], [True, True, True, True]]   # 2 groups of size 2
    dn = fixed_dn(labels, boxes, 2, 2, valid)
    monkeypatch.setattr(denoising, "make_denoising", lambda *a: dn)
    first = run(model, x, TARGETS)["dn"]
    changed = fixed_dn(labels.clone(), boxes.clone(), 2, 2, valid)
    changed.labels[:, 2:] = (changed.labels[:, 2:] + 1) % 5                # group 1 only
    changed.boxes[:, 2:] = changed.boxes[:, 2:].flip(-1)
    monkeypatch.setattr(denoising, "make_denoising", lambda *a: changed)
    second = run(model, x, TARGETS)["dn"]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(second[key][:, :2], first[key][:, :2], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(second[key][1, 2:], first[key][1, 2:])
    # image 0's slots again, in a batch whose other image has 3 boxes: groups of size 3
    wide_boxes = torch.full((2, 6, 4), 0.5)
    wide_labels = torch.zeros(2, 6, dtype=torch.long)
    wide_boxes[0, [0, 3]], wide_labels[0, [0, 3]] = boxes[0, [0, 2]], labels[0, [0, 2]]
    wide_boxes[1] = torch.rand(6, 4, generator=g) * 0.4 + 0.3
    wide = fixed_dn(wide_labels, wide_boxes, 2, 3,
                    [[True, False, False, True, False, False], [True] * 6])
    monkeypatch.setattr(denoising, "make_denoising", lambda *a: wide)
    third = run(model, x, TARGETS)["dn"]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(third[key][0, [0, 3]], first[key][0, [0, 2]], rtol=1e-4,
                                   atol=1e-5)


def test_denoising_queries_are_built_as_the_papers_say():
    g = torch.manual_seed(5)
    del g
    targets = [target([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3], [0.8, 0.2, 0.2, 0.1]],
                      [0, 1, 2]), target([[0.4, 0.4, 0.2, 0.3]], [1]),
               target(torch.zeros(0, 4).tolist(), [])]
    dn = make_denoising(DNConfig(groups=3, label_noise=1.0, box_noise=0.4, contrastive=True),
                        targets, num_classes=3)
    assert (dn.groups, dn.size, dn.count) == (3, 6, 18)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        for grp in range(3):
            slots = grp * 6 + torch.arange(6)
            want = torch.tensor([j if j < n else -1 for j in range(3)] * 2)
            assert dn.target[i, slots].tolist() == want.tolist()
            assert dn.positive[i, slots].tolist() == [j < n for j in range(3)] + [False] * 3
        ok = dn.valid[i]
        if n:   # every label flipped, to another of the 3 classes
            assert (dn.labels[i, ok] != t["labels"][dn.target[i, ok]]).all()
            assert ((dn.labels[i, ok] >= 0) & (dn.labels[i, ok] < 3)).all()
    # dynamic groups: a budget of 10 queries over at most 3 boxes
    assert make_denoising(DNConfig(queries=10), targets, 3).groups == 3
    assert make_denoising(DNConfig(groups=2), [target(torch.zeros(0, 4).tolist(), [])], 3) \
        is None


@pytest.mark.parametrize("mode", ["center", "corners"])
def test_noised_boxes_stay_in_their_band_and_valid(mode):
    torch.manual_seed(0)
    lam = 0.4
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).expand(2000, 4)   # far from every border
    pos, neg = noise_boxes(boxes, lam, mode, False), noise_boxes(boxes, lam, mode, True)
    for noised, negative in ((pos, False), (neg, True)):
        if mode == "center":
            shift = ((noised[:, :2] - 0.5).abs() / 0.1).max(-1).values    # in lambda w/2
            scale = ((noised[:, 2:] / 0.2) - 1).abs().max(-1).values        # in lambda
            moved = torch.maximum(shift, scale)
        else:
            corners = box_convert(noised, "cxcywh", "xyxy")
            moved = ((corners - torch.tensor([0.4, 0.4, 0.6, 0.6])).abs() / 0.1).max(-1).values
        if negative:   # DINO's negatives: beyond lambda on some coordinate, below 2 lambda
            assert (moved >= lam - 1e-6).all() and (moved < 2 * lam + 1e-6).all()
        else:
            assert (moved < lam + 1e-6).all()
    # near the borders and tiny: clipped to the image, never empty
    wild = torch.tensor([[0.01, 0.99, 0.02, 0.02], [0.5, 0.5, 1.0, 1.0], [0.9, 0.1, 0.001, 0.3]])
    for noised in (noise_boxes(wild.repeat(500, 1), 1.0, mode, neg)
                   for neg in (False, True)):
        xyxy = box_convert(noised, "cxcywh", "xyxy")
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
        assert (noised[:, 2:] >= denoising.MIN_SIZE - 1e-6).all()


def test_denoising_loss_pairs_each_query_with_its_target():
    """Denoising outputs that reproduce their targets exactly cost nothing in L1 and GIoU;
    the same outputs shifted by one slot cost exactly the L1 between the boxes they now sit
    against (no Hungarian matching would choose that)."""
    crit = SetCriterion(3, qdet.build_model("conditional", TINY["conditional"]).config.loss,
                        focal=True)
    targets = [target([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]], [0, 1])]
    boxes = targets[0]["boxes"][None]
    dn = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": boxes.clone(),
          "target": torch.tensor([[0, 1]]), "positive": torch.tensor([[True, True]]),
          "valid": torch.tensor([[True, True]]), "groups": 1}
    losses = crit.denoising(dn, targets, num_boxes=2.0)
    # GIoU of a box with itself: 0 up to torchvision's float32 epsilon
    assert losses["loss_bbox_dn"] == 0 and losses["loss_giou_dn"].abs() < 1e-5
    dn["pred_boxes"] = boxes.flip(1)
    want = (boxes[0, 0] - boxes[0, 1]).abs().sum() * 2 / 2
    assert crit.denoising(dn, targets, 2.0)["loss_bbox_dn"] == pytest.approx(float(want))


@pytest.mark.parametrize("arch", ["detr", "conditional"])   # softmax and focal heads
def test_accumulating_two_micro_batches_is_one_batch_of_both(arch):
    torch.manual_seed(0)
    model = build_model(arch, {**TINY[arch], "num_classes": 5})
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(3, 64, 64, generator=g) for _ in range(4)]
    targets = [TARGETS[0], TARGETS[1], OTHER[0], OTHER[1]]
    grads = []
    for net, micro, n in ((model, [(images, targets)], 1),
                          (twin, [(images[:2], targets[:2]), (images[2:], targets[2:])], 2)):
        cfg = TrainConfig(accumulate=n, clip_max_norm=0.0)
        opt = make_optimization(net, cfg, 10, torch.device("cpu"), None)
        net.train()
        logged = train_step(net, net, opt, micro, cfg, False, "step 0")
        grads.append(({k: p.grad.clone() for k, p in net.named_parameters()
                       if p.grad is not None}, float(logged["loss"])))
    (one, loss_one), (two, loss_two) = grads
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert one.keys() == two.keys()
    for k in one:   # float32 sums in another order
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


def test_ema_follows_the_warmup_formula():
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(0.0)
    ema = ModelEMA(lin, EMAConfig(enabled=True, decay=0.9, warmup=2))
    value = 1.0
    for step in range(1, 4):
        with torch.no_grad():
            lin.weight.fill_(1.0 + step)
        ema.update(lin)
        d = 0.9 * (1 - math.exp(-step / 2))
        value = d * value + (1 - d) * (1.0 + step)
        assert ema.module.weight[0, 0].item() == pytest.approx(value)


class Crash(BaseException):
    """A kill, seen from inside: nothing after it runs."""


def test_a_resumed_run_continues_the_same_average(tmp_path, monkeypatch):
    """A run stopped in its second epoch and resumed ends with the uninterrupted run's
    average and trained weights."""
    import qdet.engine.step

    common = dict(device="cpu",
                  model_overrides={k: v for k, v in TINY["detr"].items() if k != "num_classes"},
                  train_overrides={"batch_size": 4, "num_workers": 0, "shapes.train_images": 8,
                                   "shapes.val_images": 4, "shapes.image_size": 64,
                                   "ema.enabled": True, "ema.warmup": 2, "ema.decay": 0.9,
                                   "warmup_steps": 0, "epochs": 2})
    fit("detr", out=str(tmp_path / "straight"), **common)
    real, calls = qdet.engine.step.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:           # the first step of epoch 2
            raise Crash
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(qdet.engine.step, "train_step", step)
        with pytest.raises(Crash):
            fit("detr", out=str(tmp_path / "split"), **common)
    fit("detr", out=str(tmp_path / "split"), resume=True, device="cpu")
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)
            for r in ("straight", "split"))
    assert a["ema"] == b["ema"] == {"updates": 4}
    assert not all(torch.equal(a["model"][k], a["train_model"][k]) for k in a["model"])
    for part in ("model", "train_model"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-6, atol=1e-7)
    best = torch.load(tmp_path / "split" / "best.pt", weights_only=True)
    assert "train_model" not in best          # what eval, predict and export read: the average


def test_a_model_trained_with_them_exports_and_infers_as_before(tmp_path):
    """The denoising embedding and the other groups' queries exist in the weights but take
    no part in inference: the ONNX file gives the eval-mode outputs, Q queries."""
    model = model_of("conditional").eval()
    report = qdet.export(model, tmp_path / "m.onnx", size=(64, 64))
    assert not report.disagreements
    det = qdet.load(tmp_path / "m.onnx")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    got = det(x)
    assert got["pred_logits"].shape == ref["pred_logits"].shape
    torch.testing.assert_close(got["pred_boxes"], ref["pred_boxes"], rtol=1e-4, atol=1e-5)
