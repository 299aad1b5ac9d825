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


# options that differ between runs without being a choice of training: the plan a timed run
# made, how it logged, how many processes loaded its data
_NOT_CHOICES = ("time.total_steps", "time.evals", "time.step_seconds", "time.eval_seconds",
                "time.planned_steps", "time.warmup", "tensorboard", "num_workers")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# the training-only switches, said in words by ``switches_text`` rather than as options
_SWITCH_KEYS = ("dn.", "query_groups", "ema.", "accumulate", "loss.mal")


def switches_text(model: dict, train: dict) -> str:
    """The training-only switches a run's config (``config.json``'s ``model`` and ``train``)
    turns on, as a reader says them: ``"DN 5 groups, query groups 3, EMA"``; "" for none."""
    dn, parts = model.get("dn") or {}, []
    if dn.get("groups"):
        parts.append(f"{'contrastive ' * bool(dn.get('contrastive'))}DN {dn['groups']} groups")
    elif dn.get("queries"):
        parts.append(f"{'contrastive ' * bool(dn.get('contrastive'))}DN {dn['queries']} "
                     "queries")
    if model.get("query_groups", 1) > 1:
        parts.append(f"query groups {model['query_groups']}")
    if (model.get("loss") or {}).get("mal"):
        parts.append("MAL")
    if (train.get("ema") or {}).get("enabled"):
        parts.append("EMA")
    if train.get("accumulate", 1) > 1:
        parts.append(f"accumulate {train['accumulate']}")
    return ", ".join(parts)


def run_title(config: dict) -> str:
    """The method of a run as a reader names it (``Deformable DETR (two-stage)``), with its
    switches (``+ DN 5 groups, EMA``)."""
    from ..models.registry import ARCHS, method

    arch, model = config.get("arch", "?"), config.get("model", {})
    title = method(arch).model.title_for(model) if arch in ARCHS else arch
    switches = switches_text(model, config.get("train", {}))
    return f"{title} + {switches}" if switches else title


def run_labels(records: list[RunRecord]) -> list[str]:
    """A legend label per run: its method as a reader names it with its switches, plus the
    other options in which it differs from the runs of the same name (``Conditional DETR
    lr=0.0003``); the folder name where even those agree."""
    flat = [{**_flat(r.config.get("model", {})), **_flat(r.config.get("train", {}))}
            for r in records]
    titles = [run_title(r.config) for r in records]
    labels = []
    for i, rec in enumerate(records):   # options that differ among runs of the same title
        same = [j for j, t in enumerate(titles) if t == titles[i]]
        keys = sorted(k for k in set().union(*(flat[j] for j in same))
                      if k not in _NOT_CHOICES and not k.startswith(_SWITCH_KEYS)
                      and len({repr(flat[j].get(k)) for j in same}) > 1)
        opts = " ".join(f"{k}={_short(flat[i].get(k))}" for k in keys[:4])
        labels.append(f"{titles[i]} {opts}".strip())
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
