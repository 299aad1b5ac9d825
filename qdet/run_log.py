"""A run folder a person can read while it trains, and run folders read back for comparison.

After every epoch rank 0 rewrites ``results.csv`` (one row per epoch, from the rows of
``metrics.jsonl``) and sends the rows to a drawing process that renders ``curves.png``
(``qdet.plots``) at low priority: the training loop never waits for a figure nor shares its
interpreter lock with one (matplotlib draws in Python, and the training thread needs the
lock to launch every op), and a figure that fails is a warning, once, never a failed run.
``--tensorboard`` adds TensorBoard scalars (``RUN/tensorboard``) when the package is
installed. ``load_run``, ``run_labels`` and ``compare_runs`` read finished or running
folders for ``qdet plot``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import queue
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .terminal import err

METRICS = "metrics.jsonl"
# results.csv: these first (those a run has), then every per-layer term, then COCO metrics
HEAD = ("epoch", "step", "images", "time", "lr", "loss", "loss_ce", "loss_bbox", "loss_giou",
        "loss_enc")
COCO = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
TERMS = ("ce", "bbox", "giou")
LAYER_TERM = re.compile(r"loss_(ce|bbox|giou)_(\d+|enc)")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def replace_readable(tmp: str, path: Path) -> None:
    """Move a finished temporary file over ``path`` with the permissions of an ordinary
    new file (temporary files are created private)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        replace_readable(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def layer_terms(keys) -> list[str]:
    """The per-layer loss terms among ``keys`` (``loss_ce_0``, ..., ``loss_giou_enc``) in
    layer order, the encoder's last."""
    found = [(m, k) for k in keys if (m := LAYER_TERM.fullmatch(k))]
    order = lambda mk: (mk[0][2] == "enc", int(mk[0][2]) if mk[0][2].isdigit() else 0,  # noqa: E731
                        TERMS.index(mk[0][1]))
    return [k for _, k in sorted(found, key=order)]


def num_layers(rows: list[dict]) -> int:
    """Decoder layers whose terms the rows hold: the aux layers plus the final one."""
    layers = {LAYER_TERM.fullmatch(k)[2] for k in layer_terms(rows[-1])} if rows else set()
    return len(layers - {"enc"}) + 1


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl``; a line cut short by a crash is left out."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def restore_rows(out: Path, epoch: int, last: dict | None) -> list[dict]:
    """The rows of a run continued after ``epoch`` epochs (0: a new run), and
    ``metrics.jsonl`` rewritten to hold exactly them: earlier epochs' lines, then ``last``
    (the resumed checkpoint's own row, which a crash between checkpoint and line would
    lose). Later lines, from epochs the resumed run does again, go."""
    rows = [r for r in read_metrics(out) if r["epoch"] < epoch]
    if last is not None:
        rows.append(last)
    else:
        rows += [r for r in read_metrics(out) if r["epoch"] == epoch][:1]
    if (Path(out) / METRICS).exists():
        write_atomic(Path(out) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def csv_text(rows: list[dict]) -> str:
    """``results.csv`` of ``rows``: one line per epoch; a value a row lacks is empty."""
    keys = set().union(*rows) if rows else set()
    columns = ([c for c in HEAD if c in keys] + layer_terms(keys) +
               [c for c in COCO if c in keys] + [c for c in ("train_seconds",) if c in keys])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else
                         f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]
                         for c in columns])
    return buf.getvalue()


# --------------------------------------------------------------------------- logging


def check_tensorboard() -> None:
    """Raise a one-line error when ``--tensorboard`` cannot work here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install "
                         "'qdet[tensorboard]' (or pip install tensorboard), or drop "
                         "--tensorboard; results.csv and curves.png are written "
                         "either way") from None


def _draw_curves(rows_queue, path: Path, title: str, parent: int) -> None:
    """The drawing process: draws the newest rows it was sent, until it is sent None or its
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it closes us
    try:
        os.nice(10)  # the training process comes first
    except (AttributeError, OSError):
        pass
    from . import plots

    warned, done = False, False
    while not done:
        try:
            items = [rows_queue.get(timeout=2)]
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        try:
            while True:
                items.append(rows_queue.get_nowait())
        except queue.Empty:
            pass
        done = any(i is None for i in items)
        rows = [i for i in items if i is not None]
        if not rows:
            continue
        try:
            plots.curves(rows[-1], path, title)
        except Exception as e:  # noqa: BLE001 - a figure must never stop training
            if not warned:
                warned = True
                _warn(f"{path}", e)


def _warn(what: str, error: BaseException) -> None:
    err.print(f"[yellow]warning:[/] could not write {escape(what)} ({type(error).__name__}: "
              f"{escape(str(error))}); training goes on", highlight=False, soft_wrap=True)


class RunLog:
    """Rank 0's writer of ``results.csv``, ``curves.png`` and TensorBoard scalars.

    ``rows`` are the epochs so far (``restore_rows``); ``add_epoch`` appends one.
    ``close`` waits for the last figure.
    """

    def __init__(self, out: Path, rows: list[dict], title: str, tensorboard: bool = False):
        self.out, self.rows, self.title = Path(out), list(rows), title
        self._warned: set[str] = set()
        self._queue = self._proc = None
        try:  # fork where there is one (as DataLoader workers do): no re-import, instant
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            self._queue = ctx.Queue()
            self._proc = ctx.Process(target=_draw_curves, name="qdet-curves", daemon=True,
                                     args=(self._queue, self.out / "curves.png", title,
                                           os.getpid()))
            self._proc.start()
        except (OSError, ValueError) as e:
            self.warn_once("curves.png", e)
            self._queue = self._proc = None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def warn_once(self, what: str, error: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            _warn(what, error)

    def add_step(self, step: int, loss: float, lr: float) -> None:
        """One optimization step's loss and lr (TensorBoard only; values already on the
        host, so this costs the device nothing)."""
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def add_epoch(self, metrics: dict) -> None:
        """Rewrite results.csv with the new row and have curves.png redrawn."""
        self.rows.append(dict(metrics))
        try:
            write_atomic(self.out / "results.csv", csv_text(self.rows))
        except OSError as e:
            self.warn_once("results.csv", e)
        if self._queue is not None:
            self._queue.put(list(self.rows))  # a feeder thread sends it; never blocks
        if self.tb is not None:
            step = metrics.get("step", metrics["epoch"])
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    group = "val" if k in COCO or k.startswith("AR") else \
                        "loss" if k.startswith("loss") else "run"
                    self.tb.add_scalar(f"{group}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        """Wait (at most two minutes) for the last figure; close TensorBoard."""
        if self._proc is not None:
            self._queue.put(None)
            self._proc.join(timeout=120)
            if self._proc.is_alive():
                self._proc.terminate()
            self._queue.close()
            self._queue.join_thread()
            self._proc = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ----------------------------------------------------------------- reading run folders


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
        raise RunFolderError(f"{path}: no metrics ({METRICS} is missing or empty): the run "
                             "has not finished an epoch yet, or this is not a run folder")
    config = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
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
            raise RunFolderError(f"{rec.path}: no {metric!r} in {METRICS}" + (
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
