"""The ``qdet`` command line: thin Typer commands over the Python API, one module per
command group; this module only assembles them (``main`` is the entry point)."""
from __future__ import annotations

import sys

import typer
from rich.table import Table
from rich.text import Text

from ..common.terminal import console, err
from ..models.registry import ARCHS
from .bench import bench_app
from .data import data_app
from .debug import match_debug_cmd
from .evaluate import eval_
from .explain import explain_cmd
from .export import export_cmd
from .plot import plot
from .predict import predict
from .train import train
from .zoo import zoo

app = typer.Typer(
    help="qdet: query-based object detectors (DETR family). Train on the built-in shapes "
         "data or COCO-format JSON, evaluate with COCO AP, predict on images.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown")
app.command()(train)
app.command("eval")(eval_)
app.command()(predict)
app.command("match-debug")(match_debug_cmd)
app.command("explain")(explain_cmd)
app.command("export")(export_cmd)
app.command("zoo")(zoo)
app.add_typer(data_app, name="data")
app.command()(plot)
app.add_typer(bench_app, name="bench")


@app.command()
def archs():
    """List the registered architectures."""
    from ..models.registry import method

    table = Table(title="architectures")
    table.add_column("--arch")
    table.add_column("paper")
    table.add_column("head")
    for name in ARCHS:
        m = method(name)
        table.add_row(name, m.paper, "sigmoid focal" if m.focal else "softmax + no object")
    console.print(table)


@app.callback()
def _setup():
    """Warnings (a dropped box, a left-out class) print as one line, like errors."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        err.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)

    warnings.showwarning = show


def main():
    app(prog_name="qdet")


if __name__ == "__main__":
    sys.exit(main())
