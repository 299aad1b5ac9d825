"""Everything qdet prints goes through here: the consoles (results on stdout, messages on
stderr), the progress bar, tables, one-line errors and the ``--device`` option."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1):
    # the message is plain text: brackets in it (paths, "qdet[extra]") are not markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def pick_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default: CUDA when "
                                               "available, else CPU.")]


def rows_table(title: str, columns, rows) -> Table:
    """A right-aligned table of already formatted rows."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def progress_bar(disable: bool = False) -> Progress:
    """The bar of every long loop (training epochs, evaluation): count, extra info, elapsed
    time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=disable, transient=False)


def stats_table(stats: dict[str, float], title: str = "COCO bbox") -> Table:
    """The summary COCO metrics of ``stats`` (``qdet.evaluation.coco_stats``) as a table."""
    table = Table(title=title)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        table.add_column(k, justify="right")
    table.add_row(*(f"{stats[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                                 "AR100")))
    return table
