"""``qdet match-debug``: what the Hungarian matcher did for one image, and why.

For every ground-truth box: the query it was matched to, that query's prediction, the cost
terms (class, L1, GIoU, each already weighted as the checkpoint's matcher weights them) and
their total, the runner-up query for that target and by how much it lost, and whether the
match is also the cheapest choice of its row (query) and column (target). Per decoder layer
(aux outputs): which query each target would get, and how many assignments change between
layers. Unmatched queries that score above a threshold and overlap a matched prediction are
listed as likely duplicates. Works for every registered method through the output contract.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ..blocks.base import Detector, class_probs
from ..common.terminal import box_text, mark, narrow_table, num, print_fitting, print_table
from ..engine.matcher import CostMatrix, HungarianMatcher, solve

if TYPE_CHECKING:  # rich is imported when something is printed
    from rich.console import Console
    from rich.table import Table


@dataclass
class MatchRow:
    target: int
    target_label: int
    target_box: list[float]          # normalized cx, cy, w, h
    query: int
    pred_label: int
    pred_prob: float
    pred_box: list[float]
    iou: float
    cost_class: float
    cost_bbox: float
    cost_giou: float
    total: float
    runner_up: int | None            # next-cheapest query for this target
    runner_up_total: float | None
    margin: float | None             # runner-up total - total (>= 0 when the match is greedy)
    row_min: bool                    # this target is the matched query's cheapest target
    col_min: bool                    # this query is the target's cheapest query


@dataclass
class Duplicate:
    query: int
    label: int
    prob: float
    box: list[float]
    overlaps_query: int              # the matched query it overlaps most
    iou: float


def explain(cls: Tensor, bbox: Tensor, giou: Tensor, probs: Tensor, pred_boxes: Tensor,
            tgt_labels: Tensor, tgt_boxes: Tensor) -> list[MatchRow]:
    """Rows for one image from its weighted cost terms ``[Q, T]`` (``total = cls + bbox +
    giou``), per-class probabilities ``[Q, C]`` and boxes (normalized cx, cy, w, h)."""
    total = cls + bbox + giou
    costs = CostMatrix(cls[None], bbox[None], giou[None], [total.shape[1]])
    rows, cols = solve(costs)[0]
    iou = box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                  box_convert(tgt_boxes, "cxcywh", "xyxy"))
    pred_prob, pred_label = probs.max(-1)
    out = []
    for q, t in sorted(zip(rows.tolist(), cols.tolist()), key=lambda qt: qt[1]):
        column = total[:, t].clone()
        column[q] = float("inf")
        runner = int(column.argmin()) if len(column) > 1 else None
        runner_total = float(total[runner, t]) if runner is not None else None
        out.append(MatchRow(
            target=t, target_label=int(tgt_labels[t]), target_box=tgt_boxes[t].tolist(),
            query=q, pred_label=int(pred_label[q]), pred_prob=float(pred_prob[q]),
            pred_box=pred_boxes[q].tolist(), iou=float(iou[q, t]),
            cost_class=float(cls[q, t]), cost_bbox=float(bbox[q, t]),
            cost_giou=float(giou[q, t]), total=float(total[q, t]), runner_up=runner,
            runner_up_total=runner_total,
            margin=None if runner is None else runner_total - float(total[q, t]),
            row_min=bool(total[q].argmin() == t), col_min=bool(total[:, t].argmin() == q)))
    return out


def duplicates(rows: list[MatchRow], probs: Tensor, pred_boxes: Tensor, threshold: float,
               min_iou: float = 0.5) -> list[Duplicate]:
    """Unmatched queries scoring above ``threshold`` whose box overlaps a matched one."""
    matched = [r.query for r in rows]
    if not matched:
        return []
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy")
    iou = box_iou(boxes, boxes[matched])
    prob, label = probs.max(-1)
    out = []
    for q in range(len(prob)):
        if q in matched or prob[q] < threshold:
            continue
        best = int(iou[q].argmax())
        if iou[q, best] >= min_iou:
            out.append(Duplicate(q, int(label[q]), float(prob[q]), pred_boxes[q].tolist(),
                                 matched[best], float(iou[q, best])))
    return out


@torch.no_grad()
def debug_image(model: Detector, image: Tensor, target: dict, threshold: float = 0.5) -> dict:
    """Run ``model`` on one normalized image and explain the matching of ``target``
    (``labels`` in the model's label space, ``boxes`` normalized cx, cy, w, h)."""
    model.eval()
    out = model([image])
    matcher = HungarianMatcher(model.config.loss, model.focal)
    tgt = [{"labels": target["labels"], "boxes": target["boxes"]}]

    def rows_for(o):
        c = matcher.costs(o, tgt)
        probs = class_probs(o["pred_logits"][0].float(), model.focal)
        return explain(c.cls[0], c.bbox[0], c.giou[0], probs, o["pred_boxes"][0].float(),
                       target["labels"], target["boxes"]), probs

    rows, probs = rows_for(out)
    layers = []
    for o in [*out.get("aux_outputs", []), out]:
        layers.append([r.query for r in rows_for(o)[0]])
    changes = [sum(a != b for a, b in zip(x, y)) for x, y in zip(layers, layers[1:])]
    loss = model.config.loss
    return {"rows": rows, "layers": layers, "changes": changes,
            "duplicates": duplicates(rows, probs, out["pred_boxes"][0].float(), threshold),
            "weights": {"class": loss.class_cost, "bbox": loss.bbox_cost, "giou": loss.giou_cost},
            "focal": model.focal, "num_queries": out["pred_logits"].shape[1],
            "denoising": denoising_rows(model, image, tgt)}


@dataclass
class DenoisingRow:
    """A denoising query of group 0: the target it was made from (no matching), its noised
    input and what the last layer made of it."""
    target: int
    positive: bool                   # False: a negative, trained to "no object"
    noised_label: int
    noised_iou: float                # of the noised input box with the target's
    pred_label: int
    pred_prob: float
    pred_iou: float                  # of the predicted box with the target's


def denoising_rows(model: Detector, image: Tensor, tgt: list[dict]) -> list[DenoisingRow]:
    """What a model trained with denoising does with its denoising queries on this image:
    one training-mode forward (the root module alone in training mode, so dropout and batch
    norms stay as in evaluation; the noise drawn from seed 0). Empty for models without."""
    cfg = getattr(model, "config", None)
    if cfg is None or not cfg.dn.enabled or not len(tgt[0]["labels"]):
        return []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.training = True       # plan_queries reads the root's mode
        try:
            dn = model([image], tgt).get("dn")
        finally:
            model.training = False
    if dn is None:
        return []
    probs = class_probs(dn["pred_logits"][0].float(), model.focal)
    size = dn["valid"].shape[1] // dn["groups"]
    boxes = box_convert(tgt[0]["boxes"].float(), "cxcywh", "xyxy")
    rows = []
    for q in range(size):                                 # group 0
        if not dn["valid"][0, q]:
            continue
        t = int(dn["target"][0, q])
        iou = lambda b: float(box_iou(box_convert(b[None].float(), "cxcywh", "xyxy"),  # noqa: E731
                                      boxes[t:t + 1])[0, 0])
        p, lab = probs[q].max(-1)
        rows.append(DenoisingRow(t, bool(dn["positive"][0, q]),
                                 int(dn["noised_labels"][0, q]), iou(dn["noised_boxes"][0, q]),
                                 int(lab), float(p), iou(dn["pred_boxes"][0, q])))
    return rows


def to_json(result: dict, names: list[str]) -> dict:
    """The debug result as plain data, with class names."""
    rows = [{**asdict(r), "target_name": names[r.target_label], "pred_name": names[r.pred_label]}
            for r in result["rows"]]
    dups = [{**asdict(d), "name": names[d.label]} for d in result["duplicates"]]
    dn = [{**asdict(r), "noised_name": names[r.noised_label], "pred_name": names[r.pred_label]}
          for r in result.get("denoising", [])]
    return {**result, "rows": rows, "duplicates": dups, "denoising": dn}


def _matches_columns(table: Table) -> None:
    for col in ("target", "class", "box cx cy w h", "query", "predicted", "prob", "IoU"):
        table.add_column(col, justify="left" if col in ("class", "predicted") else "right")


def _costs_columns(table: Table, with_ids: bool) -> None:
    for col in (("target", "query") if with_ids else ()) + (
            "class", "L1", "GIoU", "total", "runner-up", "row min", "col min"):
        table.add_column(col, justify="right")


def _match_cells(r: MatchRow, names: list[str]) -> tuple[list[str], list[str]]:
    runner = "-" if r.runner_up is None else f"q{r.runner_up} {r.margin:+.2f}"
    matches = [str(r.target), names[r.target_label], box_text(r.target_box, 2), str(r.query),
               names[r.pred_label], f"{r.pred_prob:.2f}", f"{r.iou:.2f}"]
    costs = [num(r.cost_class), num(r.cost_bbox), num(r.cost_giou), num(r.total), runner,
             mark(r.row_min), mark(r.col_min, "yellow")]
    return matches, costs


def render(result: dict, names: list[str], console: Console, title: str = "") -> None:
    """The debug result as tables that read at 80 columns: one wide table when the console
    has room for it, else the matches and their costs as two tables."""
    w = result["weights"]
    kind = "focal" if result["focal"] else "softmax"
    head = (f"{title}Hungarian matching ({kind} class cost; weights class {w['class']:g}, "
            f"L1 {w['bbox']:g}, GIoU {w['giou']:g})")
    about_costs = ("costs weighted as the matcher weighs them; runner-up: the target's "
                   "next-cheapest query and how much more it costs; row/col min: the match "
                   "is its query's / its target's cheapest")
    wide = narrow_table("boxes normalized cx cy w h; " + about_costs)
    _matches_columns(wide)
    _costs_columns(wide, with_ids=False)
    matches = narrow_table("boxes normalized cx cy w h")
    _matches_columns(matches)
    costs = narrow_table(about_costs)
    _costs_columns(costs, with_ids=True)
    for r in result["rows"]:
        m, c = _match_cells(r, names)
        wide.add_row(*m, *c)
        matches.add_row(*m)
        costs.add_row(str(r.target), str(r.query), *c)
    print_fitting(console, (head, wide), [(head, matches), ("matching costs", costs)])
    if len(result["layers"]) > 1:
        layers = narrow_table()
        layers.add_column("target", justify="right")
        for i in range(len(result["layers"])):
            layers.add_column(f"L{i}", justify="right")
        for t in range(len(result["rows"])):
            layers.add_row(str(t), *(str(layer[t]) for layer in result["layers"]))
        print_table(console, "query matched to each target at decoder layer L0, L1, ...", layers)
        console.print("assignment changes between consecutive layers: "
                      + ", ".join(str(c) for c in result["changes"]))
    if result["duplicates"]:
        dup = narrow_table("boxes normalized cx cy w h")
        for col in ("query", "class", "prob", "box cx cy w h", "overlaps", "IoU"):
            dup.add_column(col, justify="left" if col == "class" else "right")
        for d in result["duplicates"]:
            dup.add_row(str(d.query), names[d.label], f"{d.prob:.2f}", box_text(d.box, 2),
                        f"q{d.overlaps_query}", f"{d.iou:.2f}")
        print_table(console, "likely duplicates: unmatched, confident, overlapping a match", dup)
    else:
        console.print("no likely duplicates")
    if result.get("denoising"):
        dn = narrow_table("IoU with the target's box; negatives should score no class")
        for col in ("target", "kind", "noised", "IoU in", "predicted", "prob", "IoU out"):
            dn.add_column(col, justify="left" if col in ("kind", "noised", "predicted")
                          else "right")
        for r in result["denoising"]:
            dn.add_row(str(r.target), "pos" if r.positive else "neg", names[r.noised_label],
                       f"{r.noised_iou:.2f}", names[r.pred_label], f"{r.pred_prob:.2f}",
                       f"{r.pred_iou:.2f}")
        print_table(console, "denoising queries of group 0 (training only, each paired with "
                             "the target it was made from, no matching)", dn)


def draw(img: Image.Image, result: dict, names: list[str]) -> Image.Image:
    """Targets in white, matched predictions in colour, a line joining each pair; likely
    duplicates in red."""
    from .draw import colour, draw_box, enlarge, font_for

    img, _ = enlarge(img)  # small images (the built-in data): labels legible
    draw_, font = ImageDraw.Draw(img), font_for(img)
    w, h = img.size

    def pix(b):
        x0, y0, x1, y1 = box_convert(torch.tensor(b), "cxcywh", "xyxy").tolist()
        return [x0 * w, y0 * h, x1 * w, y1 * h]

    for r in result["rows"]:
        t, p = pix(r.target_box), pix(r.pred_box)
        col = colour(r.target)
        draw_box(draw_, t, f"gt{r.target} {names[r.target_label]}", (255, 255, 255), font,
                 below=True)
        draw_box(draw_, p, f"q{r.query} {r.pred_prob:.2f}", col, font)
        draw_.line([((t[0] + t[2]) / 2, (t[1] + t[3]) / 2), ((p[0] + p[2]) / 2, (p[1] + p[3]) / 2)],
                   fill=col, width=2)
    for d in result["duplicates"]:
        draw_box(draw_, pix(d.box), f"dup q{d.query} {d.prob:.2f}", (255, 40, 40), font)
    return img
