"""Run folders read back and compared (``qdet plot``, :func:`qdet.compare_runs`): their
curves in one figure, and where each ended."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .run_folder import RunFolder, read_metrics


class RunFolderError(ValueError):
    """A folder that ``qdet plot`` cannot read; the message says why and what to pass."""


@dataclass
class RunRecord:
    path: Path
    config: dict     # config.json (arch, model, train, data)
    rows: list[dict]


def load_run(path: str | os.PathLike) -> RunRecord:
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path}: no such run folder; pass folders written by "
                             "`qdet train` (runs/ARCH-TIME)")
    rows = read_metrics(path)
    if not rows:
        raise RunFolderError(f"{path}: no metrics ({RunFolder(path).metrics.name} is missing "
                             "or empty): the run has not finished an epoch yet, or this is "
                             "not a run folder")
    config = RunFolder(path).read_config()
    return RunRecord(path, config, rows)


# options that differ between runs without being a choice (the plan a timed run made)
_NOT_CHOICES = ("time.total_steps", "time.evals", "time.step_seconds", "time.eval_seconds")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_labels(records: list[RunRecord]) -> list[str]:
    """A legend label per run: its architecture, plus the options in which it differs from
    the other runs of the same architecture (``conditional lr=0.0003``); the folder name
    where even those agree."""
    flat = [{**_flat(r.config.get("model", {})), **_flat(r.config.get("train", {}))}
            for r in records]
    archs = [r.config.get("arch", r.path.name) for r in records]
    labels = []
    for i, rec in enumerate(records):
        same = [j for j, a in enumerate(archs) if a == archs[i]]
        keys = sorted(k for k in set().union(*(flat[j] for j in same))
                      if k not in _NOT_CHOICES and len({repr(flat[j].get(k)) for j in same}) > 1)
        opts = " ".join(f"{k}={_short(flat[i].get(k))}" for k in keys[:4])
        label = f"{archs[i]} {opts}".strip()
        labels.append(label)
    return [f"{label} [{rec.path.name}]" if labels.count(label) > 1 else label
            for label, rec in zip(labels, records)]


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


X_AXES = {"epoch": "epoch", "time": "wall time (min)", "images": "training images seen"}


def series(rows: list[dict], x: str, metric: str, batch: int = 0) -> tuple[list, list]:
    """(xs, ys) of ``metric`` against ``x`` over the rows that have it. Rows written before
    runs logged ``time`` and ``images`` fall back to the summed ``train_seconds`` and
    ``steps * batch``."""
    xs, ys, seconds, images = [], [], 0.0, 0
    for row in rows:
        seconds += row.get("train_seconds", 0.0)
        images += row.get("steps", 0) * batch * row.get("world_size", 1)
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        xs.append({"epoch": row["epoch"], "time": row.get("time", seconds) / 60,
                   "images": row.get("images", images)}[x])
        ys.append(value)
    return xs, ys


def compare_runs(paths: list, x: str = "epoch", metric: str = "AP",
                 out: str | os.PathLike = "plot.png") -> list[dict]:
    """Overlay ``metric`` against ``x`` (``epoch``, ``time``, ``images``) of the run folders
    in one figure at ``out``; returns a summary per run (label, steps, images, minutes,
    last and best AP / AP50)."""
    from . import plots

    if x not in X_AXES:
        raise RunFolderError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    records = [load_run(p) for p in paths]
    labels = run_labels(records)
    lines, summary = [], []
    for rec, label in zip(records, labels):
        batch = rec.config.get("train", {}).get("batch_size", 0)
        xs, ys = series(rec.rows, x, metric, batch)
        if not ys:
            raise RunFolderError(f"{rec.path}: no {metric!r} in {RunFolder(rec.path).metrics.name}" + (
                " (the run has no validation data, or has not been evaluated yet)"
                if metric.startswith("A") else f"; its keys: {', '.join(rec.rows[-1])}"))
        lines.append((label, xs, ys))
        evaluated = [r for r in rec.rows if "AP" in r]
        best = max(evaluated, key=lambda r: r["AP"]) if evaluated else {}
        last = evaluated[-1] if evaluated else {}
        minutes = series(rec.rows, "time", "epoch", batch)[0]
        summary.append({"run": str(rec.path), "label": label,
                        "steps": rec.rows[-1].get("step", sum(r.get("steps", 0)
                                                              for r in rec.rows)),
                        "images": series(rec.rows, "images", "epoch", batch)[0][-1],
                        "minutes": minutes[-1], "AP": last.get("AP"), "AP50": last.get("AP50"),
                        "best_AP": best.get("AP")})
    plots.overlay(lines, X_AXES[x], metric, Path(out),
                  f"{metric} against {X_AXES[x].split(' (')[0]}")
    return summary
