"""``qdet plot``: several runs' curves in one figure, and a table of where they ended."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..common.terminal import console, rows_table
from .common import fail


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (runs/ARCH-TIME ...).")],
    x: Annotated[str, typer.Option(help="x axis: epoch, time (wall-clock minutes) or images "
                                   "(training images seen).")] = "epoch",
    metric: Annotated[str, typer.Option(help="AP, AP50, loss, or any other column of the "
                                        "runs' results.csv.")] = "AP",
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("plot.png"),
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as "
                                           "Markdown (for a README).")] = False,
):
    """Overlay runs' curves (labels: each run's architecture and the options in which it
    differs from the other runs of that architecture), then tabulate their last
    evaluation."""
    from ..engine.compare import RunFolderError, compare_runs

    try:
        summary = compare_runs(runs, x, metric, out)
    except RunFolderError as e:
        fail(str(e))
    columns = ("run", "steps", "images", "minutes", "AP", "AP50", "best AP")

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [(s["label"], str(s["steps"]), f"{s['images']:,}", f"{s['minutes']:.1f}",
             num(s["AP"]), num(s["AP50"]), num(s["best_AP"])) for s in summary]
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        console.print(rows_table(f"{metric} against {x}: {out}", columns, rows))
