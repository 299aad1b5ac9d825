"""``python scripts/explain_report.py RUN...``: which part of attention decides, measured over
a validation split, for docs/explain.md ("Measured on the built-in data").

Each RUN is a run folder (its ``best.pt``) or a checkpoint trained on the built-in shapes
data. On its first ``--images`` validation images, every ground-truth object's query (the
one the Hungarian matcher gives it at the last layer, as ``qdet match-debug`` shows) is
explained with :func:`qdet.explain`, and per decoder layer:

- where the logit decomposes (DETR: four terms, Conditional DETR: content and spatial):
  each term's variance share and argmax agreement (see ``qdet.explain``), the attention mass
  inside the ground-truth box of the full attention and of each term alone (the softmax of
  the term over the keys), and where the term alone peaks relative to the box: the peak
  cell's offset from the box centre in half-box units, ``max(|u|, |v|)`` (0: the centre,
  1: on the box's edge, above 1: outside);
- where the method samples (Deformable DETR, Efficient DETR): per level, the sampling weight
  it gets, the weighted RMS distance of its points from the reference point in pixels and in
  cells of that level, and the sampling weight inside the ground-truth box.

Prints the tables, writes the numbers as JSON and as Markdown tables, one figure (PNG) and,
per run, the ``qdet explain`` figure of the first validation image.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import median
from typing import Annotated, Optional

import typer

from qdet.cli.common import fail, pick_device
from qdet.common.files import write_atomic
from qdet.common.terminal import console, narrow_table, num, pct, print_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def _peak_offset(m, box, size) -> float:
    """max(|u|, |v|) of the largest cell of ``m [H, W]`` relative to ``box`` (x0 y0 x1 y1)."""
    h, w = m.shape
    i = int(m.argmax())
    x, y = (i % w + 0.5) / w * size[0], (i // w + 0.5) / h * size[1]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = max((box[2] - box[0]) / 2, 1e-6), max((box[3] - box[1]) / 2, 1e-6)
    return max(abs(x - cx) / hw, abs(y - cy) / hh)


def _mass_in(m, box, size) -> float:
    """Mass of a [H, W] distribution on cells whose centre lies inside ``box``."""
    import torch

    h, w = m.shape
    xs = (torch.arange(w) + 0.5) / w * size[0]
    ys = (torch.arange(h) + 0.5) / h * size[1]
    inside = ((xs >= box[0]) & (xs <= box[2]))[None] & ((ys >= box[1]) & (ys <= box[3]))[:, None]
    return float(m[inside].sum())


def _matched(model, dataset, index: int):
    """(the ground-truth boxes in pixels, the queries matched to them) of one image."""
    import torch
    from torchvision.ops import box_convert

    from qdet.tools.match_debug import debug_image

    x, target = dataset[index]
    label_of = {cid: i for i, cid in enumerate(model.category_ids)}
    keep = [i for i, lab in enumerate(target["labels"].tolist())
            if dataset.category_ids[lab] in label_of]
    if not keep:
        return [], []
    dev = next(model.parameters()).device
    labels = torch.tensor([label_of[dataset.category_ids[target["labels"][i]]] for i in keep])
    tgt = {"labels": labels.to(dev), "boxes": target["boxes"][keep].to(dev)}
    rows = debug_image(model, x.to(dev), tgt)["rows"]
    raw = dataset.raw_image(index)
    scale = torch.tensor([raw.width, raw.height] * 2, dtype=torch.float32)
    gt = box_convert(target["boxes"][keep].float(), "cxcywh", "xyxy") * scale
    return [gt[r.target].tolist() for r in rows], [r.query for r in rows]


def measure(weights: Path, images: int = 50, device: str = "cpu", progress=None,
            example: Path | None = None) -> dict:
    """The statistics above for one checkpoint, averaged over the matched objects of the
    first ``images`` validation images; with ``example``, the ``qdet explain`` figure of the
    first image's objects is written there."""
    from qdet.cli.common import eval_dataset, load_model
    from qdet.tools.explain import explain
    from qdet.tools.explain_view import figure, save_figure

    model = load_model(weights, device)
    dataset = eval_dataset(model, weights, None, None, builtin_fallback=False)
    n = min(images, len(dataset))
    acc: dict[int, dict[str, list]] = {}
    kind, n_objects, levels = None, 0, None
    for index in range(n):
        gts, queries = _matched(model, dataset, index)
        if queries:
            raw = dataset.raw_image(index)
            ex = explain(model, raw, queries=queries)
            kind, size = ex.kind, ex.image_size
            if example is not None:
                save_figure(figure(ex), example)
                example = None
            for obj, gt in zip(ex, gts):
                n_objects += 1
                for layer in obj.layers:
                    a = acc.setdefault(layer.index, {})
                    if layer.terms is not None:
                        a.setdefault("in_box", []).append(_mass_in(layer.attention.mean(0), gt,
                                                                   size))
                        a.setdefault("offset", []).extend(
                            _peak_offset(h, gt, size) for h in layer.attention)
                        for t, term in layer.terms.items():
                            soft = term.flatten(1).softmax(-1).view(term.shape)     # per head
                            a.setdefault(f"share {t}", []).append(layer.shares[t])
                            a.setdefault(f"agree {t}", []).append(layer.agreement[t])
                            a.setdefault(f"in_box {t}", []).append(_mass_in(soft.mean(0), gt,
                                                                            size))
                            a.setdefault(f"offset {t}", []).extend(
                                _peak_offset(h, gt, size) for h in soft)
                    if layer.spread is not None:
                        levels = layer.levels
                        x0, y0, x1, y1 = gt
                        pts, w = layer.points, layer.weights
                        inside = ((pts[..., 0] >= x0) & (pts[..., 0] <= x1) & (pts[..., 1] >= y0)
                                  & (pts[..., 1] <= y1))
                        a.setdefault("in_box", []).append(float((w * inside).sum((1, 2)).mean()))
                        for lvl, (lw, sp) in enumerate(zip(layer.level_weight, layer.spread)):
                            cell = size[0] / layer.levels[lvl][1]
                            a.setdefault(f"weight {lvl}", []).append(lw)
                            a.setdefault(f"spread {lvl}", []).append(sp)
                            a.setdefault(f"cells {lvl}", []).append(sp / cell)
        if progress is not None:
            progress()
    layers = []
    for i in sorted(acc):
        row = {"layer": i}
        for key, values in acc[i].items():
            row[key] = median(values) if key.startswith("offset") else _mean(values)
        if "offset" in acc[i]:
            row["inside"] = _mean([float(v <= 1) for v in acc[i]["offset"]])
        layers.append(row)
    return {"weights": str(weights), "arch": model.arch, "kind": kind, "images": n,
            "objects": n_objects, "levels": levels, "layers": layers}


