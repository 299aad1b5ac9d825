"""Terminal helpers shared by the command-line modules: the consoles, one-line errors, the
``--device`` option, and tables of rows."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
