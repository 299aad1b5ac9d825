"""match-debug: the assignment shown is scipy's, terms sum to the total, a hand-built matrix
gives the expected rows, and the CLI prints and saves."""
import pytest
import torch
from rich.console import Console
from scipy.optimize import linear_sum_assignment

from qdet.models.registry import build_model
from qdet.tools.match_debug import debug_image, duplicates, explain, render

from conftest import TINY, random_images


def boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                      torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_scipys_and_terms_sum(seed):
    g = torch.Generator().manual_seed(seed)
    q, t = 7, 4
    cls, bbox, giou = (torch.randn(q, t, generator=g) for _ in range(3))
    rows = explain(cls, bbox, giou, torch.rand(q, 3, generator=g), boxes(q, seed),
                   torch.randint(0, 3, (t,), generator=g), boxes(t, seed + 100))
    r, c = linear_sum_assignment((cls + bbox + giou).numpy())
    assert sorted((x.query, x.target) for x in rows) == sorted(zip(r.tolist(), c.tolist()))
    for x in rows:
        assert x.cost_class + x.cost_bbox + x.cost_giou == pytest.approx(x.total, abs=1e-6)
        assert x.total == pytest.approx(float((cls + bbox + giou)[x.query, x.target]), abs=1e-6)


def hand_built():
    # query 0 is the cheapest for both targets, but the optimum gives it target 1
    cls = torch.tensor([[-0.9, -0.95], [-0.5, -0.1], [-0.2, -0.3]])
    zero = torch.zeros(3, 2)
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    pred = torch.tensor([[.3, .3, .2, .2], [.7, .7, .2, .2], [.7, .7, .2, .2]])
    tgt = torch.tensor([[.7, .7, .2, .2], [.3, .3, .2, .2]])
    return cls, zero, probs, pred, torch.tensor([1, 0]), tgt


def test_hand_built_matrix_rows():
    cls, zero, probs, pred, labels, tgt = hand_built()
    rows = explain(cls, zero, zero, probs, pred, labels, tgt)
    assert [(r.target, r.query) for r in rows] == [(0, 1), (1, 0)]
    r0, r1 = rows
    assert r0.total == pytest.approx(-0.5) and r0.runner_up == 0
    assert r0.margin == pytest.approx(-0.4)      # a cheaper query exists but serves target 1
    assert (r0.row_min, r0.col_min) == (True, False)
    assert r1.total == pytest.approx(-0.95) and r1.runner_up == 2
    assert r1.margin == pytest.approx(0.65) and (r1.row_min, r1.col_min) == (True, True)
    assert r0.iou == pytest.approx(1.0) and r0.pred_label == 1
    assert r0.pred_prob == pytest.approx(0.7)
    dups = duplicates(rows, probs, pred, threshold=0.45)
    assert [(d.query, d.overlaps_query) for d in dups] == [(2, 1)]   # same box as query 1
    console = Console(record=True, width=200)
    render({"rows": rows, "layers": [[1, 0]], "changes": [], "duplicates": dups,
            "weights": {"class": 1, "bbox": 5, "giou": 2}, "focal": False, "num_queries": 3},
           ["cat", "dog"], console)
    text = console.export_text()
    # at 200 columns one wide table: one line per target, its total and runner-up margin
    lines = [l for l in text.splitlines() if l.split()[:1] in (["0"], ["1"])
             and len(l.split()) > 10]
    assert len(lines) == 2
    assert "dog" in lines[0] and "-0.50" in lines[0] and "q0 -0.40" in lines[0]
    assert "cat" in lines[1] and "-0.95" in lines[1] and "q2 +0.65" in lines[1]
    assert "likely duplicates" in text


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_arch_debugs_with_its_own_cost(arch):
    model = build_model(arch, TINY[arch]).eval()
    target = {"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[.3, .3, .2, .2],
                                                                     [.6, .6, .3, .4]])}
    res = debug_image(model, random_images([(64, 64)])[0], target, threshold=0.0)
    assert len(res["rows"]) == 2 and res["focal"] == model.focal
    n_layers = 1 + len(model(random_images([(64, 64)])).get("aux_outputs", []))
    assert len(res["layers"]) == n_layers and len(res["changes"]) == n_layers - 1
    assert res["layers"][-1] == [r.query for r in res["rows"]]
