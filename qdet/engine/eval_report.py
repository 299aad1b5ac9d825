"""Per-class results, the confusion matrix, precision-recall curves and a one-line diagnosis
of broken results: what ``qdet eval`` writes beside its results JSON and ``qdet train``
writes for its best checkpoint (``per_class.csv``, ``confusion.png``, ``pr.png``).

Per-class AP and AP50 are read from pycocotools' own accumulated precision array
(``COCOeval.eval['precision']``, indexed [IoU threshold, recall, category, area, max
detections]) the way its summary averages it, so they agree with a COCOeval restricted to
one category. The confusion matrix pairs detections scoring at least a threshold with
targets one to one, greedily by IoU (at least 0.5), whatever their classes: a pair counts
at (true class, predicted class), a target left over at (class, background), a detection
left over at (background, class); detections on crowd regions are left out.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from ..common.files import write_atomic
from ..common.terminal import console, err
from ..data.datasets import DetectionDataset
from .evaluation import coco_eval
from .run_folder import RunFolder

IOU = 0.5


@dataclass
class ClassResult:
    category_id: int
    name: str
    ap: float | None       # None: no target of this class in the data
    ap50: float | None
    targets: int           # non-crowd ground-truth boxes
    detections: int        # detections scoring at least the report's threshold


@dataclass
class Report:
    classes: list[ClassResult]
    confusion: np.ndarray            # [K+1, K+1]: rows true, columns predicted; last: bg
    names: list[str]
    threshold: float
    diagnosis: str | None
    files: list[Path] = field(default_factory=list)
    recall: np.ndarray | None = None      # [R] recall thresholds of pycocotools
    precision: np.ndarray | None = None   # [K, R] at IoU 0.5 (-1: class without targets)


def _mean(values: np.ndarray) -> float | None:
    kept = values[values > -1]
    return float(kept.mean()) if kept.size else None


def _index(ev: COCOeval) -> tuple[int, int, int]:
    """Where IoU 0.5, area "all" and 100 detections per image are in the precision array."""
    p = ev.params
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - IOU)))
    m = p.maxDets.index(100) if 100 in p.maxDets else len(p.maxDets) - 1
    return t50, p.areaRngLbl.index("all"), m


def per_class(ev: COCOeval | None, gt: dict, results: list[dict],
              threshold: float) -> list[ClassResult]:
    """AP (IoU 0.50:0.95) and AP50 per category of ``gt`` (COCO dict), from ``ev``'s
    precision array at area "all" and 100 detections per image, as ``summarize`` averages
    it; all 0 without detections (``ev`` None)."""
    targets: dict[int, int] = defaultdict(int)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            targets[a["category_id"]] += 1
    dets: dict[int, int] = defaultdict(int)
    for r in results:
        if r["score"] >= threshold:
            dets[r["category_id"]] += 1
    rows = []
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    if ev is not None:
        prec = ev.eval["precision"]                              # [T, R, K, A, M]
        t50, a, m = _index(ev)
        column = {cid: k for k, cid in enumerate(ev.params.catIds)}
    for c in cats:
        cid = c["id"]
        ap = ap50 = None if not targets[cid] else 0.0
        if ev is not None and cid in column:
            ap = _mean(prec[:, :, column[cid], a, m])
            ap50 = _mean(prec[t50, :, column[cid], a, m])
        rows.append(ClassResult(cid, str(c.get("name", cid)), ap, ap50, targets[cid], dets[cid]))
    return rows


def _xyxy(boxes: list) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def confusion_matrix(gt: dict, results: list[dict], category_ids: list[int],
                     iou: float = IOU, threshold: float = 0.5) -> np.ndarray:
    """Counts ``[K+1, K+1]`` (rows: true class, columns: predicted, in the order of
    ``category_ids``; index K is background) of ``results`` (COCO detections, xywh)
    scoring at least ``threshold`` against ``gt`` (COCO dict), matched at ``iou``."""
    k = len(category_ids)
    label = {cid: i for i, cid in enumerate(category_ids)}
    targets, crowd, dets = defaultdict(list), defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        if a["category_id"] in label:
            (crowd if a.get("iscrowd", 0) else targets)[a["image_id"]].append(a)
    for r in results:
        if r["score"] >= threshold and r["category_id"] in label:
            dets[r["image_id"]].append(r)
    m = np.zeros((k + 1, k + 1), dtype=np.int64)
    for image in gt["images"]:
        t, d = targets[image["id"]], dets[image["id"]]
        t_lab = [label[a["category_id"]] for a in t]
        d_lab = [label[r["category_id"]] for r in d]
        overlap = box_iou(_xyxy([a["bbox"] for a in t]), _xyxy([r["bbox"] for r in d]))
        pairs = sorted((-float(overlap[i, j]), i, j)
                       for i, j in torch.nonzero(overlap >= iou).tolist())
        used_t, used_d = set(), set()
        for _, i, j in pairs:
            if i not in used_t and j not in used_d:
                used_t.add(i)
                used_d.add(j)
                m[t_lab[i], d_lab[j]] += 1
        for i in set(range(len(t))) - used_t:
            m[t_lab[i], k] += 1
        on_crowd = torch.zeros(len(d), dtype=torch.bool)
        if crowd[image["id"]] and d:
            on_crowd = (box_iou(_xyxy([r["bbox"] for r in d]),
                                _xyxy([a["bbox"] for a in crowd[image["id"]]])) >= iou).any(1)
        for j in set(range(len(d))) - used_d:
            if not on_crowd[j]:
                m[k, d_lab[j]] += 1
    return m


def _spread(values: np.ndarray) -> float:
    """Coefficient of variation (std / mean)."""
    return float(values.std() / max(values.mean(), 1e-12))


def diagnose(gt: dict, results: list[dict], threshold: float, ap: float,
             losses: list[float] | None = None, weights: str | None = None) -> str | None:
    """One line when the results look broken (no confident detection, one class only,
    boxes of one size, AP 0 although the loss fell), else None; each points at
    ``qdet match-debug``."""
    debug = "qdet match-debug" + (f" --weights {weights}" if weights else "")
    hint = f"`{debug}` shows what the matcher assigns to each target"
    confident = [r for r in results if r["score"] >= threshold]
    if not confident:
        top = max((r["score"] for r in results), default=0.0)
        return (f"no detection scores {threshold:g} or more (the highest is {top:.2f}), so "
                f"`qdet predict` shows nothing at that threshold: the model is not confident "
                f"yet; train longer, and {hint}")
    names = {c["id"]: c.get("name", c["id"]) for c in gt["categories"]}
    truth = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    found = {r["category_id"] for r in confident}
    if len(found) == 1 and len(truth) > 1:
        return (f"every detection scoring {threshold:g} or more is "
                f"'{names.get(next(iter(found)))}' ({len(confident)} detections, while the "
                f"targets have {len(truth)} classes): the class head has collapsed; {hint}")
    size = {im["id"]: (im.get("width") or 1, im.get("height") or 1) for im in gt["images"]}

    def relative(entries):
        return np.array([[e["bbox"][2] / size.get(e["image_id"], (1, 1))[0],
                          e["bbox"][3] / size.get(e["image_id"], (1, 1))[1]] for e in entries])

    if len(confident) >= 10:
        d = relative(confident)
        t = relative([a for a in gt["annotations"] if not a.get("iscrowd", 0)])
        if max(_spread(d[:, 0]), _spread(d[:, 1])) < 0.05 and len(t) and \
                max(_spread(t[:, 0]), _spread(t[:, 1])) > 0.2:
            w, h = d.mean(0)
            unit = "of the image" if all(im.get("width") for im in gt["images"]) else "px"
            return (f"the {len(confident)} detections scoring {threshold:g} or more all have "
                    f"one size (about {w:.2g} x {h:.2g} {unit}) while the targets' sizes "
                    f"vary: the box head has collapsed; {hint}")
    if ap < 0.001 and losses and len(losses) >= 2 and losses[-1] < 0.9 * losses[0]:
        return (f"AP is {ap:.3f} although the training loss fell from {losses[0]:.3g} to "
                f"{losses[-1]:.3g}: the predictions do not line up with the targets (check "
                f"the boxes' format and the category ids); {hint}")
    return None


def build_report(dataset: DetectionDataset, results: list[dict], threshold: float = 0.5,
                 ev: COCOeval | None = None, losses: list[float] | None = None,
                 weights: str | None = None) -> Report:
    """Per-class results, confusion matrix and diagnosis of ``results`` on ``dataset``.
    ``ev``: the ``coco_eval`` of these results if already computed; ``losses``: the training
    loss per epoch (for the "AP 0 while the loss fell" check)."""
    if ev is None:
        ev = coco_eval(dataset, results)
    gt = dataset.coco_dict()
    classes = per_class(ev, gt, results, threshold)
    names = [str(n) for n in dataset.class_names]
    cm = confusion_matrix(gt, results, list(dataset.category_ids), IOU, threshold)
    ap = max(float(ev.stats[0]), 0.0) if ev is not None else 0.0
    report = Report(classes, cm, names, threshold,
                    diagnose(gt, results, threshold, ap, losses, weights))
    if ev is not None:  # precision at IoU 0.5 per class and recall, for pr.png
        t50, a, m = _index(ev)
        column = {cid: k for k, cid in enumerate(ev.params.catIds)}
        prec = ev.eval["precision"][t50, :, :, a, m].T                           # [K, R]
        report.recall = np.asarray(ev.params.recThrs)
        report.precision = np.stack([prec[column[c]] if c in column else
                                     np.full(prec.shape[1], -1.0)
                                     for c in dataset.category_ids])
    return report


def write_report(dataset: DetectionDataset, results: list[dict], folder: Path,
                 threshold: float = 0.5, ev: COCOeval | None = None,
                 losses: list[float] | None = None, weights: str | None = None) -> Report:
    """``build_report``, written to ``folder``: ``per_class.csv``, ``confusion.png`` and
    ``pr.png`` (none without detections). A figure that cannot be drawn is a warning."""
    from . import plots

    files = RunFolder(folder)
    report = build_report(dataset, results, threshold, ev, losses, weights)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["category_id", "name", "AP", "AP50", "targets", f"detections>={threshold:g}"])
    for c in report.classes:
        out.writerow([c.category_id, c.name, "" if c.ap is None else f"{c.ap:.6g}",
                      "" if c.ap50 is None else f"{c.ap50:.6g}", c.targets, c.detections])
    write_atomic(files.per_class, buf.getvalue())
    report.files.append(files.per_class)
    figures = [(files.confusion, lambda p: plots.confusion(
        report.confusion, report.names, p,
        f"confusion matrix (IoU {IOU:g}, score >= {threshold:g})"))]
    if report.precision is not None:
        ap50 = [c.ap50 or 0.0 for c in report.classes]
        figures.append((files.pr, lambda p: plots.pr_curves(
            report.recall, report.precision, report.names, ap50, p,
            f"precision-recall at IoU {IOU:g}")))
    for path, draw in figures:
        try:
            draw(path)
            report.files.append(path)
        except Exception as e:  # noqa: BLE001 - the numbers are the result; a figure is extra
            from rich.markup import escape

            err.print(f"[yellow]warning:[/] could not draw {escape(str(path))} "
                      f"({type(e).__name__}: {escape(str(e))})", highlight=False,
                      soft_wrap=True)
    return report


def class_table(report: Report, title: str):
    """Per-class AP and AP50 with the original category ids (a rich Table); narrow enough
    for 80 columns."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("class", max_width=24, overflow="ellipsis", no_wrap=True)
    for col in ("AP", "AP50", "targets", f"dets>={report.threshold:g}"):
        table.add_column(col, justify="right")
    for c in report.classes:
        table.add_row(str(c.category_id), escape(c.name), "-" if c.ap is None else f"{c.ap:.3f}",
                      "-" if c.ap50 is None else f"{c.ap50:.3f}", str(c.targets),
                      str(c.detections))
    return table


def show_report(report: Report, title: str) -> None:
    """Print the per-class table, the files written and the diagnosis, if any."""
    from rich.markup import escape

    console.print(class_table(report, f"{title}: per class"))
    console.print("written: " + ", ".join(str(p) for p in report.files), highlight=False,
                  soft_wrap=True, markup=False)
    if report.diagnosis:
        err.print(f"[bold yellow]diagnosis:[/] {escape(report.diagnosis)}", highlight=False,
                  soft_wrap=True)
