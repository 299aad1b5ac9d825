"""Showing a :func:`qdet.explain` result: rich tables that read at 80 columns, one matplotlib
figure (rows: objects, columns: decoder layers or stages) over the image, and plain data for
JSON (``qdet explain --json``).

The figure uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend
state). Term maps are drawn as the softmax of the term alone over the keys: where that term
by itself would send the query.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..common.files import atomic_path
from ..common.terminal import box_text, narrow_table, num, pct, print_fitting, print_table
from .explain import Explanations, LayerExplanation, ObjectExplanation, cell_centres

if TYPE_CHECKING:  # rich is imported when something is printed
    from rich.console import Console
    from rich.table import Table

LEGEND = {
    "attention": "entropy: of each head's attention over the keys, 0 = one key, 1 = uniform; "
                 "in box: attention mass on keys inside the object's final box",
    "sampling": "entropy: of each head's sampling weights, 0 = one point, 1 = uniform; in box: "
                "sampling weight of the points inside the object's final box",
    "stage": "RoI level: the pyramid level P<n> (stride 2^n) the stage pooled its box from; "
             "IoU final: overlap of the stage's box with the final box",
}
TERMS_LEGEND = ("per term: its share of the variance of the logits over the keys (covariance "
                "with the logits over their variance, mean over heads; shares sum to 100%) and "
                "how many heads peak on the same key with the term alone as with the logits")
LEVELS_LEGEND = ("per level (H×W of its map): the sampling weight it gets and the weighted RMS "
                 "distance of its points from the reference point, in pixels")


# ------------------------------------------------------------------------------ tables


def _main_columns(table: Table, kind: str, terms: bool) -> None:
    table.add_column("stage" if kind == "stage" else "layer", justify="right")
    table.add_column("class")
    for col in ("score", "box"):
        table.add_column(col, justify="right")
    extra = {"attention": ("entropy", "in box") + (("dominant",) if terms else ()),
             "sampling": ("entropy", "in box"), "stage": ("RoI level", "IoU final")}[kind]
    for col in extra:
        table.add_column(col, justify="left" if col == "dominant" else "right")


def _main_cells(layer: LayerExplanation, obj: ObjectExplanation, kind: str,
                size) -> list[str]:
    cells = [str(layer.index), obj.name,
             "-" if layer.score is None else f"{layer.score:.2f}",
             "-" if layer.box is None else box_text(layer.box.tolist())]
    if kind == "stage":   # a stage's own box may leave the image: clip it as the final one
        w, h = size
        clipped = None if layer.box is None else torch.stack(
            [layer.box[0].clamp(0, w), layer.box[1].clamp(0, h), layer.box[2].clamp(0, w),
             layer.box[3].clamp(0, h)])
        iou = "-" if clipped is None else \
            f"{float(box_iou(clipped[None], obj.box[None])[0, 0]):.2f}"
        return cells + [f"P{layer.roi_level}", iou]
    cells += [num(layer.entropy), pct(layer.in_box)]
    if layer.shares is not None:
        cells.append(layer.dominant or "-")
    return cells


def _detail(obj: ObjectExplanation) -> tuple[list[str], list[list[str]]] | None:
    """The columns and rows of the second table: the terms, or the sampling levels."""
    first = obj.layers[0]
    if first.shares is not None:
        nh = first.attention.shape[0]
        cols = list(first.shares)
        rows = [[f"{pct(la.shares[t])} {round(la.agreement[t] * nh)}/{nh}" for t in cols]
                for la in obj.layers]
        return cols, rows
    if first.spread is not None:
        cols = [f"{h}×{w}" for h, w in first.levels]
        rows = [[f"{pct(lw)} {num(sp)}" for lw, sp in zip(la.level_weight, la.spread)]
                for la in obj.layers]
        return cols, rows
    return None


def render(expl: Explanations, console: Console) -> None:
    """Per object: a table of its layers (class, score, box, entropy, in-box share, dominant
    term), and the terms' shares or the sampling levels beside it when the console has the
    width, else below it; then the encoder's and Dynamic DETR's scale attention."""
    kind = expl.kind
    if not len(expl):
        console.print("nothing to explain: no query selected")
    for k, obj in enumerate(expl):
        head = (f"object {k}: query {obj.query}, {obj.name} {obj.score:.2f}, box "
                f"{box_text(obj.box.tolist())}")
        terms = obj.layers[0].shares is not None
        main, wide = narrow_table(), narrow_table()
        _main_columns(main, kind, terms)
        _main_columns(wide, kind, terms)
        detail = _detail(obj)
        second = narrow_table()
        if detail is not None:
            second.add_column(main.columns[0].header, justify="right")
            for col in detail[0]:
                second.add_column(col, justify="right")
                wide.add_column(col, justify="right")
        for i, layer in enumerate(obj.layers):
            cells = _main_cells(layer, obj, kind, expl.image_size)
            main.add_row(*cells)
            if detail is not None:
                second.add_row(cells[0], *detail[1][i])
                wide.add_row(*cells, *detail[1][i])
            else:
                wide.add_row(*cells)
        if detail is None:
            print_table(console, head, main)
        else:
            name = "terms of the logit" if terms else "sampling per level"
            print_fitting(console, (head, wide), [(head, main), (f"{name}, query {obj.query}",
                                                                 second)])
    notes = ["boxes: x0 y0 x1 y1 in pixels", LEGEND[kind]]
    if len(expl) and expl[0].layers[0].shares is not None:
        notes.append(TERMS_LEGEND)
    if len(expl) and expl[0].layers[0].spread is not None:
        notes.append(LEVELS_LEGEND)
    if expl.encoder is not None:
        _render_encoder(expl, console)
    if expl.scale_attention is not None:
        _render_scale(expl, console)
    console.print("; ".join(notes), style="dim", highlight=False)


def _render_encoder(expl: Explanations, console: Console) -> None:
    enc = expl.encoder
    table = narrow_table()
    for col in ("layer", "entropy", "peak x y", "max"):
        table.add_column(col, justify="right")
    for i, a in enumerate(enc["attention"]):
        nh, h, w = a.shape
        mean = a.mean(0)
        j = int(mean.argmax())
        peak = [(j % w + 0.5) / w * expl.image_size[0], (j // w + 0.5) / h * expl.image_size[1]]
        ent = sum(-(p * p.clamp_min(1e-30).log()).sum() for p in a.flatten(1)) / nh
        table.add_row(str(i), num(float(ent) / math.log(h * w) if h * w > 1 else 0.0),
                      box_text(peak), num(float(mean.max())))
    x, y = enc["position"]
    i, j = enc["cell"]
    print_table(console, f"encoder self-attention of pixel ({x:g}, {y:g}): map row {i}, "
                         f"column {j}", table)


def _render_scale(expl: Explanations, console: Console) -> None:
    s = expl.scale_attention                # [blocks, levels, 3]; Dynamic DETR's P3, P4, ...
    table = narrow_table()
    for col in ("level", "finer", "same", "coarser"):
        table.add_column(col, justify="right")
    mean = torch.nanmean(s, 0) if s.shape[0] > 1 else s[0]
    for lvl, row in enumerate(mean.tolist()):
        table.add_row(f"P{3 + lvl}", *(num(v) for v in row))
    print_table(console, f"encoder scale attention per level (mean over {s.shape[0]} "
                         "block(s)): weight of the finer, same and coarser level's term", table)


# ------------------------------------------------------------------------------ figure


def _rows(expl: Explanations, heads: bool) -> list[tuple[ObjectExplanation, str, object]]:
    rows = []
    for obj in expl:
        first = obj.layers[0]
        if heads and expl.kind in ("attention", "sampling"):
            n = (first.attention if first.attention is not None else first.weights).shape[0]
            rows += [(obj, "head", h) for h in range(n)]
            continue
        rows.append((obj, "main", None))
        if first.terms is not None:
            rows += [(obj, "term", t) for t in first.terms]
    return rows


def _show(ax, img, size) -> None:
    ax.imshow(img, extent=(0, size[0], size[1], 0))
    ax.set_xlim(0, size[0])
    ax.set_ylim(size[1], 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _rect(ax, box, **kw) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw))


def _heat(ax, m, size) -> None:
    ax.imshow(m.numpy(), extent=(0, size[0], size[1], 0), cmap="magma", alpha=0.6,
              interpolation="nearest", vmin=0, vmax=max(float(m.max()), 1e-12))


def _note(ax, text: str) -> None:
    ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=6, color="black",
            bbox=dict(facecolor="white", alpha=0.7, pad=1, lw=0))


def _panel(ax, expl: Explanations, obj, layer: LayerExplanation, what: str, arg) -> None:
    size = expl.image_size
    head = arg if what == "head" else None
    if layer.attention is not None:
        if what == "term":
            m = layer.terms[arg].flatten(1).softmax(-1).mean(0).view(layer.attention.shape[1:])
            _note(ax, f"{arg} {pct(layer.shares[arg])}")
        else:
            m = layer.attention.mean(0) if head is None else layer.attention[head]
            _note(ax, f"H {num(layer.entropy)}  in {pct(layer.in_box)}")
        _heat(ax, m, size)
        if layer.row is not None and what != "term":   # Anchor DETR: A_y and A_x on the edges
            ry = layer.row.mean(0) if head is None else layer.row[head]
            cx = layer.col.mean(0) if head is None else layer.col[head]
            ys = (torch.arange(len(ry)) + 0.5) / len(ry) * size[1]
            xs = (torch.arange(len(cx)) + 0.5) / len(cx) * size[0]
            ax.plot((ry / ry.max() * 0.2 * size[0]).numpy(), ys.numpy(), color="white", lw=1)
            ax.plot(xs.numpy(), (size[1] - cx / cx.max() * 0.2 * size[1]).numpy(),
                    color="white", lw=1)
    if layer.points is not None:
        pts, w = layer.points, layer.weights
        if head is not None:
            pts, w = pts[head:head + 1], w[head:head + 1]
        wmax = float(w.max())
        for lvl, marker in zip(range(pts.shape[1]), "osD^v<>"):
            p, ww = pts[:, lvl].reshape(-1, 2), w[:, lvl].reshape(-1)
            ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=(4 + 60 * ww / wmax).numpy(),
                       c=ww.numpy(), cmap="viridis", vmin=0, vmax=wmax, marker=marker,
                       edgecolors="white", linewidths=0.3)
        _note(ax, f"H {num(layer.entropy)}  in {pct(layer.in_box)}")
    if layer.reference is not None:
        if layer.reference.numel() == 2:
            ax.plot(*layer.reference.tolist(), marker="x", color="lime", ms=6, mew=1.5)
        else:
            _rect(ax, layer.reference, edgecolor="lime", lw=1, ls=":")
    if layer.roi is not None:
        for earlier in obj.layers:
            if earlier.index >= layer.index:
                break
            _rect(ax, earlier.box, edgecolor="white", lw=0.6, ls=":")
        _rect(ax, layer.roi, edgecolor="yellow", lw=1, ls="--")
        ax.scatter(layer.grid[:, 0].numpy(), layer.grid[:, 1].numpy(), s=1.5, c="yellow")
        _note(ax, f"P{layer.roi_level}")
    if layer.box is not None:
        _rect(ax, layer.box, edgecolor="cyan", lw=1.2)


def figure(expl: Explanations, heads: bool = False):
    """A matplotlib Figure: a row per object (with a row per term for DETR and Conditional
    DETR, or per head with ``heads``), a column per layer, over the image; the encoder's
    attention of one position and Dynamic DETR's scale attention as extra rows."""
    from matplotlib.figure import Figure

    img = expl.image
    size = expl.image_size
    rows = _rows(expl, heads)
    enc = expl.encoder
    n_layers = len(expl[0].layers) if len(expl) else 0
    ncols = max(n_layers, len(enc["attention"]) if enc else 0, 1)
    nrows = len(rows) + (1 if enc else 0) + (1 if expl.scale_attention is not None else 0)
    side = 2.0
    aspect = size[1] / size[0]
    fig = Figure(figsize=(0.9 + ncols * side, 0.4 + max(nrows, 1) * side * aspect + 0.3),
                 layout="constrained")
    grid = fig.add_gridspec(max(nrows, 1), ncols)
    for r, (obj, what, arg) in enumerate(rows):
        for c, layer in enumerate(obj.layers):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, img, size)
            _panel(ax, expl, obj, layer, what, arg)
            if r == 0:
                ax.set_title(f"{'stage' if expl.kind == 'stage' else 'layer'} {layer.index}",
                             fontsize=8)
            if c == 0:
                label = f"q{obj.query} {obj.name} {obj.score:.2f}" if what in ("main", "head") \
                    and (what == "main" or arg == 0) else ""
                sub = {"main": "", "term": arg, "head": f"head {arg}"}[what]
                ax.set_ylabel("\n".join(s for s in (label, sub) if s), fontsize=7)
    r = len(rows)
    if enc:
        x, y = enc["position"]
        for c, a in enumerate(enc["attention"]):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, img, size)
            _heat(ax, a.mean(0), size)
            ax.plot(x, y, marker="+", color="cyan", ms=8, mew=1.5)
            ax.set_title(f"encoder {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"encoder at ({x:g}, {y:g})", fontsize=7)
        r += 1
    if expl.scale_attention is not None:
        ax = fig.add_subplot(grid[r, :])
        s = torch.nanmean(expl.scale_attention, 0) if expl.scale_attention.shape[0] > 1 \
            else expl.scale_attention[0]
        levels = torch.arange(s.shape[0], dtype=torch.float32)
        for role, name in enumerate(("finer", "same", "coarser")):
            ax.bar((levels + (role - 1) * 0.27).numpy(), torch.nan_to_num(s[:, role]).numpy(),
                   width=0.25, label=name)
        ax.set_xticks(levels.numpy(), [f"P{3 + i}" for i in range(s.shape[0])], fontsize=7)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_title("encoder scale attention (mean over blocks)", fontsize=8)
        ax.legend(fontsize=6, ncol=3)
    fig.suptitle(f"{expl.arch}: where each query looks", fontsize=9)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (``qdet.common.files``)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


# --------------------------------------------------------------------------- as data


def _list(t: Tensor | None, digits: int = 4):
    if t is None:
        return None
    return [round(v, digits) for v in t.flatten().tolist()] if t.dim() <= 1 else \
        [_list(row, digits) for row in t]


def _peak(m: Tensor, size, valid_hw) -> list[float]:
    """Pixel centre of the largest cell of a [H, W] map."""
    h, w = m.shape
    xs, ys = cell_centres(valid_hw, (h, w), size)
    i = int(m.argmax())
    return [round(float(xs[i % w]), 1), round(float(ys[i // w]), 1)]


def to_json(expl: Explanations) -> dict:
    """The explanation as plain data: the small arrays in full (boxes, points, weights, row
    and column profiles, reference points, RoI grids), each map as a summary (shape, peak
    pixel and maximum of its mean over heads)."""
    size = expl.image_size
    objects = []
    for obj in expl:
        layers = []
        for la in obj.layers:
            d = {"index": la.index, "box": _list(la.box, 1), "score": la.score,
                 "entropy": la.entropy, "in_box": la.in_box, "dominant": la.dominant,
                 "shares": la.shares, "agreement": la.agreement,
                 "reference": _list(la.reference, 1)}
            if la.attention is not None:
                mean = la.attention.mean(0)       # one image: its map has no padding
                d["attention"] = {"shape": list(la.attention.shape), "max": float(mean.max()),
                                  "peak": _peak(mean, size, mean.shape)}
                if la.terms is not None:
                    d["terms"] = {k: {"peak": _peak(v.mean(0), size, mean.shape)}
                                  for k, v in la.terms.items()}
            if la.row is not None:
                d["row"], d["col"] = _list(la.row), _list(la.col)
            if la.points is not None:
                d.update(points=_list(la.points, 1), weights=_list(la.weights),
                         levels=[list(s) for s in la.levels], level_weight=la.level_weight,
                         spread=la.spread)
            if la.roi is not None:
                d.update(roi=_list(la.roi, 1), roi_level=la.roi_level, grid=_list(la.grid, 1))
            layers.append({k: v for k, v in d.items() if v is not None})
        objects.append({"query": obj.query, "label": obj.label, "name": obj.name,
                        "score": obj.score, "box": _list(obj.box, 1), "layers": layers})
    out = {"arch": expl.arch, "kind": expl.kind, "image_size": list(size),
           "num_layers": expl.num_layers, "objects": objects}
    if expl.scale_attention is not None:
        out["scale_attention"] = [[[None if math.isnan(v) else round(v, 4) for v in lvl]
                                   for lvl in block.tolist()] for block in expl.scale_attention]
    if expl.encoder is not None:
        att = expl.encoder["attention"]
        out["encoder"] = {"position": list(expl.encoder["position"]),
                          "cell": list(expl.encoder["cell"]),
                          "layers": [{"peak": _peak(a.mean(0), size, a.shape[1:]),
                                      "max": float(a.mean(0).max())} for a in att]}
    return _finite(out)


def _finite(x):
    """NaN (a term of a constant logit row has no share) -> None, so the JSON is valid."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
