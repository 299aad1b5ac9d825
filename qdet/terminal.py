"""Everything qdet prints goes through here: the consoles (results on stdout, messages on
stderr), the progress bar, tables, one-line errors and the ``--device`` option."""
from __future__ import annotations

import math
import warnings
from typing import Annotated, Optional, Sequence

import typer
from rich import box as boxes
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1, every_rank: bool = False):
    """Print ``error: message`` and exit. The message is printed verbatim, never read as
    rich markup: it carries user data ("bbox must be [x, y, width, height], got [nan, ...]").
    Under torchrun only rank 0 prints, since every rank meets the same bad input; an error
    only one rank can see (its peers are gone) passes ``every_rank=True``."""
    quiet = err.quiet
    err.quiet = quiet and not every_rank
    err.print(Text("error: ", style="bold red") + Text(message), highlight=False,
              soft_wrap=True)
    err.quiet = quiet
    raise typer.Exit(code)


def rank_zero_only(rank: int) -> None:
    """Under torchrun every process runs the same code: only rank 0 prints (consoles,
    Python warnings such as the data check's), so each line appears once."""
    console.quiet = err.quiet = rank != 0
    if rank != 0:
        warnings.simplefilter("ignore")


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
    """A right-aligned table of already formatted rows; a cell too wide for a narrow
    terminal folds onto a second line instead of being cut to '…'."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def progress_bar(disable: bool = False) -> Progress:
    """The bar of every long loop (training epochs, evaluation): count, extra info, elapsed
    time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=disable, transient=False)


def download_bar() -> Progress:
    """The bar of a download (on stderr, so that stdout keeps only results): file name,
    bytes done of total, speed and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=False)


def stats_table(stats: dict[str, float], title: str = "COCO bbox") -> Table:
    """The summary COCO metrics of ``stats`` (``qdet.evaluation.coco_stats``) as a table."""
    table = Table(title=title)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        table.add_column(k, justify="right")
    table.add_row(*(f"{stats[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                                 "AR100")))
    return table


# ------------------------------------------------- narrow tables (readable at 80 columns)


def num(x: float | None) -> str:
    """A cost, logit or score in 2-3 significant digits and at most 5 characters:
    -0.95, 5.23, 12.3, 123; ``-`` for None or NaN."""
    if x is None or math.isnan(x):
        return "-"
    a = abs(x)
    s = f"{x:.0f}" if a >= 99.95 else f"{x:.1f}" if a >= 9.995 else f"{x:.2f}"
    return s.lstrip("-") if float(s) == 0 else s       # no "-0.00"


def pct(x: float | None) -> str:
    """A share in whole percent: ``41%``; ``-`` for None or NaN."""
    return "-" if x is None or math.isnan(x) else f"{int(round(100 * x))}%"


def mark(ok: bool, bad_style: str = "red") -> str:
    """A yes/no as one character: a green tick or a cross in ``bad_style``."""
    return "[green]✓[/]" if ok else f"[{bad_style}]✗[/]"


def box_text(values: Sequence[float], decimals: int = 0) -> str:
    """A box on one line, its four numbers separated by spaces: ``12 40 55 80``."""
    return " ".join(f"{v:.{decimals}f}" for v in values)


def narrow_table(caption: str | None = None) -> Table:
    """The compact style of the tables that must read at 80 columns (match-debug, explain,
    predict): no vertical rules, a rule under the header, a left-aligned caption. Their
    titles are printed as a line of their own (:func:`print_table`), so that a long title
    never wraps inside a narrow table."""
    return Table(caption=caption, box=boxes.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 collapse_padding=True, caption_justify="left")


def print_table(out: Console, title: str, table: Table) -> None:
    out.print(f"[bold]{title}[/]", highlight=False)
    out.print(table)


def print_fitting(out: Console, wide: tuple[str, Table],
                  narrow: Sequence[tuple[str, Table]]) -> None:
    """Print the ``(title, table)`` ``wide`` when the console has room for all its columns,
    else the ``narrow`` ones that split the same columns."""
    from rich.measure import Measurement

    unbounded = out.options.update(max_width=100_000)
    if Measurement.get(out, unbounded, wide[1]).maximum <= out.width:
        print_table(out, *wide)
    else:
        for title, table in narrow:
            print_table(out, title, table)


def detections_table(results: list[dict]) -> Table:
    """``qdet predict``'s detections (``qdet.predict.predict_files``), one line each; an
    image's name on its first line only, folded rather than cut when long."""
    from pathlib import Path

    table = narrow_table("boxes: x0 y0 x1 y1 in pixels")
    table.add_column("image", overflow="fold")
    table.add_column("class")
    for col in ("score", "box"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        name = Path(r["image"]).name
        if not r["detections"]:
            table.add_row(name, "-", "-", "-")
        for k, d in enumerate(r["detections"]):
            table.add_row(name if k == 0 else "", d["name"], f"{d['score']:.2f}",
                          box_text(d["box"]))
    return table