def _print(report: dict) -> None:
    head = (f"{report['arch']} ({report['weights']}): {report['objects']} objects in "
            f"{report['images']} validation images")
    rows = report["layers"]
    if not rows:
        console.print(f"{head}: nothing matched")
        return
    terms = [k[6:] for k in rows[0] if k.startswith("share ")]
    table = narrow_table()
    table.add_column("layer", justify="right")
    if terms:
        for t in terms:
            table.add_column(t, justify="right")
        table.add_column("in box", justify="right")
        table.add_column("peak at", justify="right")
        for r in rows:
            table.add_row(str(r["layer"]),
                          *(f"{pct(r['share ' + t])} {pct(r['agree ' + t])}" for t in terms),
                          pct(r["in_box"]), num(r["offset"]))
        print_table(console, head, table)
        detail = narrow_table()
        detail.add_column("layer", justify="right")
        for t in terms:
            detail.add_column(t, justify="right")
        for r in rows:
            detail.add_row(str(r["layer"]), *(f"{pct(r['in_box ' + t])} {num(r['offset ' + t])}"
                                              for t in terms))
        print_table(console, "where each term alone would look", detail)
        console.print("per term: its share of the logits' variance over the keys, then the "
                      "heads agreeing with the full attention's peak; in box: attention mass in "
                      "the ground-truth box; peak at: median offset of a head's peak from the "
                      "box centre (0 centre, 1 edge, >1 outside); term alone: the same two for "
                      "the softmax of the term by itself", style="dim")
        return
    levels = report["levels"] or []
    for lvl, (h, w) in enumerate(levels):
        table.add_column(f"{h}×{w}", justify="right")
    table.add_column("in box", justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), *(f"{pct(r[f'weight {i}'])} {num(r[f'spread {i}'])}px "
                                         f"{num(r[f'cells {i}'])}c"
                                         for i in range(len(levels))), pct(r["in_box"]))
    print_table(console, head, table)
    console.print("per level (H×W of its map): sampling weight, weighted RMS distance of its "
                  "points from the reference point in pixels and in cells of that level; in "
                  "box: sampling weight inside the ground-truth box", style="dim")


