"""Everything qdet prints goes through here: the consoles (results on stdout, messages on
stderr), the progress bars and the tables.

rich is imported on first use, not when this module is: training, evaluation and the tools
print through it, and a model built from Python (``qdet.build_model``, ``qdet.load``)
should not pay for a terminal it never uses.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table


class LazyConsole:
    """A ``rich.console.Console`` made on first use; attribute reads and writes (``print``,
    ``quiet``, ``width``, ``status``) go to it."""

    def __init__(self, stderr: bool = False):
        object.__setattr__(self, "_stderr", stderr)
        object.__setattr__(self, "_console", None)

    def get(self) -> "Console":
        if self._console is None:
            import os

            from rich.console import Console

            # made without COLUMNS and LINES, which rich would freeze at the size they say
            # now; afterwards it reads them at every print, as a console made at import did
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            console = Console(stderr=self._stderr, _environ=env)
            console._environ = os.environ
            object.__setattr__(self, "_console", console)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.get(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.get(), name, value)


console = LazyConsole()
err = LazyConsole(stderr=True)


def rank_zero_only(rank: int) -> None:
    """Under torchrun every process runs the same code: only rank 0 prints (consoles,
    Python warnings such as the data check's), so each line appears once."""
    console.quiet = err.quiet = rank != 0
    if rank != 0:
        warnings.simplefilter("ignore")


def rows_table(title: str, columns, rows) -> "Table":
    """A right-aligned table of already formatted rows; a cell too wide for a narrow
    terminal folds onto a second line instead of being cut to '…'."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def progress_bar(disable: bool = False) -> "Progress":
    """The bar of every long loop (training epochs, evaluation): count, extra info, elapsed
    time and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console.get(), disable=disable,
                    transient=False)


def download_bar() -> "Progress":
    """The bar of a download (on stderr, so that stdout keeps only results): file name,
    bytes done of total, speed and ETA."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err.get(), transient=False)


STAT_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def stats_table(stats: dict[str, float], title: str = "COCO bbox") -> "Table":
    """The summary COCO metrics of ``stats`` (``qdet.engine.evaluation.coco_stats``) as a
    table."""
    from rich.table import Table

    table = Table(title=title)
    for k in STAT_COLUMNS:
        table.add_column(k, justify="right")
    table.add_row(*(f"{stats[k]:.3f}" for k in STAT_COLUMNS))
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


def narrow_table(caption: str | None = None) -> "Table":
    """The compact style of the tables that must read at 80 columns (match-debug, explain,
    predict): no vertical rules, a rule under the header, a left-aligned caption. Their
    titles are printed as a line of their own (:func:`print_table`), so that a long title
    never wraps inside a narrow table."""
    from rich import box
    from rich.table import Table

    return Table(caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 collapse_padding=True, caption_justify="left")


def print_table(out, title: str, table: "Table") -> None:
    out.print(f"[bold]{title}[/]", highlight=False)
    out.print(table)


def print_fitting(out, wide: tuple[str, "Table"], narrow: Sequence[tuple[str, "Table"]]) -> None:
    """Print the ``(title, table)`` ``wide`` when the console has room for all its columns,
    else the ``narrow`` ones that split the same columns."""
    from rich.measure import Measurement

    if isinstance(out, LazyConsole):
        out = out.get()
    unbounded = out.options.update(max_width=100_000)
    if Measurement.get(out, unbounded, wide[1]).maximum <= out.width:
        print_table(out, *wide)
    else:
        for title, table in narrow:
            print_table(out, title, table)
