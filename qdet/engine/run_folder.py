"""A run folder and the files in it, named in one place.

``qdet train`` writes, in ``runs/ARCH-TIME/`` (or ``--out``): ``config.json`` (arch, model,
train, data, weights), ``metrics.jsonl`` (a JSON line per epoch), ``results.csv`` and
``curves.png`` (rewritten after every epoch), ``last.pt`` / ``best.pt``,
``best_results.json`` (the best epoch's detections), and at the end ``per_class.csv``,
``confusion.png`` and ``pr.png`` for ``best.pt`` (the report ``qdet eval`` writes beside its
results too), plus ``tensorboard/`` with ``--tensorboard``.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..common.files import write_atomic

# results.csv: these first (those a run has), then every per-layer term, then COCO metrics
HEAD = ("epoch", "step", "images", "time", "lr", "loss", "loss_ce", "loss_bbox", "loss_giou",
        "loss_enc", "loss_dn")
COCO = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
TERMS = ("ce", "bbox", "giou")
# a term of one layer: decoder layer i, the encoder, the denoising queries' last layer or
# their layer i (loss_ce_3, loss_giou_enc, loss_bbox_dn, loss_ce_dn_2)
LAYER_TERM = re.compile(r"loss_(ce|bbox|giou)_(\d+|enc|dn|dn_\d+)")
RUNS = Path("runs")


@dataclass(frozen=True)
class RunFolder:
    """The files of a run folder (or of the report ``qdet eval`` writes into any folder)."""
    path: Path

    CHECKPOINTS = ("best.pt", "last.pt")   # the one to predict with first

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    results_csv = property(lambda self: self.path / "results.csv")
    curves = property(lambda self: self.path / "curves.png")
    last = property(lambda self: self.path / "last.pt")
    best = property(lambda self: self.path / "best.pt")
    best_results = property(lambda self: self.path / "best_results.json")
    per_class = property(lambda self: self.path / "per_class.csv")
    confusion = property(lambda self: self.path / "confusion.png")
    pr = property(lambda self: self.path / "pr.png")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def is_run(self) -> bool:
        """Whether ``qdet train`` wrote this folder (its ``config.json``)."""
        return self.config.is_file()

    def checkpoint(self) -> Path | None:
        """The checkpoint to predict or evaluate with: ``best.pt``, else ``last.pt``."""
        return next((self.path / n for n in self.CHECKPOINTS if (self.path / n).is_file()), None)

    def read_config(self) -> dict:
        return json.loads(self.config.read_text()) if self.config.is_file() else {}

    def write_config(self, config: dict) -> None:
        write_atomic(self.config, json.dumps(config, indent=2))

    def append_metrics(self, metrics: dict) -> None:
        """One line in ``metrics.jsonl`` (appended: a crash cuts at most this line short,
        which :func:`read_metrics` leaves out)."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def latest_run(root: Path = RUNS, files: tuple[str, ...] = RunFolder.CHECKPOINTS) -> Path | None:
    """The run folder under ``root`` whose newest checkpoint among ``files`` was written
    last: by ``best.pt`` or ``last.pt`` (people delete the larger ``last.pt`` once a run is
    over), or by ``last.pt`` alone to resume."""
    written = {}
    for name in files:
        for ckpt in Path(root).glob(f"*/{name}"):
            mtime = ckpt.stat().st_mtime
            written[ckpt.parent] = max(written.get(ckpt.parent, mtime), mtime)
    return max(written, key=written.get) if written else None


def claim_folder(root: Path, name: str) -> Path:
    """Create ``root/name`` (else ``name-2``, ``name-3``, ...) and return it: mkdir is atomic,
    so two processes never get the same folder."""
    root.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        folder = root / (name if k == 1 else f"{name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def layer_terms(keys) -> list[str]:
    """The per-layer loss terms among ``keys`` (``loss_ce_0``, ..., ``loss_giou_enc``,
    ``loss_ce_dn_0``, ..., ``loss_ce_dn``) in layer order: the decoder's, the encoder's,
    then the denoising queries'."""
    found = [(m, k) for k in keys if (m := LAYER_TERM.fullmatch(k))]

    def order(mk):
        part = mk[0][2]
        kind = 2 if part.startswith("dn") else 1 if part == "enc" else 0
        layer = int(part.rsplit("_", 1)[-1]) if part[-1].isdigit() else 10**6
        return kind, layer, TERMS.index(mk[0][1])
    return [k for _, k in sorted(found, key=order)]


def num_layers(rows: list[dict]) -> int:
    """Decoder layers whose terms the rows hold: the aux layers plus the final one."""
    layers = {LAYER_TERM.fullmatch(k)[2] for k in layer_terms(rows[-1])} if rows else set()
    return len({p for p in layers if p.isdigit()}) + 1


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl``; a line cut short by a crash is left out."""
    path = RunFolder(run).metrics
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
    if RunFolder(out).metrics.exists():
        write_atomic(RunFolder(out).metrics, "".join(json.dumps(r) + "\n" for r in rows))
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