def markdown(reports: list[dict]) -> str:
    """The tables as Markdown (docs/assets/explain.md)."""
    out = []
    for rep in reports:
        rows = rep["layers"]
        if not rows:
            continue
        out.append(f"{rep['arch']}: {rep['objects']} objects in {rep['images']} validation "
                   f"images ({rep['weights']})\n")
        terms = [k[6:] for k in rows[0] if k.startswith("share ")]
        if terms:
            out.append("| layer | " + " | ".join(f"{t} share (agree)" for t in terms)
                       + " | in box | peak at | " + " | ".join(f"{t} alone: in box, peak at"
                                                              for t in terms) + " |")
            out.append("|" + " --- |" * (3 + 2 * len(terms)))
            for r in rows:
                out.append(f"| {r['layer']} | " + " | ".join(
                    f"{pct(r['share ' + t])} ({pct(r['agree ' + t])})" for t in terms)
                    + f" | {pct(r['in_box'])} | {num(r['offset'])} | " + " | ".join(
                    f"{pct(r['in_box ' + t])}, {num(r['offset ' + t])}" for t in terms) + " |")
        else:
            levels = rep["levels"] or []
            out.append("| layer | " + " | ".join(f"{h}×{w}: weight, spread px (cells)"
                                                 for h, w in levels) + " | in box |")
            out.append("|" + " --- |" * (2 + len(levels)))
            for r in rows:
                out.append(f"| {r['layer']} | " + " | ".join(
                    f"{pct(r[f'weight {i}'])}, {num(r[f'spread {i}'])} ({num(r[f'cells {i}'])})"
                    for i in range(len(levels))) + f" | {pct(r['in_box'])} |")
        out.append("")
    return "\n".join(out)


def plot(reports: list[dict], out: Path) -> Path:
    """One figure, a panel per run: term shares per layer, or spread per level."""
    from matplotlib.figure import Figure

    from qdet.tools.explain_view import save_figure

    fig = Figure(figsize=(4.2 * max(len(reports), 1), 3.2), layout="constrained")
    for k, rep in enumerate(reports):
        ax = fig.add_subplot(1, max(len(reports), 1), k + 1)
        rows = rep["layers"]
        if not rows:
            continue
        terms = [key[6:] for key in rows[0] if key.startswith("share ")]
        if terms:
            width = 0.8 / len(terms)
            for j, t in enumerate(terms):
                ax.bar([r["layer"] + (j - (len(terms) - 1) / 2) * width for r in rows],
                       [r["share " + t] for r in rows], width=width, label=t)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_ylabel("share of the logits' variance")
            ax.set_xlabel("decoder layer")
        else:
            n_lv = len(rep["levels"] or [])
            width = 0.8 / max(len(rows), 1)
            for j, r in enumerate(rows):
                ax.bar([lvl + (j - (len(rows) - 1) / 2) * width for lvl in range(n_lv)],
                       [r[f"spread {lvl}"] for lvl in range(n_lv)], width=width,
                       label=f"layer {r['layer']}")
            ax.set_xticks(range(n_lv), [f"{h}×{w}" for h, w in rep["levels"]])
            ax.set_ylabel("RMS distance of points from reference (px)")
            ax.set_xlabel("level (map size)")
        if terms:
            ax.set_xticks([r["layer"] for r in rows])
        ax.set_title(f"{rep['arch']}: {rep['objects']} objects", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    return save_figure(fig, out)


@app.command()
def main(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (their best.pt) or "
                                               "checkpoints, trained on the built-in data.")],
    images: Annotated[int, typer.Option(help="Validation images to measure on.")] = 50,
    out: Annotated[Path, typer.Option(help="The figure (PNG).")] = Path("docs/assets/explain.png"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Where to write the "
                                                     "numbers as JSON (and beside it, as .md, "
                                                     "the tables in Markdown); default: the "
                                                     "figure's name with .json.")] = None,
    examples: Annotated[bool, typer.Option(help="Also write the qdet explain figure of the "
                                           "first image, per run, beside the figure "
                                           "(NAME-detr.png, ...).")] = True,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
):
    """Measure, per decoder layer, which attention terms dominate (DETR, Conditional DETR)
    and how spread the sampling points are per level (Deformable DETR, Efficient DETR)."""
    from qdet.common.terminal import progress_bar
    from qdet.weights.checkpoint import read_checkpoint

    paths = []
    for run in runs:
        path = run / "best.pt" if run.is_dir() else run
        if not path.is_file():
            fail(f"{run}: no checkpoint there (a run folder with best.pt, or a .pt file)")
        paths.append(path)
    dev = pick_device(device)
    reports, seen = [], set()
    with progress_bar() as bar:
        for path in paths:
            task = bar.add_task(path.parent.name or path.name, total=images, info="")
            name = read_checkpoint(path).get("arch", str(len(reports)))
            if name in seen:
                name = f"{name}-{len(reports)}"
            seen.add(name)
            example = out.with_name(f"{out.stem}-{name}.png") if examples else None
            reports.append(measure(path, images, dev, progress=lambda: bar.advance(task),
                                   example=example))
    for rep in reports:
        _print(rep)
    json_out = json_out or out.with_suffix(".json")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_out, json.dumps(reports, indent=1))
    write_atomic(json_out.with_suffix(".md"), markdown(reports))
    plot(reports, out)
    console.print(f"figure {out}, numbers {json_out} and {json_out.with_suffix('.md')}")


if __name__ == "__main__":
    app()
